"""Search past RAM: an IVF-PQ index whose inverted lists live on disk, with exact re-ranking.

For stores whose vectors do not fit in memory (``choose_backend`` says when). The build streams
the store's parts once and never holds more than one row group of vectors:

1. find the live ``ok`` rows from the ``id``/``status`` columns only (last row per id wins);
2. stream their embeddings, part by part, into ``vectors.f32`` (raw float32, L2-normalised for
   cosine; row r of the file is the r-th live vector) and their ids into ``ids.i64``;
3. train the IVF-PQ on a random sample of rows (faiss needs ~39 points per centroid);
4. fill it shard by shard (``shard_rows`` vectors per shard, each an independent in-RAM index
   written to disk: shards could be filled on different machines), then merge the shards'
   lists into one ``lists.ivfdata`` with faiss ``contrib.ondisk.merge_ondisk``
   (``OnDiskInvertedLists``, memory-mapped at search time).

Search probes ``nprobe`` lists, takes ``k * k_factor`` candidates by their PQ codes, and
re-ranks them exactly with their raw vectors, read from the memory-mapped ``vectors.f32``
(only the candidate rows are paged in). Faiss ids are row numbers of that file; results are
store ids (``ids.i64``). The raw copy is a derived artifact: Parquet cannot read one row without
decoding its whole row group (8192 rows), so re-ranking straight from the parts would decode
~2 MB per candidate.

Updates (``update``): when the store gains parts, their live vectors are appended to
``vectors.f32`` / ``ids.i64`` and added to a small in-RAM *delta* IVF-PQ that shares the main
index's trained quantizer and codebooks (``trained.faiss``); rows whose id was deleted or
re-embedded are tombstoned (``dead-*.i64``) and never returned. Search merges both candidate
lists before re-ranking. When the delta or the tombstones pass ``MAX_CHURN`` of the index, or
the store was compacted, ``update`` declines and the caller rebuilds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow.parquet as pq
from faiss.contrib.exhaustive_search import knn_ground_truth
from faiss.contrib.ondisk import merge_ondisk

from .._fs import TMP_SUFFIX, atomic_path, atomic_write_bytes, fsync_dir, fsync_file
from ..errors import IndexStateError, InvalidArgumentError
from ..store.read import fingerprint_of, l2_normalize, live_ok_rows, read_manifest
from .choice import METRICS, Metric, choose_index_key, estimate_memory, ivf_prefix
from .lock import index_lock
from .recall import RECALL_K, RECALL_TARGET, without_own

FORMAT = "embedkit-ondisk-index"
INFO, INDEX, LISTS, TRAINED = "ondisk.json", "index.faiss", "lists.ivfdata", "trained.faiss"
# Updates stop paying off when this share of the rows is in the delta or dead: the delta is
# held in RAM and scanned beside the main lists, and dead rows waste candidate slots.
MAX_CHURN = 0.2
VECTORS, IDS = "vectors.f32", "ids.i64"
# Vectors per shard: 1M x (code + 8-byte id) is ~24 MB of lists at PQ16, and adding 1M vectors
# takes ~10 s per core, so a lost shard is cheap to redo.
SHARD_ROWS = 1_000_000
# Candidates re-ranked per result: PQ codes rank coarsely (faiss IndexRefine uses 1..16).
K_FACTOR = 8
# HNSW coarse quantizer: efSearch must be >= nprobe (it returns at most efSearch lists).
MIN_QUANTIZER_EF = 64
# Reads of an index that a writer keeps replacing: each retry follows a newer ondisk.json.
_LOAD_ATTEMPTS = 20
Backend = Literal["ram", "ondisk"]


def ondisk_key(n: int, dim: int) -> str:
    """IVF-PQ factory key: ``index_choice.ivf_prefix(n)``, 4 dims per PQ byte (<= 64 bytes).

    4 dims per sub-quantizer, not 8: on 1M x 64-d clustered vectors with ~2,400 points per
    cluster (the 10M benchmark's density), PQ8 put only 75% of the true top 10 among 32 x 10
    PQ candidates and PQ16 98.5%, with no slower training or adding once polysemous training is
    off (2 cores). Re-ranking cannot recover neighbours the codes never proposed."""
    prefix, _ = ivf_prefix(n)
    m = min(64, max(1, dim // 4))
    while dim % m:
        m -= 1
    # PQ training needs at least 2**bits points (FAISS refuses fewer: 200 vectors cannot train
    # 256 centroids); tiny stores get smaller codebooks. Exact re-ranking keeps results right.
    bits = 8 if n >= 256 else max(1, int(np.log2(max(n, 2))))
    return f"{prefix},PQ{m}" if bits == 8 else f"{prefix},PQ{m}x{bits}"


def ondisk_ram_bytes(key: str, n: int, dim: int) -> int:
    """Resident bytes of an on-disk index while searching: centroids, HNSW quantizer links,
    PQ codebooks. The lists and raw vectors are memory-mapped (page cache, not counted)."""
    nlist = int(key.split("IVF")[1].split(",")[0].split("_")[0])
    hnsw = nlist * (2 * 32 * 4 + 16) if "_HNSW" in key else 0  # level-0 links + offsets
    return nlist * dim * 4 + hnsw + 256 * dim * 4


def choose_backend(
    n: int, dim: int, max_memory_bytes: int, metric: str = "cosine"
) -> tuple[Backend, str]:
    """``("ram", key)`` when ``index.Index`` fits the budget, else ``("ondisk", key)``.

    The in-RAM path (``open_store`` + ``Index.build``) holds the store's vectors (n*dim*4 bytes)
    on top of the index itself: to build, and to re-rank a compressed index.

    Raises:
        InvalidArgumentError: not even the on-disk index's in-RAM parts fit.
    """
    try:
        key = choose_index_key(n, dim, max_memory_bytes, metric)
        if estimate_memory(key, n, dim) + n * dim * 4 <= max_memory_bytes:
            return "ram", key
    except InvalidArgumentError:
        pass  # nothing fits in RAM: on disk
    key = ondisk_key(n, dim)
    need = ondisk_ram_bytes(key, n, dim)
    if need > max_memory_bytes:
        raise InvalidArgumentError(
            f"even the on-disk index for {n} vectors of dim {dim} needs about {need} bytes of "
            f"RAM ({key}); raise --max-memory"
        )
    return "ondisk", key


@contextlib.contextmanager
def _c_stdout_silenced() -> Iterator[None]:
    """Discard what C code writes to stdout meanwhile: faiss's on-disk lists printf() progress
    lines, which would corrupt ``--json`` output. Python's own stdout is untouched."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)  # what C buffered goes to /dev/null, not to the restored stdout
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


# -- reading the store ---------------------------------------------------------------------------


def _stream_vectors(store: Path, out: Path, metric: str) -> tuple[int, int, dict[str, Any]]:
    """Write the live ok vectors to ``out/vectors.f32`` and ids to ``out/ids.i64``:
    (n, dim, the manifest they came from)."""
    manifest = read_manifest(store)
    if manifest is None:
        raise InvalidArgumentError(f"{store} is not an embedkit store (no manifest.json)")
    dim = int(manifest["metadata"]["dim"])
    parts = manifest["parts"]
    n = 0
    with open(out / VECTORS, "wb") as fv, open(out / IDS, "wb") as fi:
        for part, (_, mask) in zip(parts, live_ok_rows(store, parts), strict=True):
            for ids, x in _live_vectors(store / part["file"], mask, dim, metric):
                fv.write(x.tobytes())
                fi.write(ids.tobytes())
                n += len(x)
    return n, dim, manifest


def _live_vectors(
    file: Path, mask: np.ndarray, dim: int, metric: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, float32 vectors)`` of a part's rows selected by ``mask``, in row order, a
    bounded batch at a time; unit length for cosine (as the index stores them)."""
    start = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=65_536, columns=["id", "embedding"]):
        keep = mask[start : start + batch.num_rows]
        start += batch.num_rows
        if not keep.any():
            continue
        sel = batch.filter(keep)
        x = sel.column(1).flatten().to_numpy(zero_copy_only=False)
        x = np.ascontiguousarray(x.reshape(-1, dim), dtype=np.float32)
        if metric == "cosine":
            x = l2_normalize(x)
        yield sel.column(0).to_numpy().astype(np.int64), x


# -- building ------------------------------------------------------------------------------


def _build_files(
    store: Path,
    out: Path,
    metric: str,
    key: str | None,
    train_size: int | None,
    shard_rows: int,
    seed: int,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Write a new on-disk index's files into the new folder ``out``; returns its info."""
    say = log or (lambda _: None)
    out.mkdir(parents=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    say(f"on-disk index: copying the store's vectors to {out.parent}")
    n, dim, manifest = _stream_vectors(store, out, metric)
    times["stream_s"] = time.perf_counter() - t
    if n == 0:
        raise InvalidArgumentError(f"store {store} has no embedded rows to index")
    key = key or ondisk_key(n, dim)
    if "IVF" not in key or "PQ" not in key:
        raise InvalidArgumentError(f"the on-disk index takes an IVF...,PQ... key, got {key!r}")
    vectors = np.memmap(out / VECTORS, np.float32, "r", shape=(n, dim))
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    index = faiss.index_factory(dim, key, fmetric)
    # extract_index_ivf returns the IndexIVF base class: downcast to reach IndexIVFPQ's flag.
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    nlist = ivf.nlist
    # Polysemous training re-orders the PQ codes for Hamming-filtered search, which we do
    # not use; it was 70% of the training time (25 s of 35 s for 20k x 32-d on 2 cores).
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    size = min(n, train_size or max(39 * nlist, 256 * 39))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size, replace=False)) if size < n else np.arange(n)
    t = time.perf_counter()
    say(f"on-disk index: training {key} on {size:,} of {n:,} vectors")
    index.train(np.ascontiguousarray(vectors[sample]))
    times["train_s"] = time.perf_counter() - t
    trained = out / TRAINED  # kept: updates fill a delta index from it
    faiss.write_index(index, str(trained))
    t = time.perf_counter()
    shards: list[Path] = []
    nshards = math.ceil(n / shard_rows)
    for start in range(0, n, shard_rows):
        stop = min(n, start + shard_rows)
        say(f"on-disk index: adding shard {len(shards) + 1}/{nshards} ({stop:,}/{n:,} vectors)")
        shard = faiss.read_index(str(trained))
        shard.add_with_ids(
            np.ascontiguousarray(vectors[start:stop]), np.arange(start, stop, dtype=np.int64)
        )
        shards.append(out / f"shard-{len(shards):05d}.faiss")
        faiss.write_index(shard, str(shards[-1]))
        del shard
    times["add_s"] = time.perf_counter() - t
    t = time.perf_counter()
    merged = faiss.read_index(str(trained))
    with _c_stdout_silenced():  # OnDiskInvertedLists printf()s "resizing ..." to stdout
        merge_ondisk(merged, [str(s) for s in shards], str(out / LISTS))
        faiss.write_index(merged, str(out / INDEX))
    del merged
    for s in shards:
        s.unlink()
    times["merge_s"] = time.perf_counter() - t
    info = {
        "format": FORMAT,
        "format_version": 1,
        "key": key,
        "metric": metric,
        "n": n,
        "n_main": n,
        "dim": dim,
        "nlist": nlist,
        "train_size": int(size),
        "shards": len(shards),
        "faiss_version": faiss.__version__,
        "source": {
            "fingerprint": fingerprint_of(manifest["metadata"]),
            "store_version": manifest.get("version"),
            "parts": [part["file"] for part in manifest["parts"]],
        },
        "build": {k: round(v, 3) for k, v in times.items()},
        "params": {"nprobe": min(16, nlist), "k_factor": K_FACTOR},
    }
    del vectors
    for name in (VECTORS, IDS, TRAINED, LISTS, INDEX):
        fsync_file(out / name)
    fsync_dir(out)
    return info


