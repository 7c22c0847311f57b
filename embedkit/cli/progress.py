"""Progress display for long work: a rich bar with img/s and ETA on a terminal, plain periodic
lines when stderr is a log file or a pipe, nothing when disabled.

The library reports progress through a callback (``done, total``); this module is the CLI's
way of showing it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# A bar is redrawn this often even when no batch finishes (a slow first batch, a big model).
REFRESH_PER_SECOND = 4
# Without a terminal (a log file, `2> log`, systemd, CI): one plain line this often.
PLAIN_EVERY_S = 10.0


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} img/s" if speed else "   -- img/s", style="cyan")


class ExtractProgress:
    """Progress over files; a no-op when ``enabled`` is False.

    Call it as ``progress(done, total)`` (the library's callback), or ``advance(n)``.
    """

    def __init__(
        self,
        total: int = 0,
        enabled: bool = True,
        description: str = "embedding",
        stream: TextIO | None = None,
    ) -> None:
        self.enabled = enabled
        self.total, self.done, self.description = total, 0, description
        self._stream = stream if stream is not None else sys.stderr
        self._console = Console(file=self._stream, markup=False, highlight=False)
        self._tty = self._console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._t0 = time.monotonic()
        self._last_plain = self._t0

    def __enter__(self) -> ExtractProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self.enabled and not self._tty and self.done:
            self._plain_line()  # the final count, also in log files

    def __call__(self, done: int, total: int) -> None:
        self.total = total
        self.advance(done - self.done)

    def advance(self, n: int = 1) -> None:
        if not self.enabled or self.total <= 0:
            self.done += n
            return
        self.done += n
        if self._tty:
            if self._progress is None:
                self._start_bar()
            assert self._progress is not None and self._task is not None
            self._progress.update(self._task, completed=self.done, total=self.total)
        elif time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._plain_line()

    def _start_bar(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
            refresh_per_second=REFRESH_PER_SECOND,
        )
        self._task = self._progress.add_task(self.description, total=self.total)
        self._progress.start()

    def _plain_line(self) -> None:
        now = time.monotonic()
        self._last_plain = now
        elapsed = now - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        line = (
            f"{self.description} {self.done}/{self.total} ({pct:.0f}%), {rate:.1f} img/s, "
            f"elapsed {elapsed:.0f}s" + (f", eta {eta:.0f}s" if eta == eta else "")
        )
        print(line, file=self._stream, flush=True)
