"""Exact and near-duplicate groups: content hashes, a k-nearest-neighbour graph, pixel checks.

Every vector asks the index for its ``k`` nearest neighbours, and (when pixel fingerprints are
there: kept by extraction in the store, else decoded from the files) every image's thumbnail,
in its 8 turns and mirrors, asks for its ``k`` most correlated thumbnails: these pairs are the
candidates, O(N * k). A candidate pair is kept when the files
are byte-identical, when the pixels confirm it (``index.verify``: pHash and luminance
correlation, robust to greyscale, recolouring, mirroring and EXIF turns), or when the
embedding alone is above a threshold calibrated on the collection's background
(``index.calibrate``; never on a homogeneous collection, where unrelated images are as close
as copies). Kept pairs form star-shaped groups around a centre, so nothing chains. Each member
records the evidence that put it in its group. Memory is O(N * k), never N x N.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import IndexStateError, InvalidArgumentError
from ..images.move import MoveReport, PlannedMove, move_files
from ..store.read import STATUS_OK, Store, open_store
from .calibrate import Calibration, calibrate
from .choice import FLAT_MAX_WORK
from .groups import META, DuplicateGroup, DuplicateMember, Edges, star_groups
from .keep import DEFAULT_KEEP, check_keep_rule
from .lifecycle import Log, open_synced
from .ondisk import OnDiskIndex
from .ram import Index
from .verify import (
    HASH_ALONE,
    N_ORIENT,
    VIEWS,
    Fingerprints,
    PixelEvidence,
    compare,
    fingerprints,
    oriented_thumbs,
    store_fingerprints,
)

# The embedding threshold on a photo collection; the default (None) calibrates it per
# collection (``index.calibrate``), which gives about this on photos. Measured with the default
# efficientnet_lite0 on six photos and four edits of each (half size, JPEG q30, 5% crop,
# EXIF-rotated): every edit is >= 0.92 similar to some other copy of its photo.
DEFAULT_THRESHOLD = 0.90
DEFAULT_K = 10  # neighbours per vector (and per thumbnail orientation) judged as candidates
NEAR_BEST = 2  # pHash bits a weak pixel match may be above an image's best match
BATCH = 4096  # queries per index search: bounds the (BATCH, k) result arrays


class _RowView:
    """Some rows of a (memory-mapped) array, read block by block, never all at once."""

    def __init__(self, array: np.ndarray, rows: np.ndarray) -> None:
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: Any) -> np.ndarray:
        return np.asarray(self.array[self.rows[item]], dtype=np.float32)


def _candidates(x: Any, index: Index | OnDiskIndex, k: int, id_arr: np.ndarray) -> dict:
    """Unordered row pairs among every row's ``k`` nearest neighbours -> cosine."""
    n = len(x)
    order = np.argsort(id_arr)
    sorted_ids = id_arr[order]
    pairs: dict[tuple[int, int], float] = {}
    for start in range(0, n, BATCH):
        stop = min(start + BATCH, n)
        scores, nbrs = index.search(np.ascontiguousarray(x[start:stop]), min(k + 1, n))
        q_rows, cols = np.nonzero(nbrs >= 0)
        nbr_ids = nbrs[q_rows, cols]
        pos = np.clip(np.searchsorted(sorted_ids, nbr_ids), 0, n - 1)
        known = sorted_ids[pos] == nbr_ids
        sc = scores[q_rows, cols][known].tolist()
        for a, b, c in zip(
            (q_rows + start)[known].tolist(), order[pos][known].tolist(), sc, strict=True
        ):
            if a != b:
                pairs[(a, b) if a < b else (b, a)] = float(c)
    return pairs


