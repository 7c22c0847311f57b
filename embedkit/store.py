"""THE Parquet store: its schema, its metadata, atomic commits, and reading it back.

A store is a directory::

    STORE/manifest.json         the committed state; replaced atomically (temp, fsync, rename)
    STORE/parts/part-*.parquet  immutable part files; one not named by the manifest is garbage
    STORE/head.safetensors      the backbone's ImageNet classifier, when it has one
    STORE/.lock                 flock held by the one writer

Every part has the same schema (``store_schema(dim)``). The live view is the last row per
``id`` across parts in manifest order, minus rows whose status is ``deleted``. A reader only
ever opens parts named by a committed manifest, so a crash, ``kill -9`` or full disk while
writing leaves the previous state readable; the next writer deletes the orphans.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import StoreError, StoreLockedError, StoreMismatchError

FORMAT_NAME = "embedkit-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
HEAD_FILE = "head.safetensors"
LOCK_FILE = ".lock"
METADATA_KEY = b"embedkit"
# Compact the live view into one part when a commit leaves more parts than this: reads stay
# a handful of file opens, and superseded rows stop taking disk space.
MAX_PARTS = 64

# File descriptors of held store locks. flock belongs to the open file, which forked children
# share: a child must close these (decode workers do, at start) or it would keep the store
# locked after its parent is killed.
HELD_LOCK_FDS: set[int] = set()

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_DELETED = "deleted"

# Keys of the fingerprint: two stores (or a store and an index/probe) are compatible only when
# all of these are equal.
FINGERPRINT_KEYS = ("model", "weights_sha256", "random_init", "preprocess", "dim", "normalize")


def store_schema(dim: int, metadata: dict[str, Any] | None = None) -> pa.Schema:
    """The one Parquet schema of every part file, for vectors of ``dim`` floats."""
    fields = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("root", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("content_hash", pa.string()),  # sha256 hex of the file bytes
        pa.field("size", pa.int64()),  # bytes
        pa.field("mtime_ns", pa.int64()),  # st_mtime_ns
        pa.field("width", pa.int32()),  # after EXIF orientation
        pa.field("height", pa.int32()),
        pa.field("n_frames", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # ok | failed | deleted
        pa.field("reason", pa.string()),  # images.FAILURE_REASONS when failed
        pa.field("detail", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),  # null unless status == ok
    ]
    md = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata else None
    return pa.schema(fields, metadata=md)


COLUMNS = tuple(store_schema(1).names)


def row_id(root: str, path: str) -> int:
    """Stable int64 id of a file: blake2b-64 of ``root + NUL + path``, top bit cleared.

    Stable across runs and machines for the same root and relative path, and a valid FAISS id.
    """
    digest = hashlib.blake2b(f"{root}\0{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def fingerprint_of(metadata: dict[str, Any]) -> dict[str, Any]:
    """The compatibility fingerprint recorded in a store's metadata."""
    return {k: metadata.get(k) for k in FINGERPRINT_KEYS}


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class Store:
    """The live view of a store.

    Attributes:
        path: the store directory.
        table: every live row (ok and failed), in commit order; without the embedding column
            when the store was opened with ``vectors=False``.
        ids: int64 (N,) ids of the ok rows, aligned with ``vectors``.
        vectors: C-contiguous float32 (N, D) embeddings of the ok rows. With
            ``open_store(..., vectors=False)`` they are read on first access; ``vectors_at``
            reads single rows without loading them all.
        metadata: the store metadata (model, weights, preprocessing, versions, ...).
        version: the manifest version; increases with every commit.
    """

    path: Path
    table: pa.Table
    ids: np.ndarray
    _vectors: np.ndarray | None
    metadata: dict[str, Any]
    version: int
    paths: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    # Where each ok row lives: (part file, row in that part), for reads of a few vectors.
    _where: tuple[list[str], np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _id_order: np.ndarray | None = field(default=None, repr=False)

    @property
    def vectors(self) -> np.ndarray:
        if self._vectors is None:
            self._vectors = self.vectors_at(np.arange(len(self.ids)))
        return self._vectors

    def vectors_at(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 (len(rows), D) vectors of some ok rows, reading only the parts they are in."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._vectors is not None:
            return np.ascontiguousarray(self._vectors[rows])
        assert self._where is not None  # opened with vectors=False
        files, part_of, row_in_part = self._where
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for part in np.unique(part_of[rows]):
            sel = np.nonzero(part_of[rows] == part)[0]
            file = self.path / files[part]
            try:
                col = pq.read_table(file, columns=["embedding"])["embedding"]
            except (OSError, pa.ArrowException) as exc:
                raise StoreError(f"cannot read part {file}: {exc}; the store is damaged") from None
            taken = col.take(pa.array(row_in_part[rows[sel]])).combine_chunks()
            out[sel] = taken.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim)
        return out

    def rows_of_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each id in the ok arrays, -1 for ids not stored (no dict: O(N) int64s)."""
        if self._id_order is None:
            self._id_order = np.argsort(self.ids, kind="stable")
        want = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0:
            return np.full(len(want), -1, dtype=np.int64)
        sorted_ids = self.ids[self._id_order]
        pos = np.clip(np.searchsorted(sorted_ids, want), 0, len(sorted_ids) - 1)
        return np.where(sorted_ids[pos] == want, self._id_order[pos], -1)

    def abspath(self, row: int) -> str:
        return os.path.join(self.roots[row], self.paths[row])

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return fingerprint_of(self.metadata)

    @property
    def abspaths(self) -> list[str]:
        return [os.path.join(r, p) for r, p in zip(self.roots, self.paths, strict=True)]

    @property
    def failed(self) -> pa.Table:
        return self.table.filter(pc.equal(self.table["status"], STATUS_FAILED))

    def __len__(self) -> int:
        return len(self.ids)

    def row_of(self, key: int | str) -> int:
        """Row in the ok arrays for an id, a stored relative path, or an absolute path."""
        if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit()):
            row = int(self.rows_of_ids([int(key)])[0])
            if row >= 0:
                return row
        if isinstance(key, str):
            for n, (root, path) in enumerate(zip(self.roots, self.paths, strict=True)):
                if key == path or key == os.path.join(root, path):
                    return n
            absolute = os.path.abspath(key)
            for n, (root, path) in enumerate(zip(self.roots, self.paths, strict=True)):
                if absolute == os.path.join(root, path):
                    return n
        raise StoreError(f"{key!r} is not an embedded row of store {self.path}")

    def head(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The backbone's ImageNet classifier (weight (C, D), bias (C,)), if it had one."""
        file = self.path / HEAD_FILE
        if not file.exists():
            return None
        from safetensors.numpy import load_file

        tensors = load_file(str(file))
        return tensors["weight"].astype(np.float32), tensors["bias"].astype(np.float32)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The committed manifest of a store directory, or None when there is none yet."""
    file = Path(path) / MANIFEST
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {file}: {exc.strerror}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        raise StoreError(f"{file} is not valid JSON; the store is damaged") from None
    if manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is not an embedkit store (manifest format mismatch)")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by a newer embedkit (format "
            f"{manifest['format_version']}); upgrade embedkit to read it"
        )
    return manifest


_PART, _ROW = "__part", "__row"  # where a row was read from (open_store(vectors=False))


def _read_parts(path: Path, manifest: dict[str, Any], vectors: bool = True) -> pa.Table:
    dim = int(manifest["metadata"]["dim"])
    schema = store_schema(dim)
    if not vectors:
        keep = [f for f in schema if f.name != "embedding"]
        schema = pa.schema(keep + [pa.field(_PART, pa.int32()), pa.field(_ROW, pa.int64())])
    tables = []
    for n, part in enumerate(manifest["parts"]):
        file = path / part["file"]
        names = list(schema.names) if vectors else [f.name for f in keep]
        try:
            t = pq.read_table(file, columns=names)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"cannot read part {file}: {exc}; the store is damaged") from None
        if not vectors:
            t = t.append_column(_PART, pa.array(np.full(t.num_rows, n, dtype=np.int32)))
            t = t.append_column(_ROW, pa.array(np.arange(t.num_rows, dtype=np.int64)))
        tables.append(t.select(list(schema.names)).cast(schema))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def live_rows(table: pa.Table, *, keep_deleted: bool = False) -> pa.Table:
    """Last row per id (later parts win), in first-seen order, without ``deleted`` rows."""
    if table.num_rows == 0:
        return table
    ids = table["id"].to_numpy()
    # np.unique on the reversed ids gives, per id, its last position in the original order.
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)
    last = np.sort(len(ids) - 1 - first_in_reversed)
    live = table.take(pa.array(last))
    if not keep_deleted:
        live = live.filter(pc.not_equal(live["status"], STATUS_DELETED))
    return live


def vectors_of(table: pa.Table, dim: int) -> np.ndarray:
    """Contiguous float32 (N, D) from the embedding column of rows that all have one."""
    if table.num_rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    col = table["embedding"].combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)


def open_store(path: str | os.PathLike[str], *, vectors: bool = True) -> Store:
    """Read the committed live view of a store.

    Args:
        path: the store directory.
        vectors: load every vector now (default). ``False`` reads the other columns only, and
            ``Store.vectors`` / ``Store.vectors_at`` read vectors when asked: what search
            needs for a store whose vectors do not fit in memory.

    Raises:
        StoreError: the directory is not a store, or a part file is damaged.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise StoreError(
            f"store {p} does not exist; create it with `embedkit extract SRC --store {p}`"
        )
    manifest = read_manifest(p)
    if manifest is None:
        raise StoreError(
            f"{p} is not an embedkit store yet (no {MANIFEST}); run `embedkit extract`"
        )
    table = live_rows(_read_parts(p, manifest, vectors))
    ok = table.filter(pc.equal(table["status"], STATUS_OK))
    metadata = manifest["metadata"]
    where = None
    if not vectors:
        files = [part["file"] for part in manifest["parts"]]
        where = (files, ok[_PART].to_numpy(), ok[_ROW].to_numpy())
        table = table.drop_columns([_PART, _ROW])
    return Store(
        path=p,
        table=table,
        ids=ok["id"].to_numpy().astype(np.int64, copy=False),
        _vectors=vectors_of(ok, int(metadata["dim"])) if vectors else None,
        _where=where,
        metadata=metadata,
        version=int(manifest["version"]),
        paths=ok["path"].to_pylist(),
        roots=ok["root"].to_pylist(),
        hashes=ok["content_hash"].to_pylist(),
    )


def export_store(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write the live view (ok and failed rows) to one Parquet file; returns the row count.

    The file has the store schema and metadata, so pandas, duckdb or polars read it directly.
    """
    store = open_store(path)
    table = store.table.cast(store_schema(store.dim, store.metadata))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        _fsync_file(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return table.num_rows


# ---------------------------------------------------------------------------------------------
# Writing


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        _fsync_file(path)


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _disk_error(exc: OSError, what: Path) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(
            f"disk full while writing {what}; the store keeps its last commit, free space and rerun"
        )
    return StoreError(
        f"cannot write {what}: {exc.strerror or exc}; the store keeps its last commit"
    )


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
        self._release_lock()

    def _acquire_lock(self) -> None:
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreLockedError(
                f"store {self.path} is being written by {holder}; wait for it to finish "
                "(a killed writer releases the lock automatically)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._lock_fd = fd
        HELD_LOCK_FDS.add(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            HELD_LOCK_FDS.discard(self._lock_fd)
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
    def version(self) -> int:
        return int(self._manifest["version"]) if self._manifest else 0

    def committed_rows(self) -> pa.Table:
        """The committed live view (ok and failed rows, no tombstones), for planning reruns."""
        if self._manifest is None:
            return self._schema.empty_table()
        return live_rows(_read_parts(self.path, self._manifest))

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
            pa.array(list(roots), pa.string()),
            pa.array(list(paths), pa.string()),
            pa.array(list(content_hash or none), pa.string()),
            pa.array(list(size or none), pa.int64()),
            pa.array(list(mtime_ns or none), pa.int64()),
            pa.array(list(width or none), pa.int32()),
            pa.array(list(height or none), pa.int32()),
            pa.array(list(n_frames or none), pa.int32()),
            status_arr,
            pa.array(list(reason or none), pa.string()),
            pa.array(list(detail or none), pa.string()),
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
            _atomic_write_bytes(self.path / HEAD_FILE, data)
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
            (self.path / part["file"]).unlink(missing_ok=True)

    def _write_part(self, table: pa.Table) -> dict[str, Any]:
        name = f"part-{self.version + 1:08d}-{uuid.uuid4().hex[:12]}.parquet"
        final = self.path / PARTS_DIR / name
        tmp = final.with_name(f".{name}.tmp")
        try:
            # Row groups of ~8k rows keep reads streaming-friendly; zstd shrinks metadata
            # columns a lot and float vectors a little.
            pq.write_table(table, tmp, compression="zstd", row_group_size=8192)
            _fsync_file(tmp)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
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
            _atomic_write_bytes(self.path / MANIFEST, data)
        except OSError as exc:
            raise _disk_error(exc, self.path / MANIFEST) from None
        self._manifest = manifest
