"""The extraction run: stored vectors, the hostile corpus, incremental reruns, crashes."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TINY,
    make_photo,
    slow_extract_command,
    tree_mtime_bump,
    wait_for_committed_rows,
)
from PIL import Image

from embedkit.errors import InvalidArgumentError, StoreLockedError, StoreMismatchError
from embedkit.extraction.embed import embed
from embedkit.extraction.run import extract
from embedkit.store.read import open_store
from embedkit.store.writer import StoreWriter


def _extract(src, store, **kw):
    kw.setdefault("model", TINY)
    kw.setdefault("random_init", True)
    kw.setdefault("workers", 1)
    return extract([src] if not isinstance(src, list) else src, store, **kw)


def test_stored_vectors_equal_embed(photo_dir, tmp_path):
    s = _extract(photo_dir, tmp_path / "s")
    assert s.embedded == 7 and s.n_failed == 0
    store = open_store(tmp_path / "s")
    assert store.vectors.shape == (7, store.dim)
    assert store.metadata["random_init"] is True and store.metadata["model"] == TINY
    imgs = [Image.open(p) for p in store.abspaths]
    direct = embed(imgs, model=TINY, random_init=True)
    np.testing.assert_allclose(store.vectors, direct, rtol=1e-4, atol=1e-5)
    # Width/height are recorded per row.
    t = store.table.to_pydict()
    assert set(zip(t["width"], t["height"], strict=True)) == {(96, 72)}


def test_corpus_manifest_outcomes(corpus, tmp_path):
    """Every hostile file behaves as MANIFEST.tsv says, inside one real extract run."""
    src = tmp_path / "corpus"
    shutil.copytree(corpus, src)
    summary = _extract(src, tmp_path / "s", workers=2)
    store = open_store(tmp_path / "s")
    rows = {
        p: (s, r)
        for p, s, r in zip(
            store.table["path"].to_pylist(),
            store.table["status"].to_pylist(),
            store.table["reason"].to_pylist(),
            strict=True,
        )
    }
    expected = {}
    with open(corpus / "MANIFEST.tsv", encoding="utf-8") as f:
        lines = [ln for ln in f if not ln.startswith("#")]
    for rec in csv.DictReader(lines, delimiter="\t"):
        expected[rec["file"]] = rec["expected"]
    assert set(expected) <= set(rows), set(expected) - set(rows)
    for name, exp in expected.items():
        status, reason = rows[name]
        if exp.startswith("EMBED"):
            assert status == "ok", (name, status, reason)
        else:
            want = re.search(r"reason=([a-z_]+)", exp).group(1)
            assert (status, reason) == ("failed", want), (name, status, reason)
    assert summary.n_failed == sum(1 for e in expected.values() if e.startswith("SKIP"))
    # Orientation: stored sizes are post-transpose.
    sizes = dict(
        zip(
            store.table["path"].to_pylist(),
            zip(store.table["width"].to_pylist(), store.table["height"].to_pylist(), strict=True),
            strict=True,
        )
    )
    assert sizes["orientation_rectangle.jpg"] == (1, 2)
    frames = dict(
        zip(store.table["path"].to_pylist(), store.table["n_frames"].to_pylist(), strict=True)
    )
    assert frames["dispose_prev.gif"] == 5
    # Orientation and format twins: each is the other's nearest neighbour among the corpus.
    v = store.vectors / np.linalg.norm(store.vectors, axis=1, keepdims=True)
    sim = v @ v.T
    np.fill_diagonal(sim, -2)
    for a, b in [
        ("hopper.jpg", "hopper_orientation_6.jpg"),
        ("pil_sample_cmyk.jpg", "pil_sample_rgb.jpg"),
    ]:
        ia, ib = store.row_of(a), store.row_of(b)
        others = [
            i
            for i in range(len(store))
            if i != ia
            and store.paths[i]
            not in (
                b,
                "synthetic__unicode_名前_фото_🌅.jpg",
                "hopper.jpg",
                "hopper_orientation_6.jpg",
                "truncated_end_chunk.png",
            )
        ]  # the same hopper pixels as PNG
        assert sim[ia, ib] > sim[ia, others].max(), (a, b)


def test_unicode_paths_roundtrip(tmp_path):
    src = tmp_path / "src"
    name = "名前_фото_🌅/é e\u0301.jpg"  # composed and decomposed forms must both survive
    make_photo(src / name, 1)
    _extract(src, tmp_path / "s")
    store = open_store(tmp_path / "s")
    assert store.paths == [name]
    assert os.path.exists(store.abspaths[0])


def test_incremental_edit_delete_rename_copy(photo_dir, tmp_path):
    st = tmp_path / "s"
    _extract(photo_dir, st)
    before = open_store(st)
    v_img1 = before.vectors[before.row_of("img1.jpg")].copy()

    again = _extract(photo_dir, st)
    assert (again.embedded, again.unchanged, again.reused, again.deleted) == (0, 7, 0, 0)

    make_photo(photo_dir / "img0.jpg", 999)  # edited content
    tree_mtime_bump(photo_dir / "img0.jpg")
    (photo_dir / "img2.jpg").unlink()  # deleted
    (photo_dir / "img1.jpg").rename(photo_dir / "renamed.jpg")  # renamed
    shutil.copy(photo_dir / "img3.jpg", photo_dir / "copy3.jpg")  # copied
    tree_mtime_bump(photo_dir / "img4.jpg")  # touched only
    make_photo(photo_dir / "new.jpg", 555)  # new

    r = _extract(photo_dir, st)
    assert r.embedded == 2  # img0 (edited) and new.jpg
    assert r.reused == 3  # renamed, copy3, touched img4
    assert r.deleted == 2  # img2 and the old name of img1
    store = open_store(st)
    assert sorted(store.paths) == sorted(
        [
            "img0.jpg",
            "renamed.jpg",
            "img3.jpg",
            "copy3.jpg",
            "img4.jpg",
            "img5.jpg",
            "sub/deep.png",
            "new.jpg",
        ]
    )
    assert len(set(store.ids.tolist())) == len(store.ids)
    np.testing.assert_array_equal(store.vectors[store.row_of("renamed.jpg")], v_img1)
    np.testing.assert_array_equal(
        store.vectors[store.row_of("copy3.jpg")], store.vectors[store.row_of("img3.jpg")]
    )
    assert not np.allclose(
        store.vectors[store.row_of("img0.jpg")], before.vectors[before.row_of("img0.jpg")]
    )


def test_adding_photos_reads_no_stored_vectors(photo_dir, tmp_path, monkeypatch):
    # Planning used to read every stored vector (~5 GB per million 1280-d rows) even when
    # nothing could be reused; they are read only for a reuse, and only from its part.
    st = tmp_path / "s"
    _extract(photo_dir, st)
    calls = []
    real = StoreWriter.committed_rows

    def spy(self, *, vectors=True):
        calls.append(vectors)
        return real(self, vectors=vectors)

    monkeypatch.setattr(StoreWriter, "committed_rows", spy)
    make_photo(photo_dir / "new.jpg", 555)
    r = _extract(photo_dir, st)
    assert (r.embedded, r.reused, r.unchanged) == (1, 0, 7)
    assert calls and True not in calls


def test_renames_reuse_vectors_across_compactions(photo_dir, tmp_path, monkeypatch):
    # A renamed file's old row is tombstoned and committed early in the run; with a commit per
    # row, compactions rewrite the store before later renames ask for their vectors.
    import embedkit.store.writer as writer_mod

    st = tmp_path / "s"
    _extract(photo_dir, st, commit_every=1, batch_size=1)  # a part per row
    before = open_store(st)
    want = {p: before.vectors[before.row_of(p)].copy() for p in before.paths}
    monkeypatch.setattr(writer_mod, "MAX_PARTS", 2)
    (photo_dir / "moved").mkdir()
    for p in want:  # every file to a new path under the same walked root
        dest = photo_dir / "moved" / p
        dest.parent.mkdir(parents=True, exist_ok=True)
        (photo_dir / p).rename(dest)
    compactions = []
    real_compact = StoreWriter.compact

    def compact(self):
        compactions.append(self.pending)
        real_compact(self)

    monkeypatch.setattr(StoreWriter, "compact", compact)
    r = _extract(photo_dir, st, commit_every=1, batch_size=1)
    assert (r.embedded, r.reused, r.deleted) == (0, 7, 7), r
    assert len(compactions) >= 3  # so most reuses read a part that a compaction superseded
    store = open_store(st)
    assert sorted(store.paths) == sorted(f"moved/{p}" for p in want)
    for p, v in want.items():
        np.testing.assert_array_equal(store.vectors[store.row_of(f"moved/{p}")], v)
    # The superseded parts kept for the run are gone once it closed.
    manifest = json.loads((st / "manifest.json").read_text())
    named = {part["file"].split("/")[-1] for part in manifest["parts"]}
    assert {f.name for f in (st / "parts").iterdir()} == named


def test_single_file_runs_do_not_delete_each_other(photo_dir, tmp_path):
    st = tmp_path / "s"
    _extract(photo_dir / "img0.jpg", st)
    _extract(photo_dir / "img1.jpg", st)
    assert sorted(open_store(st).paths) == ["img0.jpg", "img1.jpg"]


def test_model_mismatch_refused(photo_dir, tmp_path):
    _extract(photo_dir, tmp_path / "s")
    with pytest.raises(StoreMismatchError, match="test_efficientnet"):
        _extract(photo_dir, tmp_path / "s", model="test_resnet")


def test_concurrent_writer_refused(photo_dir, tmp_path):
    _extract(photo_dir, tmp_path / "s")
    meta = open_store(tmp_path / "s").metadata
    with StoreWriter(tmp_path / "s", meta), pytest.raises(StoreLockedError):
        _extract(photo_dir, tmp_path / "s")


def test_bad_arguments(photo_dir, tmp_path):
    with pytest.raises(InvalidArgumentError):
        _extract(tmp_path / "missing", tmp_path / "s")
    with pytest.raises(InvalidArgumentError):
        _extract(photo_dir, tmp_path / "s", batch_size=0)


def test_decoder_crash_costs_one_file(photo_dir, tmp_path, monkeypatch):
    """A worker that dies (like a segfault in a codec) fails that file only."""
    import embedkit.images.model_input as model_input

    real = model_input.open_rgb

    def crashing(data, **kw):
        if isinstance(data, bytes) and data.startswith(b"CRASH"):
            os._exit(139)
        return real(data, **kw)

    # inherited by forked workers; load_model_input (what workers call) decodes with open_rgb
    monkeypatch.setattr(model_input, "open_rgb", crashing)
    (photo_dir / "boom.jpg").write_bytes(b"CRASH" + b"\0" * 100)
    s = _extract(photo_dir, tmp_path / "s", workers=2)
    assert s.embedded == 7 and dict(s.failed) == {"decode_crash": 1}
    store = open_store(tmp_path / "s")
    assert len(store) == 7
    # Also while the measured split resizes the pool mid-run (batches of 2: after 4 files).
    s = _extract(photo_dir, tmp_path / "b", workers=None, batch_size=2)
    assert s.embedded == 7 and dict(s.failed) == {"decode_crash": 1}


def test_list_file_source(photo_dir, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(
        f"{photo_dir / 'img0.jpg'}\n# comment\n{photo_dir / 'img1.jpg'}\nnot/there.jpg\n"
    )
    s = _extract(lst, tmp_path / "s")
    assert s.embedded == 2 and s.failed["not_found"] == 1


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    from embedkit.extraction.run import extract
    extract([sys.argv[1]], sys.argv[2], model="test_efficientnet", random_init=True,
            workers=1, batch_size=4, commit_every=8)
""")


