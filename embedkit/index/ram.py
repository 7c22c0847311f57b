"""A FAISS index over store vectors: build / add / remove / search, save / load.

The index type is a FAISS factory string chosen by ``index_choice.choose_index_key`` (pure,
tested); compressed keys (SQ8, PQ) re-rank their candidates exactly with the raw vectors. Build
tunes the search parameters to a recall target measured against exact search (``recall.py``).

Results are always store ids: vectors go in with ``add_with_ids``, so row order never matters.
Inverted files keep ids in their lists natively; every other type is wrapped in an
``IndexIDMap2`` (not around an IVF: its ``remove_ids`` assumes the inner index renumbers, which
IVF does not). Cosine is inner product on L2-normalised vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .._fs import TMP_SUFFIX, atomic_path, atomic_write_bytes
from ..errors import IndexStateError, InvalidArgumentError
from ..store.read import l2_normalize
from .choice import DEFAULT_MAX_MEMORY, Metric, check_metric, choose_index_key
from .lock import index_lock
from .recall import RECALL_K, TUNE_TARGET, exact_topk, recall_with_ties, without_own

INFO = "index.json"
# Reads of an index that a writer keeps replacing: each retry follows a newer index.json.
_LOAD_ATTEMPTS = 20


def _is_compressed(key: str) -> bool:
    return key.endswith("SQ8") or "PQ" in key


def _as_vectors(vectors: Any, dim: int | None = None) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(N, {dim})" if dim else "(N, D)"
        raise InvalidArgumentError(f"vectors must have shape {want}, got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InvalidArgumentError("vectors contain NaN or infinite values")
    return x


def _as_ids(ids: Any, n: int) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(ids), dtype=np.int64)
    if a.shape != (n,):
        raise InvalidArgumentError(f"expected {n} ids, got shape {a.shape}")
    if (a < 0).any():
        raise InvalidArgumentError("ids must be >= 0 (FAISS reserves -1 for 'no result')")
    if len(np.unique(a)) != n:
        raise InvalidArgumentError("ids must be unique")
    return a


def _missing_score(metric: str) -> float:
    return -math.inf if metric == "cosine" else math.inf


@dataclass
class _Exact:
    """Raw vectors for exact re-ranking, looked up by id (sorted ids + matching rows)."""

    ids: np.ndarray
    vectors: np.ndarray

    @classmethod
    def of(cls, vectors: np.ndarray, ids: np.ndarray) -> _Exact:
        order = np.argsort(ids, kind="stable")
        return cls(ids[order], vectors[order])

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row per id (clipped) and whether each id is present."""
        pos = np.clip(np.searchsorted(self.ids, ids), 0, max(len(self.ids) - 1, 0))
        found = (self.ids[pos] == ids) if len(self.ids) else np.zeros(ids.shape, bool)
        return pos, found


