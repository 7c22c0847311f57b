"""The ``embedkit`` command line: a thin layer over the Python API of the same verbs.

Each verb module (extract, maintain, probe, search) registers its verbs on the shared app
when imported.
"""

from __future__ import annotations

from . import extract, finetune, maintain, pipeline, probe, search  # noqa: F401  (registration)
from ._app import app

__all__ = ["app"]
