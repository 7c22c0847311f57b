"""THE Parquet store: its schema, its metadata, and reading it back.

A store is a directory::

    STORE/manifest.json         the committed state; replaced atomically (temp, fsync, rename)
    STORE/parts/part-*.parquet  immutable part files; one not named by the manifest is garbage
    STORE/head.safetensors      the backbone's ImageNet classifier, when it has one
    STORE/.lock                 flock held by the one writer
    STORE/vectors.arrow         derived, optional: the live vectors for memory-mapped reads
                                (``store.cache``; written by readers, deleted by commits)
    STORE/pixels/*.arrow        derived, optional: pixel fingerprints by content hash, for
                                ``duplicates`` (``store.pixels``; written by extraction)

Every part has the same schema (``store_schema(dim)``). The live view is the last row per
``id`` across parts in manifest order, minus rows whose status is ``deleted``. A reader only
ever opens parts named by a committed manifest, so a crash, ``kill -9`` or full disk while
writing leaves the previous state readable. Writing (the lock, atomic commits, compaction) is
``store_writer.StoreWriter``'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import StoreChangedError, StoreError
from . import cache

FORMAT_NAME = "embedkit-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
HEAD_FILE = "head.safetensors"
LOCK_FILE = ".lock"
METADATA_KEY = b"embedkit"

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


def storable(text: str) -> str:
    """``text`` as the store's UTF-8 string columns can hold it.

    Linux file names are bytes: a name that is not valid UTF-8 reaches Python with surrogate
    escapes (PEP 383), which Parquet cannot store. Those bytes are written as ``\\xNN``
    (``bad\\xffname.jpg``): readable, stable across runs, and the same for the scan and the
    store, so reruns still recognise the file. Valid text is returned unchanged.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


