"""Exact and near-duplicate groups: content hashes plus a k-nearest-neighbour graph.

Every vector asks the index for its ``k`` nearest neighbours; pairs at or above the similarity
threshold are edges, and union-find joins them (and rows with the same content hash) into
groups. Memory is O(N * k) at most for the edges and O(N) for the union-find, never N x N.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import IndexStateError, InvalidArgumentError
from ..images.move import MoveReport, PlannedMove, move_files
from ..store.read import STATUS_OK, Store, open_store
from .keep import DEFAULT_KEEP, check_keep_rule, choose_keeper
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
        score: this member's best cosine similarity to any other member of the group (its
            closest copy, not an arbitrary leader): at least the threshold for a member that
            joined by similarity, 1.0 for a byte-identical copy.
        exact: another member of the group has the same content hash (a byte-identical copy).
        identical_to: ids of the other members with the same content hash, ascending.
        closest: id of the member that ``score`` is measured against.
        width, height, size, mtime_ns: as recorded in the store (None for bare arrays).
        keep: the suggested keeper of its group (see ``index.keep``); the others are the
            copies ``--to-remove`` lists.
    """

    id: int
    path: str | None
    score: float
    exact: bool
    identical_to: tuple[int, ...] = ()
    closest: int | None = None
    width: int | None = None
    height: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    keep: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["identical_to"] = list(self.identical_to)
        return d


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of each other; the first member is the representative (the
    earliest stored) and the rest follow by decreasing best similarity."""

    members: tuple[DuplicateMember, ...]

    @property
    def keeper(self) -> DuplicateMember:
        """The member to keep: the one marked ``keep``, else the first."""
        return next((m for m in self.members if m.keep), self.members[0])

    @property
    def to_remove(self) -> tuple[DuplicateMember, ...]:
        """Every member but the keeper."""
        keeper = self.keeper
        return tuple(m for m in self.members if m is not keeper)

    @property
    def identical_pairs(self) -> int:
        """Pairs of members with the same content hash (a sub-group of m copies is m(m-1)/2)."""
        return sum(len(m.identical_to) for m in self.members) // 2

    @property
    def identical_copies(self) -> int:
        """Members that could go because a byte-identical copy stays: per sub-group of m
        identical files, m - 1."""
        seen: set[int] = set()
        copies = 0
        for m in self.members:
            if m.identical_to and m.id not in seen:
                seen.update(m.identical_to)
                seen.add(m.id)
                copies += len(m.identical_to)
        return copies

    def to_dict(self) -> dict[str, Any]:
        return {"keeper": self.keeper.id, "members": [m.to_dict() for m in self.members]}

    def with_keeper(
        self, rule: str, meta: dict[int, tuple[Any, ...]] | None = None
    ) -> DuplicateGroup:
        """This group with recorded file facts filled in (``meta``: id -> (width, height, size,
        mtime_ns)) and the keeper chosen by ``rule``."""
        members = [
            dataclasses.replace(m, **dict(zip(_META, meta[m.id], strict=True)))
            if meta is not None and m.id in meta
            else m
            for m in self.members
        ]
        pick = choose_keeper(members, rule)
        members = [dataclasses.replace(m, keep=i == pick) for i, m in enumerate(members)]
        return DuplicateGroup(tuple(members))


_META = ("width", "height", "size", "mtime_ns")


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
    groups.sort(key=lambda g: (-len(g.members), -min(m.score for m in g.members)))
    return groups


def _group(
    rows: np.ndarray,
    unit: np.ndarray,
    ids: np.ndarray,
    hashes: Any,
    paths: list[str] | None,
) -> DuplicateGroup:
    """``rows`` ascending, so the first (the union-find root) is the earliest stored.

    Identity is judged per member against every other member (by content hash), and each score
    is the member's best similarity within the group: judged against the first member only, two
    identical copies further down a group were reported as not identical and members joined
    through a chain showed scores below the threshold.
    """
    sims = unit @ unit.T  # groups are small (k-NN edges); (m, m) is fine
    np.fill_diagonal(sims, -np.inf)
    row_hash = [hashes[r] if hashes is not None and hashes[r] else None for r in rows.tolist()]
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(row_hash):
        if h is not None:
            by_hash.setdefault(h, []).append(i)
    best = sims.argmax(axis=1)
    built = []
    for i, r in enumerate(rows.tolist()):
        h = row_hash[i]
        twins = [j for j in by_hash[h] if j != i] if h is not None else []
        # A byte-identical copy is similarity 1 by definition (its vector may differ by a
        # float rounding when it was embedded in another batch).
        j = twins[0] if twins else int(best[i])
        score = 1.0 if twins else min(float(sims[i, j]), 1.0)
        built.append(
            (
                i,
                DuplicateMember(
                    id=int(ids[r]),
                    path=paths[r] if paths is not None else None,
                    score=round(score, 6),
                    exact=bool(twins),
                    identical_to=tuple(sorted(int(ids[rows[t]]) for t in twins)),
                    closest=int(ids[rows[j]]),
                ),
            )
        )
    ranked = sorted(built, key=lambda t: (t[0] != 0, -t[1].score))
    return DuplicateGroup(tuple(m for _, m in ranked))


def find_duplicates(
    store: str | os.PathLike[str] | Store,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    k: int = DEFAULT_K,
    keep: str = DEFAULT_KEEP,
    log: Log | None = None,
) -> list[DuplicateGroup]:
    """Exact and near-duplicate groups in a store, using (and updating) its search index.

    Args:
        store: a store directory or an open ``Store``.
        threshold: cosine similarity at or above which two images are near duplicates.
        k: neighbours looked up per image.
        keep: how each group's keeper is suggested (``index.keep.KEEP_RULES``; default
            ``best``: largest resolution, then largest file, then oldest).
        log: receives index maintenance messages.
    """
    check_keep_rule(keep)
    st = store if isinstance(store, Store) else open_store(store, vectors=False)
    if len(st.ids) == 0:
        return []
    groups, st = _find(st, threshold, k, log)  # st: the commit the index matched
    meta = _file_facts(st, {m.id for g in groups for m in g.members})
    return [g.with_keeper(keep, meta) for g in groups]


def _file_facts(st: Store, ids: set[int]) -> dict[int, tuple[Any, ...]]:
    """id -> (width, height, size, mtime_ns) as recorded, for the ids in groups."""
    if not ids:
        return {}
    t = st.table.filter(pc.equal(st.table["status"], STATUS_OK))
    t = t.filter(pc.is_in(t["id"], pa.array(sorted(ids), pa.int64())))
    cols = [t[c].to_pylist() for c in ("id", *_META)]
    return {row[0]: tuple(row[1:]) for row in zip(*cols, strict=True)}


def _find(
    st: Store, threshold: float, k: int, log: Log | None
) -> tuple[list[DuplicateGroup], Store]:
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
        groups = group_duplicates(view, ids, hashes, threshold, k=k, index=index, paths=paths)
        return groups, st
    if index.metric != "cosine":
        index = Index.build(st.vectors, st.ids, metric="cosine")  # an l2 index: a cosine one here
    groups = group_duplicates(
        st.vectors, st.ids, st.hashes, threshold, k=k, index=index, paths=st.abspaths
    )
    return groups, st


def move_duplicates(
    groups: list[DuplicateGroup],
    store: str | os.PathLike[str] | Store,
    dest: str | os.PathLike[str],
) -> MoveReport:
    """Move every group's non-keepers into ``dest`` (never delete), keeping their paths
    relative to the store root (under the root's folder name when the store has several
    roots), and write an undo list there. Files changed since extraction are skipped."""
    st = store if isinstance(store, Store) else open_store(store, vectors=False)
    members = [m for g in groups for m in g.to_remove]
    rows = st.rows_of_ids([m.id for m in members]) if members else np.zeros(0, np.int64)
    several_roots = len(set(st.roots)) > 1
    plan = []
    for m, row in zip(members, rows.tolist(), strict=True):
        if row < 0:
            continue  # not live any more
        root, rel = st.roots[row], st.paths[row]
        if several_roots:
            rel = os.path.join(os.path.basename(root.rstrip(os.sep)) or "root", rel)
        plan.append(PlannedMove(st.abspath(row), rel, m.size, m.mtime_ns))
    return move_files(plan, dest)
