"""A fine-tune output folder is a model: extract, classify, trace, search, probes, compare."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from safetensors.torch import save_file
from test_compare import labelled_folder
from typer.testing import CliRunner

from embedkit.classification.finetune import finetune
from embedkit.classification.head import classify
from embedkit.classification.train import train_store_probe
from embedkit.cli import app
from embedkit.errors import InvalidArgumentError, ProbeError, StoreMismatchError
from embedkit.extraction.embed import embed
from embedkit.extraction.run import extract
from embedkit.models.backbone import load_backbone
from embedkit.models.embedder import cached_embedder
from embedkit.pipeline.trace import trace
from embedkit.store.read import open_store

runner = CliRunner()
SETTINGS = dict(model=TINY, random_init=True, batch_size=8, patience=5, seed=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One fine-tune of the tiny model on red/blue photos, and a base-model store of them.

    Its own ONNX cache, so that the torch-free path is exercised on what these tests record.
    """
    root = tmp_path_factory.mktemp("ftuse")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDKIT_CACHE", str(root / "cache"))
        photos = labelled_folder(root / "photos", 8)
        ft = finetune(photos, root / "ft", epochs=1, unfreeze=1, **SETTINGS).out
        extract([str(photos)], root / "base.store", model=TINY, random_init=True)
        yield {"root": root, "photos": photos, "ft": ft, "base": root / "base.store"}


@pytest.fixture
def ft_store(world: dict[str, Path], tmp_path: Path) -> Path:
    store = tmp_path / "ft.store"
    extract([str(world["photos"])], store, model=str(world["ft"]))
    return store