def row_id(root: str, path: str) -> int:
    """Stable int64 id of a file: blake2b-64 of ``root + NUL + path``, top bit cleared.

    Stable across runs and machines for the same root and relative path, and a valid FAISS id.
    Takes the names as found or as stored (``storable``): both give the same id.
    """
    key = f"{storable(root)}\0{storable(path)}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
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
        table: every live row (ok and failed), in commit order, without the embedding column
            (the vectors are ``vectors``; ``live_table`` reads the full rows for an export).
        ids: int64 (N,) ids of the ok rows, aligned with ``vectors``.
        vectors: C-contiguous, read-only float32 (N, D) embeddings of the ok rows; usually a
            memory map of ``STORE/vectors.arrow`` (see ``store.cache``), so copy before
            writing into them. With ``open_store(..., vectors=False)`` they are read from
            Parquet on first access; ``vectors_at`` reads single rows without loading them all.
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
    _sorted_ids: np.ndarray | None = field(default=None, repr=False)
    # row_of's lookup tables: id -> row, stored relative path -> row, os.path.join(root, path)
    # -> row, each keeping the first row of a key, as a scan would. Its first lookup is one
    # pass over the rows instead (as cheap as building the tables, without their memory: a
    # search by one stored path of a 10M-row store); the second builds them (a labels CSV:
    # O(N + M), not O(N * M)).
    _by_id: dict[int, int] | None = field(default=None, repr=False)
    _by_path: tuple[dict[str, int], dict[str, int]] | None = field(default=None, repr=False)
    _lookups: int = field(default=0, repr=False)
    # The later commit the vectors are read from once a writer replaced the opened one's parts.
    _later: Store | None = field(default=None, repr=False)

    @property
    def vectors(self) -> np.ndarray:
        if self._vectors is None:  # opened with vectors=False: from Parquet, not the cache
            x = self.vectors_at(np.arange(len(self.ids)))
            x.flags.writeable = False  # as open_store's (usually memory-mapped) vectors
            self._vectors = x
        return self._vectors

    def vectors_at(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 (len(rows), D) vectors of some ok rows, reading only the parts they are in.

        Opened with ``vectors=False``, the store reads the parts of the commit it opened. When
        a writer has since replaced them (a compaction deletes them), the rows are read from
        the current commit, where each must still be an ok row with the same id and content
        hash: the same vector.

        Raises:
            StoreChangedError: the store changed some of these rows since it was opened.
            StoreError: a part of the commit that is still current is damaged.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if self._vectors is not None:
            return np.ascontiguousarray(self._vectors[rows])
        if self._later is None:
            try:
                return self._read_at(rows)
            except StoreError:
                now = read_manifest(self.path)
                if now is None or int(now["version"]) == self.version:
                    raise  # the commit we opened is still the current one: really damaged
                self._later = open_store(self.path, vectors=False)
        return self._later_vectors_at(rows)

    def _read_at(self, rows: np.ndarray) -> np.ndarray:
        assert self._where is not None  # open_store sets it
        files, part_of, row_in_part = self._where
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for part in np.unique(part_of[rows]):
            sel = np.nonzero(part_of[rows] == part)[0]
            file = self.path / files[part]
            try:
                col = read_part(file, ["embedding"])["embedding"]
            except (OSError, pa.ArrowException) as exc:
                raise StoreError(f"cannot read part {file}: {exc}; the store is damaged") from None
            taken = col.take(pa.array(row_in_part[rows[sel]])).combine_chunks()
            out[sel] = taken.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim)
        return out

    def _later_vectors_at(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` from the later commit ``_later``, where they must be the
        same rows (ok, same id, same content hash) made by the same model."""
        later = self._later
        assert later is not None
        at = later.rows_of_ids(self.ids[rows])
        same = at >= 0
        if later.fingerprint == self.fingerprint:
            for n in np.nonzero(same)[0]:
                same[n] = later.hashes[at[n]] == self.hashes[rows[n]]
        else:
            same[:] = False
        if not same.all():
            raise StoreChangedError(
                f"store {self.path} changed since it was opened (version {self.version}, now "
                f"{later.version}): {int((~same).sum())} of the {len(rows)} rows asked for were "
                "replaced or removed; open it again (open_store) to read the current rows"
            )
        return later.vectors_at(at)

    def rows_of_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each id in the ok arrays, -1 for ids not stored (no dict: O(N) int64s)."""
        if self._id_order is None or self._sorted_ids is None:
            self._id_order = np.argsort(self.ids, kind="stable")
            self._sorted_ids = self.ids[self._id_order]
        want = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0:
            return np.full(len(want), -1, dtype=np.int64)
        sorted_ids = self._sorted_ids
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
        """Row in the ok arrays for an id, a stored relative path, or an absolute path.

        An int (or a string of digits) is tried as an id first; a string then as a stored
        path (``storable`` form), relative or ``root/path``, the first such row winning, then
        as ``os.path.abspath`` of it against ``root/path``. The first call is one O(N) pass;
        later calls are O(1) dict lookups (the tables are built on the second).
        """
        self._lookups += 1
        tables = self._lookups > 1
        found: int | None = None
        if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit()):
            found = self._row_of_id(int(key), tables)
        if found is None and isinstance(key, str):
            found = self._row_of_path(storable(key), tables)  # paths are stored in this form
        if found is None:
            raise StoreError(f"{storable(str(key))!r} is not an embedded row of store {self.path}")
        return found

    def _row_of_id(self, key: int, tables: bool) -> int | None:
        if not tables:
            hits = np.flatnonzero(self.ids == key)  # no match for ints outside int64
            return int(hits[0]) if len(hits) else None
        if self._by_id is None:
            # Reversed, so the first row of a repeated id wins, as in rows_of_ids.
            rows = range(len(self.ids) - 1, -1, -1)
            self._by_id = dict(zip(self.ids[::-1].tolist(), rows, strict=True))
        return self._by_id.get(key)

    def _row_of_path(self, key: str, tables: bool) -> int | None:
        absolute = os.path.abspath(key)
        if not tables:
            by_abspath = None
            for n, (root, path) in enumerate(zip(self.roots, self.paths, strict=True)):
                full = os.path.join(root, path)
                if key == path or key == full:
                    return n
                if by_abspath is None and absolute == full:
                    by_abspath = n
            return by_abspath
        if self._by_path is None:
            rel: dict[str, int] = {}
            full_: dict[str, int] = {}
            for n, (root, path) in enumerate(zip(self.roots, self.paths, strict=True)):
                rel.setdefault(path, n)
                full_.setdefault(os.path.join(root, path), n)
            self._by_path = (rel, full_)
        rel, full_ = self._by_path
        hits = [r for r in (rel.get(key), full_.get(key)) if r is not None]
        return min(hits) if hits else full_.get(absolute)

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
PART_COLUMN, ROW_COLUMN = _PART, _ROW  # public names (StoreWriter.committed_rows(vectors=False))


def read_part(file: Path, columns: list[str]) -> pa.Table:
    """Some columns of one part file.

    ``pq.ParquetFile``, not ``pq.read_table``: for one file they read the same, but
    ``read_table`` goes through ``pyarrow.dataset``, whose import cost 0.5-1.4 s of a fresh
    ``duplicates`` on a loaded 2-core machine (150 images; with pandas, which ``pa.array``
    imports anyway when it is installed).
    """
    with pq.ParquetFile(file) as pf:
        return pf.read(columns=columns)


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
            t = read_part(file, names)
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


def live_ok_rows(store: Path, parts: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per part, ``(ids, mask)``: its ids, and which rows are live ``ok`` rows (the last row of
    their id across parts). Reads the id and status columns only."""
    ids, ok = [], []
    for part in parts:
        t = read_part(store / part["file"], ["id", "status"])
        ids.append(t["id"].to_numpy())
        ok.append(pc.equal(t["status"], STATUS_OK).to_numpy(zero_copy_only=False))
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    last = np.zeros(len(all_ids), bool)
    _, first_rev = np.unique(all_ids[::-1], return_index=True)
    last[len(all_ids) - 1 - first_rev] = True
    bounds = np.cumsum([0] + [len(i) for i in ids])
    return [(ids[p], last[bounds[p] : bounds[p + 1]] & ok[p]) for p in range(len(parts))]


def count_live(store: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    """Live ``ok`` rows of a store and its manifest, reading only the id and status columns
    (to choose a backend without loading the vectors)."""
    manifest = read_manifest(Path(store))
    if manifest is None:
        raise StoreError(f"{store} is not an embedkit store (no manifest.json)")
    live = live_ok_rows(Path(store), manifest["parts"])
    return int(sum(int(mask.sum()) for _, mask in live)), manifest


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); float32. What ``normalize: true``
    in a store's metadata means, and how cosine indexes see vectors."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def vectors_of(table: pa.Table, dim: int) -> np.ndarray:
    """Contiguous float32 (N, D) from the embedding column of rows that all have one."""
    if table.num_rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    col = table["embedding"].combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)


def _committed_manifest(p: Path) -> dict[str, Any]:
    if not p.exists():
        raise StoreError(
            f"store {p} does not exist; create it with `embedkit extract SRC --store {p}`"
        )
    manifest = read_manifest(p)
    if manifest is None:
        raise StoreError(
            f"{p} is not an embedkit store yet (no {MANIFEST}); run `embedkit extract`"
        )
    return manifest


def live_table(path: str | os.PathLike[str]) -> tuple[pa.Table, dict[str, Any]]:
    """The live view with every column, embeddings included, from the Parquet parts (what an
    export writes), and the store metadata. Raises like ``open_store``."""
    p = Path(path).expanduser()
    manifest = _committed_manifest(p)
    return live_rows(_read_parts(p, manifest)), manifest["metadata"]


def open_store(path: str | os.PathLike[str], *, vectors: bool = True) -> Store:
    """Read the committed live view of a store.

    Args:
        path: the store directory.
        vectors: load every vector now (default): a memory map of the store's vectors cache
            when it matches the manifest, else decoded from Parquet (and the cache written
            for the next reader, when the directory is writable; see ``store.cache``).
            ``False`` reads the other columns only and never touches the cache;
            ``Store.vectors`` / ``Store.vectors_at`` then read Parquet when asked: what
            search needs for a store whose vectors do not fit in memory.

    Raises:
        StoreError: the directory is not a store, or a part file is damaged.
    """
    p = Path(path).expanduser()
    # A writer may publish a new manifest and delete the parts it replaced (compaction) while
    # we read the previous one: a part that vanished under a superseded manifest is a race,
    # not damage, so read the new commit instead (a few times; a store compacted more often
    # than that under a reader is not realistic).
    for _ in range(_READ_ATTEMPTS - 1):
        manifest = _committed_manifest(p)
        try:
            return _open(p, manifest, vectors)
        except StoreError:
            now = read_manifest(p)
            if now is None or int(now["version"]) == int(manifest["version"]):
                raise  # the same commit: really damaged
    return _open(p, _committed_manifest(p), vectors)


_READ_ATTEMPTS = 5


def _open(p: Path, manifest: dict[str, Any], vectors: bool) -> Store:
    # The other columns always come from Parquet; the vectors are the expensive part.
    table = live_rows(_read_parts(p, manifest, vectors=False))
    ok = table.filter(pc.equal(table["status"], STATUS_OK))
    files = [part["file"] for part in manifest["parts"]]
    store = Store(
        path=p,
        table=table.drop_columns([_PART, _ROW]),
        ids=ok["id"].to_numpy().astype(np.int64, copy=False),
        _vectors=None,
        _where=(files, ok[_PART].to_numpy(), ok[_ROW].to_numpy()),
        metadata=manifest["metadata"],
        version=int(manifest["version"]),
        paths=ok["path"].to_pylist(),
        roots=ok["root"].to_pylist(),
        hashes=ok["content_hash"].to_pylist(),
    )
    if vectors:
        x = cache.load_vectors(p, manifest, store.ids)
        if x is None:
            x = store.vectors_at(np.arange(len(store)))
            if len(x):
                cache.save_vectors(p, manifest, store.ids, x)
            x.flags.writeable = False  # the same contract whether or not it came from the map
        store._vectors = x
    return store
