"""prune and reroot: ghost rows of deleted or moved files, without re-embedding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from conftest import TINY, make_photo
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.extraction.run import extract
from embedkit.index.duplicates import find_duplicates
from embedkit.store.maintain import prune_store
from embedkit.store.read import open_store

runner = CliRunner()


def _store(tmp_path: Path) -> tuple[Path, Path]:
    photos = tmp_path / "photos"
    for i in range(5):
        make_photo(photos / f"p{i}.jpg", i)
    (photos / "bad.jpg").write_bytes(b"not an image")
    store = tmp_path / "s"
    extract([photos], store, model=TINY, random_init=True, workers=0)
    return photos, store


def test_prune_drops_rows_of_deleted_files_and_reports_them(tmp_path: Path) -> None:
    photos, store = _store(tmp_path)
    (photos / "p1.jpg").unlink()
    (photos / "bad.jpg").unlink()
    dry = prune_store(store, dry_run=True)
    assert sorted(Path(p).name for p in dry.changed) == ["bad.jpg", "p1.jpg"]
    assert len(open_store(store)) == 5  # dry run wrote nothing
    r = runner.invoke(app, ["prune", str(store), "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["changed"]) == 2
    s = open_store(store)
    assert len(s) == 4 and "p1.jpg" not in s.paths and s.failed.num_rows == 0


def test_prune_keeps_a_missing_root_unless_asked(tmp_path: Path) -> None:
    photos, store = _store(tmp_path)
    shutil.rmtree(photos)  # like an unmounted drive
    r = prune_store(store)
    assert r.changed == [] and len(r.kept) == 6 and len(open_store(store)) == 5
    r = prune_store(store, missing_roots=True)
    assert len(r.changed) == 6 and len(open_store(store)) == 0


def test_reroot_keeps_vectors_and_a_rerun_finds_nothing_to_do(tmp_path: Path) -> None:
    photos, store = _store(tmp_path)
    before = open_store(store)
    by_name = {Path(p).name: before.vectors[i] for i, p in enumerate(before.paths)}
    moved = tmp_path / "elsewhere" / "pics"
    moved.parent.mkdir()
    shutil.move(photos, moved)  # same filesystem: mtimes kept
    (moved / "p4.jpg").unlink()  # one file did not make it
    r = runner.invoke(app, ["reroot", str(store), str(photos), str(moved), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert len(rep["changed"]) == 5 and [Path(k["path"]).name for k in rep["kept"]] == ["p4.jpg"]
    after = open_store(store)
    new_rows = [i for i, root in enumerate(after.roots) if root == str(moved)]
    assert len(new_rows) == 4  # the failed bad.jpg moved too, as a failed row
    for i in new_rows:
        np.testing.assert_array_equal(after.vectors[i], by_name[Path(after.paths[i]).name])
    # A rerun of the new place re-embeds nothing, and no ghost pairs with its own file.
    summary = extract([moved], store, model=TINY, random_init=True, workers=0)
    assert summary.embedded == 0 and summary.unchanged == 5
    # The ghost of p4.jpg: its whole old root is gone, which prune only drops when asked.
    assert prune_store(store).changed == []
    assert len(prune_store(store, missing_roots=True).changed) == 1
    assert find_duplicates(store, 0.999) == []
    assert sorted(open_store(store).roots) == [str(moved)] * 4


def test_reroot_errors_are_one_line(tmp_path: Path) -> None:
    photos, store = _store(tmp_path)
    r = runner.invoke(app, ["reroot", str(store), str(tmp_path / "nope"), str(photos)])
    assert r.exit_code == 1 and "no rows are stored under" in r.output
    r = runner.invoke(app, ["reroot", str(store), str(photos), str(tmp_path / "missing")])
    assert r.exit_code == 1 and "is not a folder" in r.output