class Index:
    """A FAISS index whose results are store ids.

    Build with ``Index.build``, reopen with ``Index.load``. ``info`` holds the metadata saved
    beside the index (key, metric, n, dim, tuned search parameters, recall@10, build time,
    size); ``info["source"]`` and ``tags`` (named arrays) are the caller's, saved alongside.
    """

    def __init__(self, faiss_index: faiss.Index, key: str, metric: Metric) -> None:
        self._index = faiss_index
        self.key = key
        self.metric: Metric = metric
        self.dim = int(faiss_index.d)
        self.params: dict[str, int] = {}
        # Ids removed from an index that cannot remove (HNSW); filtered out of every search.
        self._tombstones = np.zeros(0, dtype=np.int64)
        self._live = np.zeros(0, dtype=np.int64)  # sorted live ids
        self._exact: _Exact | None = None
        self._selector_refs: tuple[Any, ...] = ()
        self.info: dict[str, Any] = {}
        # The caller's arrays saved with the index (the store keeps content hashes per id).
        self.tags: dict[str, np.ndarray] = {}

    # -- building ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        vectors: Any,
        ids: Any,
        key: str | None = None,
        metric: Metric = "cosine",
        max_memory: int = DEFAULT_MAX_MEMORY,
        *,
        seed: int = 0,
    ) -> Index:
        """Build, tune efSearch/nprobe to recall@10 >= 0.95, and measure recall on a sample.

        Args:
            vectors: float (N, D) array.
            ids: int64 (N,) store ids, unique and >= 0.
            key: a FAISS factory string; chosen by ``choose_index_key`` when None.
            metric: ``cosine`` (unit vectors, inner product) or ``l2``.
            max_memory: memory budget in bytes for the automatic key.
            seed: seed of the recall samples.
        """
        check_metric(metric)
        x = _as_vectors(vectors)
        id_arr = _as_ids(ids, len(x))
        n, dim = x.shape
        if n == 0:
            raise InvalidArgumentError("cannot build an index from 0 vectors")
        chosen = key or choose_index_key(n, dim, max_memory, metric)
        start = time.perf_counter()
        fmetric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        try:
            inner = faiss.index_factory(dim, chosen, fmetric)
        except RuntimeError as exc:
            raise InvalidArgumentError(
                f"{chosen!r} is not a valid FAISS factory string for dim {dim}: "
                f"{str(exc).splitlines()[-1]}"
            ) from None
        xs = l2_normalize(x) if metric == "cosine" else x
        if not inner.is_trained:
            inner.train(xs)
        index = cls(_with_ids(inner), chosen, metric)
        index._index.add_with_ids(xs, id_arr)
        index._live = np.sort(id_arr)
        if _is_compressed(chosen):
            index._exact = _Exact.of(xs, id_arr)
        index.info = {
            "key": chosen,
            "key_chosen": "auto" if key is None else "given",
            "metric": metric,
            "dim": dim,
            "build_seconds": 0.0,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "faiss_version": faiss.__version__,
            "source": {},
        }
        index.tune(xs, id_arr, seed=seed)
        index.info["build_seconds"] = round(time.perf_counter() - start, 3)
        return index

    def tune(self, vectors: np.ndarray, ids: np.ndarray, *, seed: int = 0) -> float:
        """Pick the cheapest efSearch / nprobe / re-rank depth reaching ``TUNE_TARGET`` on
        one sample of ``vectors``, then measure recall@10 on another; returns that recall.

        The queries are stored vectors, so each one's own row is left out of both the exact and
        the approximate top 10: finding itself is free and would flatter the recall.
        """
        rng = np.random.default_rng(seed)
        n = len(vectors)
        order = rng.permutation(n)
        tune_rows, eval_rows = order[:500], order[500:1500]
        if len(eval_rows) < 100:  # small sets: the same sample for both
            eval_rows = tune_rows
        ladder = self._ladder()
        if len(ladder) > 1:
            truth = exact_topk(vectors, ids, vectors[tune_rows], RECALL_K + 1, self.metric)
            for params in ladder:
                self.params = params
                if self._recall(vectors, ids, tune_rows, truth) >= TUNE_TARGET:
                    break
        else:
            self.params = ladder[0]
        truth = exact_topk(vectors, ids, vectors[eval_rows], RECALL_K + 1, self.metric)
        recall = self._recall(vectors, ids, eval_rows, truth)
        self.info.update(
            params=self.params, recall_at_10=round(recall, 4), recall_sample=len(eval_rows)
        )
        return recall

    def _ladder(self) -> list[dict[str, int]]:
        ivf = faiss.try_extract_index_ivf(self._inner())
        # Candidates fetched per result for exact re-ranking: SQ8 codes rank almost exactly,
        # PQ codes coarsely (faiss's IndexRefine uses k_factor 1..16 for them).
        k_factor = 8 if "PQ" in self.key else 2 if self.key.endswith("SQ8") else 1
        if ivf is not None:
            probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p < ivf.nlist]
            ladder = [{"nprobe": p, "k_factor": k_factor} for p in probes + [ivf.nlist]]
            if k_factor > 1:  # a compressed index may need a deeper re-rank at full probing
                ladder += [{"nprobe": ivf.nlist, "k_factor": 4 * k_factor}]
            return ladder
        if "HNSW" in self.key:
            return [{"efSearch": ef} for ef in (16, 32, 64, 128, 256, 512, 1024)]
        if k_factor > 1:
            return [{"k_factor": k_factor}, {"k_factor": 4 * k_factor}]
        return [{}]

    def _recall(
        self, vectors: np.ndarray, ids: np.ndarray, rows: np.ndarray, truth: np.ndarray
    ) -> float:
        _, found = self._search_prepared(vectors[rows], RECALL_K + 1)
        if truth.shape[1] < 2:  # a one-vector index: only itself to find
            return recall_with_ties(found[:, :1], truth, vectors, ids, vectors[rows], self.metric)
        own = ids[rows]
        k = min(RECALL_K, truth.shape[1] - 1)
        return recall_with_ties(
            without_own(found, own, k),
            without_own(truth, own, k),
            vectors,
            ids,
            vectors[rows],
            self.metric,
        )

    # -- updating ------------------------------------------------------------------------

    def _inner(self) -> faiss.Index:
        if isinstance(self._index, faiss.IndexIDMap2):
            return faiss.downcast_index(self._index.index)
        return self._index

    def _can_remove(self) -> bool:
        return not isinstance(self._inner(), faiss.IndexHNSW)

    @property
    def ids(self) -> np.ndarray:
        """The live ids, sorted."""
        return self._live

    def __len__(self) -> int:
        return len(self._live)

    def add(self, vectors: Any, ids: Any) -> None:
        """Add vectors under new ids (an id already live is an error: remove it first)."""
        x = _as_vectors(vectors, self.dim)
        id_arr = _as_ids(ids, len(x))
        if len(x) == 0:
            return
        clash = np.intersect1d(id_arr, self.ids)
        if len(clash):
            raise InvalidArgumentError(
                f"{len(clash)} ids are already in the index (e.g. {int(clash[0])}); "
                "remove them first"
            )
        if len(np.intersect1d(id_arr, self._tombstones)):
            self._compact()  # a re-added id must not be hidden by its own tombstone
        xs = l2_normalize(x) if self.metric == "cosine" else x
        if self._exact is None and _is_compressed(self.key):
            raise self._needs_vectors()
        self._index.add_with_ids(xs, id_arr)
        self._live = np.union1d(self._live, id_arr)
        if self._exact is not None:
            self._exact = _Exact.of(
                np.concatenate([self._exact.vectors, xs]), np.concatenate([self._exact.ids, id_arr])
            )

    def remove(self, ids: Any) -> int:
        """Remove ids (unknown ones are ignored); returns how many were live."""
        id_arr = np.unique(np.asarray(ids, dtype=np.int64))
        live = np.intersect1d(id_arr, self.ids)
        if len(live) == 0:
            return 0
        self._live = np.setdiff1d(self._live, live, assume_unique=True)
        if self._can_remove():
            self._index.remove_ids(live)
        else:
            self._tombstones = np.union1d(self._tombstones, live)
            # Filtered graph search slows down and loses recall as dead nodes pile up.
            if len(self._tombstones) > 0.2 * self._index.ntotal:
                self._compact()
        if self._exact is not None:
            keep = ~np.isin(self._exact.ids, live)
            self._exact = _Exact(self._exact.ids[keep], self._exact.vectors[keep])
        return len(live)

    def _compact(self) -> None:
        """Rebuild the graph without tombstoned vectors (HNSW keeps raw vectors)."""
        all_ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._inner().reconstruct_n(0, self._index.ntotal)
        keep = ~np.isin(all_ids, self._tombstones)
        fmetric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        fresh = _with_ids(faiss.index_factory(self.dim, self.key, fmetric))
        fresh.add_with_ids(np.ascontiguousarray(vectors[keep]), all_ids[keep])
        self._index = fresh
        self._tombstones = np.zeros(0, dtype=np.int64)

    def attach_vectors(self, vectors: Any, ids: Any) -> None:
        """Give a compressed (SQ/PQ) index the raw vectors it re-ranks with (e.g. a store's)."""
        x = _as_vectors(vectors, self.dim)
        id_arr = _as_ids(ids, len(x))
        self._exact = _Exact.of(l2_normalize(x) if self.metric == "cosine" else x, id_arr)

    def _needs_vectors(self) -> IndexStateError:
        return IndexStateError(
            f"the {self.key} index re-ranks with the raw vectors; attach them with "
            "Index.attach_vectors(vectors, ids) (searching through the store does it)"
        )

    # -- searching -----------------------------------------------------------------------

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query.

        Returns:
            ``(scores, ids)``, both (Q, k): cosine similarity (higher is closer) or Euclidean
            distance (lower is closer), and store ids. Missing results (k > len) have id -1
            and score -inf (cosine) / inf (l2). Removed ids are never returned.
        """
        if k <= 0:
            raise InvalidArgumentError(f"k must be >= 1, got {k}")
        q = _as_vectors(queries, self.dim)
        if self.metric == "cosine":
            q = l2_normalize(q)
        scores, ids = self._search_prepared(q, k)
        if self.metric == "l2":
            scores = np.sqrt(np.maximum(scores, 0), out=scores, where=np.isfinite(scores))
        return scores, ids

    def search_threshold(
        self, queries: Any, threshold: float
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every result within ``threshold`` per query: similarity >= threshold (cosine) or
        distance <= threshold (l2); a list of ``(scores, ids)`` sorted best first."""
        q = _as_vectors(queries, self.dim)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        total = len(self)
        for row in q:
            k = min(64, max(total, 1))
            while True:
                scores, ids = self.search(row[None], k)
                within = (
                    (scores[0] >= threshold)
                    if self.metric == "cosine"
                    else (scores[0] <= threshold)
                )
                within &= ids[0] >= 0
                # Done when the worst of the k is already outside, or everything was returned.
                if not within[-1] or k >= total:
                    break
                k = min(k * 4, total)
            out.append((scores[0][within], ids[0][within]))
        return out

    def _search_prepared(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search already-normalised queries; raw FAISS scores (squared L2 for l2)."""
        if self._exact is None and _is_compressed(self.key):
            raise self._needs_vectors()
        k_factor = int(self.params.get("k_factor", 1))
        fetch = min(k * k_factor, max(int(self._index.ntotal), 1))
        scores, ids = self._index.search(q, fetch, params=self._search_params(fetch))
        if len(self._tombstones):  # belt and braces: the selector already excludes them
            dead = np.isin(ids, self._tombstones)
            ids[dead] = -1
        if self._exact is not None:
            scores, ids = self._rerank(q, ids)
        order = np.argsort(-scores if self.metric == "cosine" else scores, axis=1, kind="stable")
        scores = np.take_along_axis(scores, order, 1)
        ids = np.take_along_axis(ids, order, 1)
        missing = _missing_score(self.metric)
        scores[ids < 0] = missing
        if fetch < k:
            pad = k - fetch
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=missing)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores[:, :k].astype(np.float32), ids[:, :k]

    def _search_params(self, k: int) -> faiss.SearchParameters | None:
        sel = None
        if len(self._tombstones):
            # SWIG does not keep the inner selector alive: hold both for the search's duration.
            batch = faiss.IDSelectorBatch(self._tombstones)
            sel = faiss.IDSelectorNot(batch)
            self._selector_refs = (batch, sel)
        if "efSearch" in self.params:
            # HNSW returns at most efSearch candidates, so it must be at least k.
            return faiss.SearchParametersHNSW(efSearch=max(self.params["efSearch"], k), sel=sel)
        if "nprobe" in self.params:
            ivf_params = faiss.SearchParametersIVF(nprobe=self.params["nprobe"], sel=sel)
            if isinstance(self._inner(), faiss.IndexPreTransform):
                return faiss.SearchParametersPreTransform(index_params=ivf_params)
            return ivf_params
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _rerank(self, q: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self._exact is not None
        rows, found = self._exact.rows(ids)
        found &= ids >= 0
        cand = self._exact.vectors[rows]  # (Q, F, D)
        if self.metric == "cosine":
            scores = np.einsum("qd,qfd->qf", q, cand)
            scores[~found] = -np.inf
        else:
            scores = ((cand - q[:, None, :]) ** 2).sum(-1)
            scores[~found] = np.inf
        ids = np.where(found, ids, -1)
        return scores.astype(np.float32), ids

    # -- persistence ---------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``index-<token>.faiss``, ``extra-<token>.npz`` and ``index.json`` atomically.

        Data files get fresh names; ``index.json`` (naming them, with sizes and checksums) is
        replaced last, so a reader sees the old index or the new one, never a mix. Writers
        take the index lock (``index/lock.py``) and delete the files the previous
        ``index.json`` named only once the new one is in place: a reader that opened the old
        ``index.json`` and lost the race finds them gone and re-reads it (``load``).
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(6)
        index_file = d / f"index-{token}.faiss"
        extra_file = d / f"extra-{token}.npz"
        with index_lock(d):
            with atomic_path(index_file) as tmp:
                faiss.write_index(self._index, str(tmp))
            with atomic_path(extra_file) as tmp, open(tmp, "wb") as f:
                tags = {f"tag_{name}": arr for name, arr in self.tags.items()}
                arrays = {"tombstones": self._tombstones, "live": self._live, **tags}
                np.savez(f, allow_pickle=False, **arrays)  # plain arrays; nothing to unpickle
            info = dict(self.info)
            info.update(
                format="embedkit-index",
                format_version=1,
                key=self.key,
                metric=self.metric,
                dim=self.dim,
                n=len(self),
                params=self.params,
                size_bytes=index_file.stat().st_size,
                files={p.name: _file_digest(p) for p in (index_file, extra_file)},
            )
            atomic_write_bytes(d / INFO, json.dumps(info, indent=2, default=str).encode())
            self.info = info
            for old in d.iterdir():  # what older saves (or killed ones) left
                ours = old.suffix in (".faiss", ".npz", TMP_SUFFIX) and old.is_file()
                if ours and old.name not in info["files"]:
                    old.unlink(missing_ok=True)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str], rebuild_hint: str = "") -> Index:
        """Open a saved index; a missing, truncated or corrupt one raises ``IndexStateError``.

        Takes no lock: when the files ``index.json`` names vanish or fail their checksum while
        a writer replaces the index, ``index.json`` has changed and is read again.

        Args:
            directory: what ``save`` wrote to.
            rebuild_hint: the command that rebuilds it, for the error message.
        """
        d = Path(directory)
        for _ in range(_LOAD_ATTEMPTS):
            text = _read_info(d)
            try:
                return cls._load(d, text, rebuild_hint)
            except IndexStateError:
                if _read_info(d) == text:
                    raise  # nobody replaced it: really damaged
        return cls._load(d, _read_info(d), rebuild_hint)

    @classmethod
    def _load(cls, d: Path, text: str | None, rebuild_hint: str) -> Index:
        hint = rebuild_hint or "rebuild it with Index.build(...).save(dir)"

        def broken(what: str) -> IndexStateError:
            return IndexStateError(f"index at {d} {what}; {hint}")

        if text is None:
            raise broken("does not exist")
        try:
            info = json.loads(text)
        except json.JSONDecodeError:
            raise broken("has an unreadable index.json") from None
        if not isinstance(info, dict) or info.get("format") != "embedkit-index":
            raise broken("is not an embedkit index")
        if int(info.get("format_version", 0)) > 1:
            raise IndexStateError(f"index at {d} was written by a newer embedkit; {hint}")
        files = info.get("files") or {}
        for name, expected in files.items():
            try:
                actual = _file_digest(d / name)
            except OSError:
                raise broken(f"is missing {name}") from None
            if actual != expected:
                raise broken(f"file {name} is truncated or corrupt")
        index_name = next((n for n in files if n.endswith(".faiss")), None)
        extra_name = next((n for n in files if n.endswith(".npz")), None)
        if index_name is None or extra_name is None:
            raise broken("lists no index file")
        try:
            raw = faiss.read_index(str(d / index_name))
            with np.load(d / extra_name) as extra:
                tombstones = extra["tombstones"].astype(np.int64)
                live = extra["live"].astype(np.int64)
                tags = {n[4:]: extra[n] for n in extra.files if n.startswith("tag_")}
        except (RuntimeError, OSError, ValueError, KeyError):
            raise broken(f"file {index_name} cannot be read") from None
        if faiss.try_extract_index_ivf(raw) is None and not isinstance(raw, faiss.IndexIDMap2):
            raise broken("does not map results to store ids")
        if len(live) + len(tombstones) != raw.ntotal:
            raise broken(f"lists {len(live)} ids for {raw.ntotal} vectors")
        index = cls(raw, info["key"], info["metric"])
        index._tombstones = tombstones
        index._live = live
        index.tags = tags
        index.params = {str(k): int(v) for k, v in (info.get("params") or {}).items()}
        index.info = info
        return index


def _read_info(d: Path) -> str | None:
    """``index.json``'s text, or None when there is none (or it cannot be read as text)."""
    try:
        return (d / INFO).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _with_ids(inner: faiss.Index) -> faiss.Index:
    """The index that takes store ids: an IVF as is, anything else in an IndexIDMap2."""
    if faiss.try_extract_index_ivf(inner) is not None:
        return inner
    return faiss.IndexIDMap2(inner)


def _file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "blake2b": h.hexdigest()}
