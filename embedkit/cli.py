"""The ``embedkit`` command line: a thin layer over the Python API of the same verbs.

Each ``cli_*`` module registers its verbs on the shared app when imported.
"""

from __future__ import annotations

from . import cli_extract, cli_probe, cli_search  # noqa: F401  (registration)
from .cli_app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
