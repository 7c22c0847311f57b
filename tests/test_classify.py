"""ImageNet head recovery: stored features + stored head == the full model's own output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY, make_photo
from safetensors.torch import save_file

from embedkit.classification.head import classify, head_probabilities, rank_top_k
from embedkit.errors import ProbeError
from embedkit.extraction.run import extract
from embedkit.store.read import open_store

# Tiny timm test models whose classifier acts on the pooled pre-logits (conv, resnet, ViT).
MODELS = [TINY, "test_resnet", "test_vit"]


def full_model_file(name: str, path: Path) -> tuple[torch.nn.Module, Path]:
    """A seeded full timm model (head included) saved as a weights file."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).eval()
    with torch.no_grad():
        # Random heads give near-uniform probabilities whose top-5 order is a coin toss;
        # a larger scale spreads them so the comparison is meaningful.
        model.get_classifier().weight.mul_(40)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def photos(d: Path, n: int = 4) -> list[Path]:
    return [make_photo(d / f"{i}.png", 10 + i, size=(80 + 10 * i, 64)) for i in range(n)]


@pytest.mark.parametrize("name", MODELS)
def test_head_recovery_equals_the_full_model(name: str, tmp_path: Path) -> None:
    model, weights = full_model_file(name, tmp_path / "w.safetensors")
    files = photos(tmp_path / "photos")
    extract(
        [str(tmp_path / "photos")], tmp_path / "s.store", model=name, weights=weights, workers=0
    )
    store = open_store(tmp_path / "s.store")
    preds = {Path(p.path).name: p for p in classify(store=store, top_k=5)}
    # Stored rows come back by absolute path with their id: unambiguous across roots.
    assert all(
        Path(p.path).is_absolute() and p.id in set(store.ids.tolist()) for p in preds.values()
    )

    from embedkit.extraction.embed import backbone_for_store
    from embedkit.images.decode import open_rgb

    pp = backbone_for_store(store, device="cpu").preprocess
    for f in files:
        x = pp.normalize(torch.from_numpy(np.array(pp.to_uint8(open_rgb(f).image)))[None])
        with torch.no_grad():
            expected = torch.softmax(model(x).double(), dim=1)[0].numpy()
        got = preds[f.name]
        assert [t.index for t in got.top] == list(np.argsort(-expected)[:5])
        np.testing.assert_allclose(
            [t.prob for t in got.top], np.sort(expected)[::-1][:5], atol=1e-4
        )

    # new image files through the store's model give the same answer as the stored rows
    again = classify(store=store, images=files[:2], top_k=5, device="cpu")
    for p in again:
        stored = preds[Path(p.path).name]
        assert [t.index for t in p.top] == [t.index for t in stored.top]
        np.testing.assert_allclose([t.prob for t in p.top], [t.prob for t in stored.top], atol=1e-4)


def test_random_init_store_is_refused(tmp_path: Path) -> None:
    photos(tmp_path / "photos", 2)
    extract(
        [str(tmp_path / "photos")], tmp_path / "s.store", model=TINY, random_init=True, workers=0
    )
    with pytest.raises(ProbeError, match="randomly initialised.*probe train"):
        classify(store=tmp_path / "s.store")


def test_rank_top_k_and_json_shape() -> None:
    probs = head_probabilities(
        np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),
        np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32),
        np.zeros(3, np.float32),
    )
    np.testing.assert_allclose(probs.sum(1), 1.0)
    preds = rank_top_k(probs, ["tabby cat", "dog", "fox"], ["a.jpg", "b.jpg"], 2)
    assert str(preds[0].top[0]).startswith("tabby cat 0.")
    d = preds[1].to_dict()
    assert d["path"] == "b.jpg" and [t["index"] for t in d["top"]] == [1, 2]
    assert set(d["top"][0]) == {"index", "label", "prob"}
    json.dumps(d)


@pytest.mark.slow
def test_chelsea_is_a_cat_with_default_weights(tmp_path: Path) -> None:
    from PIL import Image
    from skimage import data

    (tmp_path / "photos").mkdir()
    Image.fromarray(data.chelsea()).save(tmp_path / "photos" / "chelsea.png")
    extract([str(tmp_path / "photos")], tmp_path / "s.store", workers=0)
    top = classify(store=tmp_path / "s.store", top_k=5)[0].top
    assert 281 <= top[0].index <= 285, top  # ImageNet's domestic cats: tabby .. Egyptian cat
    assert "cat" in top[0].label
