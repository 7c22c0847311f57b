"""The Parquet store: schema, live view, atomic commits, locking, mismatch refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from embedkit.errors import StoreError, StoreLockedError, StoreMismatchError
from embedkit.store.read import (
    MANIFEST,
    open_store,
    row_id,
    store_schema,
)
from embedkit.store.writer import StoreWriter, export_store

DIM = 8


def _meta(model: str = "m", sha: str = "abc", dim: int = DIM) -> dict:
    return {
        "model": model,
        "weights_sha256": sha,
        "random_init": False,
        "preprocess": {"size": [4, 4]},
        "dim": dim,
        "normalize": False,
    }


def _add_ok(w: StoreWriter, names: list[str], vecs: np.ndarray, root: str = "/r") -> None:
    w.add(
        ids=[row_id(root, n) for n in names],
        roots=[root] * len(names),
        paths=names,
        status=["ok"] * len(names),
        content_hash=[f"h-{n}" for n in names],
        size=[1] * len(names),
        mtime_ns=[1] * len(names),
        embedding=vecs,
    )


def test_schema_is_fixed_size_list_float32():
    schema = store_schema(2048)
    emb = schema.field("embedding").type
    assert str(emb) == "fixed_size_list<item: float>[2048]"
    assert schema.field("id").type == "int64"


def test_row_id_stable_and_faiss_compatible():
    a = row_id("/photos", "a/b.jpg")
    assert a == row_id("/photos", "a/b.jpg")
    assert a != row_id("/photos", "a/c.jpg")
    assert 0 <= a < 2**63


def test_roundtrip_contiguous_vectors(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, DIM)).astype(np.float32)
    with StoreWriter(tmp_path / "s", _meta()) as w:
        _add_ok(w, [f"{i}.jpg" for i in range(5)], vecs)
        w.add(
            ids=[row_id("/r", "bad.jpg")],
            roots=["/r"],
            paths=["bad.jpg"],
            status=["failed"],
            reason=["unidentified"],
            detail=["x"],
        )
        w.commit()
    s = open_store(tmp_path / "s")
    assert s.vectors.dtype == np.float32 and s.vectors.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(s.vectors, vecs)
    assert s.paths == [f"{i}.jpg" for i in range(5)]
    assert s.table.num_rows == 6 and s.failed.num_rows == 1
    assert s.row_of(s.ids[3]) == 3 and s.row_of("3.jpg") == 3 and s.row_of("/r/3.jpg") == 3
    with pytest.raises(StoreError):
        s.row_of("nope.jpg")
    # Metadata is in every part file, readable with plain pyarrow.
    part = next((tmp_path / "s" / "parts").glob("*.parquet"))
    md = json.loads(pq.read_schema(part).metadata[b"embedkit"])
    assert md["model"] == "m" and md["dim"] == DIM


def test_later_rows_win_and_deleted_rows_vanish(tmp_path):
    v1 = np.ones((2, DIM), np.float32)
    with StoreWriter(tmp_path / "s", _meta()) as w:
        _add_ok(w, ["a.jpg", "b.jpg"], v1)
        w.commit()
        _add_ok(w, ["a.jpg"], 2 * np.ones((1, DIM), np.float32))
        w.add(ids=[row_id("/r", "b.jpg")], roots=["/r"], paths=["b.jpg"], status=["deleted"])
        w.commit()
    s = open_store(tmp_path / "s")
    assert s.paths == ["a.jpg"]
    np.testing.assert_array_equal(s.vectors, 2 * np.ones((1, DIM)))
    assert s.version == 2


def test_uncommitted_rows_invisible_and_orphans_removed(tmp_path):
    with StoreWriter(tmp_path / "s", _meta()) as w:
        _add_ok(w, ["a.jpg"], np.ones((1, DIM), np.float32))
        w.commit()
    # A part file written but never named by the manifest (a writer killed before commit).
    orphan = tmp_path / "s" / "parts" / "part-99999999-dead.parquet"
    orphan.write_bytes(b"garbage")
    assert len(open_store(tmp_path / "s")) == 1
    with StoreWriter(tmp_path / "s", _meta()):
        pass
    assert not orphan.exists()


def test_compaction_keeps_live_view(tmp_path, monkeypatch):
    import embedkit.store.writer as writer_mod

    monkeypatch.setattr(writer_mod, "MAX_PARTS", 3)
    with StoreWriter(tmp_path / "s", _meta()) as w:
        for i in range(6):
            _add_ok(w, [f"{i}.jpg", "same.jpg"], np.full((2, DIM), i, np.float32))
            w.commit()
    s = open_store(tmp_path / "s")
    assert len(list((tmp_path / "s" / "parts").glob("*.parquet"))) <= 3
    assert sorted(s.paths) == sorted([f"{i}.jpg" for i in range(6)] + ["same.jpg"])
    assert s.vectors[s.row_of("same.jpg")][0] == 5


def test_model_mismatch_refused(tmp_path):
    with StoreWriter(tmp_path / "s", _meta()) as w:
        _add_ok(w, ["a.jpg"], np.ones((1, DIM), np.float32))
        w.commit()
    with pytest.raises(StoreMismatchError, match="new --store"):
        StoreWriter(tmp_path / "s", _meta(model="other")).open()
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        StoreWriter(tmp_path / "s", _meta(sha="zzz")).open()


def test_not_a_store(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="not an embedkit store"):
        StoreWriter(tmp_path / "x", _meta()).open()
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="damaged"):
        open_store(tmp_path / "bad")


def test_second_writer_refused_even_across_processes(tmp_path):
    with StoreWriter(tmp_path / "s", _meta()):
        with pytest.raises(StoreLockedError, match="being written"):
            StoreWriter(tmp_path / "s", _meta()).open()
        code = textwrap.dedent(f"""
            from embedkit.store.writer import StoreWriter, export_store
            from embedkit.errors import StoreLockedError
            try:
                StoreWriter({str(tmp_path / "s")!r}, {_meta()!r}).open()
            except StoreLockedError:
                raise SystemExit(3)
        """)
        assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    StoreWriter(tmp_path / "s", _meta()).open()  # released after close


def test_disk_full_keeps_previous_commit(tmp_path, monkeypatch):
    with StoreWriter(tmp_path / "s", _meta()) as w:
        _add_ok(w, ["a.jpg"], np.ones((1, DIM), np.float32))
        w.commit()
        _add_ok(w, ["b.jpg"], np.ones((1, DIM), np.float32))

        def full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(pq, "write_table", full)
        with pytest.raises(StoreError, match="disk full"):
            w.commit()
    monkeypatch.undo()
    s = open_store(tmp_path / "s")
    assert s.paths == ["a.jpg"]
    assert not list((tmp_path / "s").rglob("*.tmp"))


def test_export_one_file_readable_by_pyarrow(tmp_path):
    names = ["ä/名前.jpg", "b.jpg"]
    with StoreWriter(tmp_path / "s", _meta()) as w:
        _add_ok(w, names, np.eye(2, DIM, dtype=np.float32))
        w.commit()
    out = tmp_path / "all.parquet"
    assert export_store(tmp_path / "s", out) == 2
    t = pq.read_table(out)
    assert t["path"].to_pylist() == names
    assert t.schema.field("embedding").type.list_size == DIM
    assert os.path.getsize(out) > 0


# --- lookups by path and id -------------------------------------------------------------------


def _scan_row_of(s, key):
    """row_of as it was: linear scans (the reference the lookup tables must match)."""
    from embedkit.store.read import storable

    if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit()):
        hit = np.flatnonzero(s.ids == int(key))
        if len(hit):
            return int(hit[0])
    if isinstance(key, str):
        key = storable(key)
        for n, (root, path) in enumerate(zip(s.roots, s.paths, strict=True)):
            if key == path or key == os.path.join(root, path):
                return n
        absolute = os.path.abspath(key)
        for n, (root, path) in enumerate(zip(s.roots, s.paths, strict=True)):
            if absolute == os.path.join(root, path):
                return n
    raise StoreError(key)


class _NoScan(list):
    """A list that refuses to be iterated: a lookup that still scans the rows fails."""

    def __iter__(self):
        raise AssertionError("row_of scanned the rows")


def _two_root_store(path):
    # The same relative names under two roots, a non-UTF-8 name (surrogate escape, stored
    # as \xff), a name made of digits, and a root whose join with a path is another row's
    # relative path (a.jpg of root "" vs "x/a.jpg"): first-row-wins must hold across both.
    rows = [
        ("/r1", "a.jpg"),
        ("/r2", "a.jpg"),
        ("/r1", "bad\udcffname.jpg"),
        ("/r2", "sub/b.jpg"),
        ("/r1", "12345"),
        ("/r1", "99999999999999999999"),
        ("/r2", "/r1/a.jpg"),  # an absolute stored path: join(root, path) is the path itself
    ]
    with StoreWriter(path, _meta()) as w:
        w.add(
            ids=[row_id(r, p) for r, p in rows],
            roots=[r for r, _ in rows],
            paths=[p for _, p in rows],
            status=["ok"] * len(rows),
            embedding=np.arange(len(rows) * DIM, dtype=np.float32).reshape(-1, DIM),
        )
        w.commit()
    return open_store(path)


def test_row_of_tables_match_the_scan_across_roots_and_escapes(tmp_path, monkeypatch):
    s = _two_root_store(tmp_path / "s")
    keys = [
        "a.jpg",
        "/r1/a.jpg",
        "/r2/a.jpg",
        "bad\udcffname.jpg",  # as os.listdir gives it
        "bad\\xffname.jpg",  # as stored
        "/r1/bad\udcffname.jpg",
        "sub/b.jpg",
        "/r2/sub/../sub/b.jpg",  # only abspath finds it
        "/r2//sub/b.jpg",
        "12345",
        s.ids[3],
        int(s.ids[5]),
        str(s.ids[6]),
    ]
    monkeypatch.chdir("/")
    keys.append("r2/sub/b.jpg")  # relative to the working directory: abspath finds it
    expected = [_scan_row_of(s, k) for k in keys]
    assert expected[:3] == [0, 0, 1] and expected[3] == expected[4] == 2 and expected[-1] == 3
    # A first lookup is one pass over the rows; later ones use the tables: both must agree.
    assert [_fresh(s).row_of(k) for k in keys] == expected
    s.row_of("a.jpg")
    assert [s.row_of(k) for k in keys] == expected and s._by_path is not None
    for missing in ["nope.jpg", "/r3/a.jpg", "b.jpg", 7, "7", -1, 2**70]:
        for store in (_fresh(s), s):
            with pytest.raises(StoreError, match="not an embedded row"):
                store.row_of(missing)
        with pytest.raises(StoreError):
            _scan_row_of(s, missing)


def _fresh(s):
    import dataclasses

    return dataclasses.replace(s, _by_id=None, _by_path=None, _lookups=0)


def test_row_of_does_not_scan_per_lookup(tmp_path):
    s = _two_root_store(tmp_path / "s")
    s.row_of("a.jpg")  # one pass, no tables: a single lookup (search by a path) keeps no dicts
    assert s._by_path is None and s._by_id is None
    s.row_of("sub/b.jpg")  # the second builds the path tables
    s.row_of(int(s.ids[0]))  # and the id table, at its first use after the first lookup
    s.roots, s.paths = _NoScan(s.roots), _NoScan(s.paths)
    assert s.row_of("/r2/a.jpg") == 1
    assert s.row_of("/r2/sub/../sub/b.jpg") == 3
    assert s.row_of(int(s.ids[4])) == 4 and s.row_of(str(s.ids[2])) == 2
    with pytest.raises(StoreError):
        s.row_of("missing.jpg")


def test_row_of_a_digit_name_past_int64_is_a_path(tmp_path):
    # It was int()-ed into an int64 array first, and raised OverflowError.
    s = _two_root_store(tmp_path / "s")
    assert s.row_of("99999999999999999999") == 5


# --- the vectors cache ------------------------------------------------------------------------


def _cached_store(path, n=6):
    rng = np.random.default_rng(1)
    with StoreWriter(path, _meta()) as w:
        _add_ok(w, [f"{i}.jpg" for i in range(n)], rng.standard_normal((n, DIM)).astype("f4"))
        w.add(
            ids=[row_id("/r", "bad.jpg")],
            roots=["/r"],
            paths=["bad.jpg"],
            status=["failed"],
            reason=["unidentified"],
        )
        w.commit()
        # A second part: one row superseded, one deleted.
        _add_ok(w, ["1.jpg"], np.full((1, DIM), 7, np.float32))
        w.add(ids=[row_id("/r", "2.jpg")], roots=["/r"], paths=["2.jpg"], status=["deleted"])
        w.commit()
    return path


def _parquet_vectors(path):
    from embedkit.store.read import live_table

    t, _ = live_table(path)
    t = t.filter(pc.equal(t["status"], "ok"))
    return t["id"].to_numpy(), np.stack(
        [np.asarray(v, np.float32) for v in t["embedding"].to_pylist()]
    )


def _is_mapped(x):
    while getattr(x, "base", None) is not None and isinstance(x.base, np.ndarray):
        x = x.base
    return not x.flags.owndata


def test_cache_equals_parquet_and_is_a_read_only_map(tmp_path):
    from embedkit.store.cache import CACHE_FILE

    p = _cached_store(tmp_path / "s")
    ids, want = _parquet_vectors(p)
    first = open_store(p)  # decodes Parquet, writes the cache
    assert (p / CACHE_FILE).is_file()
    second = open_store(p)  # maps it
    for s in (first, second):
        np.testing.assert_array_equal(s.ids, ids)
        np.testing.assert_array_equal(s.vectors, want)
        assert s.vectors.dtype == np.float32 and s.vectors.flags["C_CONTIGUOUS"]
        assert not s.vectors.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            s.vectors[0, 0] = 1
        assert "embedding" not in s.table.column_names
    assert _is_mapped(second.vectors) and not _is_mapped(first.vectors)
    lazy = open_store(p, vectors=False).vectors
    np.testing.assert_array_equal(lazy, want)
    assert not lazy.flags.writeable
    assert not list(p.glob(".*.tmp"))


def test_warm_read_does_not_decode_parquet(tmp_path, monkeypatch):
    from embedkit.store.read import Store

    p = _cached_store(tmp_path / "s")
    _, want = _parquet_vectors(p)
    open_store(p)

    def no_parquet(*a, **k):
        raise AssertionError("vectors decoded from Parquet despite a valid cache")

    monkeypatch.setattr(Store, "vectors_at", no_parquet)
    np.testing.assert_array_equal(open_store(p).vectors, want)


@pytest.mark.parametrize("change", ["add", "supersede", "delete", "compact"])
def test_commits_invalidate_the_cache(tmp_path, change):
    from embedkit.store.cache import CACHE_FILE, cache_key, load_vectors
    from embedkit.store.read import read_manifest

    p = _cached_store(tmp_path / "s")
    open_store(p)
    stale = (p / CACHE_FILE).read_bytes()
    with StoreWriter(p, _meta()) as w:
        if change == "add":
            _add_ok(w, ["new.jpg"], np.full((1, DIM), 3, np.float32))
        elif change == "supersede":
            # the last live row: the ids keep their order, only the version tells
            _add_ok(w, ["1.jpg"], np.full((1, DIM), 4, np.float32))
        elif change == "delete":
            w.add(ids=[row_id("/r", "3.jpg")], roots=["/r"], paths=["3.jpg"], status=["deleted"])
        if change == "compact":
            w.compact()
        else:
            w.commit()
    assert not (p / CACHE_FILE).exists()  # the writer dropped it
    # A reader that read the old manifest could still put the old cache back: never used.
    (p / CACHE_FILE).write_bytes(stale)
    ids, want = _parquet_vectors(p)
    s = open_store(p)
    np.testing.assert_array_equal(s.ids, ids)
    np.testing.assert_array_equal(s.vectors, want)
    # ... and rebuilt for the new manifest.
    manifest = read_manifest(p)
    assert load_vectors(p, manifest, ids) is not None
    assert (p / CACHE_FILE).read_bytes() != stale
    assert cache_key(manifest)["version"] == s.version


def test_a_cache_with_other_ids_is_ignored(tmp_path):
    from embedkit.store.cache import save_vectors
    from embedkit.store.read import read_manifest

    p = _cached_store(tmp_path / "s")
    ids, want = _parquet_vectors(p)
    # The right key but another row order: matching the manifest is not enough.
    save_vectors(p, read_manifest(p), ids[::-1].copy(), want[::-1] + 1)
    np.testing.assert_array_equal(open_store(p).vectors, want)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "tail"])
def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path, damage):
    from embedkit.store.cache import CACHE_FILE, load_vectors
    from embedkit.store.read import read_manifest

    p = _cached_store(tmp_path / "s")
    ids, want = _parquet_vectors(p)
    open_store(p)
    f = p / CACHE_FILE
    data = f.read_bytes()
    bad = {
        "truncate": data[: len(data) // 2],
        "garbage": os.urandom(len(data)),
        "empty": b"",
        "tail": data[:-40] + os.urandom(40),  # the footer that locates the batch
    }[damage]
    f.write_bytes(bad)
    s = open_store(p)
    np.testing.assert_array_equal(s.vectors, want)
    assert f.read_bytes() != bad
    assert load_vectors(p, read_manifest(p), ids) is not None


def test_a_read_only_store_opens_without_a_cache(tmp_path, monkeypatch):
    import pyarrow as pa

    from embedkit.store.cache import CACHE_FILE

    p = _cached_store(tmp_path / "s")
    _, want = _parquet_vectors(p)
    if os.geteuid() == 0:  # root writes through file modes: refuse the write as EROFS would

        def refuse(*a, **k):
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(pa, "OSFile", refuse)
    p.chmod(0o555)
    try:
        s = open_store(p)
        np.testing.assert_array_equal(s.vectors, want)
        assert not (p / CACHE_FILE).exists() and not list(p.glob(".*.tmp"))
    finally:
        p.chmod(0o755)


def test_lazy_open_never_touches_the_cache(tmp_path, monkeypatch):
    import embedkit.store.cache as cache_mod
    from embedkit.store.cache import CACHE_FILE

    p = _cached_store(tmp_path / "s")
    _, want = _parquet_vectors(p)

    def untouchable(*a, **k):
        raise AssertionError("the lazy path used the vectors cache")

    monkeypatch.setattr(cache_mod, "load_vectors", untouchable)
    monkeypatch.setattr(cache_mod, "save_vectors", untouchable)
    s = open_store(p, vectors=False)
    np.testing.assert_array_equal(s.vectors_at([2, 0]), want[[2, 0]])
    np.testing.assert_array_equal(s.vectors, want)
    assert not (p / CACHE_FILE).exists()


def test_concurrent_first_readers_agree(tmp_path):
    from embedkit.store.cache import CACHE_FILE, load_vectors
    from embedkit.store.read import read_manifest

    p = _cached_store(tmp_path / "s", n=400)
    ids, want = _parquet_vectors(p)
    code = textwrap.dedent(f"""
        import numpy as np
        from embedkit.store.read import open_store
        x = open_store({str(p)!r}).vectors
        print(float(np.asarray(x, np.float64).sum()))
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    sums = [float(pr.communicate()[0]) for pr in procs]
    assert all(pr.returncode == 0 for pr in procs)
    assert sums == [float(want.astype(np.float64).sum())] * 4
    assert (p / CACHE_FILE).is_file() and not list(p.glob(".*.tmp"))
    np.testing.assert_array_equal(load_vectors(p, read_manifest(p), ids), want)


