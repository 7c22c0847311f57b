"""``python -m embedkit``: the same CLI as the ``embedkit`` script."""

from .cli import main

main()
