"""On-disk IVF-PQ: recall against exact search, store ids and the live view, the budget choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_metadata

from embedkit.errors import IndexStateError, InvalidArgumentError
from embedkit.index.choice import choose_index_key
from embedkit.index.ondisk import OnDiskIndex, choose_backend, ondisk_key, recall_at_k
from embedkit.store.read import STATUS_DELETED, STATUS_FAILED, STATUS_OK
from embedkit.store.writer import StoreWriter

DIM = 32


def clustered(rng: np.random.Generator, n: int, dim: int = DIM, k: int = 200) -> np.ndarray:
    centers = rng.normal(size=(k, dim)).astype(np.float32)
    return (centers[rng.integers(0, k, n)] + 0.35 * rng.normal(size=(n, dim))).astype(np.float32)


_metadata = synthetic_metadata


def _write(writer: StoreWriter, ids: np.ndarray, x: np.ndarray) -> None:
    writer.add(
        ids=ids.tolist(),
        roots=["/r"] * len(ids),
        paths=[f"{i}.jpg" for i in ids],
        status=[STATUS_OK] * len(ids),
        embedding=x,
    )
    writer.commit()


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    """20k live vectors in 3 parts, plus a failed row, a deleted id and a re-embedded id."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("ondisk") / "store"
    x = clustered(rng, 20_000)
    ids = np.arange(20_000, dtype=np.int64) * 7 + 3  # store ids are not row numbers
    with StoreWriter(path, _metadata(DIM)) as w:
        for s in range(0, 20_000, 8_000):
            _write(w, ids[s : s + 8_000], x[s : s + 8_000])
        w.add(
            ids=[1],
            roots=["/r"],
            paths=["bad.jpg"],
            status=[STATUS_FAILED],
            reason=["unidentified"],
        )
        w.add(ids=[int(ids[5])], roots=["/r"], paths=["5.jpg"], status=[STATUS_DELETED])
        x[6] = clustered(rng, 1)[0]  # id of row 6 re-embedded with a new vector
        _write(w, ids[6:7], x[6:7])
    live = np.ones(20_000, bool)
    live[5] = False
    return path, ids[live], x[live], int(ids[5])


def _exact(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1)[:, :k]


def test_recall_store_ids_and_reload(synthetic_store, tmp_path):
    path, ids, x, deleted = synthetic_store
    index = OnDiskIndex.build(path, tmp_path / "idx", shard_rows=7_000)
    # Tune on fresh queries (the default sample is stored vectors, which find themselves).
    index.tune(queries=clustered(np.random.default_rng(2), 200))
    assert len(index) == len(ids) == 19_999
    assert index.info["shards"] == 3 and index.info["key"] == ondisk_key(19_999, DIM)
    assert (index.data_dir / "lists.ivfdata").stat().st_size > 0
    assert index.data_dir.parent == tmp_path / "idx"  # its build's folder, named by ondisk.json
    q = clustered(np.random.default_rng(1), 200)  # fresh queries, not stored vectors
    truth = ids[_exact(x, q, 10)]
    scores, found = index.search(q, 10)
    assert recall_at_k(found, truth) >= 0.9
    assert np.isin(found, ids).all() and deleted not in found
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    # The re-embedded id is found by its new vector (the live view, not the first row);
    # it is row 5 of the live arrays (row 5 of the original was deleted).
    _, top = index.search(x[5:6], 1)
    assert top[0, 0] == ids[5] == 6 * 7 + 3
    again = OnDiskIndex.load(tmp_path / "idx")
    np.testing.assert_array_equal(again.search(q, 10)[1], found)
    np.testing.assert_array_equal(index.exact(q), truth)


def test_l2_metric_and_small_k(synthetic_store, tmp_path):
    path, ids, x, _ = synthetic_store
    index = OnDiskIndex.build(path, tmp_path / "l2", metric="l2", key="IVF64,PQ4")
    q = x[:50] + 0.01
    dist, found = index.search(q, 3)
    assert (found[:, 0] == ids[:50]).mean() >= 0.95
    np.testing.assert_allclose(dist[:, 0], np.linalg.norm(q - x[:50], axis=1), rtol=1e-3, atol=1e-3)


def test_bad_arguments(synthetic_store, tmp_path):
    path, *_ = synthetic_store
    with pytest.raises(InvalidArgumentError, match="IVF"):
        OnDiskIndex.build(path, tmp_path / "x", key="HNSW32")
    with pytest.raises(IndexStateError):
        OnDiskIndex.load(tmp_path / "nothing")


