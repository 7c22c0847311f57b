"""Keeping a store in step with a collection that moved: ``prune`` and ``reroot``.

Both go through the one writer (lock, atomic commit), so a crash leaves the previous commit
readable, and neither re-embeds anything:

- ``prune_store`` writes tombstones for rows whose files are gone (ok and failed rows alike).
  A root folder that is missing as a whole (an unmounted drive, a renamed parent) is left
  alone unless asked: that is far more often a mount problem than a deletion.
- ``reroot_store`` moves rows from one root folder to another (a collection moved or renamed):
  each row gets the id a fresh ``extract`` of the new location computes (ids hash root and
  path), keeps its vector, size, mtime and hash, and the old row is tombstoned. A later
  ``extract NEW`` sees the files as unchanged. Rows whose file is not at the new place (or has
  another size) stay where they are, and are reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..errors import InvalidArgumentError, StoreError
from .read import STATUS_DELETED, STATUS_OK, read_manifest, row_id, vectors_of
from .writer import StoreWriter


@dataclass
class MaintenanceReport:
    """What ``prune_store`` / ``reroot_store`` did (or would do, with ``dry_run``)."""

    changed: list[str] = field(default_factory=list)  # absolute paths pruned / rerooted
    kept: list[tuple[str, str]] = field(default_factory=list)  # (path, why it was left alone)
    dry_run: bool = False
    version: int | None = None  # the store version after the commit

    def to_dict(self) -> dict[str, Any]:
        return {
            "changed": self.changed,
            "kept": [{"path": p, "reason": r} for p, r in self.kept],
            "dry_run": self.dry_run,
            "version": self.version,
        }


def _writer(path: Path) -> StoreWriter:
    manifest = read_manifest(path)
    if manifest is None:
        raise StoreError(f"{path} is not an embedkit store (no manifest.json)")
    return StoreWriter(path, manifest["metadata"])


def prune_store(
    store: str | os.PathLike[str], *, dry_run: bool = False, missing_roots: bool = False
) -> MaintenanceReport:
    """Drop rows whose files no longer exist.

    Args:
        store: the store directory.
        dry_run: report what would be dropped, change nothing.
        missing_roots: also drop the rows of root folders that are missing as a whole.
    """
    path = Path(store).expanduser()
    report = MaintenanceReport(dry_run=dry_run)
    with _writer(path) as w:
        live = w.committed_rows(vectors=False)  # tombstones need no vectors
        roots = live["root"].to_pylist()
        rels = live["path"].to_pylist()
        ids = live["id"].to_pylist()
        root_ok = {r: os.path.isdir(r) for r in set(roots)}
        gone: list[int] = []
        for n, (root, rel) in enumerate(zip(roots, rels, strict=True)):
            full = os.path.join(root, rel)
            if not root_ok[root] and not missing_roots:
                report.kept.append((full, f"root {root} is missing as a whole (--missing-roots)"))
            elif not os.path.lexists(full):
                gone.append(n)
                report.changed.append(full)
        if gone and not dry_run:
            w.add(
                ids=[ids[n] for n in gone],
                roots=[roots[n] for n in gone],
                paths=[rels[n] for n in gone],
                status=[STATUS_DELETED] * len(gone),
            )
            report.version = w.commit()
    return report


def reroot_store(
    store: str | os.PathLike[str],
    old: str | os.PathLike[str],
    new: str | os.PathLike[str],
    *,
    dry_run: bool = False,
) -> MaintenanceReport:
    """Move rows stored under root folder ``old`` (or a folder below it) to ``new``.

    Args:
        store: the store directory.
        old: the folder the files were extracted from (as stored; ``embedkit info`` shows
            roots), or any parent of it.
        new: where that folder is now.
        dry_run: report what would move, change nothing.
    """
    path = Path(store).expanduser()
    old_s = os.path.abspath(os.path.expanduser(os.fspath(old)))
    new_s = os.path.abspath(os.path.expanduser(os.fspath(new)))
    if old_s == new_s:
        raise InvalidArgumentError(f"{old_s} is both the old and the new root; nothing to move")
    if not os.path.isdir(new_s):
        raise InvalidArgumentError(f"{new_s} is not a folder; give the new location of {old_s}")
    report = MaintenanceReport(dry_run=dry_run)
    with _writer(path) as w:
        live = w.committed_rows()
        roots = live["root"].to_pylist()
        if not any(_under(r, old_s) for r in roots):
            known = ", ".join(sorted(set(roots))[:5]) or "none"
            raise InvalidArgumentError(f"no rows are stored under {old_s}; the roots are: {known}")
        moving = [n for n, r in enumerate(roots) if _under(r, old_s)]
        rels = live["path"].to_pylist()
        sizes = live["size"].to_pylist()
        keep_rows, new_roots = [], []
        for n in moving:
            new_root = new_s + roots[n][len(old_s) :]
            target = os.path.join(new_root, rels[n])
            try:
                size_now = os.stat(target).st_size
            except OSError:
                report.kept.append((os.path.join(roots[n], rels[n]), f"not found at {target}"))
                continue
            if sizes[n] is not None and size_now != sizes[n]:
                report.kept.append((target, "size differs from the stored file; re-extract it"))
                continue
            keep_rows.append(n)
            new_roots.append(new_root)
            report.changed.append(target)
        if keep_rows and not dry_run:
            t = live.take(keep_rows)
            ok = np.asarray(pc.equal(t["status"], STATUS_OK).to_numpy(zero_copy_only=False))
            emb = np.zeros((t.num_rows, w.dim), np.float32)
            if ok.any():
                emb[ok] = vectors_of(t.filter(pc.equal(t["status"], STATUS_OK)), w.dim)
            cols = {c: t[c].to_pylist() for c in t.column_names if c != "embedding"}
            w.add(
                ids=[row_id(r, p) for r, p in zip(new_roots, cols["path"], strict=True)],
                roots=new_roots,
                paths=cols["path"],
                status=cols["status"],
                content_hash=cols["content_hash"],
                size=cols["size"],
                mtime_ns=cols["mtime_ns"],
                width=cols["width"],
                height=cols["height"],
                n_frames=cols["n_frames"],
                reason=cols["reason"],
                detail=cols["detail"],
                embedding=emb,
            )
            w.add(
                ids=cols["id"],
                roots=cols["root"],
                paths=cols["path"],
                status=[STATUS_DELETED] * t.num_rows,
            )
            report.version = w.commit()
    return report


def _under(root: str, folder: str) -> bool:
    return root == folder or root.startswith(folder.rstrip(os.sep) + os.sep)
