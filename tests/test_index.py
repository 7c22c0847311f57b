"""Index: key choice at its thresholds, recall against exact search, id mapping, persistence."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from embedkit.errors import IndexStateError, InvalidArgumentError
from embedkit.index.choice import FLAT_MAX_WORK, HNSW_MAX_N, choose_index_key, estimate_memory
from embedkit.index.ram import Index

GiB = 2**30


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Gaussian blobs whose members are well apart (intra-cluster cosine ~0.7)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    noise = rng.standard_normal((n, dim)).astype(np.float32)
    return (centers[labels] + 0.8 * noise).astype(np.float32)


def random_ids(n: int, seed: int = 1) -> np.ndarray:
    # Large, unordered ids: a result that came from row order would not match them.
    return np.random.default_rng(seed).choice(2**62, n, replace=False).astype(np.int64)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered(12_000, 32)
    queries = x[:200] + 0.3 * np.random.default_rng(5).standard_normal((200, 32)).astype(np.float32)
    return x, random_ids(len(x)), queries


# -- choose_index_key ---------------------------------------------------------------------


def test_small_collections_are_searched_exactly() -> None:
    assert choose_index_key(1, 512, GiB) == "Flat"
    assert choose_index_key(FLAT_MAX_WORK // 512, 512, GiB) == "Flat"
    assert choose_index_key(FLAT_MAX_WORK // 512 + 1, 512, GiB) == "HNSW32"
    # the threshold is work per query, so lower dimensions stay exact for longer
    assert choose_index_key(200_000, 128, GiB) == "Flat"


def test_hnsw_up_to_its_size_limit_then_inverted_files() -> None:
    assert choose_index_key(HNSW_MAX_N, 512, 8 * GiB) == "HNSW32"
    key = choose_index_key(HNSW_MAX_N + 1, 512, 8 * GiB)
    assert key.startswith("IVF") and key.endswith(",Flat")
    assert choose_index_key(1_000_000, 128, 4 * GiB) == "IVF4096,Flat"
    # many centroids get an HNSW coarse quantizer
    assert choose_index_key(50_000_000, 64, 64 * GiB).startswith("IVF32768_HNSW32,")


def test_memory_budget_moves_to_compressed_codes() -> None:
    n, dim = 200_000, 512
    hnsw = estimate_memory("HNSW32", n, dim)
    assert choose_index_key(n, dim, hnsw) == "HNSW32"
    # raw vectors fit but not the graph -> inverted file over raw vectors
    assert choose_index_key(n, dim, hnsw - 1).endswith(",Flat")
    # 1 byte per dimension
    assert choose_index_key(n, dim, 200 * 2**20).endswith(",SQ8")
    # the most bytes per vector that fit: 64, then 32 ...
    ivf = choose_index_key(n, dim, 200 * 2**20).split(",")[0]
    pq64 = estimate_memory(f"{ivf},PQ64", n, dim)
    assert choose_index_key(n, dim, pq64) == f"{ivf},PQ64"
    assert choose_index_key(n, dim, pq64 - 1) == f"{ivf},PQ32"
    # every automatic key really is a FAISS factory string, within its budget
    for budget in (GiB, 200 * 2**20, pq64 - 1):
        key = choose_index_key(n, dim, budget)
        assert estimate_memory(key, n, dim) <= budget
        faiss.index_factory(dim, key)


def test_small_but_memory_tight_sets_skip_the_inverted_file() -> None:
    key = choose_index_key(300, 512, 200_000)
    assert key == "SQ8"


def test_nothing_fits_or_bad_arguments_say_how_to_fix() -> None:
    with pytest.raises(InvalidArgumentError, match="--max-memory"):
        choose_index_key(1_000_000, 512, 1000)
    with pytest.raises(InvalidArgumentError, match="cosine, l2"):
        choose_index_key(10, 8, GiB, metric="dot")
    with pytest.raises(InvalidArgumentError):
        choose_index_key(10, 0, GiB)


# -- recall of each index type against Flat ---------------------------------------------


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    pairs = zip(found, exact, strict=True)
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in pairs]))


# PQ4 on 32 dims: 8 dims per sub-quantizer; low-dimensional k-means is slow in FAISS.
# l2 is covered by one graph and one compressed index.
_RECALL_CASES = [
    *((key, "cosine") for key in ["HNSW32", "IVF64,Flat", "IVF64,SQ8", "IVF64,PQ4", "SQ8"]),
    ("HNSW32", "l2"),
    ("IVF64,SQ8", "l2"),
]


@pytest.mark.parametrize(("key", "metric"), _RECALL_CASES)
def test_recall_against_flat(data, key: str, metric: str) -> None:
    x, ids, queries = data
    exact = Index.build(x, ids, key="Flat", metric=metric)
    approx = Index.build(x, ids, key=key, metric=metric)
    _, truth = exact.search(queries, 10)
    scores, found = approx.search(queries, 10)
    assert _recall(found, truth) >= 0.95
    assert approx.info["recall_at_10"] >= 0.95
    # scores are sorted best first and are exact for re-ranked indexes
    if metric == "cosine":
        assert np.all(np.diff(scores, axis=1) <= 1e-6)
    else:
        assert np.all(np.diff(scores, axis=1) >= -1e-4)


def test_cosine_scores_are_similarities_and_l2_scores_distances(data) -> None:
    x, ids, _ = data
    cos = Index.build(x[:100], ids[:100])
    s, i = cos.search(x[:1] * 7.0, 1)  # scale does not matter for cosine
    assert i[0, 0] == ids[0] and s[0, 0] == pytest.approx(1.0, abs=1e-5)
    l2 = Index.build(x[:100], ids[:100], metric="l2")
    s, i = l2.search(x[:1] + np.array([[3.0] + [0.0] * 31], np.float32), 1)
    assert i[0, 0] == ids[0] and s[0, 0] == pytest.approx(3.0, abs=1e-4)


def test_k_larger_than_the_index_pads_with_minus_one(data) -> None:
    x, ids, _ = data
    index = Index.build(x[:3], ids[:3])
    scores, found = index.search(x[:1], 5)
    assert set(found[0, :3]) == set(ids[:3])
    assert list(found[0, 3:]) == [-1, -1] and np.all(np.isneginf(scores[0, 3:]))


def test_threshold_search_returns_everything_above(data) -> None:
    x, ids, _ = data
    index = Index.build(x[:2000], ids[:2000], key="HNSW32")
    [(scores, found)] = index.search_threshold(x[:1], 0.3)
    exact = (x[:2000] / np.linalg.norm(x[:2000], axis=1, keepdims=True)) @ (
        x[0] / np.linalg.norm(x[0])
    )
    assert int((exact >= 0.3).sum()) > 64  # needs more than the first round of 64
    assert set(found) <= set(ids[:2000][exact >= 0.3 - 1e-5])
    assert len(found) >= 0.95 * int((exact >= 0.3).sum())
    assert np.all(scores >= 0.3) and np.all(np.diff(scores) <= 1e-6)


# -- ids: remove, re-add ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["Flat", "HNSW32", "IVF64,Flat", "IVF64,SQ8"])
def test_removed_ids_never_come_back_and_readds_map_to_new_ids(data, key: str) -> None:
    x, ids, _ = data
    x, ids = x[:3000], ids[:3000]
    index = Index.build(x, ids, key=key)
    gone = ids[:50]
    assert index.remove(np.concatenate([gone, [123]])) == 50  # unknown ids are ignored
    assert len(index) == 2950
    _, found = index.search(x[:50], 10)
    assert not np.isin(found, gone).any()
    # re-add the same vectors under new ids, and one old id with a new vector
    new_ids = np.arange(10**12, 10**12 + 50, dtype=np.int64)
    index.add(x[:50], new_ids)
    _, found = index.search(x[:50], 1)
    assert list(found[:, 0]) == list(new_ids)
    index.remove(new_ids[:1])
    index.add(x[100:101], ids[:1])  # an id removed earlier comes back with another vector
    _, found = index.search(x[100:101], 2)
    assert set(found[0]) == {ids[100], ids[0]}
    _, found = index.search(x[:1], 3)
    assert ids[0] not in found[0] and new_ids[0] not in found[0]


def test_adding_a_live_id_is_refused(data) -> None:
    x, ids, _ = data
    index = Index.build(x[:10], ids[:10])
    with pytest.raises(InvalidArgumentError, match="remove them first"):
        index.add(x[:1], ids[:1])


def test_hnsw_compacts_when_many_ids_are_removed(data) -> None:
    x, ids, _ = data
    index = Index.build(x[:1000], ids[:1000], key="HNSW32")
    index.remove(ids[:100])
    assert index._index.ntotal == 1000  # tombstoned
    index.remove(ids[100:300])
    assert index._index.ntotal == 700  # rebuilt without the dead vectors
    assert set(index.ids) == set(ids[300:1000])


def test_bad_input_is_refused(data) -> None:
    x, ids, _ = data
    with pytest.raises(InvalidArgumentError, match="unique"):
        Index.build(x[:2], np.array([1, 1]))
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        Index.build(x[:2], np.array([1, -5]))
    with pytest.raises(InvalidArgumentError, match="NaN"):
        Index.build(np.full((2, 4), np.nan), np.array([1, 2]))
    with pytest.raises(InvalidArgumentError, match="factory string"):
        Index.build(x[:10], ids[:10], key="NotAnIndex")
    index = Index.build(x[:10], ids[:10])
    with pytest.raises(InvalidArgumentError, match=r"\(N, 32\)"):
        index.search(np.zeros((1, 5), np.float32), 1)


# -- persistence ----------------------------------------------------------------------------


def test_save_load_round_trip_keeps_ids_params_and_tombstones(data, tmp_path) -> None:
    x, ids, queries = data
    index = Index.build(x[:3000], ids[:3000], key="HNSW32")
    index.remove(ids[:10])
    index.info["source"] = {"version": 7}
    index.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert meta["n"] == 2990 and meta["key"] == "HNSW32" and meta["size_bytes"] > 0
    assert meta["recall_at_10"] >= 0.95 and meta["build_seconds"] >= 0
    loaded = Index.load(tmp_path / "ix")
    assert loaded.info["source"] == {"version": 7}
    assert loaded.params == index.params
    a = index.search(queries, 10)[1]
    b = loaded.search(queries, 10)[1]
    assert np.array_equal(a, b) and not np.isin(b, ids[:10]).any()
    # saving again replaces the files and leaves no old ones behind
    loaded.save(tmp_path / "ix")
    assert len(list((tmp_path / "ix").glob("*.faiss"))) == 1


def test_compressed_index_needs_its_vectors_after_loading(data, tmp_path) -> None:
    x, ids, queries = data
    Index.build(x, ids, key="IVF64,SQ8").save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    with pytest.raises(IndexStateError, match="attach_vectors"):
        loaded.search(queries, 10)
    loaded.attach_vectors(x, ids)
    assert loaded.search(queries[:1], 1)[1][0, 0] == ids[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_json", "bad_json", "no_dir", "gone"])
def test_damaged_index_gives_a_rebuild_hint(data, tmp_path, damage: str) -> None:
    x, ids, _ = data
    d = tmp_path / "ix"
    Index.build(x[:500], ids[:500]).save(d)
    [faiss_file] = d.glob("*.faiss")
    if damage == "truncate":
        faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    elif damage == "garbage":
        faiss_file.write_bytes(b"\x07" * faiss_file.stat().st_size)
    elif damage == "no_json":
        (d / "index.json").unlink()
    elif damage == "bad_json":
        (d / "index.json").write_text("{")
    elif damage == "no_dir":
        d = tmp_path / "nothing"
    elif damage == "gone":
        faiss_file.unlink()
    with pytest.raises(IndexStateError, match="embedkit index STORE --rebuild"):
        Index.load(d, rebuild_hint="run `embedkit index STORE --rebuild`")


def test_a_damaged_file_that_still_matches_its_checksum_is_caught_by_faiss(data, tmp_path):
    # index.json rewritten to match a corrupt file: the FAISS reader must fail cleanly
    x, ids, _ = data
    d = tmp_path / "ix"
    Index.build(x[:500], ids[:500]).save(d)
    [faiss_file] = d.glob("*.faiss")
    faiss_file.write_bytes(b"IxM2" + b"\xff" * 64)
    from embedkit.index.ram import _file_digest

    meta = json.loads((d / "index.json").read_text())
    meta["files"][faiss_file.name] = _file_digest(faiss_file)
    (d / "index.json").write_text(json.dumps(meta))
    with pytest.raises(IndexStateError, match="cannot be read"):
        Index.load(d)
