"""The progress display: a bar on a terminal, plain periodic lines in a log file."""

from __future__ import annotations

import io

import pytest

from embedkit.cli import progress as progress_mod
from embedkit.cli.progress import ExtractProgress


def test_plain_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(float(t) for t in range(0, 1000, 4))  # every call: 4 s later
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    out = io.StringIO()  # not a terminal: a log file
    with ExtractProgress(total=100, stream=out) as bar:
        for done in range(10, 101, 10):
            bar(done, 100)
    lines = out.getvalue().splitlines()
    # 10 updates 4 s apart with a line at most every 10 s, plus the final count
    assert 3 <= len(lines) <= 5, lines
    assert lines[-1].startswith("embedding 100/100 (100%)") and "img/s" in lines[-1]
    assert all("\x1b" not in ln for ln in lines)  # no terminal escapes in a log


def test_disabled_prints_nothing() -> None:
    out = io.StringIO()
    with ExtractProgress(total=10, enabled=False, stream=out) as bar:
        bar(10, 10)
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_that_refreshes_on_its_own() -> None:
    assert progress_mod.REFRESH_PER_SECOND >= 1
    out = io.StringIO()
    out.isatty = lambda: True  # type: ignore[method-assign]
    with ExtractProgress(total=10, stream=out) as bar:
        bar(5, 10)
        assert bar._progress is not None and bar._progress.live.auto_refresh
    assert "5/10" in out.getvalue() or "10" in out.getvalue()
