"""``finetune_views``: augmented views, the frozen trunk's cached activations, and their use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from test_compare import labelled_folder

from embedkit.classification.finetune import finetune, trainable_units
from embedkit.classification.finetune_views import augment, split_backbone, trunk_views
from embedkit.models.backbone import load_backbone


def _crops(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (n, 8, 8, 3)).astype(np.float32)
    big = torch.nn.functional.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2), size=size,
                                          mode="bilinear")  # fmt: skip
    return big.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("unfreeze", [0, 1, 3])
def test_cached_trunk_gives_the_gradients_of_the_whole_backbone(unfreeze: int) -> None:
    bb = load_backbone(TINY, random_init=True, device="cpu")
    net = bb.model
    for p in net.parameters():
        p.requires_grad_(False)
    units = trainable_units(net)[-unfreeze:] if unfreeze else []
    params = [p for u in units for p in u.parameters()]
    for p in params:
        p.requires_grad_(True)
    pixels = _crops(6, bb.preprocess.size)

    def normalize(u8: torch.Tensor) -> torch.Tensor:
        return bb.preprocess.normalize(u8).contiguous(memory_format=torch.channels_last)

    parts = split_backbone(net, units[0] if units else None, normalize(torch.from_numpy(pixels)))
    assert parts is not None
    trunk, rest = parts
    assert all(not p.requires_grad for p in trunk.parameters())
    cached = trunk_views(trunk, pixels, bb.preprocess.normalize, views=2, min_scale=0.5, seed=3,
                         batch_size=len(pixels), device=torch.device("cpu"))  # fmt: skip
    assert cached.shape[:2] == (2, 6)
    # view 1 of trunk_views is augment() with the view's own stream, then the whole backbone
    views = augment(pixels, np.random.default_rng([3, 1, 1]), 0.5)
    assert not np.array_equal(views, pixels)
    head = torch.nn.Linear(bb.dim, 3)
    target = torch.tensor([0, 1, 2, 0, 1, 2])

    def grads(features: torch.Tensor) -> list[torch.Tensor]:
        loss = torch.nn.functional.cross_entropy(head(features), target)
        return torch.autograd.grad(loss, [*params, *head.parameters()])

    whole = grads(net(normalize(torch.from_numpy(views))))
    split = grads(rest(cached[1].contiguous(memory_format=torch.channels_last)
                       if unfreeze else cached[1]))  # fmt: skip
    assert len(whole) == len(params) + 2
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_split_backbone_refuses_a_backbone_that_is_not_its_children_in_order(
    tmp_path: Path,
) -> None:
    bb = load_backbone("test_vit", random_init=True, device="cpu")
    x = bb.preprocess.normalize(torch.from_numpy(_crops(2, bb.preprocess.size)))
    unit = trainable_units(bb.model)[-1]
    assert split_backbone(bb.model, unit, x) is None
    # finetune then runs the whole backbone on every step, and still trains
    photos = labelled_folder(tmp_path / "photos", 6)
    r = finetune(photos, tmp_path / "ft", model="test_vit", random_init=True, epochs=1,
                 unfreeze=1, batch_size=8, views=4)  # fmt: skip
    assert r.cached_views == 0 and len(r.history) == 1


def test_augment_flips_only_at_scale_one_and_repeats_with_its_seed() -> None:
    pixels = _crops(16, (32, 40))
    flipped = augment(pixels, np.random.default_rng(0), 1.0)
    same = [np.array_equal(a, b) for a, b in zip(flipped, pixels, strict=True)]
    mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(flipped, pixels, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(same) and any(mirrored)
    cropped = augment(pixels, np.random.default_rng(0), 0.3)
    assert cropped.shape == pixels.shape and cropped.dtype == np.uint8
    assert sum(not np.array_equal(a, b) and not np.array_equal(a, b[:, ::-1])
               for a, b in zip(cropped, pixels, strict=True)) >= 12  # fmt: skip
    np.testing.assert_array_equal(cropped, augment(pixels, np.random.default_rng(0), 0.3))
    assert np.array_equal(pixels, _crops(16, (32, 40)))  # the input is not changed


def test_head_only_finetune_trains_on_cached_pooled_features(tmp_path: Path) -> None:
    # unfreeze=0: the trunk is the whole backbone, its cached output the pooled (N, D) features
    photos = labelled_folder(tmp_path / "photos", 6)
    r = finetune(photos, tmp_path / "ft", model=TINY, random_init=True, epochs=2, unfreeze=0,
                 batch_size=8, views=3)  # fmt: skip
    assert r.cached_views == 3 and len(r.history) == 2 and r.test_acc == 1.0


def test_cached_run_without_a_validation_split(tmp_path: Path) -> None:
    photos = labelled_folder(tmp_path / "photos", 6)
    r = finetune(photos, tmp_path / "ft", model=TINY, random_init=True, epochs=1, unfreeze=1,
                 batch_size=8, views=2, val_fraction=0.0)  # fmt: skip
    assert r.cached_views == 2 and len(r.history) == 1


@pytest.mark.parametrize("views", [2, 0])
def test_phase1_head_is_fitted_on_the_augmented_views_phase2_trains_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, views: int
) -> None:
    # Before: phase 1 fitted the head on plain crops only, and phase 2 started far off on its
    # own (augmented) training inputs (benchmarks/RESULTS.md, finetune: loss 0.02 vs 5.67).
    import json

    import embedkit.classification.train as train_mod

    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = train_mod.train_probe

    def spy(features: np.ndarray, labels: np.ndarray, **kw: object) -> object:
        seen.append((np.asarray(features), np.asarray(labels)))
        return real(features, labels, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(train_mod, "train_probe", spy)
    photos = labelled_folder(tmp_path / "photos", 8)
    r = finetune(photos, tmp_path / "ft", model=TINY, random_init=True, epochs=1, unfreeze=1,
                 batch_size=8, views=views, min_scale=0.5)  # fmt: skip
    info = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    n, n_train = 16, len(info["split"]["train"])
    n_views = views or 4  # views=0 (augment on the fly): DEFAULT_VIEWS fresh views for phase 1
    assert seen and all(len(f) == n + n_views * n_train for f, _ in seen)
    feats, labels = seen[0]
    # the extra rows are new (augmented) features of the training images, with their labels
    extra = feats[n:]
    assert not any(np.allclose(e, p) for e in extra[:n_train] for p in feats[:n])
    assert sorted(labels[n : n + n_train]) == sorted(
        Path(p).parent.name for p in info["split"]["train"]
    )
    assert np.isfinite(r.head_loss_views) and np.isfinite(r.head_loss_plain)
    assert info["head_loss_views"] == r.head_loss_views


def test_phase1_head_with_views_keeps_the_split() -> None:
    from embedkit.classification.finetune import phase1_head

    rng = np.random.default_rng(0)
    y = np.array(["a", "b"] * 20)
    x = rng.normal(size=(40, 5)).astype(np.float32) + (y == "a")[:, None]
    groups = np.arange(40).astype(str)
    kw = {"groups": groups, "seed": 0, "val_fraction": 0.2, "test_fraction": 0.2}
    plain, _, _ = phase1_head(x, y, **kw)  # type: ignore[arg-type]
    views = rng.normal(size=(3, len(plain.split["train"]), 5)).astype(np.float32)
    with_views, w, b = phase1_head(x, y, train_views=views, **kw)  # type: ignore[arg-type]
    np.testing.assert_array_equal(with_views.split["val"], plain.split["val"])
    np.testing.assert_array_equal(with_views.split["test"], plain.split["test"])
    assert len(with_views.split["train"]) == 4 * len(plain.split["train"])
    assert w.shape == (2, 5) and b.shape == (2,)
