"""Shared writer for benchmarks/RESULTS.md: each script owns one delimited section."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the ``<!-- key:begin -->`` ... ``<!-- key:end -->`` section."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"<!-- {key}:begin -->\n## {title}\n\nMeasured {stamp}.\n\n{body}\n<!-- {key}:end -->"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- {key}:begin -->.*?<!-- {key}:end -->", re.S)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    RESULTS.write_text(text, encoding="utf-8")
