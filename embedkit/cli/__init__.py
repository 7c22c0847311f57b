"""The ``embedkit`` command line: a thin layer over the Python API of the same verbs.

Each verb module (extract, maintain, probe, search, serve) registers its verbs on the shared app
when imported.
"""

from __future__ import annotations

from . import (  # noqa: F401  (registration)
    extract,
    finetune,
    maintain,
    pipeline,
    probe,
    search,
    serve,
)
from ._app import app, one_line_summaries

one_line_summaries(app)

__all__ = ["app"]
