"""The ``search`` verb: query a store by image file, stored path or id, or vector; top-k or
threshold.

The store's index comes from ``lifecycle.open_synced``, which builds it when missing and brings
it up to date with the store's last commit first (waiting for another process that is doing
so); an index built from another model is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..defaults import DEFAULT_SEARCH_K
from ..errors import IndexStateError, InvalidArgumentError, StoreError
from ..store.read import Store, open_store, storable
from .lifecycle import Log, _rebuild_hint, open_synced


@dataclass(frozen=True)
class Hit:
    """One result: ``score`` is cosine similarity (or Euclidean distance for an l2 index)."""

    rank: int
    score: float
    id: int
    path: str


@dataclass(frozen=True)
class QueryResult:
    """The hits for one query, best first; ``query`` says what was asked."""

    query: str
    hits: list[Hit] = field(default_factory=list)


Query = str | int | os.PathLike[str] | np.ndarray


def search(
    store: str | os.PathLike[str] | Store,
    queries: Sequence[Query],
    k: int = DEFAULT_SEARCH_K,
    threshold: float | None = None,
    *,
    vector_files: Sequence[str | os.PathLike[str]] = (),
    exclude_self: bool = False,
    device: str = "auto",
    log: Log | None = None,
) -> list[QueryResult]:
    """Find the stored images most similar to each query.

    A query is a stored path (relative or absolute) or id, an image file (embedded with the
    store's own model and preprocessing), or a vector. ``vector_files`` adds queries from
    ``.npy`` files of shape (D,) or (N, D).

    Args:
        store: a store directory or an open ``Store``.
        queries: the queries, in order.
        k: results per query (ignored when ``threshold`` is given).
        threshold: return every result with similarity >= threshold (distance <= threshold
            for an l2 index) instead of the top k.
        vector_files: ``.npy`` query vectors.
        exclude_self: drop the query's own row from results of stored queries.
        device: for embedding image-file queries.
        log: receives index maintenance messages.

    Raises:
        StoreError: a query is neither stored nor an image file.
        ImageFileError: an image file query cannot be decoded (extraction's reason for it).
        WeightsUnavailableError: image queries need the store's weights, which are gone.
        IndexStateError: the index comes from another model.
    """
    if threshold is None and k < 1:
        raise InvalidArgumentError(f"k must be >= 1, got {k}")
    # Vectors are read only where needed: the queried rows, and all of them only for an in-RAM
    # index that re-ranks (which fits the memory budget by construction).
    st = store if isinstance(store, Store) else open_store(store, vectors=False)
    labels, vectors = _resolve_queries(st, list(queries), list(vector_files), device)
    if not labels:
        raise InvalidArgumentError(
            "give at least one query (an image, a stored path or id, --vector)"
        )
    # The index and the store snapshot it matches: a newer one than `st` when an extract
    # committed meanwhile (queries were read from `st`; hits are named from the same commit
    # the index was brought to).
    index, st = open_synced(st, log=log)
    if threshold is not None and index.metric == "cosine" and not -1.0 <= threshold <= 1.0:
        raise InvalidArgumentError(
            f"--threshold {threshold} can match nothing: cosine similarity is in [-1, 1]"
        )
    # one extra result per query so that dropping the query itself still leaves k
    extra = 1 if exclude_self else 0
    if threshold is None:
        scores, ids = index.search(vectors, k + extra)
        per_query = [(scores[i], ids[i]) for i in range(len(labels))]
    else:
        per_query = index.search_threshold(vectors, threshold)
    results = []
    for (label, self_id), (q_scores, q_ids) in zip(labels, per_query, strict=True):
        hits: list[Hit] = []
        rows = st.rows_of_ids(q_ids).tolist()
        for score, id_, row in zip(q_scores.tolist(), q_ids.tolist(), rows, strict=True):
            if id_ < 0 or (exclude_self and id_ == self_id):
                continue
            if row < 0:  # cannot happen: the index was just brought to the store's rows
                raise IndexStateError(f"index returned unknown id {id_}; {_rebuild_hint(st)}")
            hits.append(Hit(len(hits) + 1, float(score), int(id_), st.abspath(row)))
        results.append(QueryResult(label, hits if threshold is not None else hits[:k]))
    return results


def _resolve_queries(
    store: Store, queries: list[Query], vector_files: list[Any], device: str
) -> tuple[list[tuple[str, int | None]], np.ndarray]:
    labels: list[tuple[str, int | None]] = []
    vectors: list[np.ndarray] = []
    images: list[tuple[int, str]] = []  # (position, path) to embed in one batch
    for q in queries:
        if isinstance(q, np.ndarray):
            vectors.append(_check_vector(q.reshape(1, -1) if q.ndim == 1 else q, store, "vector"))
            labels += [("vector", None)] * len(vectors[-1])
            continue
        try:
            row = store.row_of(q if isinstance(q, int) else os.fspath(q))
        except StoreError:
            row = None
        # Labels are for display: storable() so that a non-UTF-8 file name prints.
        if row is not None:
            label = storable(os.fspath(q)) if not isinstance(q, int) else str(q)
            labels.append((label, int(store.ids[row])))
            vectors.append(store.vectors_at([row]))
        elif not isinstance(q, int) and os.path.isfile(q):
            images.append((len(vectors), os.fspath(q)))
            labels.append((storable(os.fspath(q)), None))
            vectors.append(np.zeros((1, store.dim), np.float32))  # filled below
        else:
            shown = storable(os.fspath(q)) if not isinstance(q, int) else q
            raise StoreError(
                f"query {shown!r} is neither a stored path or id of {store.path} nor an image file"
            )
    for file in vector_files:
        try:
            arr = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"cannot read vector file {file}: {exc}") from None
        arr = _check_vector(arr.reshape(1, -1) if arr.ndim == 1 else arr, store, os.fspath(file))
        vectors.append(arr)
        labels += [
            (os.fspath(file) if len(arr) == 1 else f"{os.fspath(file)}[{i}]", None)
            for i in range(len(arr))
        ]
    if images:
        embedded = _embed_files(store, [p for _, p in images], device)
        for (pos, _), vec in zip(images, embedded, strict=True):
            vectors[pos] = vec[None]
    if not vectors:
        return [], np.zeros((0, store.dim), np.float32)
    return labels, np.concatenate(vectors).astype(np.float32)


def _check_vector(arr: np.ndarray, store: Store, what: str) -> np.ndarray:
    if arr.ndim != 2 or arr.shape[1] != store.dim:
        raise InvalidArgumentError(
            f"{what} has shape {arr.shape}; this store's vectors have {store.dim} dimensions"
        )
    return arr.astype(np.float32)


def _embed_files(store: Store, paths: list[str], device: str) -> np.ndarray:
    """Embed image files exactly as the store's extraction did: the same decode
    (``load_model_input``, JPEG draft rule included), model, weights and normalisation.

    Raises:
        ImageFileError: a file cannot be decoded, with the reason extraction would record.
    """
    from ..extraction.embed import embed
    from ..models.embedder import embedder_for_store  # torch-free when the ONNX is cached

    model = embedder_for_store(store, device=device)
    return embed(paths, model=model, normalize=bool(store.metadata.get("normalize")))
