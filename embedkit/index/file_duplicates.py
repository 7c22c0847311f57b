"""Duplicates among image files, with no store and no model: pixels and bytes only.

``embedkit duplicates FOLDER`` for a folder that is not a store (what a perceptual-hash tool
is used for): every file is read once, in extraction's crash-isolated decode worker processes,
for its content hash (byte-identical copies) and its pixel fingerprint (``images.pixelprint``,
decoded with JPEG draft scaling), and ``duplicates.group_duplicates`` groups them with pixel
evidence alone. No network, no torch: a fraction of what extraction costs
(``benchmarks/duplicates.py``: within the time of imagededup's hashes on the same files). What
it cannot see is what only an embedding sees: copies whose pixels changed beyond a small crop
or turn (heavy crops, overlays, re-shoots); a store (``embedkit extract`` first) adds the
embedding to the same rules.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..extraction.pool import Decoded
from ..images.move import MoveReport, PlannedMove, move_files
from ..images.sources import SKIP_KINDS, FoundFile, find_images
from .duplicates import DEFAULT_K, group_duplicates
from .groups import META, DuplicateGroup
from .keep import DEFAULT_KEEP, check_keep_rule
from .lifecycle import Log
from .verify import fingerprints

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FileFacts:
    """What reading one file gave: its content hash, size on disk and full-resolution size."""

    content_hash: str
    size: int
    mtime_ns: int
    width: int
    height: int


@dataclass
class FileDuplicates:
    """Duplicate groups among files, with what could not be compared.

    Attributes:
        groups: largest first; a member's ``id`` is its position in ``files``.
        files: every image file found, in scan order.
        failures: (path, why) for files that could not be read or decoded, and for what the
            scan could not enter; they are in no group.
        skipped: files of walked folders that are not images, by kind
            (``images.sources.SKIP_KINDS``).
    """

    groups: list[DuplicateGroup]
    files: list[FoundFile]
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def _facts(path: str, got: Decoded) -> FileFacts | None:
    """The facts of a file a worker read (its size and time from the file now: the worker
    read those bytes a moment ago)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    assert got.content_hash is not None and got.width is not None and got.height is not None
    return FileFacts(got.content_hash, st.st_size, st.st_mtime_ns, got.width, got.height)


def find_file_duplicates(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    k: int = DEFAULT_K,
    keep: str = DEFAULT_KEEP,
    workers: int | None = None,
    progress: Progress | None = None,
    log: Log | None = None,
) -> FileDuplicates:
    """Exact and near-duplicate groups among image files, compared by their pixels.

    Args:
        sources: folders (walked recursively, hidden entries skipped), image files and
            .txt/.csv list files, as ``embedkit extract`` takes them.
        k: most correlated thumbnails looked up per image (in each of its 8 turns/mirrors).
        keep: how each group's keeper is suggested (``index.keep.KEEP_RULES``).
        workers: decode worker processes (default: one per usable core, at most
            ``verify.MAX_WORKERS``).
        progress: called as ``progress(done, total)`` while files are read.
        log: receives what was skipped or unreadable and how pairs are judged.

    Raises:
        InvalidArgumentError: a source does not exist, or ``keep`` / ``k`` is not valid.
    """
    check_keep_rule(keep)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [os.path.expanduser(os.fspath(s)) for s in sources]  # "~/Pictures" from Python
    skipped: Counter[str] = Counter()
    files, scan_failures = find_images(sources, skipped=skipped)
    failures = [(os.path.join(f.root, f.path), f.detail or f.reason) for f in scan_failures]
    n = len(files)
    facts: list[FileFacts | None] = [None] * n

    def keep_facts(i: int, got: Decoded) -> None:
        facts[i] = _facts(files[i].abspath, got)

    fp = fingerprints(
        [f.abspath for f in files], workers=workers, progress=progress, on_read=keep_facts
    )
    failures += [(files[i].abspath, why) for i, why in sorted(fp.errors.items())]
    if log is not None:
        if skipped:
            kinds = ", ".join(f"{c} {SKIP_KINDS[kind]}" for kind, c in skipped.most_common())
            log(f"skipped (not compared): {kinds}")
        if failures:
            log(f"{len(failures)} files could not be read; they are in no group")
    groups = group_duplicates(
        None,
        np.arange(n, dtype=np.int64),
        [f.content_hash if f is not None else None for f in facts],
        k=k,
        paths=[f.abspath for f in files],
        pixels=fp,
        log=log,
    )
    meta = {
        i: tuple(getattr(f, name) for name in META) for i, f in enumerate(facts) if f is not None
    }
    groups = [g.with_keeper(keep, meta) for g in groups]
    return FileDuplicates(groups, files, failures, skipped)


def move_file_duplicates(result: FileDuplicates, dest: str | os.PathLike[str]) -> MoveReport:
    """Move every group's non-keepers into ``dest`` (never delete), keeping their paths
    relative to the folder they were found in (under that folder's name when there were
    several), and write an undo list there. Files changed since they were read are skipped."""
    several_roots = len({f.root for f in result.files}) > 1
    plan = []
    for g in result.groups:
        for m in g.to_remove:
            f = result.files[m.id]
            rel = f.path
            if several_roots:
                rel = os.path.join(os.path.basename(f.root.rstrip(os.sep)) or "root", rel)
            plan.append(PlannedMove(f.abspath, rel, m.size, m.mtime_ns))
    return move_files(plan, dest)
