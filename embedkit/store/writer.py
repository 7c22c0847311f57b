"""Writing a store: the one writer's lock, atomic commits, compaction, the saved head.

The format (layout, schema, metadata, live view) is ``store.py``'s; this module only writes
it. A commit writes a new immutable part (temp, fsync, rename), then publishes a new
``manifest.json`` the same way, so a crash, ``kill -9`` or full disk while writing leaves the
previous commit readable; the next writer deletes the orphans. ``STORE/.lock`` is an flock
held by the one writer.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .._fs import (
    acquire_flock,
    atomic_path,
    atomic_write_bytes,
    close_in_children,
    keep_in_children,
)
from ..errors import InvalidArgumentError, StoreError, StoreLockedError, StoreMismatchError
from .cache import drop_vectors
from .read import (
    FINGERPRINT_KEYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEAD_FILE,
    LOCK_FILE,
    MANIFEST,
    PARTS_DIR,
    STATUS_OK,
    _read_parts,
    fingerprint_of,
    live_rows,
    live_table,
    read_manifest,
    storable,
    store_schema,
)

# Compact the live view into one part when a commit leaves more parts than this: reads stay
# a handful of file opens, and superseded rows stop taking disk space.
MAX_PARTS = 64


def _disk_error(exc: OSError, what: Path) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(
            f"disk full while writing {what}; the store keeps its last commit, free space and rerun"
        )
    return StoreError(
        f"cannot write {what}: {exc.strerror or exc}; the store keeps its last commit"
    )


def export_store(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write the live view (ok and failed rows) to one Parquet file; returns the row count.

    The file has the store schema and metadata, so pandas, duckdb or polars read it directly.
    """
    out = Path(out).expanduser()
    if out.is_dir():
        raise InvalidArgumentError(
            f"{out} is a folder; name the file to write, e.g. {out / 'store.parquet'}"
        )
    if not out.parent.is_dir():
        raise InvalidArgumentError(
            f"folder {out.parent} does not exist; create it first or write elsewhere"
        )
    live, metadata = live_table(path)  # Parquet, the source of truth: never the vectors cache
    table = live.cast(store_schema(int(metadata["dim"]), metadata))
    try:
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    except OSError as exc:  # permission, full disk, read-only folder: nothing half-written stays
        raise StoreError(f"cannot write {out}: {exc.strerror or exc}") from None
    return table.num_rows


def describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which fingerprint keys differ, for error messages."""
    diffs = []
    for key in FINGERPRINT_KEYS:
        if old.get(key) != new.get(key):
            a, b = old.get(key), new.get(key)
            if key == "weights_sha256":
                a, b = str(a)[:12], str(b)[:12]
            if key == "preprocess":
                a, b = "…", "different"
            diffs.append(f"{key} {a} (store) vs {b} (now)")
    return "; ".join(diffs)


class StoreWriter:
    """The one writer of a store: takes the lock, buffers rows, commits parts atomically.

    Use as a context manager. ``add(...)`` buffers rows; ``commit()`` writes them as a new
    part and publishes a new manifest. Nothing is visible to readers before ``commit``.
    """

    def __init__(self, path: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata)
        self.dim = int(metadata["dim"])
        self._lock_fd: int | None = None
        self._buffer: list[pa.RecordBatch] = []
        self._schema = store_schema(self.dim, self.metadata)
        self._manifest: dict[str, Any] | None = None
        # While True, compaction leaves the superseded part files on disk until ``close``: a
        # run that reads rows it planned from (extraction.rows.StoredVectors) can still read
        # them. Readers never see them (they are not in the manifest); a writer killed before
        # ``close`` leaves orphans that the next writer's ``open`` removes.
        self.keep_superseded_parts = False
        self._superseded: list[Path] = []

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a directory; choose another --store")
        if self.path.is_dir() and not (self.path / MANIFEST).exists():
            # Files a writer creates before its first commit (a run killed that early).
            ours = (PARTS_DIR, LOCK_FILE, HEAD_FILE)
            stray = [
                p.name
                for p in self.path.iterdir()
                if p.name not in ours and not p.name.endswith(".tmp")
            ]
            if stray:
                raise StoreError(
                    f"{self.path} is a non-empty folder that is not an embedkit store; "
                    "choose a new or empty --store directory"
                )
        try:
            (self.path / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store {self.path}: {exc.strerror}") from None
        self._acquire_lock()
        try:
            self._manifest = read_manifest(self.path)
            if self._manifest is not None:
                old = fingerprint_of(self._manifest["metadata"])
                new = fingerprint_of(self.metadata)
                if old != new:
                    raise StoreMismatchError(
                        f"store {self.path} was made with model {old['model']} "
                        f"({describe_mismatch(old, new)}); extract into a new --store, or use "
                        f"--model {old['model']} with the same weights"
                    )
                # Keep the first creation time; everything else describes the current writer.
                old_md = self._manifest["metadata"]
                self.metadata["created"] = old_md.get("created")
                # Vectors of every runtime ever used stay in the store: keep the list.
                runtimes = set(old_md.get("runtimes") or [old_md.get("runtime")])
                runtimes.add(self.metadata.get("runtime"))
                self.metadata["runtimes"] = sorted(r for r in runtimes if r)
            self._remove_orphans()
        except BaseException:
            self._release_lock()
            raise

    def close(self) -> None:
        for f in self._superseded:
            f.unlink(missing_ok=True)
        self._superseded = []
        self._release_lock()

    def _acquire_lock(self) -> None:
        def busy(holder: str, _timeout: float) -> StoreLockedError:
            return StoreLockedError(
                f"store {self.path} is being written by {holder}; wait for it to finish "
                "(a killed writer releases the lock automatically)"
            )

        fd = acquire_flock(self.path / LOCK_FILE, 0.0, busy)  # one try: writers do not queue
        self._lock_fd = fd
        # flock belongs to the open file, which forked children share: decode workers close
        # it at start, or they would keep the store locked after this process is killed.
        close_in_children(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            keep_in_children(self._lock_fd)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_orphans(self) -> None:
        named = {p["file"] for p in (self._manifest or {}).get("parts", [])}
        for f in (self.path / PARTS_DIR).iterdir():
            if f"{PARTS_DIR}/{f.name}" not in named:
                f.unlink(missing_ok=True)  # a part of a run killed before its commit
        for f in self.path.glob(".*.tmp"):
            f.unlink(missing_ok=True)

    # -- state -----------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any] | None:
        """The last committed manifest (None before the first commit)."""
        return self._manifest

    @property
    def version(self) -> int:
        return int(self._manifest["version"]) if self._manifest else 0

    def committed_rows(self, *, vectors: bool = True) -> pa.Table:
        """The committed live view (ok and failed rows, no tombstones), for planning reruns.

        ``vectors=False`` leaves the embedding column unread (the rest of the row only).
        """
        if self._manifest is None:
            return self._schema.empty_table()
        return live_rows(_read_parts(self.path, self._manifest, vectors))

    @property
    def pending(self) -> int:
        return sum(b.num_rows for b in self._buffer)

    # -- writing ---------------------------------------------------------------------------
    def add(
        self,
        *,
        ids: Sequence[int],
        roots: Sequence[str],
        paths: Sequence[str],
        status: Sequence[str],
        content_hash: Sequence[str | None] | None = None,
        size: Sequence[int | None] | None = None,
        mtime_ns: Sequence[int | None] | None = None,
        width: Sequence[int | None] | None = None,
        height: Sequence[int | None] | None = None,
        n_frames: Sequence[int | None] | None = None,
        reason: Sequence[str | None] | None = None,
        detail: Sequence[str | None] | None = None,
        embedding: np.ndarray | None = None,
    ) -> None:
        """Buffer rows. ``embedding`` is float32 (n, D); its rows are ignored unless status ok."""
        n = len(ids)
        if n == 0:
            return
        none = [None] * n
        status_arr = pa.array(list(status), pa.string())
        ok_mask = np.asarray(pc.equal(status_arr, STATUS_OK).to_numpy(zero_copy_only=False))
        if embedding is None:
            if ok_mask.any():
                raise ValueError("ok rows need an embedding")
            embedding = np.zeros((n, self.dim), np.float32)
        emb = np.ascontiguousarray(embedding, dtype=np.float32)
        if emb.shape != (n, self.dim):
            raise ValueError(f"embedding shape {emb.shape} != ({n}, {self.dim})")
        emb_arr = pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1)), self.dim, mask=pa.array(~ok_mask)
        )
        columns = [
            pa.array(list(ids), pa.int64()),
            pa.array([storable(r) for r in roots], pa.string()),
            pa.array([storable(p) for p in paths], pa.string()),
            pa.array(list(content_hash or none), pa.string()),
            pa.array(list(size or none), pa.int64()),
            pa.array(list(mtime_ns or none), pa.int64()),
            pa.array(list(width or none), pa.int32()),
            pa.array(list(height or none), pa.int32()),
            pa.array(list(n_frames or none), pa.int32()),
            status_arr,
            pa.array(list(reason or none), pa.string()),
            pa.array([None if d is None else storable(d) for d in detail or none], pa.string()),
            emb_arr,
        ]
        self._buffer.append(pa.RecordBatch.from_arrays(columns, schema=self._schema))

    def save_head(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Keep the stripped ImageNet classifier beside the vectors (atomically)."""
        from safetensors.numpy import save

        data = save(
            {
                "weight": np.ascontiguousarray(weight, np.float32),
                "bias": np.ascontiguousarray(bias, np.float32),
            }
        )
        try:
            atomic_write_bytes(self.path / HEAD_FILE, data)
        except OSError as exc:
            raise _disk_error(exc, self.path / HEAD_FILE) from None

    def commit(self) -> int:
        """Write buffered rows as one part and publish a new manifest. Returns the version."""
        if not self._buffer and self._manifest is not None:
            return self.version
        parts = list((self._manifest or {}).get("parts", []))
        if self._buffer:
            parts.append(self._write_part(pa.Table.from_batches(self._buffer, self._schema)))
        self._publish(parts)
        self._buffer = []
        if len(parts) > MAX_PARTS:
            self.compact()
        return self.version

    def compact(self) -> None:
        """Rewrite the live view as a single part; superseded rows and tombstones go away."""
        assert self._manifest is not None and not self._buffer
        old_parts = list(self._manifest["parts"])
        live = live_rows(_read_parts(self.path, self._manifest))
        self._publish([self._write_part(live)])
        for part in old_parts:
            if self.keep_superseded_parts:
                self._superseded.append(self.path / part["file"])
            else:
                (self.path / part["file"]).unlink(missing_ok=True)

    def _write_part(self, table: pa.Table) -> dict[str, Any]:
        name = f"part-{self.version + 1:08d}-{uuid.uuid4().hex[:12]}.parquet"
        final = self.path / PARTS_DIR / name
        try:
            with atomic_path(final) as tmp:
                # Row groups of ~8k rows keep reads streaming-friendly; zstd shrinks metadata
                # columns a lot and float vectors a little.
                pq.write_table(table, tmp, compression="zstd", row_group_size=8192)
        except OSError as exc:
            raise _disk_error(exc, final) from None
        return {"file": f"{PARTS_DIR}/{name}", "rows": table.num_rows}

    def _publish(self, parts: list[dict[str, Any]]) -> None:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        if self.metadata.get("created") is None:  # first commit of a new store
            self.metadata["created"] = now
        self.metadata["updated"] = now
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "version": self.version + 1,
            "parts": parts,
            "metadata": self.metadata,
        }
        data = json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=True).encode()
        try:
            atomic_write_bytes(self.path / MANIFEST, data)
        except OSError as exc:
            raise _disk_error(exc, self.path / MANIFEST) from None
        self._manifest = manifest
        drop_vectors(self.path)  # stale now (readers would ignore it); frees its space
