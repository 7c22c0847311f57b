"""Pixel fingerprints kept with a store, by content hash: duplicates without decoding again.

Extraction's decode workers compute each image's pixel fingerprint (``images.pixelprint``)
from the image they decoded for the model; ``duplicates`` compares them. Keeping them here
saves decoding every file a second time. ``STORE/pixels/*.arrow`` are Arrow IPC files
(one record batch each): ``content_hash`` (sha256 hex) and the fingerprint's arrays.

Derived data, like ``store.cache``'s vectors, never the source of truth and never required:

- **Keyed by content.** A row says "the file with these bytes has this fingerprint", true
  whatever the manifest, so segments need no invalidation at commits; rows of deleted files
  are dead weight until the next merge (``merge_segments`` keeps only hashes still live).
  The schema metadata records the recipe (``pixelprint.RECIPE``) and the JPEG draft size the
  image was decoded at (the model's: ``Preprocess.draft_size``); a reader asking for another
  key, or finding a damaged file, ignores it and decodes the file instead.
- **Appended, atomically.** Extraction writes one segment per commit (a temp name, fsync,
  ``os.replace``): memory stays bounded by ``commit_every`` fingerprints, and a killed run
  leaves only whole segments. ``duplicates`` writes one for the files it had to decode (a
  store made before fingerprints were kept). A read-only store or a full disk is not an error:
  nothing is written and the next reader decodes again.
- **Merged by the writer.** At the end of an extract run, when there are more than
  ``MERGE_AT`` segments, the writer (holding the store lock) writes their union as one and
  deletes the ones it read; a reader listing them meanwhile ignores a vanished file.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .._fs import atomic_path
from ..images.pixelprint import N_ORIENT, RECIPE, THUMB, VIEWS, PixelPrint, pixel_prints

PIXELS_DIR = "pixels"
SEGMENT_KEY = b"embedkit-pixels"
SEGMENT_FORMAT = 1
MERGE_AT = 16  # segments an extract run leaves before merging them into one
_NV = len(VIEWS)


def segment_key(draft_size: int) -> dict[str, Any]:
    """What a segment must have been made with to serve a store whose model drafts JPEGs to
    ``draft_size``."""
    return {"format": SEGMENT_FORMAT, "recipe": RECIPE, "draft_size": int(draft_size)}


def _schema(key: dict[str, Any] | None = None) -> pa.Schema:
    md = {SEGMENT_KEY: json.dumps(key, sort_keys=True).encode()} if key is not None else None
    return pa.schema(
        [
            pa.field("content_hash", pa.string(), nullable=False),
            pa.field("phash", pa.list_(pa.uint64(), _NV * N_ORIENT), nullable=False),
            pa.field("thumb", pa.list_(pa.float16(), _NV * THUMB * THUMB), nullable=False),
            pa.field("dhash", pa.list_(pa.uint64(), _NV), nullable=False),
        ],
        metadata=md,
    )


def _flat(values: np.ndarray, size: int, typ: pa.DataType) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), typ), size)


def write_segment(store: Path, key: dict[str, Any], prints: dict[str, PixelPrint]) -> bool:
    """Write ``prints`` (content hash -> fingerprint) as one new segment; False (and nothing
    left behind) if the store cannot be written."""
    if not prints:
        return True
    hashes = list(prints)
    ph = np.stack([prints[h].phash for h in hashes]).astype(np.uint64)
    th = np.stack([prints[h].thumb for h in hashes]).astype(np.float16)
    dh = np.stack([prints[h].dhash for h in hashes]).astype(np.uint64)
    return _write(store, key, hashes, ph, th, dh) is not None


def _write(
    store: Path,
    key: dict[str, Any],
    hashes: Sequence[str],
    ph: np.ndarray,
    th: np.ndarray,
    dh: np.ndarray,
) -> Path | None:
    folder = store / PIXELS_DIR
    name = f"{uuid.uuid4().hex}.arrow"
    batch = pa.record_batch(
        [
            pa.array(hashes, pa.string()),
            _flat(ph, _NV * N_ORIENT, pa.uint64()),
            _flat(th, _NV * THUMB * THUMB, pa.float16()),
            _flat(dh, _NV, pa.uint64()),
        ],
        schema=_schema(key),
    )
    try:
        folder.mkdir(exist_ok=True)
        with (
            atomic_path(folder / name) as tmp,
            pa.OSFile(str(tmp), "wb") as sink,
            pa.ipc.new_file(sink, batch.schema) as w,
        ):
            w.write_batch(batch)
        return folder / name
    except (OSError, pa.ArrowException):  # read-only store, full disk: the prints are optional
        return None


def _segments(store: Path) -> list[Path]:
    try:
        return sorted(p for p in (store / PIXELS_DIR).glob("*.arrow") if p.is_file())
    except OSError:
        return []


def _read(path: Path, key: dict[str, Any]) -> pa.RecordBatch | None:
    """The segment's batch, or None when it is gone, damaged or made for another key."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        schema = reader.schema
        if json.loads((schema.metadata or {}).get(SEGMENT_KEY, b"null")) != key:
            return None
        if not schema.remove_metadata().equals(_schema()) or reader.num_record_batches != 1:
            return None
        batch = reader.get_batch(0)
        batch.validate(full=False)
        return batch
    except (OSError, ValueError, pa.ArrowException):  # vanished (merged), truncated, garbage
        return None


