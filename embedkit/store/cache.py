"""A memory-mapped copy of a store's live vectors: ``open_store(...).vectors`` without Parquet.

Decoding the embedding column of the Parquet parts (zstd, then a take of the live rows) costs
about 15x an ``np.load`` of the same array. ``STORE/vectors.arrow`` is the live ok vectors as
one uncompressed Arrow IPC file (Feather v2): ``id`` int64 and ``embedding``
fixed_size_list<float32>[dim], in the live view's row order, in a single record batch, so a
reader maps it and hands out a zero-copy, read-only view of the page cache.

It is derived data, never the source of truth (Parquet stays that, and ``export`` reads
Parquet), and never required:

- **Keyed to the manifest.** Its schema metadata records the manifest version and the part file
  names (which carry a random suffix, so a rebuilt store at the same version does not match).
  A reader uses it only when that key equals the committed manifest's, its ids equal the ids
  the reader just read from Parquet, its dim and row count match and it has no null vector;
  otherwise (stale, truncated, garbage, another store's) it is ignored and rebuilt. Bytes
  flipped inside the vector data itself are not detected: checking a checksum would cost a
  full read, which is what the cache avoids (Parquet reads do not verify page checksums
  either).
- **Written by readers, on the first ``open_store`` that misses it.** Not by the writer at
  commit: an extract commits every few thousand images, and rewriting every vector at each
  commit would make a run quadratic in the store size; most commits are never followed by a
  read. The reader that decoded the Parquet vectors anyway writes them once.
- **Atomic.** A temp name unique per process and call (``.vectors.arrow.<uuid>.tmp``,
  which the next writer removes if a reader died mid-write), fsync, ``os.replace``. Readers
  racing each write the same content; the last replace wins and every mapped copy stays valid
  (the old inode lives while mapped).
- **Optional.** Any error writing it (a read-only store, a full disk) is swallowed: the reader
  keeps the vectors it decoded. ``open_store(path, vectors=False)`` never opens or writes it.
- **Invalidated by commits.** ``StoreWriter`` deletes it after publishing every manifest
  (commits and compaction): it would be ignored anyway, this frees its disk space at once.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .._fs import atomic_path

CACHE_FILE = "vectors.arrow"
CACHE_KEY = b"embedkit-vectors-cache"
CACHE_FORMAT = 1


def cache_key(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a cache must have been built from to serve this manifest."""
    return {
        "format": CACHE_FORMAT,
        "version": int(manifest["version"]),
        "parts": [part["file"] for part in manifest["parts"]],
        "dim": int(manifest["metadata"]["dim"]),
    }


def _schema(dim: int, key: dict[str, Any] | None = None) -> pa.Schema:
    md = {CACHE_KEY: json.dumps(key, sort_keys=True).encode()} if key is not None else None
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ],
        metadata=md,
    )


def load_vectors(store: Path, manifest: dict[str, Any], ids: np.ndarray) -> np.ndarray | None:
    """The cached (N, D) float32 vectors (read-only, memory-mapped), or None when there is no
    cache or it does not match this manifest and these live ok ``ids`` exactly."""
    key = cache_key(manifest)
    dim = key["dim"]
    try:
        source = pa.memory_map(str(store / CACHE_FILE), "r")
    except OSError:  # none yet (the usual miss), or unreadable: either way, not used
        return None
    try:
        reader = pa.ipc.open_file(source)
        schema = reader.schema
        found = json.loads((schema.metadata or {}).get(CACHE_KEY, b"null"))
        if found != key or not schema.remove_metadata().equals(_schema(dim)):
            return None
        if reader.num_record_batches != 1:  # ours have exactly one: a view needs one buffer
            return None
        batch = reader.get_batch(0)
        batch.validate()
        if batch.num_rows != len(ids) or batch.column(1).null_count:
            return None
        if not np.array_equal(batch.column(0).to_numpy(), ids):
            return None
        flat = batch.column(1).flatten().to_numpy(zero_copy_only=True)
        return flat.reshape(len(ids), dim)  # read-only: the map is opened read-only
    except (OSError, ValueError, pa.ArrowException):  # truncated, garbage, not Arrow
        return None


def save_vectors(store: Path, manifest: dict[str, Any], ids: np.ndarray, x: np.ndarray) -> bool:
    """Write the cache for this manifest atomically; False (and nothing left) if it cannot."""
    key = cache_key(manifest)
    final = store / CACHE_FILE
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(flat), key["dim"])
    batch = pa.record_batch([pa.array(ids, pa.int64()), emb], schema=_schema(key["dim"], key))
    try:
        with (
            atomic_path(final) as tmp,
            pa.OSFile(str(tmp), "wb") as sink,
            pa.ipc.new_file(sink, batch.schema) as w,
        ):
            w.write_batch(batch)
        return True
    except (OSError, pa.ArrowException):  # read-only store, full disk: the cache is optional
        return False


def drop_vectors(store: Path) -> None:
    """Delete the cache (after a commit it no longer matches; this frees its space now)."""
    with contextlib.suppress(OSError):
        (store / CACHE_FILE).unlink(missing_ok=True)
