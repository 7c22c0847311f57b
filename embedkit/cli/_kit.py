"""Shared pieces of the CLI edge: the console, the error boundary and output formats.

Every command module registers its commands on the one typer app in ``cli.py``. A command
parses its options, makes ONE library call, and renders the result; ``EmbedkitError`` is turned
into one line on stderr and exit code 1 by ``run_command``.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from ..errors import EmbedkitError

# markup=False: what we print is full of user data (paths, labels, error messages) in which Rich
# would take "[2019]" or "[red]" for markup and drop or restyle it. Styling is explicit instead
# (``style=``, ``Text``).
console = Console(stderr=False, highlight=False, markup=False)
err_console = Console(stderr=True, highlight=False, markup=False)

F = TypeVar("F", bound=Callable[..., Any])


class OutputFormat(str, enum.Enum):
    """How a command prints its result."""

    table = "table"
    json = "json"
    csv = "csv"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, systemd, ``docker stop``), raised in the main thread so that it
    unwinds like Ctrl-C: ``finally`` blocks commit what was done and stop the workers."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


# Exit statuses of a process ended by a signal, as shells report them: 128 + the signal number.
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


def leave_after_signal(code: object) -> None:
    """End this process now with ``code`` when it is a signal's status (130 / 143), skipping
    the interpreter's teardown; return otherwise.

    By then the command has committed its work (the library's ``finally`` blocks ran while the
    interrupt unwound) and printed its line. What is left is teardown: ``Py_FinalizeEx``, then
    ``exit()`` running ONNX Runtime's static C++ destructors (its environment and thread pool)
    while an ORT pool thread may still be waiting: no Python frames, ~1.5 s after every Ctrl-C
    here, and the place issue 12 saw hang for good under load (benchmarks/RESULTS.md, "Ctrl-C
    under load"). Nothing in this process needs it: the kernel closes the files, and the store
    lock with them.
    """
    if not isinstance(code, int) or code not in (EXIT_SIGINT, EXIT_SIGTERM):
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def run_command(func: F) -> F:
    """Wrap a command body: typed user errors become one line and exit code 1; Ctrl-C and
    SIGTERM end it with one line and 130 / 143 after the library's cleanup has run."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Signal handlers can only be set from the main thread (tests may call from others).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
        try:
            return func(*args, **kwargs)
        except EmbedkitError as exc:
            err_console.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
            raise typer.Exit(code=1) from None
        except Terminated:
            err_console.print("terminated; committed work is kept, rerun to resume")
            raise typer.Exit(code=EXIT_SIGTERM) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; committed work is kept, rerun to resume")
            raise typer.Exit(code=EXIT_SIGINT) from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """Print JSON to stdout exactly (no rich markup or wrapping), for scripts."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")
    sys.stdout.flush()
