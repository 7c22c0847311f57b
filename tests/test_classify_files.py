"""``classify`` without a store: image files through a named model and its own head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from test_classify import full_model_file, photos
from typer.testing import CliRunner

from embedkit.classification.head import classify
from embedkit.cli import app
from embedkit.errors import InvalidArgumentError, ProbeError
from embedkit.extraction.run import extract

runner = CliRunner()


@pytest.fixture(autouse=True)
def _own_onnx_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache"))


def test_files_without_a_store_match_the_store_form(tmp_path: Path) -> None:
    _, weights = full_model_file(TINY, tmp_path / "w.safetensors")
    files = photos(tmp_path / "photos", 3)
    extract([str(tmp_path / "photos")], tmp_path / "s.store", model=TINY, weights=weights)
    by_store = classify(store=tmp_path / "s.store", images=files, top_k=5)
    by_model = classify(images=files, model=TINY, weights=weights, top_k=5)
    assert [p.path for p in by_model] == [str(f) for f in files]
    for a, b in zip(by_model, by_store, strict=True):
        assert a.id is None
        assert [t.index for t in a.top] == [t.index for t in b.top]
        np.testing.assert_allclose([t.prob for t in a.top], [t.prob for t in b.top], atol=1e-5)

    r = runner.invoke(
        app, ["classify", "--model", TINY, "--weights", str(weights), "-k", "2", "--json",
              *map(str, files[:2])],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [o["path"] for o in out] == [str(f) for f in files[:2]]
    assert all(o["id"] is None and len(o["top"]) == 2 for o in out)
    assert [t["index"] for t in out[0]["top"]] == [t.index for t in by_model[0].top[:2]]
    assert set(out[0]["top"][0]) == {"index", "label", "prob"}


def test_random_init_and_nothing_to_classify_are_refused(tmp_path: Path) -> None:
    files = photos(tmp_path / "photos", 1)
    with pytest.raises(ProbeError, match="no ImageNet classifier"):
        classify(images=files, model=TINY, random_init=True)
    with pytest.raises(InvalidArgumentError, match="nothing to classify"):
        classify(model=TINY)
    with pytest.raises(InvalidArgumentError, match="not both"):
        classify(store=tmp_path / "s.store", model=TINY)
    r = runner.invoke(app, ["classify", "--model", TINY, "--random-init", str(files[0])])
    assert r.exit_code == 1 and "no ImageNet classifier" in r.output


def test_headless_weights_are_refused(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(TINY, num_classes=0)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "h.safetensors"))
    files = photos(tmp_path / "photos", 1)
    with pytest.raises(ProbeError, match="no ImageNet classifier"):
        classify(images=files, model=TINY, weights=tmp_path / "h.safetensors")


def chelsea_jpeg(path: Path) -> Path:
    from PIL import Image
    from skimage import data

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.chelsea()).save(path, quality=90)
    return path


@pytest.mark.slow
def test_chelsea_jpeg_is_a_cat_with_the_default_model(tmp_path: Path) -> None:
    cat = chelsea_jpeg(tmp_path / "chelsea.jpg")
    top = classify(images=[cat], top_k=3)[0].top
    assert top[0].index in (281, 282, 285), top  # tabby, tiger cat, Egyptian cat
    r = runner.invoke(app, ["classify", str(cat), "--json"])
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)[0]["top"][0]
    assert first["index"] == top[0].index and first["label"] == top[0].label