# -- the index ---------------------------------------------------------------------------------


class OnDiskIndex:
    """IVF-PQ with on-disk lists + exact re-ranking; build with ``build``, reopen with ``load``."""

    def __init__(self, directory: Path, info: dict[str, Any]) -> None:
        self.directory = directory
        self.info = info
        self.metric: Metric = info["metric"]
        self.dim, self.n = int(info["dim"]), int(info["n"])
        self.params: dict[str, int] = dict(info.get("params") or {})
        # The build's own folder (``g-<token>``); an index from before builds had one keeps
        # its files beside ondisk.json.
        self.data_dir = directory / info["data"] if info.get("data") else directory
        d = self.data_dir
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR  # find lists.ivfdata beside index.faiss
        with _c_stdout_silenced():  # faiss printf()s the list file's new path
            self._index = faiss.read_index(str(d / INDEX), flags)
        self._vectors = np.memmap(d / VECTORS, np.float32, "r", shape=(self.n, self.dim))
        self._ids = np.memmap(d / IDS, np.int64, "r", shape=(self.n,))
        delta = info.get("delta")  # rows added by updates, in RAM
        self._delta = faiss.read_index(str(d / delta)) if delta else None
        self._dead = (
            np.fromfile(d / info["dead"], dtype=np.int64)
            if info.get("dead")
            else np.zeros(0, np.int64)
        )

    @classmethod
    def build(
        cls,
        store: str | os.PathLike[str],
        directory: str | os.PathLike[str],
        *,
        metric: Metric = "cosine",
        key: str | None = None,
        train_size: int | None = None,
        shard_rows: int = SHARD_ROWS,
        seed: int = 0,
        log: Callable[[str], None] | None = None,
    ) -> OnDiskIndex:
        """Build from a store's parts into ``directory`` (replaced atomically when done).

        The files go to a new folder ``directory/g-<token>``; ``directory/ondisk.json``, which
        names it, is replaced last, and older builds' folders are deleted after that. Holds the
        index lock (``index/lock.py``) throughout: concurrent builds run one after the other.

        Args:
            store: the store directory.
            directory: where the index goes (e.g. ``STORE/index-ondisk``).
            metric: ``cosine`` or ``l2``.
            key: an ``IVF...,PQ...`` factory string (default ``ondisk_key(n, dim)``).
            train_size: training sample (default 39 points per centroid, at least 256*39 for
                the PQ codebooks, at most n).
            shard_rows: vectors per shard.
            seed: sampling seed.
            log: receives one line per phase and per shard (a build of 10M takes minutes).
        """
        if metric not in METRICS:
            raise InvalidArgumentError(f"metric {metric!r} is not one of: {', '.join(METRICS)}")
        if shard_rows < 1:
            raise InvalidArgumentError(f"shard_rows must be >= 1, got {shard_rows}")
        final = Path(directory)
        with index_lock(final, log):
            gen = f"g-{secrets.token_hex(6)}"
            try:
                info = _build_files(
                    Path(store), final / gen, metric, key, train_size, shard_rows, seed, log
                )
                info["data"] = gen
                built = cls(final, info)
                (log or (lambda _: None))("on-disk index: measuring recall to choose nprobe")
                built.tune(seed=seed)  # and publishes it: writes ondisk.json naming g-<token>
            except BaseException:
                shutil.rmtree(final / gen, ignore_errors=True)
                if not (final / INFO).exists():
                    with contextlib.suppress(OSError):
                        final.rmdir()  # made for this build, and empty again
                raise
            _remove_all_but(final, {INFO, gen})
        return built

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> OnDiskIndex:
        """Open the index ``directory/ondisk.json`` names.

        Takes no lock: when its files vanish while a writer replaces the index (a rebuild
        deletes the old build's folder, an update the old delta), ``ondisk.json`` has changed
        and is read again. Files already open stay readable after they are deleted (POSIX).
        """
        d = Path(directory)
        for _ in range(_LOAD_ATTEMPTS):
            text = _read_info(d)
            try:
                return cls._load(d, text)
            except IndexStateError:
                if _read_info(d) == text:
                    raise  # nobody replaced it: really missing or damaged
        return cls._load(d, _read_info(d))

    @classmethod
    def _load(cls, d: Path, text: str | None) -> OnDiskIndex:
        try:
            info = json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            info = None
        if not isinstance(info, dict):
            raise IndexStateError(
                f"no readable on-disk index at {d}; build it with OnDiskIndex.build(store, dir)"
            )
        if info.get("format") != FORMAT:
            raise IndexStateError(f"{d} is not an embedkit on-disk index")
        try:
            return cls(d, info)
        except (OSError, RuntimeError, ValueError) as exc:  # a file missing or cut short
            raise IndexStateError(
                f"the on-disk index at {d} is damaged ({exc}); rebuild it with `embedkit index "
                "STORE --rebuild` or OnDiskIndex.build(store, dir)"
            ) from None

    def _reload(self) -> None:
        """Catch up with what another process wrote since this object was loaded."""
        if _read_info(self.directory) != _info_bytes(self.info).decode():
            fresh = type(self).load(self.directory)
            self.__dict__.update(fresh.__dict__)

    def __len__(self) -> int:
        """Searchable vectors (rows of ``vectors`` minus tombstoned ones)."""
        return self.n - len(self._dead)

    def alive_rows(self) -> np.ndarray:
        """Sorted rows of ``vectors`` that are not tombstoned."""
        return np.nonzero(self._alive_mask())[0]

    def _alive_mask(self) -> np.ndarray:
        alive = np.ones(self.n, bool)
        alive[self._dead] = False
        return alive

    @property
    def vectors(self) -> np.ndarray:
        """The indexed vectors (memory-mapped, read-only; L2-normalised for cosine), aligned
        with ``ids``: the store's live order at build time, then rows added by updates.
        Tombstoned rows are still there: ``alive_rows`` says which count."""
        return self._vectors

    @property
    def ids(self) -> np.ndarray:
        """Store ids of ``vectors``' rows (memory-mapped)."""
        return self._ids

    def search(
        self, queries: Any, k: int = 10, *, nprobe: int | None = None, k_factor: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: ``(scores, store ids)``, both (Q, k), like ``Index.search``
        (cosine similarity, or Euclidean distance for l2; id -1 where fewer than k)."""
        if k <= 0:
            raise InvalidArgumentError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidArgumentError(f"queries must have shape (Q, {self.dim}), got {q.shape}")
        if self.metric == "cosine":
            q = l2_normalize(q)
        rows = self._candidates(q, k, nprobe, k_factor)
        scores, rows = self._rerank(q, rows, k)
        ids = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
        if self.metric == "l2":
            scores = np.sqrt(np.maximum(scores, 0), out=scores, where=np.isfinite(scores))
        return scores, ids

    def _candidates(
        self, q: np.ndarray, k: int, nprobe: int | None, k_factor: int | None
    ) -> np.ndarray:
        p = nprobe or self.params["nprobe"]
        fetch = min(self.n, k * (k_factor or self.params["k_factor"]))
        ps = faiss.ParameterSpace()
        found = []
        for index in (self._index, self._delta):
            if index is None:
                continue
            ps.set_index_parameter(index, "nprobe", p)
            if "_HNSW" in self.info["key"]:
                ps.set_index_parameter(index, "quantizer_efSearch", max(p, MIN_QUANTIZER_EF))
            found.append(index.search(q, fetch)[1])
        return np.concatenate(found, axis=1)

    def _rerank(self, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidate rows; keep the best k (score larger = better inside)."""
        valid = rows >= 0
        if len(self._dead):
            valid &= ~np.isin(rows, self._dead)
        uniq = np.unique(rows[valid])
        block = np.asarray(self._vectors[uniq])  # sorted rows: sequential-ish page reads
        cand = (
            block[np.searchsorted(uniq, np.where(valid, rows, uniq[0]))]
            if len(uniq)
            else np.zeros((*rows.shape, self.dim), np.float32)
        )
        if self.metric == "cosine":
            better = np.einsum("qd,qfd->qf", q, cand)
        else:
            better = -((cand - q[:, None, :]) ** 2).sum(-1)
        better[~valid] = -np.inf
        order = np.argsort(-better, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(better, order, 1)
        rows = np.where(np.isfinite(best), np.take_along_axis(rows, order, 1), -1)
        scores = best if self.metric == "cosine" else -best
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            fill = -np.inf if self.metric == "cosine" else np.inf
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=fill)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return scores.astype(np.float32), rows

    def exact(self, queries: np.ndarray, k: int = RECALL_K, block: int = 1_000_000) -> np.ndarray:
        """Exact top-``k`` store ids by a streamed scan of ``vectors.f32`` (ground truth)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.metric == "cosine":
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        fmetric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2

        alive = self._alive_mask()
        order = np.nonzero(alive)[0]  # the scan's row numbers count alive rows only

        def blocks():
            for s in range(0, self.n, block):
                yield np.ascontiguousarray(self._vectors[s : s + block][alive[s : s + block]])

        _, rows = knn_ground_truth(q, blocks(), min(k, len(order)), metric_type=fmetric)
        return np.where(rows >= 0, self._ids[order[np.maximum(rows, 0)]], -1)

    def tune(self, *, queries: np.ndarray | None = None, seed: int = 0) -> float:
        """Pick the smallest nprobe (then a deeper re-rank) reaching recall@10 >= 0.95 on
        ``queries``; saves the choice in ``ondisk.json`` and returns the recall.

        Default queries: 200 stored vectors, each left out of its own results (searched for
        k + 1, itself dropped from both sides): a stored vector always finds itself, which
        would count as one free hit in ten (0.95 on stored queries was 0.75 on fresh ones).
        """
        own: np.ndarray | None = None
        if queries is None:
            rng = np.random.default_rng(seed)
            alive = self.alive_rows()
            rows = np.sort(rng.choice(alive, min(200, len(alive)), replace=False))
            queries = np.asarray(self._vectors[rows])
            own = np.asarray(self._ids[rows])
        k = RECALL_K if own is None else min(RECALL_K + 1, len(self))
        truth = without_own(self.exact(queries, k), own, RECALL_K)
        nlist = int(self.info["nlist"])
        # Per nprobe, a shallow then a deep re-rank: more lists cannot help when the true
        # neighbours are in the probed lists but ranked past k * k_factor by their PQ codes
        # (the 10M benchmark: recall flat from nprobe 4 to 64 at a fixed k_factor).
        ladder = [
            {"nprobe": p, "k_factor": f}
            for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
            if p < nlist
            for f in (K_FACTOR, 4 * K_FACTOR)
        ]
        ladder += [
            {"nprobe": min(nlist, 1024), "k_factor": 4 * K_FACTOR},
            {"nprobe": min(nlist, 1024), "k_factor": 16 * K_FACTOR},
        ]
        recall = 0.0
        for params in ladder:
            self.params = params
            found = without_own(self.search(queries, k)[1], own, RECALL_K)
            recall = recall_at_k(found, truth)
            if recall >= RECALL_TARGET:
                break
        self.info.update(
            params=self.params, recall_at_10=round(recall, 4), recall_sample=len(queries)
        )
        self.save_info()
        return recall

    def update(self, store: str | os.PathLike[str]) -> str | None:
        """Bring the index to the store's current version without a rebuild.

        New parts' live vectors are appended and added to the delta index; rows whose id is
        no longer live in an indexed part are tombstoned. Returns None when updated, or why
        an update cannot do it (the caller rebuilds): another model, a compacted store (its
        indexed parts are gone), or more than ``MAX_CHURN`` of the rows added or dead.
        """
        with index_lock(self.directory):
            self._reload()  # another process may have updated or rebuilt it meanwhile
            return self._update(Path(store))

    def _update(self, path: Path) -> str | None:
        manifest = read_manifest(path)
        if manifest is None:
            raise InvalidArgumentError(f"{path} is not an embedkit store (no manifest.json)")
        source = self.info.get("source") or {}
        if source.get("fingerprint") != fingerprint_of(manifest["metadata"]):
            return "the store's model changed"
        parts = manifest["parts"]
        indexed = set(source.get("parts") or ())
        files = [part["file"] for part in parts]
        if not indexed or not (self.data_dir / TRAINED).exists():
            return "the index was built by an older embedkit that did not keep what updates need"
        if not indexed <= set(files):
            return "the store was compacted since the build"
        live_old, new_parts = [], []
        for part, (part_ids, mask) in zip(parts, live_ok_rows(path, parts), strict=True):
            if part["file"] in indexed:
                live_old.append(part_ids[mask])
            elif mask.any():
                new_parts.append((part, mask))
        keep = np.concatenate(live_old) if live_old else np.zeros(0, np.int64)
        ids = np.asarray(self._ids)
        dead = np.union1d(self._dead, np.nonzero(~np.isin(ids, keep))[0]).astype(np.int64)
        added = int(sum(int(m.sum()) for _, m in new_parts))
        n_main = int(self.info.get("n_main", self.n))
        if (self.n - n_main) + added + len(dead) > MAX_CHURN * max(n_main, 1):
            return (
                f"{added} new and {len(dead)} removed rows since the build exceed "
                f"{MAX_CHURN:.0%} of the index"
            )
        version = int(manifest["version"])
        d = self.data_dir
        for leftover in d.glob(f".*{TMP_SUFFIX}"):  # temp files of a killed update
            leftover.unlink(missing_ok=True)
        # Rows past info["n"] are left over from an interrupted update: drop them first.
        for name, width in ((VECTORS, 4 * self.dim), (IDS, 8)):
            os.truncate(d / name, self.n * width)
        delta = self._delta if self._delta is not None else faiss.read_index(str(d / TRAINED))
        row = self.n
        with open(d / VECTORS, "ab") as fv, open(d / IDS, "ab") as fi:
            for part, mask in new_parts:
                for ids_new, x in _live_vectors(path / part["file"], mask, self.dim, self.metric):
                    fv.write(x.tobytes())
                    fi.write(ids_new.tobytes())
                    delta.add_with_ids(x, np.arange(row, row + len(x), dtype=np.int64))
                    row += len(x)
            for f in (fv, fi):
                f.flush()
                os.fsync(f.fileno())
        # New delta and tombstone files under new names, then the info that points to them:
        # a crash before the info is written leaves the previous state intact.
        old: list[str | None] = [self.info.get("delta"), self.info.get("dead")]
        delta_name, dead_name = f"delta-{version}.faiss", f"dead-{version}.i64"
        with atomic_path(d / delta_name) as tmp:
            faiss.write_index(delta, str(tmp))
        with atomic_path(d / dead_name) as tmp:
            dead.tofile(tmp)
        self.info.update(n=row, delta=delta_name, dead=dead_name)
        self.info["source"] = {**source, "store_version": version, "parts": files}
        self.save_info()
        for stale in old:
            if stale and stale not in (delta_name, dead_name):
                (d / stale).unlink(missing_ok=True)
        self.n, self._delta, self._dead = row, delta, dead
        self._vectors = np.memmap(d / VECTORS, np.float32, "r", shape=(self.n, self.dim))
        self._ids = np.memmap(d / IDS, np.int64, "r", shape=(self.n,))
        return None

    def save_info(self) -> None:
        """Write ``info`` (with the caller's additions, e.g. ``source``) to ``ondisk.json``
        atomically, under the index lock."""
        with index_lock(self.directory):
            atomic_write_bytes(self.directory / INFO, _info_bytes(self.info))

    def search_threshold(
        self, queries: Any, threshold: float
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every result within ``threshold`` per query, like ``Index.search_threshold``:
        similarity >= threshold (cosine) or distance <= threshold (l2), best first."""
        q = np.asarray(queries, dtype=np.float32)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for row in q:
            k = min(64, max(self.n, 1))
            while True:
                scores, ids = self.search(row[None], k)
                s, i = scores[0], ids[0]
                within = (s >= threshold) if self.metric == "cosine" else (s <= threshold)
                within &= i >= 0
                # Done when the worst of the k is already outside, or everything was returned.
                if not within[-1] or k >= self.n:
                    break
                k = min(k * 4, self.n)
            out.append((s[within], i[within]))
        return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k ids that were found (no tie handling: for distinct vectors)."""
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(int((truth >= 0).sum()), 1)


def _info_bytes(info: dict[str, Any]) -> bytes:
    return json.dumps(info, indent=1, default=str).encode()


def _read_info(d: Path) -> str | None:
    """``ondisk.json``'s text, or None when there is none (or it cannot be read as text)."""
    try:
        return (d / INFO).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _remove_all_but(directory: Path, keep: set[str]) -> None:
    """Delete what older builds (and killed ones) left in ``directory``: after a rebuild, its
    old folder; for an index from before builds had folders, its loose files."""
    for p in directory.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    fsync_dir(directory)
