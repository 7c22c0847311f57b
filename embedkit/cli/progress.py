"""Progress display for long work: rich bars with img/s and ETA, silent when disabled."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} img/s" if speed else "   -- img/s", style="cyan")


class ExtractProgress:
    """A progress bar over files; a no-op when ``enabled`` is False."""

    def __init__(self, total: int, enabled: bool, description: str = "embedding") -> None:
        self.enabled = enabled and total > 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
            disable=not self.enabled,
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> ExtractProgress:
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._progress.stop()

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self._progress.advance(self._task, n)