class StoredPrints:
    """Fingerprints found in a store for some content hashes (rows aligned with them).

    Attributes:
        found: (N,) bool: the store has this row's fingerprint.
        phash, thumb, dhash: as ``index.verify.Fingerprints`` (zeros where not found).
    """

    def __init__(self, n: int) -> None:
        self.found = np.zeros(n, dtype=bool)
        self.phash = np.zeros((n, _NV, N_ORIENT), dtype=np.uint64)
        self.thumb = np.zeros((n, _NV, THUMB * THUMB), dtype=np.float16)
        self.dhash = np.zeros((n, _NV), dtype=np.uint64)


def read_prints(store: Path, key: dict[str, Any], hashes: Sequence[str | None]) -> StoredPrints:
    """The stored fingerprints of the files with these content hashes (None: no file)."""
    out = StoredPrints(len(hashes))
    want = pa.array([h if h else None for h in hashes], pa.string())
    for path in _segments(store):
        if out.found.all():
            break
        batch = _read(path, key)
        if batch is None or batch.num_rows == 0:
            continue
        at = pc.index_in(want, value_set=batch.column(0))  # null: not in this segment
        take = at.is_valid().to_numpy(zero_copy_only=False) & ~out.found
        if not take.any():
            continue
        rows = np.where(take)[0]
        src = pc.fill_null(at, 0).to_numpy(zero_copy_only=False)[rows].astype(np.int64)
        out.phash[rows] = _column(batch, 1, (_NV, N_ORIENT))[src]
        out.thumb[rows] = _column(batch, 2, (_NV, THUMB * THUMB))[src]
        out.dhash[rows] = _column(batch, 3, (_NV,))[src]
        out.found[rows] = True
    return out


def _column(batch: pa.RecordBatch, i: int, shape: tuple[int, ...]) -> np.ndarray:
    flat = batch.column(i).flatten().to_numpy(zero_copy_only=True)
    return flat.reshape(batch.num_rows, *shape)


class PrintSink:
    """Collects the grey views extraction's decode workers took, and writes their
    fingerprints (hashed all at once) as a segment at each commit."""

    def __init__(self, store: str | os.PathLike[str], draft_size: int) -> None:
        self.store, self.key = Path(store), segment_key(draft_size)
        self.pending: dict[str, np.ndarray] = {}
        self.written = 0

    def add(self, content_hash: str | None, views: np.ndarray | None) -> None:
        if content_hash and views is not None:
            self.pending[content_hash] = views

    def flush(self) -> None:
        if self.pending:
            prints = pixel_prints(np.stack(list(self.pending.values())))
            if write_segment(self.store, self.key, dict(zip(self.pending, prints, strict=True))):
                self.written += 1
        self.pending = {}


def merge_segments(
    store: Path,
    key: dict[str, Any],
    live: Callable[[], Iterable[str | None]],
    *,
    at: int = MERGE_AT,
) -> bool:
    """With more than ``at`` segments: write the fingerprints of the ``live()`` content
    hashes as one segment and delete every segment read (also those made for another key,
    which no reader of this store uses). Only the store's writer calls this. True when
    merged."""
    paths = _segments(store)
    if len(paths) <= at:
        return False
    keep = pa.array(sorted({h for h in live() if h}), pa.string())
    parts = []
    for p in paths:
        batch = _read(p, key)
        if batch is not None and batch.num_rows:
            parts.append(batch.filter(pc.is_in(batch.column(0), value_set=keep)))
    if parts:
        table = pa.Table.from_batches(parts).combine_chunks()
        # first row per hash (equal content gives the same fingerprint anyway)
        hashes = table.column(0).to_pylist()
        first = sorted({h: i for i, h in reversed(list(enumerate(hashes)))}.values())
        table = table.take(pa.array(first, pa.int64()))
        batch = table.to_batches()[0] if table.num_rows else None
        if batch is not None:
            written = _write(
                store,
                key,
                batch.column(0).to_pylist(),
                _column(batch, 1, (_NV, N_ORIENT)),
                _column(batch, 2, (_NV, THUMB * THUMB)),
                _column(batch, 3, (_NV,)),
            )
            if written is None:
                return False  # keep the segments: nothing replaced them
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()
    return True
