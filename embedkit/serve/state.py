"""The server's view of a store: reopened when its manifest version changes, with the derived
views (listing, duplicates, map, classes, probe predictions) cached per version.

An ``embedkit extract`` into the store while the server runs commits a new manifest version;
the next request sees it (``LiveStore.current``), and derived views are recomputed lazily.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np
import pyarrow.compute as pc

from ..errors import IndexStateError, StoreError
from ..index.lifecycle import open_index
from ..index.ondisk import OnDiskIndex
from ..index.ram import Index
from ..index.search import Hit
from ..store.read import STATUS_OK, Store, open_store, read_manifest
from .projection import MapMethod, project_2d

_logger = logging.getLogger("embedkit.serve")
T = TypeVar("T")


@contextlib.contextmanager
def _one_faiss_thread() -> Iterator[None]:
    """FAISS on one OpenMP thread for the calling thread only (OpenMP keeps the setting per
    thread). One query is too small to split across cores, and a server has concurrent
    requests for them: measured at 100k x 256-d Flat on 2 shared cores, p50 36.8 ms with
    OpenMP's 2 threads, 8.7 ms with 1."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass
class Snapshot:
    """One committed version of the store, opened once, and what was derived from it."""

    store: Store
    widths: list[int | None]
    heights: list[int | None]
    sizes: list[int | None]
    mtimes: list[int | None]
    index: Index | OnDiskIndex | None = None  # None for an empty store
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _key_locks: dict[Any, threading.Lock] = field(default_factory=dict, repr=False)

    @property
    def version(self) -> int:
        return self.store.version

    def row(self, id_: int) -> int | None:
        """Row of a live ``ok`` id, None when the store has no such row."""
        row = int(self.store.rows_of_ids([id_])[0])
        return row if row >= 0 else None

    def image(self, row: int) -> dict[str, Any]:
        st = self.store
        return {
            "id": int(st.ids[row]),
            "key": str(int(st.ids[row])),  # JS numbers hold 53 bits; ids have 63
            "path": st.abspath(row),
            "width": self.widths[row],
            "height": self.heights[row],
        }

    def similar(self, row: int, k: int) -> list[Hit]:
        """The top-``k`` hits for a stored row, exactly as ``embedkit.search(store, [id], k=k)``
        gives them (the API tests compare the two).

        Not a call to ``search`` itself because that reopens the index (re-reading and
        hashing its file) and reads the whole embedding column of the row's part, per query:
        ~100 ms at 10k rows, seconds at 1M. The snapshot keeps both open instead.
        """
        if self.index is None:
            return []
        st = self.store
        if isinstance(self.index, OnDiskIndex):  # vectors past the memory budget: read one
            query = st.vectors_at([row])
        else:  # an in-RAM index means the vectors fit the budget too (index.choice)
            query = st.vectors[row : row + 1]
        with _one_faiss_thread():
            scores, ids = self.index.search(query, k)
        found = st.rows_of_ids(ids[0]).tolist()
        hits: list[Hit] = []
        for score, id_, at in zip(scores[0].tolist(), ids[0].tolist(), found, strict=True):
            if id_ < 0:
                continue
            if at < 0:  # the index was brought to this version when the snapshot opened
                raise IndexStateError(
                    f"index returned unknown id {id_}; rebuild it with "
                    f"`embedkit index {st.path} --rebuild`"
                )
            hits.append(Hit(len(hits) + 1, float(score), int(id_), st.abspath(at)))
        return hits[:k]

    def cached(self, key: Any, compute: Callable[[], T]) -> T:
        """``compute()`` once per snapshot and key (duplicates at a threshold, the map, ...).

        One lock per key: a long computation (duplicates of a big store) makes only the
        requests for the same key wait.
        """
        with self._lock:
            if key in self._cache:
                return self._cache[key]  # type: ignore[no-any-return]
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._cache:
                self._cache[key] = compute()
            return self._cache[key]  # type: ignore[no-any-return]

    def map_points(self, method: MapMethod) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            xy, used = project_2d(self.store.vectors, method)
            return {
                "method": used,
                "keys": [str(int(i)) for i in self.store.ids],
                "x": np.round(xy[:, 0], 4).tolist(),
                "y": np.round(xy[:, 1], 4).tolist(),
            }

        return self.cached(("map", method), compute)


def _snapshot(path: Path) -> Snapshot:
    store = open_store(path, vectors=False)
    ok = store.table.filter(pc.equal(store.table["status"], STATUS_OK))  # aligned with ids
    return Snapshot(
        store=store,
        widths=ok["width"].to_pylist(),
        heights=ok["height"].to_pylist(),
        sizes=ok["size"].to_pylist(),
        mtimes=ok["mtime_ns"].to_pylist(),
    )


class LiveStore:
    """A store directory as the server sees it: the latest committed version, read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        self._lock = threading.Lock()
        self._snap = self._open()

    def _open(self) -> Snapshot:
        snap = _snapshot(self.path)
        if len(snap.store):
            # Brought up to date once, here under the lock, and kept for this version's
            # searches; an upload search (``embedkit.search``) then finds it current too.
            snap.index = open_index(snap.store, log=_logger.info)
            if not isinstance(snap.index, OnDiskIndex):
                snap.store.vectors  # noqa: B018  (load now, not in the first request)
        return snap

    def current(self) -> Snapshot:
        """The snapshot of the committed version, reopened when the manifest moved on."""
        manifest = read_manifest(self.path)
        if manifest is None:
            raise StoreError(f"{self.path} is no longer an embedkit store (no manifest.json)")
        if int(manifest["version"]) != self._snap.version:
            with self._lock:
                if int(manifest["version"]) != self._snap.version:
                    self._snap = self._open()
        return self._snap
