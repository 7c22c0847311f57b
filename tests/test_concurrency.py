"""Concurrent use: searches that update a stale index, `index` beside `search`, an extract
committing meanwhile. Writers serialise on the index lock and publish atomically; readers take
no lock and see an old complete index or a new complete one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_photo, synthetic_metadata

from embedkit._fs import atomic_path, atomic_write_bytes
from embedkit.errors import IndexLockedError
from embedkit.index.lifecycle import INDEX_DIR, ONDISK_DIR, index_store, open_index
from embedkit.index.lock import WAIT_ENV, index_lock
from embedkit.index.ondisk import INFO as ONDISK_INFO
from embedkit.index.ondisk import OnDiskIndex
from embedkit.index.ram import Index
from embedkit.index.search import search
from embedkit.store.read import STATUS_OK, open_store
from embedkit.store.writer import StoreWriter

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
DIM = 32


def _metadata(dim: int = DIM) -> dict:
    return synthetic_metadata(dim)


def _clustered(rng: np.random.Generator, n: int) -> np.ndarray:
    centers = rng.normal(size=(100, DIM)).astype(np.float32)
    return (centers[rng.integers(0, 100, n)] + 0.35 * rng.normal(size=(n, DIM))).astype(np.float32)


def _commit(path: Path, ids: np.ndarray, x: np.ndarray) -> None:
    with StoreWriter(path, _metadata()) as w:
        w.add(
            ids=ids.tolist(),
            roots=["/r"] * len(ids),
            paths=[f"{i}.jpg" for i in ids],
            status=[STATUS_OK] * len(ids),
            embedding=x,
        )
        w.commit()


def _run_threads(targets: list[Callable[[], None]]) -> list[BaseException]:
    """Run the targets in threads at once; the exceptions they raised."""
    errors: list[BaseException] = []

    def guard(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _leftovers(folder: Path) -> list[str]:
    """Temp files and unfinished builds anywhere under ``folder``."""
    return [
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.endswith(".tmp") or "building" in p.name or p.name.startswith(".tmp-")
    ]


# -- the write helpers ---------------------------------------------------------------------------


def test_atomic_write_leaves_the_old_file_on_error_and_no_temp(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"one")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"one" and sorted(tmp_path.iterdir()) == [target]


# -- writers in threads: each of these failed before writers took the lock ----------------------


def test_concurrent_saves_into_one_folder_never_break_a_reader(tmp_path):
    """Two writers saving different indexes into one folder, a reader loading meanwhile: the
    old code shared the temp name ``.index.json.tmp`` and deleted the other writer's files."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    small = Index.build(x[:100], np.arange(100), key="Flat")
    large = Index.build(x, np.arange(300), key="Flat")
    d = tmp_path / "idx"
    small.save(d)
    done = threading.Event()
    seen: set[int] = set()

    def writer(index: Index) -> Callable[[], None]:
        def run() -> None:
            for _ in range(25):
                index.save(d)

        return run

    def reader() -> None:
        while not done.is_set():
            loaded = Index.load(d)  # never missing, truncated or mixed
            seen.add(len(loaded))
            assert len(loaded) == len(loaded.ids) and loaded.info["n"] == len(loaded)

    def writers() -> None:
        try:
            assert not _run_threads([writer(small), writer(large)])
        finally:
            done.set()

    errors = _run_threads([writers, reader])
    assert not errors, errors
    assert len(Index.load(d)) in (100, 300) and seen <= {100, 300}
    info = json.loads((d / "index.json").read_text())
    assert sorted(p.name for p in d.iterdir()) == sorted(["index.json", *info["files"]])
    assert not _leftovers(tmp_path)


def test_concurrent_ondisk_builds_into_one_folder_and_a_reader(tmp_path):
    """Two on-disk builds into one folder (the old code built both in ``.idx.building`` and
    removed the folder under the other) while a reader searches: the builds take turns, the
    reader always finds its query, and one build's folder is left."""
    rng = np.random.default_rng(1)
    store = tmp_path / "store"
    ids = np.arange(3_000, dtype=np.int64) * 3 + 1
    x = _clustered(rng, 3_000)
    _commit(store, ids, x)
    d = tmp_path / "idx"
    OnDiskIndex.build(store, d, key="IVF16,PQ8")
    done = threading.Event()
    searched = [0]

    def build() -> None:
        OnDiskIndex.build(store, d, key="IVF16,PQ8")

    def reader() -> None:
        while not done.is_set():
            index = OnDiskIndex.load(d)
            _, found = index.search(x[:5], 1)
            assert (found[:, 0] == ids[:5]).all()
            searched[0] += 1

    def builders() -> None:
        try:
            assert not _run_threads([build, build])
        finally:
            done.set()

    errors = _run_threads([builders, reader])
    assert not errors, errors
    assert searched[0] > 0
    index = OnDiskIndex.load(d)
    assert sorted(p.name for p in d.iterdir()) == sorted([ONDISK_INFO, index.data_dir.name])
    assert not _leftovers(tmp_path)


