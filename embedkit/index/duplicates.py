"""Exact and near-duplicate groups: content hashes plus a k-nearest-neighbour graph.

Every vector asks the index for its ``k`` nearest neighbours; pairs at or above the similarity
threshold are edges, and union-find joins them (and rows with the same content hash) into
groups. Memory is O(N * k) at most for the edges and O(N) for the union-find, never N x N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import IndexStateError, InvalidArgumentError
from ..store.read import Store, open_store
from .lifecycle import Log, open_synced
from .ondisk import OnDiskIndex
from .ram import Index

# Cosine similarity that joins two images. Measured with the default efficientnet_lite0 on six
# photos and four edits of each (half size, JPEG q30, 5% crop, EXIF-rotated): every edit is
# >= 0.92 similar to some other copy of its photo (0.85 to the farthest), while different
# photos score <= 0.34. 0.95 left a third of those edits out of their group.
DEFAULT_THRESHOLD = 0.90
DEFAULT_K = 10  # neighbours per vector; bigger groups still connect through chains
BATCH = 4096  # queries per index search: bounds the (BATCH, k) result arrays


@dataclass(frozen=True)
class DuplicateMember:
    """One image of a group.

    Attributes:
        id: store id.
        path: absolute path, or None for bare arrays.
        score: cosine similarity to the group's first member (1.0 for the first).
        exact: same content hash as the first member.
    """

    id: int
    path: str | None
    score: float
    exact: bool


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of each other; the first member is the representative (the
    earliest stored) and the rest follow by decreasing similarity to it."""

    members: tuple[DuplicateMember, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"members": [m.__dict__ for m in self.members]}


class _RowView:
    """Some rows of a (memory-mapped) array, read block by block, never all at once."""

    def __init__(self, array: np.ndarray, rows: np.ndarray) -> None:
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: Any) -> np.ndarray:
        return np.asarray(self.array[self.rows[item]], dtype=np.float32)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))  # a list: element access is ~10x faster than numpy's

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]  # path halving
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller row becomes the root, so a group's root is its earliest row
            self.parent[max(ra, rb)] = min(ra, rb)


def group_duplicates(
    vectors: Any,
    ids: Any,
    hashes: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    k: int = DEFAULT_K,
    index: Index | OnDiskIndex | None = None,
    paths: list[str] | None = None,
) -> list[DuplicateGroup]:
    """Duplicate groups among rows of ``vectors``.

    Args:
        vectors: float (N, D), rows aligned with ``ids`` (and ``hashes``/``paths``).
        ids: int64 (N,) ids.
        hashes: content hashes per row (exact duplicates), or None.
        threshold: cosine similarity at or above which two images are near duplicates.
        k: neighbours looked up per image.
        index: a cosine ``Index`` or ``OnDiskIndex`` holding these ids (built when None).
        paths: per-row paths to put in the result.

    Returns:
        Groups of two or more, largest first.
    """
    if not -1.0 <= threshold <= 1.0:
        raise InvalidArgumentError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if k < 1:
        raise InvalidArgumentError(f"k must be >= 1, got {k}")
    x = vectors if isinstance(vectors, _RowView) else np.ascontiguousarray(vectors, np.float32)
    id_arr = np.asarray(ids, dtype=np.int64)
    n = len(x)
    if n == 0:
        return []
    if index is None:
        index = Index.build(x, id_arr, metric="cosine")
    elif index.metric != "cosine":
        raise InvalidArgumentError("duplicates need a cosine index; rebuild with --metric cosine")
    order = np.argsort(id_arr)
    sorted_ids = id_arr[order]
    uf = _UnionFind(n)

    if hashes is not None:
        first: dict[str, int] = {}
        for row, h in enumerate(hashes):
            if h:
                uf.union(first.setdefault(h, row), row)

    for start in range(0, n, BATCH):
        stop = min(start + BATCH, n)
        scores, nbrs = index.search(np.ascontiguousarray(x[start:stop]), min(k + 1, n))
        keep = (scores >= threshold) & (nbrs >= 0)
        q_rows, cols = np.nonzero(keep)
        nbr_ids = nbrs[q_rows, cols]
        pos = np.clip(np.searchsorted(sorted_ids, nbr_ids), 0, n - 1)
        known = sorted_ids[pos] == nbr_ids
        for a, b in zip((q_rows + start)[known].tolist(), order[pos][known].tolist(), strict=True):
            if a != b:
                uf.union(a, b)

    roots = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
    counts = np.bincount(roots, minlength=n)
    grouped = np.nonzero(counts[roots] >= 2)[0]
    grouped = grouped[np.argsort(roots[grouped], kind="stable")]
    _, starts = np.unique(roots[grouped], return_index=True)
    groups = []
    for rows in np.split(grouped, starts[1:]) if len(grouped) else []:
        v = np.asarray(x[rows], dtype=np.float32)
        unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        groups.append(_group(rows, unit, id_arr, hashes, paths))
    groups.sort(key=lambda g: (-len(g.members), -g.members[-1].score))
    return groups


