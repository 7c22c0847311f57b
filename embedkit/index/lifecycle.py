"""The index lifecycle of a store: build it under ``STORE/index/``, keep it in step with the
store, open it ready to search (``index_store``, ``open_index``; the ``index`` verb).

When the in-RAM index plus the store's vectors would not fit the memory budget
(``ondisk.choose_backend``), the store's index is instead an ``OnDiskIndex`` under
``STORE/index-ondisk/``; a store has one or the other, never both. A store that moved on gets
its on-disk index updated in place (``OnDiskIndex.update``), or rebuilt when an update cannot
do it.

The index records the fingerprint of the store it was built from (model, weights hash,
preprocessing, dim) and the store version. An index from another model is refused by
``open_index`` (``index_store`` rebuilds it); one from an older store version is updated in
place (new ids added, deleted and changed ids removed) or rebuilt when that is cheaper. Every
such decision is reported through ``log`` in one line.

Concurrent use (docs/internals.md, "Concurrent use"): every load-decide-write sequence holds
the index lock (``lock.py``) and re-reads the store's last commit under it, so the index only
moves forward; readers take no lock. A search that finds the index stale waits for whoever
holds the lock (up to ``lock.wait_seconds()``), then searches one consistent commit
(``open_synced``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import IndexStateError, InvalidArgumentError, StoreError
from ..store.read import Store, count_live, fingerprint_of, open_store, read_manifest
from .choice import DEFAULT_MAX_MEMORY, METRICS, Metric, choose_index_key
from .lock import index_lock
from .ondisk import INFO as ONDISK_INFO
from .ondisk import OnDiskIndex, choose_backend
from .ram import Index

INDEX_DIR = "index"
ONDISK_DIR = "index-ondisk"
# An update touching more than this share of the rows costs about as much as a rebuild, and a
# rebuild also re-chooses the key and re-tunes recall.
REBUILD_SHARE = 0.5
# Rounds of "bring the index to the last commit" while an extract keeps committing: each round
# is an update of the few rows committed during the previous one.
_SYNC_ATTEMPTS = 10

Log = Callable[[str], None]
Action = Literal["built", "rebuilt", "updated", "up to date"]

_logger = logging.getLogger("embedkit")


def _default_log(message: str) -> None:
    _logger.info(message)


def _rebuild_hint(store: Store) -> str:
    return f"rebuild it with `embedkit index {store.path} --rebuild`"


def _hash64(hashes: Sequence[str]) -> np.ndarray:
    """First 64 bits of each sha256 hex content hash: enough to see that a file changed."""
    return np.array([int(h[:16], 16) if h else 0 for h in hashes], dtype=np.uint64)


def _source(store: Store) -> dict[str, Any]:
    return {"fingerprint": store.fingerprint, "store_version": store.version}


@dataclass(frozen=True)
class IndexReport:
    """What ``index_store`` did.

    Attributes:
        action: ``built``, ``rebuilt``, ``updated`` or ``up to date``.
        message: one line saying what happened and why.
        info: the metadata saved beside the index (key, metric, n, dim, params,
            recall_at_10, build_seconds, size_bytes, source).
        path: the index directory (``STORE/index`` or ``STORE/index-ondisk``).
        index: the index itself, ready to search.
    """

    action: Action
    message: str
    info: dict[str, Any]
    path: Path
    index: Index | OnDiskIndex = field(repr=False, compare=False)


def _build(store: Store, key: str | None, metric: Metric, max_memory: int) -> Index:
    if len(store.ids) == 0:
        raise StoreError(f"store {store.path} has no embedded images; run `embedkit extract`")
    index = Index.build(store.vectors, store.ids, key=key, metric=metric, max_memory=max_memory)
    index.info["source"] = _source(store)
    index.info["max_memory"] = max_memory
    index.tags = {"ids": store.ids.copy(), "hash64": _hash64(store.hashes)}
    return index


def _update(index: Index, store: Store) -> tuple[str, bool] | None:
    """Bring ``index`` to the store's rows in place; None when a rebuild is cheaper.

    Returns:
        (summary, changed) or None.
    """
    old_ids = index.tags.get("ids", np.zeros(0, np.int64))
    old_hash = index.tags.get("hash64", np.zeros(0, np.uint64))
    new_hash = _hash64(store.hashes)
    added = ~np.isin(store.ids, old_ids)
    removed = old_ids[~np.isin(old_ids, store.ids)]
    # same id, different content: the file was replaced
    order = np.argsort(old_ids)
    pos = np.clip(np.searchsorted(old_ids[order], store.ids), 0, max(len(old_ids) - 1, 0))
    changed = ~added & (old_hash[order][pos] != new_hash) if len(old_ids) else added & False
    touched = int(added.sum() + len(removed) + changed.sum())
    if touched > REBUILD_SHARE * max(len(store.ids), 1):
        return None
    if index.info.get("key_chosen") == "auto":
        budget = int(index.info.get("max_memory", DEFAULT_MAX_MEMORY))
        if choose_index_key(len(store.ids), store.dim, budget, index.metric) != index.key:
            return None  # the collection outgrew its index type
    if _needs_vectors(index):
        index.attach_vectors(store.vectors, store.ids)
    index.remove(np.concatenate([removed, store.ids[changed]]))
    put = added | changed
    index.add(store.vectors[put], store.ids[put])
    index.tags = {"ids": store.ids.copy(), "hash64": new_hash}
    index.info["source"] = _source(store)
    index.info["n"] = len(index)
    summary = f"+{int(added.sum())} new, -{len(removed)} deleted, {int(changed.sum())} changed"
    return summary, touched > 0


def _needs_vectors(index: Index) -> bool:
    return index.key.endswith("SQ8") or "PQ" in index.key


def _describe_foreign(index: Index, store: Store) -> str:
    old = (index.info.get("source") or {}).get("fingerprint") or {}
    new = store.fingerprint
    diffs = [f"{k} {old.get(k)!r} vs {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    return "; ".join(diffs[:3]) or "unknown origin"


def open_index(
    store: Store,
    *,
    metric: Metric = "cosine",
    log: Log | None = None,
) -> Index | OnDiskIndex:
    """The store's index, ready to search: built when missing, updated when the store moved on
    (rebuilt when an update cannot do it).

    The index matches the store's last commit, which is newer than ``store`` when an extract
    committed since it was opened; ``open_synced`` also returns the matching ``Store``.

    Raises:
        IndexStateError: the index was built from another model, or is damaged.
        IndexLockedError: another process kept building it past the wait limit.
    """
    return open_synced(store, metric=metric, log=log)[0]


def open_synced(
    store: Store,
    *,
    metric: Metric = "cosine",
    log: Log | None = None,
) -> tuple[Index | OnDiskIndex, Store]:
    """The store's index ready to search, and the store snapshot it was brought to.

    Reading takes no lock: an index already at ``store``'s version is returned as is (and one
    another process brought to a later commit, with that commit's ``Store``). Otherwise the
    index lock is taken (waiting for another process's build, up to ``lock.wait_seconds()``),
    the store's last commit is read and the index built, updated or rebuilt to it, so that
    the index only ever moves forward and a search never mixes two commits.

    Raises:
        IndexStateError: the index was built from another model, or is damaged.
        IndexLockedError: another process kept building it past the wait limit.
    """
    log = log or _default_log
    try:
        found = _load_any(store.path)
    except IndexStateError:
        found = None  # damaged, or replaced while we read it: look again under the lock
    if found is not None:
        _check_origin(found, store)
        current = store
        if _version(found) != store.version:
            manifest = read_manifest(store.path)
            if manifest is not None and int(manifest["version"]) == _version(found):
                current = _reopen(store)  # another process indexed a newer commit: use it
        if _version(found) == current.version:
            return _ready(found, current), current
    with index_lock(store.path / INDEX_DIR, log):
        current = _latest(store)
        for _ in range(_SYNC_ATTEMPTS):
            index = _open_locked(current, metric, log)
            if _version(index) == current.version:
                return index, current
            # The on-disk index reads the store's manifest itself, and followed a commit
            # made since `current` was read: read that commit too.
            current = _reopen(current)
    raise IndexStateError(
        f"store {store.path} kept committing while its index was brought up to date; retry"
    )


def _load_any(path: Path) -> Index | OnDiskIndex | None:
    """The store's index as it is on disk (no update), or None when it has none."""
    if (path / ONDISK_DIR / ONDISK_INFO).exists():
        return OnDiskIndex.load(path / ONDISK_DIR)
    if (path / INDEX_DIR / "index.json").exists():
        hint = f"rebuild it with `embedkit index {path} --rebuild`"
        return Index.load(path / INDEX_DIR, rebuild_hint=hint)
    return None


def _version(index: Index | OnDiskIndex) -> int | None:
    return (index.info.get("source") or {}).get("store_version")


def _check_origin(index: Index | OnDiskIndex, store: Store) -> None:
    source = index.info.get("source") or {}
    if source.get("fingerprint") == store.fingerprint:
        return
    if isinstance(index, OnDiskIndex):
        raise IndexStateError(
            f"the on-disk index in {store.path / ONDISK_DIR} was built from another model or "
            f"preprocessing; {_rebuild_hint(store)}"
        )
    raise IndexStateError(
        f"the index in {store.path / INDEX_DIR} was built from another model or preprocessing "
        f"({_describe_foreign(index, store)}); {_rebuild_hint(store)}"
    )


def _ready(index: Index | OnDiskIndex, store: Store) -> Index | OnDiskIndex:
    if isinstance(index, Index) and _needs_vectors(index):
        index.attach_vectors(store.vectors, store.ids)
    return index


def _reopen(store: Store) -> Store:
    """The store's last commit, read like ``store`` was (all vectors, or on demand)."""
    return open_store(store.path, vectors=store._vectors is not None)


def _latest(store: Store) -> Store:
    """``store``, or its last commit when an extract committed since it was read."""
    manifest = read_manifest(store.path)
    if manifest is None or int(manifest["version"]) == store.version:
        return store
    return _reopen(store)


def _open_locked(store: Store, metric: Metric, log: Log) -> Index | OnDiskIndex:
    """``open_index``'s decisions, under the index lock."""
    if (store.path / ONDISK_DIR / ONDISK_INFO).exists():
        return _open_ondisk(store, log)
    directory = store.path / INDEX_DIR
    if not (directory / "index.json").exists():
        log(f"no index yet for {store.path}: building one ({len(store.ids)} vectors)")
        return _index_locked(store, None, metric, DEFAULT_MAX_MEMORY, False, log).index
    index = Index.load(directory, rebuild_hint=_rebuild_hint(store))
    _check_origin(index, store)
    _ready(index, store)
    if _version(index) != store.version:
        return _refresh(index, store, log).index
    return index


def _open_ondisk(store: Store, log: Log) -> OnDiskIndex | Index:
    index = OnDiskIndex.load(store.path / ONDISK_DIR)
    _check_origin(index, store)
    if _version(index) == store.version:
        return index
    if _update_ondisk(index, store.path, store.version, log) is None:
        return index
    # Too much changed for an update: rebuild under the budget it was built for (which may
    # now pick the in-RAM index, e.g. after deletions).
    budget = int(index.info.get("max_memory", DEFAULT_MAX_MEMORY))
    return _index_locked(store, None, index.metric, budget, False, log).index


def _ondisk_reason(
    index: OnDiskIndex, fingerprint: dict[str, Any], metric: str, max_memory: int
) -> str | None:
    """Why ``index`` must be rebuilt whatever the store's version; None when it can serve
    (up to date, or updated in place)."""
    if (index.info.get("source") or {}).get("fingerprint") != fingerprint:
        return "the old index came from another model"
    if index.metric != metric:
        return f"the old index was {index.info['key']}/{index.metric}"
    if int(index.info.get("max_memory", max_memory)) != max_memory:
        return "the memory budget changed"
    return None


def _update_ondisk(index: OnDiskIndex, path: Path, version: int, log: Log) -> str | None:
    """Update ``index`` in place to the store's ``version``; None when done, else why not."""
    old = (index.info.get("source") or {}).get("store_version")
    start = time.perf_counter()
    declined = index.update(path)
    if declined is not None:
        return f"the store moved from version {old} to {version} and {declined}"
    log(
        f"updated on-disk index from store version {old} to {_version(index)} "
        f"({len(index)} vectors) in {time.perf_counter() - start:.1f}s"
    )
    return None


def _index_ondisk(
    path: Path,
    key: str,
    metric: Metric,
    max_memory: int,
    fingerprint: dict[str, Any],
    version: int,
    rebuild: bool,
    log: Log,
) -> IndexReport:
    """Build (or find up to date) the on-disk index in ``STORE/index-ondisk``."""
    directory = path / ONDISK_DIR
    reason = ""
    if (directory / ONDISK_INFO).exists() and not rebuild:
        try:
            old = OnDiskIndex.load(directory)
        except IndexStateError as exc:
            reason = f"the old index was unreadable ({exc})"
        else:
            reason = _ondisk_reason(old, fingerprint, metric, max_memory) or ""
            if not reason and (old.info.get("source") or {}).get("store_version") == version:
                message = f"on-disk index is up to date with store version {version}"
                log(message)
                return IndexReport("up to date", message, dict(old.info), directory, old)
            if not reason:
                declined = _update_ondisk(old, path, version, log)
                if declined is None:
                    message = f"on-disk index updated to store version {version}"
                    return IndexReport("updated", message, dict(old.info), directory, old)
                reason = declined
            del old  # drop its memory maps before the rebuild replaces the folder
    elif rebuild:
        reason = "--rebuild was asked for"
    elif (path / INDEX_DIR / "index.json").exists():
        reason = "the in-RAM index and vectors no longer fit --max-memory"
    start = time.perf_counter()
    index = OnDiskIndex.build(path, directory, metric=metric, key=key, log=log)  # and tunes it
    index.info.update(
        backend="ondisk",
        key_chosen="auto",
        max_memory=max_memory,
        build_seconds=round(time.perf_counter() - start, 3),  # stream + train + add + tune
        size_bytes=sum(p.stat().st_size for p in index.data_dir.iterdir() if p.is_file()),
    )
    index.save_info()
    shutil.rmtree(path / INDEX_DIR, ignore_errors=True)  # one index per store
    action: Action = "rebuilt" if reason else "built"
    message = (
        f"{action} on-disk {index.info['key']} index of {len(index)} vectors in "
        f"{index.info['build_seconds']:.1f}s, recall@10 {index.info['recall_at_10']} "
        f"(the in-RAM index and vectors would exceed --max-memory {max_memory} bytes)"
        + (f" ({reason})" if reason else "")
    )
    log(message)
    return IndexReport(action, message, dict(index.info), directory, index)


def _refresh(index: Index, store: Store, log: Log) -> IndexReport:
    directory = store.path / INDEX_DIR
    was = (index.info.get("source") or {}).get("store_version")
    result = _update(index, store)
    if result is None:
        rebuilt = _build(
            store,
            None if index.info.get("key_chosen") == "auto" else index.key,
            index.metric,
            int(index.info.get("max_memory", DEFAULT_MAX_MEMORY)),
        )
        rebuilt.save(directory)
        message = (
            f"index was at store version {was}, store is at {store.version}: rebuilt "
            f"({rebuilt.key}, {len(rebuilt)} vectors, recall@10 {rebuilt.info['recall_at_10']})"
        )
        log(message)
        return _report("rebuilt", message, rebuilt, directory)
    summary, _ = result
    index.save(directory)
    message = (
        f"index was at store version {was}, store is at {store.version}: updated in place "
        f"({summary})"
    )
    log(message)
    return _report("updated", message, index, directory)


def _report(action: Action, message: str, index: Index, directory: Path) -> IndexReport:
    return IndexReport(action, message, dict(index.info), directory, index)


def index_store(
    store: str | os.PathLike[str] | Store,
    *,
    key: str | None = None,
    metric: Metric = "cosine",
    max_memory: int = DEFAULT_MAX_MEMORY,
    rebuild: bool = False,
    log: Log | None = None,
) -> IndexReport:
    """Build or bring up to date the search index in ``STORE/index/``.

    With no ``key``, when the in-RAM index plus the store's vectors would exceed
    ``max_memory``, builds the on-disk IVF-PQ index in ``STORE/index-ondisk/`` instead
    (``ondisk.choose_backend``; the store's vectors are then streamed, never all loaded).

    Args:
        store: a store directory or an open ``Store``.
        key: a FAISS factory string for the in-RAM index; default: ``choose_index_key`` for
            the store's size, or the on-disk index (see above).
        metric: ``cosine`` or ``l2``.
        max_memory: memory budget in bytes for the automatic choice.
        rebuild: build from scratch even when the index could be updated.
        log: receives one line per decision (default: the ``embedkit`` logger).
    """
    if metric not in METRICS:
        raise InvalidArgumentError(f"metric {metric!r} is not one of: {', '.join(METRICS)}")
    log = log or _default_log
    path = store.path if isinstance(store, Store) else Path(store)
    if not isinstance(store, Store) and read_manifest(path) is None:
        open_store(path)  # raises the store's own "not a store" error (before any lock file)
    with index_lock(path / INDEX_DIR, log):
        return _index_locked(
            _latest(store) if isinstance(store, Store) else path,
            key,
            metric,
            max_memory,
            rebuild,
            log,
        )


def _index_locked(
    store: Path | Store,
    key: str | None,
    metric: Metric,
    max_memory: int,
    rebuild: bool,
    log: Log,
) -> IndexReport:
    """``index_store``'s decisions, under the index lock."""
    if key is None:
        # Choose the backend from the id/status columns alone: a store past RAM must not be
        # loaded whole to find out that it is one.
        if isinstance(store, Store):
            path, n, dim = store.path, len(store.ids), store.dim
            fingerprint, version = store.fingerprint, store.version
        else:
            path = store
            n, manifest = count_live(path)
            dim, version = int(manifest["metadata"]["dim"]), int(manifest["version"])
            fingerprint = fingerprint_of(manifest["metadata"])
        backend, chosen = choose_backend(n, dim, max_memory, metric)
        if backend == "ondisk":
            return _index_ondisk(
                path, chosen, metric, max_memory, fingerprint, version, rebuild, log
            )
    st = store if isinstance(store, Store) else open_store(store)
    # One index per store: open_index would prefer a leftover on-disk one to this.
    shutil.rmtree(st.path / ONDISK_DIR, ignore_errors=True)
    directory = st.path / INDEX_DIR
    reason = ""
    if (directory / "index.json").exists() and not rebuild:
        try:
            index = Index.load(directory, rebuild_hint=_rebuild_hint(st))
        except IndexStateError as exc:
            reason = f"the old index was unreadable ({exc})"
        else:
            source = index.info.get("source") or {}
            if source.get("fingerprint") != st.fingerprint:
                reason = f"the old index came from another model ({_describe_foreign(index, st)})"
            elif index.metric != metric or (key is not None and key != index.key):
                reason = f"the old index was {index.key}/{index.metric}"
            elif int(index.info.get("max_memory", max_memory)) != max_memory and key is None:
                reason = "the memory budget changed"
            elif source.get("store_version") == st.version:
                message = f"index is up to date with store version {st.version}"
                log(message)
                return _report("up to date", message, index, directory)
            else:
                if _needs_vectors(index):
                    index.attach_vectors(st.vectors, st.ids)
                return _refresh(index, st, log)
    elif rebuild:
        reason = "--rebuild was asked for"
    index = _build(st, key, metric, max_memory)
    index.save(directory)
    action: Action = "rebuilt" if reason else "built"
    message = (
        f"{action} {index.key} index of {len(index)} vectors in "
        f"{index.info['build_seconds']:.1f}s, recall@10 {index.info['recall_at_10']}"
        + (f" ({reason})" if reason else "")
    )
    log(message)
    return _report(action, message, index, directory)