def test_extract_with_the_folder_records_the_finetuned_weights_and_their_base(
    world: dict[str, Path], ft_store: Path
) -> None:
    ft, photos = world["ft"], world["photos"]
    info = json.loads((ft / "finetune.json").read_text())
    md = open_store(ft_store).metadata
    assert md["model"] == TINY and md["random_init"] is False
    assert md["weights_source"] == f"file:{ft / 'model.safetensors'}"
    base_sha = open_store(world["base"]).metadata["weights_sha256"]
    assert md["finetune"] == {
        "dir": str(ft), "classes": ["blue", "red"], "base_model": TINY,
        "base_weights_source": "random-init", "base_weights_sha256": base_sha,
        "base_random_init": True,
    }  # fmt: skip
    assert info["start_weights_sha256"] == base_sha
    assert md["weights_sha256"] != base_sha
    # the fine-tuned backbone's vectors, the same from the folder and from the file
    bb = load_backbone(str(ft))
    st = open_store(ft_store)
    row = st.row_of("red/0.png")
    np.testing.assert_allclose(st.vectors[row], embed([photos / "red" / "0.png"], bb)[0], atol=1e-5)
    by_file = load_backbone(TINY, weights=ft / "model.safetensors")
    assert by_file.fingerprint() == bb.fingerprint() and by_file.finetuned == bb.finetuned
    # so the other form extends the same store: nothing changed, nothing to do
    again = extract([str(photos)], ft_store, model=TINY, weights=ft / "model.safetensors")
    assert again.embedded == 0 and again.unchanged == 16
    r = runner.invoke(app, ["info", str(ft_store), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["finetune"]["base_weights_sha256"] == base_sha


def test_mixing_with_the_base_models_store_is_refused_both_ways(
    world: dict[str, Path], ft_store: Path
) -> None:
    photos = str(world["photos"])
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        extract([photos], world["base"], model=str(world["ft"]))
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        extract([photos], ft_store, model=TINY, random_init=True)
    r = runner.invoke(app, ["extract", photos, "--store", str(world["base"]), "--model",
                            str(world["ft"])])  # fmt: skip
    assert r.exit_code == 1 and "was made with model" in r.output
    assert "Traceback" not in r.output


def test_a_head_only_finetune_is_another_model_than_its_base(
    world: dict[str, Path], tmp_path: Path
) -> None:
    # epochs=0: the backbone is the base's, tensor for tensor; only the head is new. Its store
    # still must not mix with the base's: the head (saved beside the vectors) names classes.
    head_only = finetune(world["photos"], tmp_path / "head", epochs=0, unfreeze=0, **SETTINGS)
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        extract([str(world["photos"])], world["base"], model=str(head_only.out))


def test_classify_uses_the_new_head_and_its_classes(world: dict[str, Path], ft_store: Path) -> None:
    ft, photos = world["ft"], world["photos"]
    files = [photos / "red" / "1.png", photos / "blue" / "1.png"]
    by_model = classify(images=files, model=str(ft), top_k=5)
    assert [[t.label for t in p.top] for p in by_model] == [["red", "blue"], ["blue", "red"]]
    by_store = classify(store=ft_store, images=files)
    for a, b in zip(by_model, by_store, strict=True):
        np.testing.assert_allclose([t.prob for t in a.top], [t.prob for t in b.top], atol=1e-5)
    stored = classify(store=ft_store)
    assert {t.label for p in stored for t in p.top} == {"blue", "red"}
    assert all(p.top[0].label == Path(p.path).parent.name for p in stored)

    r = runner.invoke(app, ["classify", str(files[0]), "--model", str(ft), "--json"])
    assert r.exit_code == 0, r.output
    assert [t["label"] for t in json.loads(r.stdout)[0]["top"]] == ["red", "blue"]
    r = runner.invoke(app, ["classify", str(files[0]), "--weights",
                            str(ft / "model.safetensors"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["top"][0]["label"] == "red"


def test_trace_ends_with_the_new_head(world: dict[str, Path]) -> None:
    ft, photo = world["ft"], world["photos"] / "blue" / "2.png"
    r = runner.invoke(app, ["trace", str(photo), "--model", str(ft), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    shapes = {s["name"]: s["shape"] for s in d["stages"]}
    dim = shapes["features"][1]
    assert shapes["features"] == [1, dim] and shapes["logits"] == [1, 2]
    assert shapes["softmax"] == [1, 2] and shapes["top_k"] == [2]
    assert d["classifier"] == f"finetune:{ft}"
    assert [t["label"] for t in d["top"]] == ["blue", "red"]
    tr = trace(photo, str(ft))
    np.testing.assert_allclose(
        [p for _, _, p in tr.top],
        [t.prob for t in classify(images=[photo], model=str(ft))[0].top], atol=1e-5,
    )  # fmt: skip


def test_search_a_finetuned_store_with_an_image_file(
    world: dict[str, Path], ft_store: Path, tmp_path: Path
) -> None:
    query = tmp_path / "query.png"  # not a stored path: embedded with the store's model
    query.write_bytes((world["photos"] / "red" / "3.png").read_bytes())
    r = runner.invoke(app, ["search", str(ft_store), str(query), "-k", "1", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)[0]["hits"]
    assert hits[0]["path"].endswith("red/3.png") and hits[0]["score"] > 0.999


def test_probes_do_not_cross_between_base_and_finetuned_stores(
    world: dict[str, Path], ft_store: Path, tmp_path: Path
) -> None:
    on_base = train_store_probe(world["base"], knn_k=None)
    on_ft = train_store_probe(ft_store, knn_k=None)
    with pytest.raises(ProbeError, match="another model"):
        on_base.classify(store=ft_store)
    with pytest.raises(ProbeError, match="another model"):
        on_ft.classify(store=world["base"])
    preds = on_ft.classify(store=ft_store, images=[world["photos"] / "blue" / "4.png"])
    assert preds[0].top[0].label in ("blue", "red")

    on_base.save(tmp_path / "base.probe")
    r = runner.invoke(app, ["probe", "predict", str(tmp_path / "base.probe"), "--store",
                            str(ft_store)])  # fmt: skip
    assert r.exit_code == 1 and "another model" in r.output
    # the fine-tune folder itself is no probe: the error points at its own head
    r = runner.invoke(app, ["probe", "predict", str(world["ft"]), "--store", str(ft_store)])
    assert r.exit_code == 1 and "embedkit classify" in r.output and "Traceback" not in r.output


def test_a_store_made_from_the_file_before_folders_were_models_says_to_re_extract(
    world: dict[str, Path], ft_store: Path
) -> None:
    # Such stores recorded the backbone's sha256 without the head, and no finetune record.
    manifest = json.loads((ft_store / "manifest.json").read_text())
    md = manifest["metadata"]
    del md["finetune"]
    md["weights_sha256"] = "0" * 64
    (ft_store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreMismatchError, match=f"re-extract it .* --model {world['ft']}"):
        classify(store=ft_store, images=[world["photos"] / "red" / "0.png"], device="cpu")


def test_the_torch_free_path_carries_the_head_and_classes(
    world: dict[str, Path], ft_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDKIT_CACHE", str(world["root"] / "cache"))
    emb = cached_embedder(str(world["ft"]), device="cpu")  # recorded by the extraction
    assert emb is not None and emb.backbone is None  # no torch model behind it
    assert emb.finetuned is not None and emb.finetuned.classes == ("blue", "red")
    assert emb.head is not None and emb.head[0].shape == (2, emb.dim)
    md = open_store(ft_store).metadata
    assert emb.provenance.to_metadata()["finetune"] == md["finetune"]
    assert emb.weights_sha256 == md["weights_sha256"]


def test_compare_the_finetuned_backbone_with_its_base(world: dict[str, Path]) -> None:
    from embedkit.pipeline.compare import compare_models

    rows = compare_models(world["photos"], [TINY, str(world["ft"])], random_init=True)
    assert [r.model for r in rows] == [TINY, str(world["ft"])]
    assert rows[0].weights == "random"
    assert rows[1].weights == f"file:{world['ft'] / 'model.safetensors'}"


def test_resolution_errors_say_what_to_do(tmp_path: Path) -> None:
    import torch

    from embedkit.models.finetuned import resolve_model

    folder = tmp_path / "photos"
    folder.mkdir()
    with pytest.raises(InvalidArgumentError, match="not a fine-tune output"):
        resolve_model(str(folder))
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({"x": torch.zeros(1)}, str(ft / "model.safetensors"))
    (ft / "finetune.json").write_text(json.dumps({
        "format": "embedkit.finetune/1", "arch": TINY, "classes": ["a", "b"],
        "preprocess": {"size": [32, 32], "crop_pct": 1.0, "crop_mode": "center",
                       "interpolation": "bilinear", "mean": [0, 0, 0], "std": [1, 1, 1]},
        "settings": {"model": TINY}, "start_weights": "random-init",
    }))  # fmt: skip
    ref = resolve_model(str(ft))
    assert (ref.name, ref.weights) == (TINY, os.path.join(str(ft), "model.safetensors"))
    assert resolve_model(None, ft / "model.safetensors") == ref
    with pytest.raises(InvalidArgumentError, match="drop --random-init"):
        resolve_model(str(ft), random_init=True)
    with pytest.raises(InvalidArgumentError, match="drop --weights"):
        resolve_model(str(ft), tmp_path / "other.safetensors")
    with pytest.raises(InvalidArgumentError, match="not of resnet50"):
        resolve_model("resnet50", ft / "model.safetensors")
    r = runner.invoke(app, ["classify", str(tmp_path), "--model", str(folder)])
    assert r.exit_code == 1 and "not a fine-tune output" in r.output


def test_help_names_the_folder_form() -> None:
    for verb in (["extract"], ["classify"], ["trace"], ["compare"]):
        r = runner.invoke(app, [*verb, "--help"], terminal_width=300)
        assert r.exit_code == 0, r.output
        flat = " ".join(r.output.replace("│", " ").split())
        assert "fine-tune folder" in flat, verb


@pytest.mark.slow
def test_real_lite0_finetune_classifies_and_traces_with_its_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default model's packaged weights (tf_efficientnet_lite0 architecture): the folder
    # resolves to that arch, its 224 px preprocessing and its 2-class head.
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache"))
    photos = labelled_folder(tmp_path / "photos", 6)
    r = finetune(photos, tmp_path / "ft", model="efficientnet_lite0", epochs=1, unfreeze=1,
                 batch_size=8, device="cpu")  # fmt: skip
    assert r.arch == "tf_efficientnet_lite0"
    photo = photos / "red" / "5.png"
    res = runner.invoke(app, ["trace", str(photo), "--model", str(r.out), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    shapes = {s["name"]: s["shape"] for s in d["stages"]}
    assert shapes["features"] == [1, 1280] and shapes["logits"] == [1, 2]
    assert d["top"][0]["label"] == "red"
    extract([str(photos)], tmp_path / "s.store", model=str(r.out), device="cpu")
    md = open_store(tmp_path / "s.store").metadata
    assert md["model"] == "tf_efficientnet_lite0"
    assert md["finetune"]["base_weights_source"].startswith("package:")
    preds = classify(store=tmp_path / "s.store")
    assert all(p.top[0].label == Path(p.path).parent.name for p in preds)
    # the export checked during extract serves the next classify without torch
    emb = cached_embedder(str(r.out), device="cpu")
    assert emb is not None and emb.backbone is None and emb.head is not None