def _group(
    rows: np.ndarray,
    unit: np.ndarray,
    ids: np.ndarray,
    hashes: Any,
    paths: list[str] | None,
) -> DuplicateGroup:
    """``rows`` ascending, so the first (the union-find root) is the earliest stored."""
    rep = int(rows[0])
    sims = unit @ unit[0]
    sims[0] = 1.0
    pairs = zip(rows.tolist(), sims.tolist(), strict=True)
    ranked = sorted(pairs, key=lambda t: (t[0] != rep, -t[1]))
    members = tuple(
        DuplicateMember(
            id=int(ids[r]),
            path=paths[r] if paths is not None else None,
            score=round(min(float(s), 1.0), 6),
            exact=hashes is not None and bool(hashes[r]) and hashes[r] == hashes[rep],
        )
        for r, s in ranked
    )
    return DuplicateGroup(members)


def find_duplicates(
    store: str | os.PathLike[str] | Store,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    k: int = DEFAULT_K,
    log: Log | None = None,
) -> list[DuplicateGroup]:
    """Exact and near-duplicate groups in a store, using (and updating) its search index.

    Args:
        store: a store directory or an open ``Store``.
        threshold: cosine similarity at or above which two images are near duplicates.
        k: neighbours looked up per image.
        log: receives index maintenance messages.
    """
    st = store if isinstance(store, Store) else open_store(store, vectors=False)
    if len(st.ids) == 0:
        return []
    index, st = open_synced(st, log=log)  # st: the commit the index was brought to
    if isinstance(index, OnDiskIndex):
        # Past RAM: the queries are the index's own memory-mapped vectors, read block by block;
        # the store's vectors are never loaded.
        if index.metric != "cosine":
            raise InvalidArgumentError(
                "duplicates need a cosine index; rebuild with `embedkit index --metric cosine`"
            )
        alive = index.alive_rows()  # rows tombstoned by updates take no part
        ids = np.asarray(index.ids[alive])
        rows = st.rows_of_ids(ids)
        if (rows < 0).any():  # cannot happen: open_index brought the index to the store
            raise IndexStateError("the on-disk index has ids the store does not; rebuild it")
        aligned = bool(np.array_equal(rows, np.arange(len(rows))))
        hashes = st.hashes if aligned else [st.hashes[r] for r in rows.tolist()]
        paths = st.abspaths if aligned else [st.abspath(r) for r in rows.tolist()]
        view = _RowView(index.vectors, alive)
        return group_duplicates(view, ids, hashes, threshold, k=k, index=index, paths=paths)
    if index.metric != "cosine":
        index = Index.build(st.vectors, st.ids, metric="cosine")  # an l2 index: a cosine one here
    return group_duplicates(
        st.vectors, st.ids, st.hashes, threshold, k=k, index=index, paths=st.abspaths
    )