def test_budget_picks_ondisk_when_ram_index_does_not_fit():
    gib = 2**30
    # 100k x 512 floats (200 MB) fit a 4 GiB budget: the in-RAM index, choose_index_key's key.
    backend, key = choose_backend(100_000, 512, 4 * gib)
    assert backend == "ram" and key == choose_index_key(100_000, 512, 4 * gib)
    # 100M x 512: the raw vectors alone are 205 GB; the on-disk index needs only its centroids.
    backend, key = choose_backend(100_000_000, 512, 4 * gib)
    assert backend == "ondisk" and key == ondisk_key(100_000_000, 512)
    assert key == "IVF32768_HNSW32,PQ64"  # 4*sqrt(1e8) rounded to a power of two
    # 10M x 64 in 2 GiB: a PQ index would fit, but not with the 2.5 GB of vectors it re-ranks.
    assert choose_backend(10_000_000, 64, 2 * gib)[0] == "ondisk"
    with pytest.raises(InvalidArgumentError, match="max-memory"):
        choose_backend(100_000_000, 512, 2**20)


def test_cli_index_with_tiny_budget_goes_on_disk_and_search_uses_it(tmp_path):
    """`embedkit index --max-memory 1M` on a 10k x 32-d store (1.3 MB of vectors) builds the
    on-disk index; `search` and `embedkit search` go through it and return store ids."""
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.cli import search as cli_search  # noqa: F401  (registers index/search)
    from embedkit.index.lifecycle import INDEX_DIR, ONDISK_DIR, index_store, open_index
    from embedkit.index.search import search
    from embedkit.store.read import open_store

    rng = np.random.default_rng(3)
    n = 10_000
    x = clustered(rng, n)
    ids = np.arange(n, dtype=np.int64) * 5 + 11
    path = tmp_path / "store"
    with StoreWriter(path, _metadata(DIM)) as w:
        _write(w, ids, x)
    assert choose_backend(n, DIM, 2**20)[0] == "ondisk"
    runner = CliRunner()
    # A real process: faiss's C++ printf()s reach the process's stdout, which CliRunner does
    # not capture; --json output must still be nothing but JSON.
    done = subprocess.run(
        [sys.executable, "-m", "embedkit.cli", "index", str(path), "--max-memory", "1M", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["action"] == "built" and report["backend"] == "ondisk"
    assert report["key"] == ondisk_key(n, DIM) and report["recall_at_10"] >= 0.95
    data_dir = OnDiskIndex.load(path / ONDISK_DIR).data_dir
    assert report["build_seconds"] > 0 and (data_dir / "lists.ivfdata").exists()
    assert not (path / INDEX_DIR).exists()
    # Unchanged store, same budget: nothing to do.
    again = index_store(path, max_memory=2**20)
    assert again.action == "up to date" and isinstance(again.index, OnDiskIndex)
    st = open_store(path)
    assert isinstance(open_index(st), OnDiskIndex)
    # Recall of search() through the on-disk index against exact search on the store.
    # Queries from the store's own clusters (clustered() with a new rng draws new centers).
    q = x[rng.choice(n, 100, replace=False)] + 0.35 * rng.normal(size=(100, DIM))
    q = q.astype(np.float32)
    results = search(st, list(q), k=10)
    found = np.array([[h.id for h in r.hits] for r in results])
    truth = ids[_exact(x, q, 10)]
    assert np.isin(found, ids).all()
    assert recall_at_k(found, truth) >= 0.9
    hits = search(st, [int(ids[7])], k=1)[0].hits
    assert hits[0].id == ids[7] and hits[0].path.endswith(f"{ids[7]}.jpg")
    # From a path, search reads the queried row only: the store's vectors stay on disk.
    lazy = open_store(path, vectors=False)
    assert search(lazy, [int(ids[7])], k=1)[0].hits[0].id == ids[7]
    assert lazy._vectors is None
    r = runner.invoke(app, ["search", str(path), str(int(ids[7])), "-k", "3", "--csv"])
    assert r.exit_code == 0, r.output
    assert f",1,1.000000,{ids[7]}," in r.stdout
    # A roomy budget goes back to the in-RAM index, and the on-disk one is removed.
    back = index_store(path)
    assert back.path == path / INDEX_DIR and not (path / ONDISK_DIR).exists()
    # So does an explicit --index-key, whatever the budget.
    assert index_store(path, max_memory=2**20).action == "rebuilt"  # replaces the in-RAM one
    assert not (path / INDEX_DIR).exists()
    assert index_store(path, key="Flat", max_memory=2**20).index.key == "Flat"
    assert not (path / ONDISK_DIR).exists()


def test_duplicates_through_the_ondisk_index_match_the_in_ram_ones(tmp_path):
    """Past RAM, duplicates query the on-disk index with its memory-mapped vectors and never
    load the store's; the groups equal the in-RAM path's on the same store."""
    from embedkit.index.duplicates import find_duplicates
    from embedkit.index.lifecycle import ONDISK_DIR, index_store
    from embedkit.store.read import open_store

    rng = np.random.default_rng(5)
    n = 6_000
    x = clustered(rng, n, k=300)
    planted = rng.choice(n, 40, replace=False)
    x[planted[20:]] = x[planted[:20]] + 0.01 * rng.normal(size=(20, DIM)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    path = tmp_path / "store"
    with StoreWriter(path, _metadata(DIM)) as w:
        _write(w, ids[:3000], x[:3000])
        _write(w, ids[3000:], x[3000:])

    def groups():
        return sorted(sorted(m.id for m in g.members) for g in find_duplicates(path, 0.99))

    index_store(path, max_memory=2**18)  # 6k x 32-d = 768 KB of vectors: on disk
    assert (path / ONDISK_DIR).exists()
    lazy = open_store(path, vectors=False)
    ondisk = sorted(sorted(m.id for m in g.members) for g in find_duplicates(lazy, 0.99))
    assert lazy._vectors is None
    index_store(path)  # the default budget: back in RAM
    assert not (path / ONDISK_DIR).exists()
    in_ram = groups()
    pairs = sorted(
        sorted([int(ids[a]), int(ids[b])]) for a, b in zip(planted[:20], planted[20:], strict=True)
    )
    assert all(p in in_ram for p in pairs)
    assert ondisk == in_ram


def test_lazy_store_reads_single_vectors_from_their_parts(synthetic_store):
    from embedkit.store.read import open_store

    path, ids, x, _ = synthetic_store
    lazy = open_store(path, vectors=False)
    assert lazy._vectors is None and "embedding" not in lazy.table.column_names
    want = ids[[0, 5, 6, 8_500, len(ids) - 1]]
    rows = lazy.rows_of_ids(np.append(want, [2]))  # 2 is no stored id
    assert rows[-1] == -1
    full = open_store(path)
    np.testing.assert_array_equal(lazy.vectors_at(rows[:-1]), full.vectors[rows[:-1]])
    assert lazy.abspath(int(rows[0])) == full.abspaths[int(rows[0])]
    np.testing.assert_array_equal(lazy.vectors, full.vectors)  # all of them, on first access


def test_update_appends_tombstones_and_stays_correct(tmp_path):
    """A store that moved on is brought up to date in place: new rows searchable, deleted and
    re-embedded rows' old vectors never returned, recall intact; too much churn rebuilds."""
    from embedkit.index.duplicates import find_duplicates
    from embedkit.index.lifecycle import ONDISK_DIR, index_store
    from embedkit.index.search import search
    from embedkit.store.read import open_store

    rng = np.random.default_rng(11)
    n = 10_000
    x = clustered(rng, n)
    ids = np.arange(n, dtype=np.int64) * 5 + 11
    path = tmp_path / "store"
    budget = 2**20  # 10k x 32-d = 1.3 MB of vectors: on disk
    with StoreWriter(path, _metadata(DIM)) as w:
        _write(w, ids, x)
    first = index_store(path, max_memory=budget)
    assert first.action == "built" and isinstance(first.index, OnDiskIndex)
    # A new part: 300 new rows (one a copy of row 0), id 7 deleted, id 8 re-embedded.
    new_ids = np.arange(300, dtype=np.int64) * 5 + 10**7
    new_x = clustered(rng, 300)
    new_x[0] = x[0]
    moved = clustered(rng, 1)[0]
    with StoreWriter(path, _metadata(DIM)) as w:
        _write(w, new_ids, new_x)
        w.add(ids=[int(ids[7])], roots=["/r"], paths=[f"{ids[7]}.jpg"], status=[STATUS_DELETED])
        _write(w, ids[8:9], moved[None])
    report = index_store(path, max_memory=budget)
    assert report.action == "updated", report.message
    index = report.index
    assert len(index) == n - 1 + 300 and index.n == n + 300 + 1
    st = open_store(path)
    assert sorted(st.ids.tolist()) == sorted(index.ids[index.alive_rows()].tolist())
    # New rows are found, the deleted id never, the re-embedded id by its new vector only.
    hits = search(st, [new_x[5]], k=3)[0].hits
    assert hits[0].id == new_ids[5] and hits[0].score > 0.999
    found = search(st, [x[7], x[8]], k=20)
    assert all(h.id != ids[7] for h in found[0].hits)
    assert all(not (h.id == ids[8] and h.score > 0.999) for h in found[1].hits)
    hits = search(st, [moved], k=1)[0].hits
    assert hits[0].id == ids[8] and hits[0].score > 0.999
    # Recall against exact search over the live rows.
    live_x = np.concatenate([np.delete(x, [7, 8], axis=0), new_x, moved[None]])
    live_ids = np.concatenate([np.delete(ids, [7, 8]), new_ids, ids[8:9]])
    q = live_x[rng.choice(len(live_x), 100, replace=False)] + 0.35 * rng.normal(size=(100, DIM))
    q = q.astype(np.float32)
    got = np.array([[h.id for h in r.hits] for r in search(st, list(q), k=10)])
    assert recall_at_k(got, live_ids[_exact(live_x, q, 10)]) >= 0.9
    # Duplicates see the new copy of row 0 and no tombstoned row.
    groups = [sorted(m.id for m in g.members) for g in find_duplicates(path, 0.999)]
    assert sorted([int(ids[0]), int(new_ids[0])]) in groups
    # An interrupted update (bytes appended past the recorded rows) is repaired by the next.
    with open(OnDiskIndex.load(path / ONDISK_DIR).data_dir / "vectors.f32", "ab") as f:
        f.write(b"\0" * 4 * DIM * 3)
    with StoreWriter(path, _metadata(DIM)) as w:
        _write(w, new_ids[:1] + 1, new_x[1:2])
    assert index_store(path, max_memory=budget).action == "updated"
    hits = search(open_store(path), [new_x[1]], k=2)[0].hits
    assert {h.id for h in hits} == {int(new_ids[1]), int(new_ids[0] + 1)}
    # search() itself updates a stale on-disk index (no `embedkit index` in between).
    with StoreWriter(path, _metadata(DIM)) as w:
        _write(w, new_ids[:1] + 2, new_x[2:3])
    hits = search(open_store(path), [new_x[2]], k=1)[0].hits
    assert hits[0].id == new_ids[0] + 2
    assert index_store(path, max_memory=budget).action == "up to date"
    # Churn past MAX_CHURN: rebuilt from scratch.
    more = np.arange(3_000, dtype=np.int64) * 5 + 2 * 10**7
    with StoreWriter(path, _metadata(DIM)) as w:
        _write(w, more, clustered(rng, 3_000))
    again = index_store(path, max_memory=budget)
    assert again.action == "rebuilt" and "exceed" in again.message
    assert again.index.info.get("delta") is None and len(again.index) == len(open_store(path))


def test_tiny_store_on_disk_trains_smaller_codebooks(tmp_path: Path) -> None:
    """200 vectors of dim 1280 under a 1500K budget go on disk; PQ's 8-bit codebooks need 256
    training points, so the key takes fewer bits instead of a FAISS traceback."""
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.store.read import row_id
    from embedkit.store.writer import StoreWriter

    n, d = 200, 1280
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    with StoreWriter(tmp_path / "s", synthetic_metadata(d)) as w:
        w.add(
            ids=[row_id("/r", f"{i}.jpg") for i in range(n)],
            roots=["/r"] * n,
            paths=[f"{i}.jpg" for i in range(n)],
            status=["ok"] * n,
            embedding=x,
        )
        w.commit()
    assert ondisk_key(n, d).endswith("x7") and ondisk_key(10_000, d).endswith("PQ64")
    r = CliRunner().invoke(app, ["index", str(tmp_path / "s"), "--max-memory", "1500K", "--json"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert json.loads(r.stdout)["backend"] == "ondisk"
    r = CliRunner().invoke(app, ["search", str(tmp_path / "s"), "7.jpg", "-k", "1", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["hits"][0]["path"] == "/r/7.jpg"