def test_export_reads_parquet_not_the_cache(tmp_path):
    from embedkit.store.cache import save_vectors
    from embedkit.store.read import read_manifest

    p = _cached_store(tmp_path / "s")
    ids, want = _parquet_vectors(p)
    # A cache that matches key and ids but not the data (flipped bytes are not detected):
    # the export must still write what Parquet holds.
    save_vectors(p, read_manifest(p), ids, want + 100)
    export_store(p, tmp_path / "out.parquet")
    t = pq.read_table(tmp_path / "out.parquet")
    t = t.filter(pc.equal(t["status"], "ok"))
    got = np.stack([np.asarray(v, np.float32) for v in t["embedding"].to_pylist()])
    np.testing.assert_array_equal(got, want)


class _CountingList(list):
    iterations = 0

    def __iter__(self):
        type(self).iterations += 1
        return super().__iter__()


def test_labels_csv_by_path_across_roots_looks_up_without_scans(tmp_path):
    from embedkit.classification.labels import labelled_features

    s = _two_root_store(tmp_path / "s")
    labels = tmp_path / "labels.csv"
    rows = [
        ("/r1/a.jpg", "x"),
        ("/r2/a.jpg", "y"),
        ("bad\\xffname.jpg", "x"),  # the stored (escaped) form
        ("/r2/sub/../sub/b.jpg", "y"),
        ("12345", "x"),
        (str(s.ids[5]), "y"),  # a digit key is an id first
        (str(s.ids[6]), "x"),  # its root/path is row 0's: only its id reaches it
    ]
    labels.write_text("path,label\n" + "".join(f"{k},{v}\n" for k, v in rows), encoding="utf-8")
    _CountingList.iterations = 0
    s.paths = _CountingList(s.paths)
    data = labelled_features(s, labels)
    assert list(data.labels) == ["x", "y", "x", "y", "x", "y", "x"]
    # labelled_features lists the paths once, row_of's first lookup is one pass and its
    # second builds the tables; a scan per CSV line (the old row_of) is one pass per line.
    assert _CountingList.iterations <= 3


