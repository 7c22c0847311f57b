"""Move files aside (never delete) and put them back: what ``duplicates --move-to`` does.

A move keeps each file's path relative to its store root under the destination folder, refuses
to overwrite anything, skips a file that changed since it was embedded (size or mtime differ
from the store's record), and appends every move to an undo list (CSV: ``original,moved_to``)
that ``undo_moves`` replays backwards.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError

UNDO_COLUMNS = ("original", "moved_to")


@dataclass(frozen=True)
class PlannedMove:
    """One file to move: where it is, where it goes (relative to the destination), and what the
    store recorded about it (to detect a file changed since)."""

    source: str
    relative: str
    size: int | None = None
    mtime_ns: int | None = None


@dataclass
class MoveReport:
    """What a move did: pairs moved, files skipped with the reason, and the undo list."""

    moved: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    undo_file: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "moved": [{"original": a, "moved_to": b} for a, b in self.moved],
            "skipped": [{"path": a, "reason": b} for a, b in self.skipped],
            "undo_file": self.undo_file,
        }


def move_files(plan: Iterable[PlannedMove], dest: str | os.PathLike[str]) -> MoveReport:
    """Move each planned file under ``dest``, keeping its relative path; never overwrite.

    The undo list ``dest/embedkit-undo-<time>.csv`` is written as moves happen (flushed per
    line), so an interrupted move can still be undone.
    """
    root = Path(dest).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise InvalidArgumentError(f"--move-to {root} exists and is not a folder; name a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot create --move-to folder {root}: {exc.strerror}"
        ) from None
    report = MoveReport()
    undo_path = root / f"embedkit-undo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.csv"
    with open(undo_path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(UNDO_COLUMNS)
        for item in plan:
            reason = _check(item)
            target = root / item.relative.lstrip("/")
            if reason is None and (target.exists() or target.is_symlink()):
                reason = f"{target} already exists (never overwritten)"
            if reason is None:
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(item.source, target)
                except OSError as exc:
                    reason = f"move failed: {exc.strerror or exc}"
            if reason is not None:
                report.skipped.append((item.source, reason))
                continue
            writer.writerow([item.source, str(target)])
            f.flush()
            report.moved.append((item.source, str(target)))
    if report.moved:
        report.undo_file = str(undo_path)
    else:
        undo_path.unlink()
    return report


def _check(item: PlannedMove) -> str | None:
    try:
        st = os.lstat(item.source)
    except FileNotFoundError:
        return "file is gone"
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    if item.size is not None and st.st_size != item.size:
        return "changed since it was embedded (size differs); re-extract first"
    if item.mtime_ns is not None and st.st_mtime_ns != item.mtime_ns:
        return "changed since it was embedded (mtime differs); re-extract first"
    return None


def undo_moves(undo_file: str | os.PathLike[str]) -> MoveReport:
    """Put files moved by ``move_files`` back, newest move first; never overwrite."""
    path = Path(undo_file)
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read undo list {path}: {exc.strerror}") from None
    if set(UNDO_COLUMNS) - columns:
        raise InvalidArgumentError(
            f"{path} is not an embedkit undo list (it needs the columns {', '.join(UNDO_COLUMNS)})"
        )
    report = MoveReport()
    for row in reversed(rows):
        original, moved = row["original"], row["moved_to"]
        if os.path.lexists(original):
            report.skipped.append((moved, f"{original} exists again (never overwritten)"))
        elif not os.path.lexists(moved):
            report.skipped.append((moved, "no longer there"))
        else:
            try:
                Path(original).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(moved, original)
            except OSError as exc:
                report.skipped.append((moved, f"move failed: {exc.strerror or exc}"))
                continue
            report.moved.append((moved, original))
    return report
