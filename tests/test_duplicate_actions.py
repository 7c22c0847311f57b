"""Acting on duplicates: the keeper rule, --to-remove, --move-to with an undo list; never delete."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_photo
from PIL import Image
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.errors import InvalidArgumentError
from embedkit.extraction.run import extract
from embedkit.index.duplicates import DuplicateGroup, DuplicateMember, find_duplicates
from embedkit.index.keep import choose_keeper

runner = CliRunner()
STRICT = ["--threshold", "0.99"]  # only byte-identical copies group with the random tiny model


def _m(i: int, w: int, h: int, size: int, mtime: int) -> DuplicateMember:
    return DuplicateMember(i, f"/p/{i}.jpg", 0.95, False, (), None, w, h, size, mtime)


def test_keep_rules_order_and_ties() -> None:
    ms = [_m(0, 100, 100, 900, 30), _m(1, 200, 100, 500, 20), _m(2, 200, 100, 800, 10)]
    assert choose_keeper(ms, "best") == 2  # largest resolution, then the larger file
    assert choose_keeper(ms, "resolution") == 2
    assert choose_keeper(ms, "size") == 0
    assert choose_keeper(ms, "oldest") == 2
    assert choose_keeper(ms, "newest") == 0
    same = [_m(5, 10, 10, 1, 1), _m(6, 10, 10, 1, 1)]
    assert choose_keeper(same, "best") == 0  # full tie: the earliest stored
    with pytest.raises(InvalidArgumentError, match="best.*resolution.*size.*oldest.*newest"):
        choose_keeper(ms, "largest")
    g = DuplicateGroup(tuple(ms)).with_keeper("best")
    assert g.keeper.id == 2 and [m.id for m in g.to_remove] == [0, 1]


@pytest.fixture
def dup_store(tmp_path: Path) -> tuple[Path, Path]:
    photos = tmp_path / "photos"
    for i in range(4):
        make_photo(photos / f"p{i}.jpg", i, size=(64, 48))
    (photos / "sub").mkdir()
    shutil.copy(photos / "p1.jpg", photos / "sub" / "p1_copy.jpg")
    shutil.copy(photos / "p1.jpg", photos / "sub" / "p1_copy2.jpg")
    # oldest: p1.jpg itself
    for n, name in enumerate(["p1.jpg", "sub/p1_copy.jpg", "sub/p1_copy2.jpg"]):
        t = 1_600_000_000 + n * 1000
        os.utime(photos / name, (t, t))
    store = tmp_path / "s"
    extract([photos], store, model=TINY, random_init=True, workers=0)
    return photos, store


def test_find_duplicates_suggests_a_keeper(dup_store) -> None:
    photos, store = dup_store
    (g,) = find_duplicates(store, 0.99)
    assert sum(m.keep for m in g.members) == 1
    assert Path(g.keeper.path).name == "p1.jpg"  # all equal in pixels and bytes: the oldest
    assert all(m.width == 64 and m.height == 48 and m.size for m in g.members)
    (g,) = find_duplicates(store, 0.99, keep="newest")
    assert Path(g.keeper.path).name == "p1_copy2.jpg"


def test_cli_to_remove_plain_json_csv(dup_store) -> None:
    photos, store = dup_store
    r = runner.invoke(app, ["duplicates", str(store), *STRICT, "--to-remove"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert sorted(Path(x).name for x in lines) == ["p1_copy.jpg", "p1_copy2.jpg"]
    assert all(os.path.isabs(x) and os.path.exists(x) for x in lines)  # nothing deleted
    r = runner.invoke(app, ["duplicates", str(store), *STRICT, "--to-remove", "--json"])
    data = json.loads(r.stdout)
    assert {Path(d["keeper"]).name for d in data} == {"p1.jpg"} and len(data) == 2
    r = runner.invoke(app, ["duplicates", str(store), *STRICT, "--to-remove", "--csv"])
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 2 and rows[0]["exact"] == "1"
    r = runner.invoke(app, ["duplicates", str(store), *STRICT, "--keep", "bogus"])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_cli_move_to_keeps_relative_paths_and_undoes(dup_store, tmp_path: Path) -> None:
    photos, store = dup_store
    aside = tmp_path / "aside"
    # An existing file at a target is never overwritten: that one is skipped.
    (aside / "sub").mkdir(parents=True)
    (aside / "sub" / "p1_copy2.jpg").write_bytes(b"someone else's file")
    r = runner.invoke(app, ["duplicates", str(store), *STRICT, "--move-to", str(aside), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [Path(m["moved_to"]).relative_to(aside).as_posix() for m in report["moved"]] == [
        "sub/p1_copy.jpg"
    ]
    assert len(report["skipped"]) == 1 and "already exists" in report["skipped"][0]["reason"]
    assert not (photos / "sub" / "p1_copy.jpg").exists()
    assert (photos / "sub" / "p1_copy2.jpg").exists() and (photos / "p1.jpg").exists()
    assert (aside / "sub" / "p1_copy2.jpg").read_bytes() == b"someone else's file"
    undo = Path(report["undo_file"])
    assert undo.parent == aside and undo.exists()
    r = runner.invoke(app, ["undo-move", str(undo)])
    assert r.exit_code == 0 and "restored 1 files" in r.stdout
    assert (photos / "sub" / "p1_copy.jpg").exists()
    assert not (aside / "sub" / "p1_copy.jpg").exists()


def test_move_skips_files_changed_since_extraction(dup_store, tmp_path: Path) -> None:
    photos, store = dup_store
    changed = photos / "sub" / "p1_copy.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(changed)
    r = runner.invoke(app, ["duplicates", str(store), *STRICT, "--move-to", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert changed.exists() and "changed since it was embedded" in r.output
    assert "moved 1 files, skipped 1" in r.stdout


def test_move_to_a_file_is_one_line(dup_store, tmp_path: Path) -> None:
    _, store = dup_store
    f = tmp_path / "afile"
    f.write_text("x")
    r = runner.invoke(app, ["duplicates", str(store), *STRICT, "--move-to", str(f)])
    assert r.exit_code == 1 and "not a folder" in r.output and "Traceback" not in r.output