# -- the lock and the store's commits ------------------------------------------------------------


def test_stale_search_waits_for_the_lock_with_a_timeout_an_up_to_date_one_does_not(
    tmp_path, monkeypatch
):
    rng = np.random.default_rng(2)
    store = tmp_path / "store"
    _commit(store, np.arange(50), _clustered(rng, 50))
    index_store(store)
    monkeypatch.setenv(WAIT_ENV, "0.5")
    result: list[object] = []

    def open_it() -> None:
        result.append(open_index(open_store(store)))

    with index_lock(store / INDEX_DIR):  # another writer (another thread is another holder)
        assert not _run_threads([open_it])  # up to date: read without the lock
        assert isinstance(result[0], Index)
        _commit(store, np.arange(50, 60), _clustered(rng, 10))  # now stale
        errors = _run_threads([open_it])
        assert len(errors) == 1 and isinstance(errors[0], IndexLockedError)
        assert f"pid {os.getpid()}" in str(errors[0]) and WAIT_ENV in str(errors[0])
    # Once the lock is free, the wait ends with the index brought up to date.
    assert len(open_index(open_store(store))) == 60


def test_search_from_an_older_snapshot_never_moves_the_index_back(tmp_path):
    """A search that read the store before an extract committed, and finds the index already
    at the newer commit, uses that commit (and names its hits from it) instead of rewriting
    the index for the old one (what the old code did)."""
    rng = np.random.default_rng(3)
    store = tmp_path / "store"
    x = _clustered(rng, 60)
    _commit(store, np.arange(40), x[:40])
    index_store(store)
    old = open_store(store, vectors=False)
    _commit(store, np.arange(40, 60), x[40:])
    index_store(store)  # `embedkit index` (or another search) ran after the commit
    hits = search(old, [x[50]], k=1)[0].hits
    assert hits[0].id == 50 and hits[0].path.endswith("50.jpg") and hits[0].score > 0.999
    info = json.loads((store / INDEX_DIR / "index.json").read_text())
    assert info["source"]["store_version"] == open_store(store).version == 2


# -- real processes ------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "embedkit.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def _wait_for_version(store: Path, version: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while open_store(store, vectors=False).version < version:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the background writer never committed"
        time.sleep(0.05)


def _check_searches(procs: list[tuple[object, subprocess.Popen[str]]], top: Callable) -> None:
    for query, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        hits = json.loads(out)[0]["hits"]
        assert top(query, hits[0]) and hits[0]["score"] > 0.999, (query, hits[:2])


_EXTRACTS = f"""
import sys, time, embedkit
store, src, *rounds = sys.argv[1:]
for r in range(len(rounds)):
    embedkit.extract([src, *rounds[: r + 1]], store, model={TINY!r}, random_init=True,
                     runtime="torch", workers=0)
    time.sleep(0.2)
"""


