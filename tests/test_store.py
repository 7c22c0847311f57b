"""The Parquet store: schema, live view, atomic commits, locking, mismatch refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
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