@pytest.mark.slow
def test_kill9_then_resume_exactly_once(tmp_path):
    src = tmp_path / "many"
    for i in range(160):
        make_photo(src / f"{i:03d}.jpg", i, size=(320, 240))
    st = tmp_path / "s"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # Kill at several points: during start-up, early, and mid-run.
    for delay in (0.5, 3.0, 4.5, 6.0):
        p = subprocess.Popen([sys.executable, str(script), str(src), str(st)], env=env)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        if (st / "manifest.json").exists():
            store = open_store(st)  # readable after every kill
            assert len(set(store.paths)) == len(store.paths)
    done = subprocess.run([sys.executable, str(script), str(src), str(st)], env=env)
    assert done.returncode == 0
    store = open_store(st)
    assert sorted(store.paths) == sorted(f"{i:03d}.jpg" for i in range(160))
    assert len(set(store.ids.tolist())) == 160 and store.table.num_rows == 160
    ref = embed(
        [Image.open(src / "000.jpg"), Image.open(src / "159.jpg")], model=TINY, random_init=True
    )
    np.testing.assert_allclose(
        store.vectors[[store.row_of("000.jpg"), store.row_of("159.jpg")]], ref, rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow
def test_ctrl_c_commits_what_was_embedded(tmp_path):
    src = tmp_path / "many"
    n = 300
    for i in range(n):
        make_photo(src / f"{i:03d}.jpg", i, size=(640, 480))
    st = tmp_path / "s"
    # torch at batch 1: slow enough per image that Ctrl-C lands mid-run.
    cmd = [sys.executable, "-m", "embedkit.cli", "extract", str(src), "--store", str(st),
           "--model", TINY, "--random-init", "--workers", "1", "--batch-size", "1",
           "--runtime", "torch"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # On a loaded machine the first image can take longer than the delay: then nothing was
    # embedded yet, so try again with a fresh store and a longer delay.
    for delay in (0.5, 2.0, 5.0):
        shutil.rmtree(st, ignore_errors=True)
        p = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
        deadline = time.time() + 120
        # Decoding has started once the decode worker process exists.
        while time.time() < deadline and p.poll() is None and not children.read_text().strip():
            time.sleep(0.05)
        time.sleep(delay)  # mid-run
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        if (st / "manifest.json").exists() and len(open_store(st)) > 0:
            break
    if len(open_store(st)) == n:
        pytest.skip("the run finished before Ctrl-C arrived (machine too fast for this test)")
    assert p.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    partial = open_store(st)
    assert 0 < len(partial) < n
    r = _extract(src, st)
    assert r.unchanged == len(partial) and r.embedded == n - len(partial)
    assert len(open_store(st)) == n


def test_store_records_every_runtime_used(photo_dir, tmp_path):
    _extract(photo_dir / "img0.jpg", tmp_path / "s", runtime="torch")
    assert open_store(tmp_path / "s").metadata["runtimes"] == ["torch"]
    _extract(photo_dir / "img1.jpg", tmp_path / "s", runtime="onnx")
    md = open_store(tmp_path / "s").metadata
    assert md["runtime"] == "onnx" and md["runtimes"] == ["onnx", "torch"]


def test_default_split_is_chosen_from_measured_times(photo_dir, tmp_path):
    """Without --workers/--threads the split is re-chosen from the run's timings."""
    s = _extract(photo_dir, tmp_path / "a", workers=None, batch_size=2)
    assert s.embedded == 7 and s.split == "measured" and s.batch_size == 2
    assert open_store(tmp_path / "a").metadata["precision"] == "fp32"
    assert s.workers >= 1 and s.threads >= 1
    if s.threads > 1 and s.workers + s.threads > os.cpu_count():
        # Only a team that sleeps while waiting (ONNX Runtime, spinning off) shares cores.
        assert open_store(tmp_path / "a").metadata["runtime"] == "onnx"
    fixed = _extract(photo_dir, tmp_path / "b", workers=1, batch_size=2)
    assert (fixed.workers, fixed.split) == (1, "policy")
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    rows = [a.row_of(int(i)) for i in b.ids]
    np.testing.assert_allclose(a.vectors[rows], b.vectors, rtol=1e-5, atol=1e-6)


def test_file_names_that_are_not_utf8(photo_dir, tmp_path):
    """Linux names are bytes; Parquet strings are UTF-8. Such a file is embedded under an
    escaped name, recognised as unchanged on a rerun, and found by its real path."""
    from embedkit.index.search import search

    raw = os.path.join(os.fsencode(photo_dir), b"caf\xe9 \xff.jpg")
    try:
        make_photo(Path(os.fsdecode(raw)), 99)  # unlike the other photos
    except (OSError, UnicodeError):
        pytest.skip("this filesystem only takes UTF-8 names")
    s = _extract(photo_dir, tmp_path / "s")
    assert s.embedded == 8 and s.n_failed == 0
    store = open_store(tmp_path / "s")
    assert "caf\\xe9 \\xff.jpg" in store.paths
    again = _extract(photo_dir, tmp_path / "s")
    assert (again.unchanged, again.embedded, again.deleted) == (8, 0, 0)
    hits = search(store, [os.fsdecode(raw)], k=1)[0].hits
    assert hits[0].path.endswith("caf\\xe9 \\xff.jpg") and hits[0].score > 0.999


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return {int(c) for c in path.read_text().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize(
    ("sig", "status", "word"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
)
def test_signal_to_the_main_process_commits_and_stops_the_workers_promptly(
    tmp_path, sig, status, word
):
    """SIGTERM (timeout, systemd, docker stop) and a SIGINT sent to the main process only (not
    the group, so the workers do not get it): committed rows kept, process and every decode
    worker gone within seconds, the rerun completes exactly once."""
    n = 200
    # big photos keep the workers busy decoding when the signal lands
    cmd, env, src, st = slow_extract_command(tmp_path, n=n, size=(1600, 1200), workers=2)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_committed_rows(p, st, 4, timeout=120)  # mid-run, with committed rows
    workers = _children(p.pid)
    assert p.poll() is None and workers, "the run ended before the signal could be sent"
    p.send_signal(sig)
    t0 = time.time()
    out, err = p.communicate(timeout=60)
    gone_s = time.time() - t0
    assert p.returncode == status, (out, err)
    assert word in err and "Traceback" not in err, err
    assert gone_s < 5.0, f"the process lived {gone_s:.1f}s after the signal"
    time.sleep(0.5)  # orphaned workers would be re-parented, not gone
    assert not [w for w in workers if _alive(w)], "a decode worker outlived the run"
    partial = open_store(st)
    assert 0 < len(partial) < n
    r = _extract(src, st)
    assert r.unchanged == len(partial) and r.embedded + r.reused == n - len(partial)
    store = open_store(st)
    assert len(store) == n and len(set(store.paths)) == n


@pytest.mark.parametrize("batch_size", [1, 8])
def test_byte_identical_files_in_one_run_are_embedded_once(photo_dir, tmp_path, batch_size):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(photo_dir / "img0.jpg", src / name)
    shutil.copy(photo_dir / "img1.jpg", src / "c.jpg")
    shutil.copy(photo_dir / "img0.jpg", src / "d.jpg")
    r = _extract(src, tmp_path / "s", batch_size=batch_size)
    assert (r.embedded, r.reused) == (2, 2)
    store = open_store(tmp_path / "s")
    assert len(store) == 4
    a, b, d = (store.vectors[store.row_of(n)] for n in ("a.jpg", "b.jpg", "d.jpg"))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)
    rows = {p: i for i, p in enumerate(store.paths)}
    assert len({store.table["width"][rows[n]].as_py() for n in ("a.jpg", "b.jpg")}) == 1
    assert store.table["width"][rows["b.jpg"]].as_py() is not None
    again = _extract(src, tmp_path / "s")
    assert (again.embedded, again.reused, again.unchanged) == (0, 0, 4)


@pytest.mark.parametrize("content", ["empty", "no_images"])
def test_no_images_is_exit_0_with_one_warning_naming_what_was_skipped(tmp_path, content):
    src = tmp_path / "src"
    src.mkdir()
    if content == "no_images":
        for name in (".DS_Store", "IMG_1.CR2", "IMG_2.NEF", "IMG_3.heic", "notes.txt"):
            (src / name).write_bytes(b"x")
    cmd = [sys.executable, "-m", "embedkit.cli", "extract", str(src), "--store",
           str(tmp_path / "s"), "--model", TINY, "--random-init", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, r.stderr
    summary = json.loads(r.stdout)
    assert summary["found"] == 0 and summary["embedded"] == 0
    if content == "empty":
        assert "no files" in warnings[0] and summary["skipped"] == {}
    else:
        heic = "HEIC/HEIF" in warnings[0]
        from embedkit.images.decode import IMAGE_SUFFIXES

        expected = {"hidden": 1, "raw": 2, "other": 1}
        if ".heic" not in IMAGE_SUFFIXES:  # pillow-heif not installed
            expected["heic"] = 1
            assert heic
        assert summary["skipped"] == expected
        assert "skipped" in warnings[0] and "2 camera RAW" in warnings[0]
        assert "1 hidden" in warnings[0] and "1 unknown suffix" in warnings[0]


def test_found_images_give_no_warning(photo_dir, tmp_path):
    (photo_dir / "notes.txt").write_text("x")
    r = _extract(photo_dir, tmp_path / "s")
    assert r.warnings == [] and r.found == r.embedded > 0 and r.skipped == {"other": 1}
