"""``trace``: one image stage by stage, with the real shapes and the very vector extract stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_photo
from test_classify import full_model_file
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.errors import ImageFileError
from embedkit.extraction.run import extract
from embedkit.pipeline.trace import trace
from embedkit.store.read import open_store

runner = CliRunner()
STAGES = ["file", "decoded", "resized", "normalized", "features"]
HEAD_STAGES = [*STAGES, "logits", "softmax", "top_k"]


def _stored_row(store: Path, file: Path) -> np.ndarray:
    s = open_store(store)
    return np.asarray(s.vectors[s.row_of(str(file))])


def test_trace_features_equal_the_stored_row(tmp_path: Path) -> None:
    # 300 x 200 JPEG: a real resize (short side 200 -> the model's scale size) and crop.
    photo = make_photo(tmp_path / "photos" / "a.jpg", 3, size=(300, 200))
    extract([str(tmp_path / "photos")], tmp_path / "s.store", model=TINY, random_init=True)
    tr = trace(photo, TINY, random_init=True)
    assert [s.name for s in tr.stages] == STAGES  # random weights: no classifier stages
    assert tr.classifier is None and tr.top == []
    stored = _stored_row(tmp_path / "s.store", photo)
    assert np.abs(tr.features - stored).max() <= 1e-5

    dim = open_store(tmp_path / "s.store").vectors.shape[1]
    assert tr.stage("file").shape == [photo.stat().st_size]
    assert tr.stage("file").detail["format"] == "JPEG"
    assert tr.stage("decoded").shape == [200, 300, 3]
    assert tr.stage("features").shape == [1, dim]
    h, w = tr.stage("resized").shape[:2]
    assert tr.stage("normalized").shape == [1, 3, h, w]
    assert tr.stage("normalized").dtype == "float32"
    norm = tr.stage("features").detail["l2_norm"]
    assert norm == pytest.approx(float(np.linalg.norm(stored)), rel=1e-5)


def test_exif_orientation_is_reported_and_applied(tmp_path: Path) -> None:
    from PIL import Image

    src = make_photo(tmp_path / "src.png", 4, size=(120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.open(src).save(tmp_path / "rot.jpg", exif=exif)
    tr = trace(tmp_path / "rot.jpg", TINY, random_init=True)
    assert tr.stage("file").detail["exif_orientation"] == 6
    assert tr.stage("file").detail["size"] == [80, 120]
    assert tr.stage("decoded").shape == [120, 80, 3]  # upright: H and W swapped


def test_head_and_json_shapes(tmp_path: Path) -> None:
    _, weights = full_model_file(TINY, tmp_path / "w.safetensors")
    photo = make_photo(tmp_path / "p.png", 5, size=(90, 70))
    r = runner.invoke(
        app, ["trace", str(photo), "--model", TINY, "--weights", str(weights), "-k", "3", "--json"]
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [s["name"] for s in d["stages"]] == HEAD_STAGES
    shapes = {s["name"]: s["shape"] for s in d["stages"]}
    assert shapes["logits"] == [1, 1000] and shapes["softmax"] == [1, 1000]
    assert shapes["top_k"] == [3] and len(d["top"]) == 3
    assert all(isinstance(n, int) for s in d["stages"] for n in s["shape"])
    from embedkit.classification.head import classify

    want = classify(images=[photo], model=TINY, weights=weights, top_k=3)[0].top
    assert [t["index"] for t in d["top"]] == [t.index for t in want]
    np.testing.assert_allclose([t["prob"] for t in d["top"]], [t.prob for t in want], atol=1e-5)

    table = runner.invoke(app, ["trace", str(photo), "--model", TINY, "--weights", str(weights)])
    assert table.exit_code == 0, table.output
    for name in HEAD_STAGES:
        assert name in table.stdout


def test_trace_with_a_probe(tmp_path: Path) -> None:
    from embedkit.classification.train import train_store_probe

    for cls in ("red", "blue"):
        for i in range(8):
            make_photo(tmp_path / "photos" / cls / f"{i}.png", i + (100 if cls == "red" else 0))
    extract([str(tmp_path / "photos")], tmp_path / "s.store", model=TINY, random_init=True)
    probe = train_store_probe(tmp_path / "s.store", group_threshold=1.0)
    probe.save(tmp_path / "c.probe")
    photo = tmp_path / "photos" / "red" / "0.png"
    tr = trace(photo, probe=tmp_path / "c.probe", top_k=2)  # model and random init: the probe's
    assert [s.name for s in tr.stages] == HEAD_STAGES
    assert tr.stage("logits").shape == [1, 2]
    fp = open_store(tmp_path / "s.store").fingerprint
    want = probe.predict_proba(_stored_row(tmp_path / "s.store", photo)[None], fingerprint=fp)[0]
    got = {lab: p for _, lab, p in tr.top}
    for i, c in enumerate(probe.classes):
        assert got[c] == pytest.approx(float(want[i]), abs=1e-5)


def test_undecodable_file_is_a_typed_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageFileError, match="unidentified"):
        trace(bad, TINY, random_init=True)


@pytest.mark.slow
def test_default_model_trace_equals_extract(tmp_path: Path) -> None:
    from test_classify_files import chelsea_jpeg

    cat = chelsea_jpeg(tmp_path / "photos" / "chelsea.jpg")
    extract([str(tmp_path / "photos")], tmp_path / "s.store")
    tr = trace(cat)
    assert np.abs(tr.features - _stored_row(tmp_path / "s.store", cat)).max() <= 1e-5
    assert tr.top[0][0] in (281, 282, 285)


def test_a_stage_that_drifts_from_embed_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import embedkit.extraction.embed as embed_mod
    from embedkit.pipeline.trace import TraceMismatchError

    photo = make_photo(tmp_path / "p.png", 6)
    real = embed_mod.embed
    monkeypatch.setattr(embed_mod, "embed", lambda *a, **k: real(*a, **k) + 1e-3)
    with pytest.raises(TraceMismatchError, match="differ from embed"):
        trace(photo, TINY, random_init=True)
