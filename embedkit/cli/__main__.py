"""``python -m embedkit.cli``: the same CLI as the ``embedkit`` script."""

from . import main

main()
