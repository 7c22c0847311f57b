"""The plan of one ``extract`` run against the committed store: which files are unchanged
(same size and mtime), which need decoding, which were deleted, which could not be stat'ed."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa

from ..images.sources import FoundFile
from ..store.read import STATUS_FAILED, row_id

# Failures worth retrying on a rerun even when the file did not change: they depend on the
# environment (permissions, a crashing worker, a file that vanished mid-run), not the bytes.
TRANSIENT_REASONS = frozenset({"permission_denied", "decode_crash", "not_found"})


@dataclass
class Plan:
    todo: list[tuple[FoundFile, os.stat_result]]
    unchanged: int
    deleted_ids: list[int]
    deleted_keys: list[tuple[str, str]]
    failed_stat: list[tuple[FoundFile, str, str]]


def plan_run(
    found: list[FoundFile], walked_roots: set[str], skipped_dirs: list[str], committed: pa.Table
) -> Plan:
    existing: dict[int, tuple[int | None, int | None, str, str | None]] = {}
    if committed.num_rows:
        for i, s, m, st, r in zip(
            committed["id"].to_pylist(),
            committed["size"].to_pylist(),
            committed["mtime_ns"].to_pylist(),
            committed["status"].to_pylist(),
            committed["reason"].to_pylist(),
            strict=True,
        ):
            existing[i] = (s, m, st, r)
    todo: list[tuple[FoundFile, os.stat_result]] = []
    failed_stat: list[tuple[FoundFile, str, str]] = []
    unchanged = 0
    seen: set[int] = set()
    for f in found:
        fid = row_id(f.root, f.path)
        seen.add(fid)
        try:
            st = os.stat(f.abspath)
        except PermissionError:
            failed_stat.append((f, "permission_denied", "cannot stat"))
            continue
        except OSError as exc:
            failed_stat.append((f, "not_found", str(exc.strerror)))
            continue
        old = existing.get(fid)
        if (
            old is not None
            and old[0] == st.st_size
            and old[1] == st.st_mtime_ns
            and not (old[2] == STATUS_FAILED and old[3] in TRANSIENT_REASONS)
        ):
            unchanged += 1
            continue
        todo.append((f, st))
    deleted_ids, deleted_keys = [], []
    if committed.num_rows:
        for i, root, path in zip(
            committed["id"].to_pylist(),
            committed["root"].to_pylist(),
            committed["path"].to_pylist(),
            strict=True,
        ):
            if i in seen or root not in walked_roots:
                continue
            full = os.path.join(root, path)
            if any(full.startswith(d + os.sep) for d in skipped_dirs):
                continue  # under a folder we could not read this time: keep it
            deleted_ids.append(i)
            deleted_keys.append((root, path))
    return Plan(todo, unchanged, deleted_ids, deleted_keys, failed_stat)