@pytest.mark.slow
def test_eight_searches_on_a_stale_store_while_extract_commits(tmp_path):
    """The acceptance run: a tiny-model store whose index is behind, 8 `embedkit search`
    processes at once while extracts commit 4 images at a time. Every search exits 0 with its
    own image first; the index ends at the store's last commit; no temp files are left."""
    from embedkit import extract

    src, store = tmp_path / "src", tmp_path / "S"
    for i in range(16):
        make_photo(src / f"a{i:02d}.jpg", i, (64, 48))
    # The store and its index, made in this process (the CLI's `extract`/`index` call these).
    extract([src], store, model=TINY, random_init=True, runtime="torch", workers=0)
    assert index_store(store).action == "built"
    rounds = [tmp_path / "more" / f"r{r}" for r in range(6)]
    for r, folder in enumerate(rounds):
        for j in range(4):
            make_photo(folder / f"b{j}.jpg", 100 + 4 * r + j, (64, 48))
    version = open_store(store, vectors=False).version
    # Another process commits 4 new images at a time, 6 times (one `extract` per round, each
    # adding a folder), while the searches run.
    writer = subprocess.Popen(
        [sys.executable, "-c", _EXTRACTS, str(store), str(src), *map(str, rounds)],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    _wait_for_version(store, version + 1, writer)  # stale from here on, and moving
    queries = [str(src / f"a{i:02d}.jpg") for i in range(0, 16, 2)]
    procs = [(q, _cli("search", str(store), q, "-k", "3", "--json")) for q in queries]
    _check_searches(procs, lambda q, hit: hit["path"] == q)
    assert writer.wait(timeout=120) == 0, writer.communicate()
    final = _cli("index", str(store), "--json")
    assert final.wait(timeout=60) == 0, final.communicate()
    assert json.load(final.stdout)["action"] in ("updated", "up to date")
    st = open_store(store, vectors=False)
    assert len(st) == 40 and index_store(store).action == "up to date"
    index = Index.load(store / INDEX_DIR)
    assert index.info["source"]["store_version"] == st.version
    np.testing.assert_array_equal(np.sort(index.ids), np.sort(st.ids))
    assert not _leftovers(store) and not (store / ONDISK_DIR).exists()
    named = json.loads((store / INDEX_DIR / "index.json").read_text())["files"]
    assert sorted(p.name for p in (store / INDEX_DIR).iterdir()) == sorted(["index.json", *named])


# A second writer process: 8 commits of 120 synthetic rows, 0.3 s apart.
_WRITER = """
import sys, time
import numpy as np
from embedkit.store.writer import StoreWriter
meta = {"model": "synthetic", "weights_sha256": "0", "random_init": True, "preprocess": {},
        "dim": 32, "normalize": False}
rng = np.random.default_rng(5)
centers = rng.normal(size=(100, 32)).astype(np.float32)
for c in range(8):
    ids = np.arange(120) * 7 + 10**6 + 1000 * c
    x = centers[rng.integers(0, 100, 120)] + 0.35 * rng.normal(size=(120, 32))
    with StoreWriter(sys.argv[1], meta) as w:
        w.add(ids=ids.tolist(), roots=["/r"] * 120, paths=[f"{i}.jpg" for i in ids],
              status=["ok"] * 120, embedding=x.astype(np.float32))
        w.commit()
    time.sleep(0.3)
"""


@pytest.mark.slow
def test_searches_on_a_stale_ondisk_index_while_commits_force_a_rebuild(tmp_path):
    """The same with the on-disk index (`--max-memory 256K`): commits past MAX_CHURN make some
    search rebuild it into a new folder while other searches read the old one."""
    rng = np.random.default_rng(4)
    store = tmp_path / "S"
    base = np.arange(3_000, dtype=np.int64) * 7 + 5
    x = _clustered(rng, 3_000)
    _commit(store, base, x)
    built = _cli("index", str(store), "--max-memory", "256K", "--json")
    assert built.wait(timeout=120) == 0, built.communicate()
    assert json.load(built.stdout)["backend"] == "ondisk"
    _commit(store, np.arange(100) * 7 + 6, _clustered(rng, 100))  # stale
    # 8 commits of 120 rows: past 20% of 3,000 after the fifth, the next update rebuilds.
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(store)], stderr=subprocess.PIPE, text=True, env=ENV
    )
    version = open_store(store, vectors=False).version
    _wait_for_version(store, version + 1, writer)
    queries = [int(i) for i in base[::500]]
    procs = [(q, _cli("search", str(store), str(q), "-k", "3", "--json")) for q in queries]
    _check_searches(procs, lambda q, hit: hit["id"] == q)
    assert writer.wait(timeout=120) == 0, writer.communicate()
    final = _cli("index", str(store), "--max-memory", "256K", "--json")
    assert final.wait(timeout=120) == 0, final.communicate()
    st = open_store(store, vectors=False)
    index = OnDiskIndex.load(store / ONDISK_DIR)
    assert index.info["source"]["store_version"] == st.version and len(st) == 3_000 + 100 + 960
    np.testing.assert_array_equal(np.sort(index.ids[index.alive_rows()]), np.sort(st.ids))
    assert not _leftovers(store) and not (store / INDEX_DIR).exists()
    listing = sorted(p.name for p in (store / ONDISK_DIR).iterdir())
    assert listing == sorted([ONDISK_INFO, index.data_dir.name])