def _pixel_candidates(fp: Fingerprints, k: int) -> set[tuple[int, int]]:
    """Row pairs whose thumbnails are among each other's ``k`` most correlated, per view and
    in any of the 8 orientations: copies that the embedding ranks below unrelated look-alikes
    (resized textiles, greyscale photos) still become candidates. O(N * 16 * k) results."""
    rows = np.nonzero(fp.ok)[0]
    if len(rows) < 2:
        return set()
    out: set[tuple[int, int]] = set()
    kk = min(k + 1, len(rows))
    step = max(1, BATCH // N_ORIENT)
    for view in range(len(VIEWS)):
        base = fp.thumb[rows, view].astype(np.float32)
        search = _thumb_search(base, rows.astype(np.int64))
        for start in range(0, len(rows), step):
            block = rows[start : start + step]
            q = oriented_thumbs(fp, block, view).reshape(-1, base.shape[1])
            scores, nbrs = search(np.ascontiguousarray(q), kk)
            # the k best over all 8 orientations together (not k per orientation: 8x junk)
            scores = scores.reshape(len(block), -1)
            nbrs = nbrs.reshape(len(block), -1)
            order = np.argsort(-scores, axis=1, kind="stable")
            ranked = np.take_along_axis(nbrs, order, axis=1)
            for a, row in zip(block.tolist(), ranked.tolist(), strict=True):
                taken = 0
                for b in row:
                    if b < 0 or b == a:
                        continue
                    pair = (a, b) if a < b else (b, a)
                    if pair not in out:
                        out.add(pair)
                    taken += 1
                    if taken >= k:
                        break
    return out


def _thumb_search(base: np.ndarray, rows: np.ndarray) -> Any:
    """``search(queries, k) -> (scores, rows)`` over the unit-norm thumbnails ``base``.

    An exact inner-product search while it is cheap (the ``Flat`` range of
    ``choice.choose_index_key``): ``Index.build`` would tune and measure the recall of an
    index that is exact anyway, which cost as much as the searches (1.3 s of 3.7 s on 1,500
    textiles). Past that, a tuned approximate ``Index``: missing a candidate costs a pair,
    never a wrong one."""
    if len(base) * base.shape[1] > FLAT_MAX_WORK:
        return Index.build(base, rows, metric="cosine").search
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(np.ascontiguousarray(base))

    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, pos = flat.search(q, k)
        return scores, np.where(pos >= 0, rows[np.maximum(pos, 0)], -1)

    return search


def _edges(
    x: Any,
    cand: dict[tuple[int, int], float],
    hashes: Any,
    cal: Calibration,
    fp: Fingerprints | None,
    *,
    embedding: bool = True,
) -> Edges:
    """Judge every candidate pair: identical bytes, pixels confirm, or (outside homogeneous
    collections) the embedding alone is at or above the calibrated threshold. Without an
    ``embedding`` (files compared by pixels alone) the reasons name no cosine."""
    edges = Edges([], [], [], [], [])
    if not cand:
        return edges
    pairs = np.array(sorted(cand), dtype=np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    cos = np.array([cand[(i, j)] for i, j in pairs.tolist()], dtype=np.float64)
    # The small-warp search only where the embedding cannot decide: on photos it found no
    # copy the embedding missed (turned and cropped photos: recall 1.00 without it, tune
    # split) and its extra edges re-centred a star that took in an unrelated turned photo
    # (precision 0.962 -> 0.944).
    pix = compare(fp, a, b, warp=cal.homogeneous) if fp is not None else None
    if pix is not None:
        pix = _near_best_only(pix, a, b)
    # Which pairs are accepted, decided for all at once; only those get a reason in words.
    same = np.zeros(len(pairs), dtype=bool)
    if hashes is not None:
        h = np.array([s or "" for s in hashes], dtype=object)
        same = (h[a] != "") & (h[a] == h[b])
    accept = same.copy()
    if not cal.homogeneous:
        accept |= cos >= cal.threshold
    if pix is not None:
        accept |= pix.confirmed
    for i in np.flatnonzero(accept).tolist():
        ra, rb, c = int(a[i]), int(b[i]), float(cos[i])
        emb = f"embedding cosine {c:.3f}"
        if same[i]:
            ev, why = "identical", "same content hash (byte-identical files)"
        elif pix is not None and pix.confirmed[i]:
            ev = "pixels"
            why = f"pixels: {pix.describe(i)}" + (f"; {emb}" if embedding else "")
        elif c >= cal.threshold and not cal.homogeneous:
            ev = "embedding"
            if pix is None or not (fp is not None and fp.ok[ra] and fp.ok[rb]):
                unread = "no files to compare" if fp is None else "a file could not be read"
                why = f"{emb} >= {cal.threshold:.3f} (pixels not checked: {unread})"
            else:
                why = (
                    f"{emb} >= {cal.threshold:.3f}; pixels differ (pHash distance "
                    f"{int(pix.distance[i])}/64: cropped, rotated, framed or overlaid copy)"
                )
        else:
            continue
        edges.a.append(ra)
        edges.b.append(rb)
        edges.cosine.append(c)
        edges.evidence.append(ev)
        edges.why.append(why)
    return edges


def _near_best_only(pix: PixelEvidence, a: np.ndarray, b: np.ndarray) -> PixelEvidence:
    """Drop weak pixel confirmations (distance above ``HASH_ALONE``) that are not within
    ``NEAR_BEST`` of the best confirmed distance of either image.

    A shared artefact (the black corners of rotated scans, a frame, a stamp) makes unrelated
    images weakly alike, and one of them becomes a hub linked to dozens: measured on rendered
    pages, 20 rotated pages joined one group at distances 10-14. A real copy's weak match is
    (close to) the best match that image has.
    """
    d = np.where(pix.confirmed, pix.score, 65)
    best = np.full(int(max(a.max(), b.max())) + 1, 65, dtype=np.int64)
    np.minimum.at(best, a, d)
    np.minimum.at(best, b, d)
    near = d <= np.maximum(best[a], best[b]) + NEAR_BEST
    keep = pix.confirmed & ((pix.distance <= HASH_ALONE) | near)
    return dataclasses.replace(pix, confirmed=keep)


def group_duplicates(
    vectors: Any,
    ids: Any,
    hashes: Any = None,
    threshold: float | None = None,
    *,
    k: int = DEFAULT_K,
    index: Index | OnDiskIndex | None = None,
    paths: list[str] | None = None,
    verify: bool = True,
    log: Log | None = None,
    pixels: Fingerprints | None = None,
) -> list[DuplicateGroup]:
    """Duplicate groups among rows of ``vectors`` (or, with ``vectors=None``, among images
    compared by their pixel fingerprints alone: ``pixels`` is then required).

    Candidates are every row's ``k`` nearest neighbours by embedding and, when the files are
    there, by pixel thumbnail (in all 8 turns/mirrors). A candidate pair is a duplicate when
    the files are byte-identical, the pixels confirm it (``verify``), or the embedding alone
    is at or above ``threshold`` (default: calibrated on this collection, see
    ``index.calibrate``; on a homogeneous collection the embedding alone never decides).
    Groups are stars around a centre (``_star_groups``), never chains.

    Args:
        vectors: float (N, D), rows aligned with ``ids`` (and ``hashes``/``paths``); None
            compares pixels only (``index.file_duplicates``): candidates are the most
            correlated thumbnails, every pair needs pixel evidence (or identical bytes), the
            small-warp search is on, and a member's ``score`` is its luminance correlation.
        ids: int64 (N,) ids.
        hashes: content hashes per row (exact duplicates), or None.
        threshold: embedding cosine at or above which two images are copies without pixel
            evidence; None calibrates it. An explicit value also applies to homogeneous
            collections.
        k: neighbours looked up per image.
        index: a cosine ``Index`` or ``OnDiskIndex`` holding these ids (built when None).
        paths: per-row image paths: put in the result and, with ``verify``, decoded for
            pixel evidence (a file that cannot be read falls back to embedding evidence).
        verify: compare pixels of candidate pairs.
        log: receives the calibration and any homogeneous-collection warning.
        pixels: the rows' pixel fingerprints when the caller has them (``find_duplicates``
            reads them from the store); None computes them from ``paths``.

    Returns:
        Groups of two or more, largest first.
    """
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise InvalidArgumentError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if k < 1:
        raise InvalidArgumentError(f"k must be >= 1, got {k}")
    id_arr = np.asarray(ids, dtype=np.int64)
    embedding = vectors is not None
    if embedding:
        x = vectors if isinstance(vectors, _RowView) else np.ascontiguousarray(vectors, np.float32)
    elif pixels is None or not verify:
        raise InvalidArgumentError("duplicates without vectors need the images' pixel fingerprints")
    else:
        # the whole views' thumbnails (zero mean, unit norm): a dot product is a correlation
        x = np.ascontiguousarray(pixels.thumb[:, 0], dtype=np.float32)
    n = len(x)
    if n == 0:
        return []
    fp = None
    if embedding:
        if index is None:
            index = Index.build(x, id_arr, metric="cosine")
        elif index.metric != "cosine":
            raise InvalidArgumentError(
                "duplicates need a cosine index; rebuild with --metric cosine"
            )
        cal = calibrate(x)
        if threshold is not None:
            cal = dataclasses.replace(cal, threshold=threshold, homogeneous=False)
        if log is not None:
            log(cal.describe())
        cand = _candidates(x, index, k, id_arr)
    else:
        # the embedding decides nothing (there is none); ``homogeneous`` turns the warps on
        cal, cand = Calibration(0.0, 0.0, 1.0, True, 0), {}
        if log is not None:
            log("no embeddings: pairs are judged by their pixels (and identical bytes) alone")
    if verify and (pixels is not None or paths is not None):
        fp = pixels if pixels is not None else fingerprints(list(paths or []))
        extra = _pixel_candidates(fp, k) - cand.keys()
        if extra:
            cand.update(_cosines(x, sorted(extra)))
        if fp.errors and log is not None and embedding:
            log(
                f"{len(fp.errors)} files could not be read for pixel checks; their pairs rest "
                "on the embedding alone"
            )
    if hashes is not None:
        first: dict[str, int] = {}
        pairs = []
        for row, h in enumerate(hashes):
            if h:
                if h in first:
                    pairs.append((first[h], row))
                else:
                    first[h] = row
        missing = [p for p in pairs if p not in cand]
        if missing:
            cand.update(_cosines(x, missing))
    edges = _edges(x, cand, hashes, cal, fp, embedding=embedding)
    edge_of = {
        (min(a, b), max(a, b)): e for e, (a, b) in enumerate(zip(edges.a, edges.b, strict=True))
    }
    groups = []
    for rows, link in star_groups(n, edges):
        rows_arr = np.array(sorted(rows), dtype=np.int64)
        v = np.asarray(x[rows_arr], dtype=np.float32)
        unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        groups.append(_group(rows_arr, unit, id_arr, hashes, paths, link, edges, edge_of))
    groups.sort(key=lambda g: (-len(g.members), -min(m.score for m in g.members)))
    return groups


def _cosines(x: Any, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """Cosine of each row pair, BATCH pairs at a time (only those rows are read)."""
    out: dict[tuple[int, int], float] = {}
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        idx = np.array(chunk, dtype=np.int64)
        va = np.asarray(x[idx[:, 0]], dtype=np.float32)
        vb = np.asarray(x[idx[:, 1]], dtype=np.float32)
        norms = np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1)
        sims = np.einsum("nd,nd->n", va, vb) / np.maximum(norms, 1e-12)
        out.update(zip(chunk, sims.tolist(), strict=True))
    return out


def _group(
    rows: np.ndarray,
    unit: np.ndarray,
    ids: np.ndarray,
    hashes: Any,
    paths: list[str] | None,
    link: dict[int, int] | None = None,
    edges: Edges | None = None,
    edge_of: dict[tuple[int, int], int] | None = None,
) -> DuplicateGroup:
    """``rows`` ascending, so the first is the earliest stored.

    Identity is judged per member against every other member (by content hash), and each score
    is the member's best similarity within the group: judged against the first member only, two
    identical copies further down a group were reported as not identical and members joined
    through a chain showed scores below the threshold. ``link`` (row -> the row whose
    accepted pair put it in the group) and ``edges`` give each member's evidence.
    """
    sims = unit @ unit.T  # groups are small (stars of k-NN edges); (m, m) is fine
    np.fill_diagonal(sims, -np.inf)
    row_hash = [hashes[r] if hashes is not None and hashes[r] else None for r in rows.tolist()]
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(row_hash):
        if h is not None:
            by_hash.setdefault(h, []).append(i)
    best = sims.argmax(axis=1)
    row_ids = [int(ids[r]) for r in rows.tolist()]
    built = []
    for i, r in enumerate(rows.tolist()):
        h = row_hash[i]
        twins = [j for j in by_hash[h] if j != i] if h is not None else []
        # A byte-identical copy is similarity 1 by definition (its vector may differ by a
        # float rounding when it was embedded in another batch).
        j = twins[0] if twins else int(best[i])
        score = 1.0 if twins else min(float(sims[i, j]), 1.0)
        linked = link.get(r) if link is not None else None
        evidence, why = "centre", "the group's centre: every other member is linked to it"
        if linked is not None and edges is not None and edge_of is not None:
            e = edge_of[(min(r, linked), max(r, linked))]
            other = os.path.basename(paths[linked]) if paths is not None else f"id {ids[linked]}"
            evidence, why = edges.evidence[e], f"with {other}: {edges.why[e]}"
        elif link is None:
            evidence, why = "embedding", ""
        built.append(
            (
                i,
                DuplicateMember(
                    id=row_ids[i],
                    path=paths[r] if paths is not None else None,
                    score=round(score, 6),
                    exact=bool(twins),
                    identical_to=tuple(sorted(row_ids[t] for t in twins)),
                    closest=row_ids[j],
                    evidence=evidence,
                    linked_to=int(ids[linked]) if linked is not None else None,
                    why=why,
                ),
            )
        )
    ranked = sorted(built, key=lambda t: (t[0] != 0, -t[1].score))
    return DuplicateGroup(tuple(m for _, m in ranked))


def find_duplicates(
    store: str | os.PathLike[str] | Store,
    threshold: float | None = None,
    *,
    k: int = DEFAULT_K,
    keep: str = DEFAULT_KEEP,
    verify: bool = True,
    log: Log | None = None,
) -> list[DuplicateGroup]:
    """Exact and near-duplicate groups in a store, using (and updating) its search index.

    Args:
        store: a store directory or an open ``Store``.
        threshold: embedding cosine at or above which two images are copies without pixel
            evidence; None (default) calibrates it on the store (``index.calibrate``).
        k: neighbours looked up per image.
        verify: decode candidate pairs' files for pixel evidence (``index.verify``).
        keep: how each group's keeper is suggested (``index.keep.KEEP_RULES``; default
            ``best``: largest resolution, then largest file, then oldest).
        log: receives index maintenance messages, the calibration and warnings.
    """
    check_keep_rule(keep)
    st = store if isinstance(store, Store) else open_store(store, vectors=False)
    if len(st.ids) == 0:
        return []
    groups, st = _find(st, threshold, k, verify, log)  # st: the commit the index matched
    meta = _file_facts(st, {m.id for g in groups for m in g.members})
    return [g.with_keeper(keep, meta) for g in groups]


def _file_facts(st: Store, ids: set[int]) -> dict[int, tuple[Any, ...]]:
    """id -> (width, height, size, mtime_ns) as recorded, for the ids in groups."""
    if not ids:
        return {}
    t = st.table.filter(pc.equal(st.table["status"], STATUS_OK))
    t = t.filter(pc.is_in(t["id"], pa.array(sorted(ids), pa.int64())))
    cols = [t[c].to_pylist() for c in ("id", *META)]
    return {row[0]: tuple(row[1:]) for row in zip(*cols, strict=True)}


def _find(
    st: Store, threshold: float | None, k: int, verify: bool, log: Log | None
) -> tuple[list[DuplicateGroup], Store]:
    index, st = open_synced(st, log=log)  # st: the commit the index was brought to
    vectors: Any
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
        vectors = _RowView(index.vectors, alive)
    else:
        if index.metric != "cosine":  # an l2 index: a cosine one here
            index = Index.build(st.vectors, st.ids, metric="cosine")
        vectors, ids, hashes, paths = st.vectors, st.ids, st.hashes, st.abspaths
    groups = group_duplicates(
        vectors,
        ids,
        hashes,
        threshold,
        k=k,
        index=index,
        paths=paths,
        verify=verify,
        log=log,
        pixels=_pixels(st, paths, hashes, log) if verify else None,
    )
    return groups, st


def _pixels(st: Store, paths: list[str], hashes: list[str], log: Log | None) -> Fingerprints:
    """The store's kept fingerprints; files it has none for are decoded (and kept)."""
    fp, decoded = store_fingerprints(st.path, st.metadata, paths, hashes)
    if decoded and log is not None:
        log(
            f"pixel fingerprints: {decoded} of {len(paths)} files decoded (the store kept none "
            "for them: made before fingerprints were kept, under an older fingerprint recipe, "
            "or by the Ray engine); kept now"
        )
    return fp


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
