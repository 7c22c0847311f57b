"""Search on real stores: queries by path / id / image / vector, staleness, foreign models, CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, TINY, make_photo
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.cli import search as cli_search  # noqa: F401  (registers index/search/duplicates)
from embedkit.errors import IndexStateError, InvalidArgumentError, StoreError
from embedkit.extraction.run import extract
from embedkit.index.lifecycle import INDEX_DIR, index_store, open_index
from embedkit.index.ram import Index
from embedkit.index.search import search
from embedkit.store.read import open_store

runner = CliRunner()


def make_store(tmp: Path, n: int = 8, name: str = "s.store") -> Path:
    photos = tmp / "photos"
    for i in range(n):
        make_photo(photos / f"p{i}.jpg", i)
    store = tmp / name
    extract([photos], store, model=TINY, random_init=True, workers=0)
    return store


@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("search"))


@pytest.fixture
def store(base_store: Path, tmp_path: Path) -> Path:
    # a private copy (with its own photos) per test, so tests can modify it
    shutil.copytree(base_store.parent / "photos", tmp_path / "photos")
    target = tmp_path / "s.store"
    extract([tmp_path / "photos"], target, model=TINY, random_init=True, workers=0)
    return target


def test_stored_path_and_id_queries_find_themselves_first(store: Path) -> None:
    st = open_store(store)
    [by_path, by_id] = search(store, ["p3.jpg", int(st.ids[5])], k=3)
    assert by_path.hits[0].path.endswith("p3.jpg") and by_path.hits[0].score == pytest.approx(1)
    assert by_id.hits[0].id == int(st.ids[5])
    assert [h.rank for h in by_path.hits] == [1, 2, 3]
    assert all(a.score >= b.score for a, b in zip(by_path.hits, by_path.hits[1:], strict=False))
    [r] = search(store, ["p3.jpg"], k=3, exclude_self=True)
    assert not r.hits[0].path.endswith("p3.jpg") and len(r.hits) == 3


def test_image_file_query_matches_its_stored_copy(store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "q.jpg"
    outside.parent.mkdir()
    shutil.copy(tmp_path / "photos" / "p2.jpg", outside)
    [r] = search(store, [str(outside)], k=1)
    assert r.hits[0].path.endswith("p2.jpg") and r.hits[0].score == pytest.approx(1, abs=1e-4)


def test_vector_queries_and_threshold(store: Path, tmp_path: Path) -> None:
    st = open_store(store)
    np.save(tmp_path / "q.npy", st.vectors[[1, 4]])
    r = search(store, [st.vectors[0]], vector_files=[tmp_path / "q.npy"], k=2)
    assert [x.hits[0].id for x in r] == [int(st.ids[i]) for i in (0, 1, 4)]
    [everything] = search(store, ["p0.jpg"], threshold=-1.0)
    assert len(everything.hits) == len(st.ids)
    [few] = search(store, ["p0.jpg"], threshold=0.9999)
    assert [h.path.endswith("p0.jpg") for h in few.hits] == [True]
    with pytest.raises(InvalidArgumentError, match=r"\[-1, 1\]"):
        search(store, ["p0.jpg"], threshold=2.0)  # cosine: nothing could ever match
    np.save(tmp_path / "bad.npy", np.zeros(3))
    with pytest.raises(InvalidArgumentError, match="dimensions"):
        search(store, [], vector_files=[tmp_path / "bad.npy"])


def test_unknown_query_says_what_it_accepts(store: Path) -> None:
    with pytest.raises(StoreError, match="neither a stored"):
        search(store, ["nope.jpg"])


def test_index_is_built_saved_and_up_to_date(store: Path) -> None:
    messages: list[str] = []
    report = index_store(store, log=messages.append)
    assert report.action == "built" and report.info["key"] == "Flat"
    meta = json.loads((store / INDEX_DIR / "index.json").read_text())
    assert meta["source"]["store_version"] == open_store(store).version
    assert meta["recall_at_10"] == 1.0 and meta["size_bytes"] > 0 and "build_seconds" in meta
    assert index_store(store, log=messages.append).action == "up to date"
    assert index_store(store, rebuild=True, log=messages.append).action == "rebuilt"
    assert index_store(store, key="HNSW32", log=messages.append).info["key"] == "HNSW32"


def test_stale_index_is_updated_and_never_returns_deleted_rows(store: Path, tmp_path) -> None:
    index_store(store, key="HNSW32")  # HNSW cannot remove: exercises the tombstones
    photos = tmp_path / "photos"
    (photos / "p1.jpg").unlink()
    make_photo(photos / "new.jpg", 77)
    make_photo(photos / "p2.jpg", 555)  # same path, new content
    extract([photos], store, model=TINY, random_init=True, workers=0)
    messages: list[str] = []
    [r] = search(store, ["new.jpg"], k=20, log=messages.append)
    assert any("updated in place" in m and "+1 new, -1 deleted, 1 changed" in m for m in messages)
    paths = [h.path for h in r.hits]
    assert paths[0].endswith("new.jpg") and not any(p.endswith("p1.jpg") for p in paths)
    assert len(paths) == len(open_store(store).ids)
    [p2] = search(store, ["p2.jpg"], k=1)
    assert p2.hits[0].score == pytest.approx(1.0, abs=1e-4)  # the new vector, not the old
    messages.clear()
    search(store, ["new.jpg"], log=messages.append)
    assert messages == []  # saved: no second update


def test_many_changes_rebuild_instead(store: Path, tmp_path) -> None:
    index_store(store)
    for i in range(10):  # 10 new of 18: more than half the rows changed
        make_photo(tmp_path / "photos" / f"extra{i}.jpg", 900 + i)
    extract([tmp_path / "photos"], store, model=TINY, random_init=True, workers=0)
    report = index_store(store)
    assert report.action == "rebuilt" and "store version" in report.message


def test_foreign_index_is_refused_by_search_and_rebuilt_by_index(store: Path, tmp_path) -> None:
    other = make_store(tmp_path / "other", n=4)
    index_store(other)
    shutil.rmtree(store / INDEX_DIR, ignore_errors=True)
    # another store's index, made with different weights (another seed would do the same)
    info_file = other / INDEX_DIR / "index.json"
    meta = json.loads(info_file.read_text())
    meta["source"]["fingerprint"]["weights_sha256"] = "0" * 64
    info_file.write_text(json.dumps(meta))
    shutil.copytree(other / INDEX_DIR, store / INDEX_DIR)
    with pytest.raises(IndexStateError, match="another model.*--rebuild"):
        search(store, ["p0.jpg"])
    report = index_store(store)
    assert report.action == "rebuilt" and "another model" in report.message
    assert search(store, ["p0.jpg"], k=1)[0].hits[0].path.endswith("p0.jpg")


def test_corrupt_index_file_gives_rebuild_hint(store: Path) -> None:
    index_store(store)
    [f] = (store / INDEX_DIR).glob("*.faiss")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(IndexStateError, match=r"truncated or corrupt.*embedkit index .* --rebuild"):
        open_index(open_store(store))
    result = runner.invoke(app, ["search", str(store), "p0.jpg"])
    assert result.exit_code == 1 and "--rebuild" in result.output
    assert index_store(store).action == "rebuilt"  # `index` recovers by itself


def test_missing_index_is_built_on_first_search(store: Path) -> None:
    messages: list[str] = []
    search(store, ["p0.jpg"], log=messages.append)
    assert any("no index yet" in m for m in messages)
    assert Index.load(store / INDEX_DIR).info["n"] == len(open_store(store).ids)


# -- CLI --------------------------------------------------------------------------------------


def test_cli_index_and_search_formats(store: Path) -> None:
    r = runner.invoke(app, ["index", str(store), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["key"] == "Flat"
    r = runner.invoke(app, ["index", str(store), "--index-key", "HNSW32", "--max-memory", "1G"])
    assert r.exit_code == 0 and "HNSW32" in r.output and "recall_at_10" in r.output

    r = runner.invoke(app, ["search", str(store), "p1.jpg", "p2.jpg", "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert len(data) == 2 and [d["query"] for d in data] == ["p1.jpg", "p2.jpg"]
    hits = data[0]["hits"]
    assert len(hits) == 3 and set(hits[0]) == {"rank", "score", "id", "path"}
    assert hits[0]["rank"] == 1 and hits[0]["path"].endswith("p1.jpg")
    assert os.path.isabs(hits[0]["path"])

    r = runner.invoke(app, ["search", str(store), "p1.jpg", "-k", "2", "--csv"])
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert r.exit_code == 0 and len(rows) == 2 and rows[0]["path"].endswith("p1.jpg")
    assert set(rows[0]) == {"query", "rank", "score", "id", "path"}

    r = runner.invoke(app, ["search", str(store), "p1.jpg", "-k", "2"])
    assert r.exit_code == 0 and "rank" in r.stdout and "p1.jpg" in r.stdout


def test_cli_errors_are_one_line(store: Path) -> None:
    r = runner.invoke(app, ["search", str(store), "nope.jpg"])
    assert r.exit_code == 1 and "neither a stored" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["search", str(store), "p1.jpg", "--json", "--csv"])
    assert r.exit_code == 1 and "one of --json and --csv" in r.output
    r = runner.invoke(app, ["index", str(store), "--max-memory", "lots"])
    assert r.exit_code == 1 and "512M" in r.output
    r = runner.invoke(app, ["index", str(store), "--index-key", "Bogus12"])
    assert r.exit_code == 1 and "factory string" in r.output


# Random-init test-model features of different synthetic photos can be > 0.9 similar; only the
# byte-identical copy must group here.
STRICT = ["--threshold", "0.99"]


def test_cli_duplicates_formats(store: Path, tmp_path: Path) -> None:
    shutil.copy(tmp_path / "photos" / "p3.jpg", tmp_path / "photos" / "p3_copy.jpg")
    extract([tmp_path / "photos"], store, model=TINY, random_init=True, workers=0)
    r = runner.invoke(app, ["duplicates", str(store), "--json", *STRICT])
    assert r.exit_code == 0, r.output
    groups = json.loads(r.stdout)
    assert len(groups) == 1 and {Path(m["path"]).name for m in groups[0]} == {
        "p3.jpg",
        "p3_copy.jpg",
    }
    assert groups[0][1]["exact"] is True and groups[0][1]["score"] == pytest.approx(1.0)
    r = runner.invoke(app, ["duplicates", str(store), "--csv", *STRICT])
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["group"] for row in rows] == ["1", "1"]
    r = runner.invoke(app, ["duplicates", str(store), *STRICT])
    assert r.exit_code == 0 and "1 groups, 2 images in groups" in r.stdout
    assert "p3_copy.jpg" in r.stdout


# -- real weights on the shared corpus --------------------------------------------------------


@pytest.mark.slow
def test_corpus_twins_are_each_others_nearest_neighbour(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in (
        "pil_sample_cmyk.jpg",
        "pil_sample_rgb.jpg",
        "hopper.jpg",
        "hopper_orientation_6.jpg",
        "orientation_rectangle.jpg",
        "transparent.png",
    ):
        shutil.copy(CORPUS / name, photos / name)
    store = tmp_path / "c.store"
    extract([photos], store, workers=0)
    pairs = {
        "pil_sample_cmyk.jpg": "pil_sample_rgb.jpg",
        "pil_sample_rgb.jpg": "pil_sample_cmyk.jpg",
        "hopper.jpg": "hopper_orientation_6.jpg",
        "hopper_orientation_6.jpg": "hopper.jpg",
    }
    results = search(store, list(pairs), k=1, exclude_self=True)
    for r in results:
        assert Path(r.hits[0].path).name == pairs[r.query], (r.query, r.hits)
