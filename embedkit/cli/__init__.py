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
from ._kit import leave_after_signal

one_line_summaries(app)

__all__ = ["app", "main"]


def main() -> None:
    """The ``embedkit`` console script and ``python -m embedkit``: ``app`` as its own process.

    A command ended by Ctrl-C or SIGTERM has committed its work and said so when ``app``
    exits 130 / 143; the process then leaves without the interpreter's teardown
    (``_kit.leave_after_signal``). ``app`` itself stays importable and testable in-process.
    """
    try:
        app()
    except SystemExit as exc:
        leave_after_signal(exc.code)
        raise