def test_a_mapped_store_outlives_the_commit_that_drops_its_cache(tmp_path):
    from embedkit.store.cache import CACHE_FILE

    p = _cached_store(tmp_path / "s")
    _, want = _parquet_vectors(p)
    open_store(p)
    old = open_store(p)  # maps vectors.arrow
    (p / f".{CACHE_FILE}.1.dead.tmp").write_bytes(b"a reader killed mid-write")
    with StoreWriter(p, _meta()) as w:  # removes the dead reader's temp file
        _add_ok(w, ["later.jpg"], np.ones((1, DIM), np.float32))
        w.commit()  # and drops the cache: the mapped inode stays readable
    assert not (p / CACHE_FILE).exists() and not list(p.glob(".*.tmp"))
    np.testing.assert_array_equal(old.vectors, want)
    assert len(open_store(p)) == len(want) + 1


def test_open_store_reads_the_new_commit_when_compaction_removes_parts_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that got the manifest just before a writer compacted (which deletes the old
    parts) used to fail with 'the store is damaged'; it now reads the new commit."""
    import embedkit.store.read as read_mod
    from embedkit.store.read import open_store as open_
    from embedkit.store.writer import StoreWriter as Writer

    md = {"model": "m", "dim": 4, "weights_sha256": "x", "random_init": True,
          "preprocess": {}, "normalize": False}  # fmt: skip
    with Writer(tmp_path / "s", md) as w:
        for i in range(3):
            w.add(ids=[i], roots=["/r"], paths=[f"{i}.jpg"], status=["ok"],
                  embedding=np.full((1, 4), i, np.float32))  # fmt: skip
            w.commit()
    real = read_mod._read_parts
    raced = []

    def racing(path, manifest, vectors=True):
        if not raced:  # the writer compacts between our manifest read and our part reads
            raced.append(True)
            with Writer(tmp_path / "s", md) as w2:
                w2.compact()
        return real(path, manifest, vectors)

    monkeypatch.setattr(read_mod, "_read_parts", racing)
    s = open_(tmp_path / "s")
    assert raced and sorted(s.paths) == ["0.jpg", "1.jpg", "2.jpg"]
    assert len(list((tmp_path / "s" / "parts").glob("*.parquet"))) == 1
    # Real damage at an unchanged commit still says so.
    monkeypatch.setattr(read_mod, "_read_parts", real)
    for f in (tmp_path / "s" / "parts").glob("*.parquet"):
        f.write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="damaged"):
        open_(tmp_path / "s")


def test_lazy_store_reads_its_vectors_after_a_compaction_removed_its_parts(tmp_path: Path) -> None:
    """``open_store(vectors=False)`` keeps part names; a writer compacting before the vectors
    are read deleted those parts ('the store is damaged'). Unchanged rows are now read from
    the new commit; a row replaced since is a StoreChangedError that says to reopen."""
    from embedkit.errors import StoreChangedError

    p = tmp_path / "s"

    def add(w: StoreWriter, i: int, value: float, digest: str) -> None:
        w.add(ids=[i], roots=["/r"], paths=[f"{i}.jpg"], status=["ok"], content_hash=[digest],
              embedding=np.full((1, DIM), value, np.float32))  # fmt: skip
        w.commit()

    with StoreWriter(p, _meta()) as w:
        for i in range(3):
            add(w, i, i, f"h{i}")
    lazy = open_store(p, vectors=False)
    parts = set((p / "parts").glob("*.parquet"))
    with StoreWriter(p, _meta()) as w:
        w.compact()
    assert not parts & set((p / "parts").glob("*.parquet"))  # the opened commit's parts are gone
    want = np.stack([np.full(DIM, i, np.float32) for i in lazy.ids])
    np.testing.assert_array_equal(lazy.vectors_at([2, 0]), want[[2, 0]])
    np.testing.assert_array_equal(lazy.vectors, want)

    lazy = open_store(p, vectors=False)
    with StoreWriter(p, _meta()) as w:
        add(w, 1, 10.0, "h1-edited")  # 1.jpg was edited: another file, another vector
        w.compact()
    np.testing.assert_array_equal(lazy.vectors_at([lazy.row_of("0.jpg")]), want[[0]])
    with pytest.raises(StoreChangedError, match="1 of the 2 rows .* open it again"):
        lazy.vectors_at([lazy.row_of("1.jpg"), lazy.row_of("2.jpg")])
    # Real damage at the commit still current is still damage.
    lazy = open_store(p, vectors=False)
    for f in (p / "parts").glob("*.parquet"):
        f.write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="damaged"):
        lazy.vectors_at([0])
