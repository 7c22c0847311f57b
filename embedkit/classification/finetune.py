"""Fine-tune a backbone on your labelled photos, in two phases, and save weights ``extract``
can load.

Phase 1 trains a linear head on frozen features: ``train.train_probe`` (L-BFGS) on the
backbone's pooled features of the plain training crops and of the augmented views phase 2
trains on (dead features left out), with the weight decay of lowest validation loss (see
``phase1_head``), folded into one dense layer (``W / scale``, ``b - W @ (mean /
scale)``). Phase 2 unfreezes the last ``unfreeze`` units of the backbone (see
``trainable_units``) and trains them with the head: AdamW, linear warm-up then cosine decay,
early stopping on the validation loss of the group-aware split (the split of
``labels.split_rows``, near-duplicate groups from the pretrained features), random resized
crops and horizontal flips. BatchNorm statistics stay frozen (eval mode): with the few hundred
images this is meant for, re-estimating them hurts more than it helps, and the fine-tuned
features then come from the exact forward ``extract`` runs. It also makes the frozen trunk (all
before the first unfrozen unit) a fixed function, so phase 2 runs it once over ``views``
augmented views per image and trains on the stored activations (``finetune_views``: the same
gradients, several times faster on a CPU).

Files in ``out`` (safetensors + JSON, no pickle): ``model.safetensors`` (timm keys of the
architecture, the new head as its classifier), ``finetune.json`` (arch, classes,
preprocessing, the starting weights and their sha256, split, settings, history, test
accuracy): together a model, ``--model out`` everywhere (``models.finetuned``), and after
every epoch ``checkpoint.safetensors`` +
``checkpoint.json`` (weights, optimiser moments, best weights, epoch, history) for
``resume=True``.

Images are decoded once (``load_model_input``, as extraction does) and kept as uint8 crops
in memory: ~150 KB each at 224 px, so this is for thousands of images, not millions.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._fs import atomic_write_bytes
from ..errors import InvalidArgumentError, ProbeError
from .finetune_checkpoint import FORMAT, TrainedState, read_checkpoint, restore, write_checkpoint

if TYPE_CHECKING:
    from torch import nn

    from ..models.backbone import Backbone
    from .probe import Probe

# (phase, row): phase is "head" (frozen features, L-BFGS) or "finetune"; row has HISTORY_COLUMNS.
FinetuneCallback = Callable[[str, dict[str, float]], None]
# Phase 2's augmentation (finetune_views): activations of DEFAULT_VIEWS views per training image
# are cached (efficientnet_lite0, unfreeze=3: 37.6 KB per view, 150 MB for 1000 images x 4);
# random resized crops keep at least DEFAULT_MIN_SCALE of the crop's area, mild so that a small
# local detail (a defect, the textile benchmark's "local" class) is rarely cropped away. Not
# tuned: the validation sweep did not fit in the time a 2-core shared machine gave it.
DEFAULT_VIEWS = 4
DEFAULT_MIN_SCALE = 0.8
# A feature whose std on the training rows is below this x the median std is dead (phase1_head).
DEAD_FEATURE_RATIO = 1e-3


@dataclass
class FinetuneResult:
    """What ``finetune`` produced.

    Attributes:
        out: the output folder: a model (``--model out``, ``extract(..., model=out)``).
        weights: ``out/model.safetensors``. arch: its timm architecture.
        classes: the head's class names, in output order.
        head_history: phase 1 epochs; history: phase 2 epochs (``HISTORY_COLUMNS``).
        best_epoch: the phase 2 epoch whose weights were kept (0: phase 1's head alone).
        test_acc: accuracy on the test split, before (head only) and after fine-tuning.
    """

    out: Path
    weights: Path
    arch: str
    classes: list[str]
    head_history: list[dict[str, float]] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    test_acc_head: float = float("nan")
    test_acc: float = float("nan")
    stopped_early: bool = False
    cache_seconds: float = 0.0
    cached_views: int = 0
    head_view_seconds: float = 0.0
    head_loss_plain: float = float("nan")
    head_loss_views: float = float("nan")
    head_max_weight: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "weights": str(self.weights),
            "arch": self.arch,
            "classes": self.classes,
            "best_epoch": self.best_epoch,
            "test_acc_head": self.test_acc_head,
            "test_acc": self.test_acc,
            "stopped_early": self.stopped_early,
            "epochs": len(self.history),
            "cache_seconds": self.cache_seconds,
            "cached_views": self.cached_views,
            "head_view_seconds": self.head_view_seconds,
            "head_loss_plain": self.head_loss_plain,
            "head_loss_views": self.head_loss_views,
            "head_max_weight": self.head_max_weight,
        }


def finetune(
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str,
    labels: str | os.PathLike[str] | None = None,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    unfreeze: int = 2,
    epochs: int = 10,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    warmup_epochs: int = 1,
    batch_size: int = 16,
    patience: int = 3,
    views: int = DEFAULT_VIEWS,
    min_scale: float = DEFAULT_MIN_SCALE,
    label_smoothing: float = 0.0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    group_threshold: float | None = None,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    on_epoch: FinetuneCallback | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on labelled photos (see the module docstring for the method).

    Args:
        images: a folder with one subfolder per class, or any folder with ``labels``.
        out: output folder (created); with ``resume``, the folder of the interrupted run.
        model, weights, random_init: the starting backbone, as for ``load_backbone``.
        labels: CSV ``path,label`` with paths relative to ``images``; default parent folders.
        unfreeze: backbone units trained in phase 2 (0: only the head).
        epochs: phase 2 epochs at most. lr: peak AdamW learning rate of the backbone (the head
            gets 10x). weight_decay: AdamW's. warmup_epochs: linear warm-up before cosine.
        batch_size: images per step. patience: epochs without a better validation loss
            before stopping.
        views: augmented views per training image whose frozen-trunk activations are computed
            once (``finetune_views``); 0: augment on the fly and run the whole backbone on
            every step (the same training, several times slower).
        min_scale: smallest area share of the random resized crop (1: horizontal flips only).
        label_smoothing: of phase 2's cross-entropy (PyTorch's ``label_smoothing``).
        val_fraction, test_fraction, group_threshold, seed: the split, as for probes.
        resume: continue from ``out/checkpoint.*`` (same images and settings).
        on_epoch: called as ``on_epoch(phase, row)`` after every epoch.

    Raises:
        ProbeError: too few labelled images, or nothing to resume.
        InvalidArgumentError: bad settings.
    """
    import torch

    from ..models.backbone import load_backbone

    if epochs < 0 or unfreeze < 0 or batch_size < 1 or patience < 1 or lr <= 0 or views < 0:
        raise InvalidArgumentError(
            "need epochs >= 0, unfreeze >= 0, batch_size >= 1, patience >= 1, views >= 0, lr > 0"
        )
    if not 0 < min_scale <= 1 or not 0 <= label_smoothing < 1:
        raise InvalidArgumentError("need 0 < min_scale <= 1 and 0 <= label_smoothing < 1")
    out = Path(out)
    settings = {
        "model": model, "unfreeze": unfreeze, "epochs": epochs, "lr": lr,
        "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "batch_size": batch_size,
        "patience": patience, "views": views, "min_scale": min_scale,
        "label_smoothing": label_smoothing, "val_fraction": val_fraction,
        "test_fraction": test_fraction, "group_threshold": group_threshold, "seed": seed,
        "weights": None if weights is None else os.path.abspath(os.fspath(weights)),
        "random_init": random_init,
    }  # fmt: skip
    ckpt = read_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise ProbeError(f"nothing to resume in {out}: no checkpoint.json/.safetensors there")
    if ckpt is not None and ckpt["settings"] != settings:
        diff = sorted(k for k in settings if ckpt["settings"].get(k) != settings[k])
        raise InvalidArgumentError(
            f"--resume with other settings than the checkpoint's ({', '.join(diff)}); pass the "
            "same ones, or start afresh in another --out"
        )
    backbone = load_backbone(model, weights=weights, random_init=random_init, device=device)
    paths, y_names, pixels, hashes = _load_images(images, labels, backbone)
    classes, y = np.unique(y_names, return_inverse=True)
    if len(classes) < 2:
        raise ProbeError(f"only one class ({classes[0]!r}) is labelled; label at least two")
    dev = backbone.device
    torch.manual_seed(seed)

    from .finetune_views import features

    frozen = features(backbone, pixels, batch_size)
    from .labels import near_duplicate_groups, split_rows

    groups = near_duplicate_groups(frozen, hashes, group_threshold)
    split = split_rows(y_names, groups, val_fraction=val_fraction, test_fraction=test_fraction,
                       seed=seed)  # fmt: skip
    head = torch.nn.Linear(backbone.dim, len(classes)).to(dev)
    result = FinetuneResult(out, out / "model.safetensors", backbone.arch or backbone.name,
                            [str(c) for c in classes])  # fmt: skip

    # Phase 2's inputs first: phase 1 fits the head on the same augmented views.
    net = backbone.model
    for p in net.parameters():
        p.requires_grad_(False)
    units = trainable_units(net)[-unfreeze:] if unfreeze else []
    from .finetune_views import Phase2Inputs, evaluate

    inputs = Phase2Inputs(backbone, pixels, y, split, units, views=views, min_scale=min_scale,
                           seed=seed, batch_size=batch_size)  # fmt: skip
    result.cache_seconds = inputs.seconds
    result.cached_views = 0 if inputs.train_cache is None else len(inputs.train_cache)

    # Phase 1: the head on frozen features (skipped on resume: the checkpoint holds it).
    if ckpt is None:
        t0 = time.perf_counter()
        view_feats = inputs.train_view_features(views or DEFAULT_VIEWS, seed)
        result.head_view_seconds = time.perf_counter() - t0
        probe, w, b = phase1_head(
            frozen, y_names, groups=groups, seed=seed, val_fraction=val_fraction,
            test_fraction=test_fraction, train_views=view_feats,
            on_epoch=None if on_epoch is None else (lambda wd, row: on_epoch("head", row)),
        )  # fmt: skip
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(w))
            head.bias.copy_(torch.from_numpy(b.astype(np.float32)))
        result.head_history = list(probe.history)
        result.head_loss_plain = _folded_loss(w, b, frozen[split.train], y[split.train])
        result.head_loss_views = _folded_loss(w, b, view_feats.reshape(-1, w.shape[1]),
                                              np.tile(y[split.train], len(view_feats)))  # fmt: skip
        result.head_max_weight = float(np.abs(w).max())
        assert probe.test is not None
        result.test_acc_head = float(probe.test.accuracy)
    else:
        result.head_history = ckpt["head_history"]
        result.test_acc_head = ckpt["test_acc_head"]

    # Phase 2: unfreeze the last units and train them with the head.
    params = [p for u in units for p in u.parameters()]
    for p in params:
        p.requires_grad_(True)
    groups_opt = [{"params": list(head.parameters()), "lr": lr * 10}]
    if params:
        groups_opt.append({"params": params, "lr": lr})
    opt = torch.optim.AdamW(groups_opt, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(split.train) / batch_size))
    total, warm = max(1, epochs * steps_per_epoch), warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    trained = TrainedState(net, head)
    start_epoch, best_loss, best_epoch, bad = 1, float("inf"), 0, 0
    history: list[dict[str, float]] = []
    best = trained.state()
    if ckpt is not None:
        start_epoch, best_loss, best_epoch, bad, history, best = restore(
            ckpt, trained, opt, sched, out
        )
    else:
        best_loss = inputs.evaluate_val(head)[0]
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    for epoch in range(start_epoch, epochs + 1):
        if bad >= patience:
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])  # per epoch: a resumed run redoes the same
        order = rng.permutation(len(split.train))  # positions in split.train
        n_seen, loss_sum, correct = 0, 0.0, 0
        for i in range(0, len(order), batch_size):
            pos = order[i : i + batch_size]
            logits = head(inputs.train_features(pos, rng))
            target = torch.from_numpy(y[split.train[pos]]).to(dev)
            loss = loss_fn(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n_seen += len(pos)
            loss_sum += float(loss.detach()) * len(pos)
            correct += int((logits.argmax(1) == target).sum())
        train_s = time.perf_counter() - t0
        val_loss, val_acc = inputs.evaluate_val(head)
        row = {"epoch": epoch, "train_loss": loss_sum / max(n_seen, 1),
               "train_acc": correct / max(n_seen, 1), "val_loss": val_loss, "val_acc": val_acc,
               "seconds": time.perf_counter() - t0, "train_seconds": train_s}  # fmt: skip
        history.append(row)
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, bad, best = val_loss, epoch, 0, trained.state()
        else:
            bad += 1
        write_checkpoint(out, trained, opt, sched, best, {
            "format": FORMAT, "settings": settings, "epoch": epoch, "best_loss": best_loss,
            "best_epoch": best_epoch, "bad_epochs": bad, "history": history,
            "head_history": result.head_history, "test_acc_head": result.test_acc_head,
        })  # fmt: skip
        if on_epoch is not None:
            on_epoch("finetune", row)
    result.stopped_early = bad >= patience and len(history) > 0 and history[-1]["epoch"] < epochs
    trained.load(best)
    result.history, result.best_epoch = history, best_epoch
    # the test split through the whole backbone, as extract runs it
    result.test_acc = evaluate(backbone, head, pixels, y, split.test, batch_size)[1]
    _save_model(result, trained, head, backbone, settings, split, paths)
    return result


# --- pieces -------------------------------------------------------------------------------------


def phase1_head(
    frozen: np.ndarray,
    y_names: np.ndarray,
    *,
    groups: np.ndarray,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    train_views: np.ndarray | None = None,
    on_epoch: Callable[[float, dict[str, float]], None] | None = None,
) -> tuple[Probe, np.ndarray, np.ndarray]:
    """The probe on frozen features, folded into one dense layer: (probe, weight (C, D), bias).

    The weight decay is the one of lowest validation *loss* (``train_probe`` alone picks the
    best validation accuracy): phase 2 starts from this head and trains it by cross-entropy,
    and the most accurate head is often over-confident (benchmarks/finetune.py, textiles:
    validation loss 1.60 at the chosen wd 1e-4 against 0.65 at wd 0.1, one point less accurate;
    phase 2's warm-up epoch then had a train loss of 2.8).

    ``train_views`` (V, n_train, D): pooled features of the augmented views of the training
    rows (``Phase2Inputs.train_view_features``), fitted as extra training rows. Fitted on plain
    crops alone, the folded head was calibrated on nothing phase 2 trains on (digits: train loss
    0.024 on plain crops, 5.67 on phase 2's random resized crops, weights up to 28,683); with
    the views 0.056 / 0.048 and weights up to 1,163 (benchmarks/RESULTS.md, finetune).

    Dead features (std below ``DEAD_FEATURE_RATIO`` x the median std on the training rows:
    channels the pretrained ReLUs keep at ~0 for these photos; ~1/3 of efficientnet_lite0's on
    the textile benchmark, std ~1e-6) are set to their mean first, so they get no weight. The
    probe standardises features, and would otherwise fit their float noise and fold into
    weights of ``W / scale`` ~ 1e4-5e4: the first phase 2 steps wake those channels up and the
    logits explode (validation loss 9.4 after one warm-up epoch, benchmarks/finetune.py).
    """
    from ..defaults import DEFAULT_WEIGHT_DECAYS
    from .labels import split_rows
    from .train import train_probe

    train = split_rows(y_names, groups, val_fraction=val_fraction,
                       test_fraction=test_fraction, seed=seed).train  # fmt: skip
    if train_views is not None and len(train_views):
        # The views are extra rows of their image's group, after all others: split_rows deals
        # groups by their first row, so the split is unchanged and the views land in train.
        n_views = len(train_views)
        frozen = np.concatenate([frozen, train_views.reshape(-1, frozen.shape[1])])
        y_names = np.concatenate([y_names, np.tile(y_names[train], n_views)])
        groups = np.concatenate([np.asarray(groups), np.tile(np.asarray(groups)[train], n_views)])
        train = split_rows(y_names, groups, val_fraction=val_fraction,
                           test_fraction=test_fraction, seed=seed).train  # fmt: skip
    std = frozen[train].std(axis=0, dtype=np.float64)
    dead = std < DEAD_FEATURE_RATIO * np.median(std)
    clean = frozen.copy()
    clean[:, dead] = frozen[train][:, dead].mean(axis=0)  # constant: scale 1, weight 0
    # One probe per weight decay: the same fits as train_probe's own grid search.
    runs = []
    for wd in DEFAULT_WEIGHT_DECAYS:
        runs.append(train_probe(
            clean, y_names, groups=groups, seed=seed, val_fraction=val_fraction,
            test_fraction=test_fraction, device="cpu", knn_k=None, weight_decays=[wd],
            on_epoch=on_epoch,
        ))  # fmt: skip
    grid = [row for r in runs for row in r.grid]
    if all(math.isfinite(row["val_loss"]) for row in grid):
        best = min(range(len(runs)), key=lambda i: (grid[i]["val_loss"], -grid[i]["val_acc"]))
        probe = runs[best]
        probe.settings["weight_decay_choice"] = "lowest validation loss (finetune phase 1)"
    else:  # no validation rows: the middle of the grid, as train_probe
        probe = runs[len(runs) // 2]
        probe.settings["weight_decay_choice"] = "middle of the grid (no validation rows)"
    probe.grid, probe.settings["weight_decays"] = grid, list(DEFAULT_WEIGHT_DECAYS)
    w = probe.weight / probe.scale[None, :]
    b = probe.bias - w @ probe.mean
    return probe, w, b


def _folded_loss(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the dense head ``x @ w.T + b`` (float64); NaN without rows."""
    if len(x) == 0:
        return float("nan")
    z = x.astype(np.float64) @ w.T.astype(np.float64) + b
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def trainable_units(net: nn.Module) -> list[nn.Module]:
    """The backbone's layers in forward order, as units to unfreeze from the end.

    Top-level children, with a ``Sequential`` of stages (timm's ``blocks``, ``layers``,
    ``features``) opened into its stages, and parameterless modules (pooling, activations)
    left out. EfficientNet: ``conv_stem, bn1, blocks.0 .. blocks.6, conv_head, bn2``, so
    ``unfreeze=3`` trains the last stage and the head convolution with its BatchNorm affine.
    """
    from torch import nn

    units: list[nn.Module] = []
    for child in net.children():
        members = list(child.children()) if isinstance(child, nn.Sequential) else [child]
        units.extend(m for m in members if any(True for _ in m.parameters()))
    return units


def _load_images(
    images: str | os.PathLike[str], labels: str | os.PathLike[str] | None, backbone: Backbone
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(relative paths, label names, uint8 crops (N, H, W, 3), content hashes), sorted."""
    from ..images.decode import ImageDecodeError
    from ..images.model_input import load_model_input
    from ..images.sources import find_images

    found, _ = find_images([images])
    by_path: dict[str, str] = {}
    if labels is not None:
        import csv

        with open(labels, newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                if rec.get("path") and rec.get("label"):
                    by_path[rec["path"]] = rec["label"]
    rows = []
    for ff in sorted(found, key=lambda f: f.path):
        label = by_path.get(ff.path) if labels is not None else Path(ff.path).parent.name
        if not label:
            continue  # unlabelled: not part of the training data
        try:
            mi = load_model_input(ff.abspath, backbone.preprocess)
        except ImageDecodeError:
            continue  # the same files extraction would record as failed
        rows.append((ff.path, label, mi.pixels, mi.content_hash))
    if len(rows) < 4:
        raise ProbeError(
            f"{len(rows)} labelled, decodable images under {images}; put each class's photos "
            "in a subfolder named after it (or pass a labels CSV)"
        )
    return (
        [r[0] for r in rows],
        np.asarray([r[1] for r in rows]).astype(str),
        np.stack([r[2] for r in rows]),
        np.asarray([r[3] for r in rows]).astype(str),
    )


def _save_model(
    result: FinetuneResult,
    trained: TrainedState,
    head: nn.Linear,
    backbone: Backbone,
    settings: dict[str, Any],
    split: Any,
    paths: Sequence[str],
) -> None:
    from safetensors.torch import save

    from ..models.backbone import _classifier_name

    net_sd = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    # The classifier slot of the timm architecture holds the new head (C classes); with
    # finetune.json beside it, load_backbone builds the C-class model (models.finetuned).
    clf = _classifier_name(backbone.model)  # the Identity left by reset_classifier(0)
    net_sd[f"{clf}.weight"] = head.weight.detach().cpu().contiguous()
    net_sd[f"{clf}.bias"] = head.bias.detach().cpu().contiguous()
    result.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(result.weights, save(net_sd))
    info = {
        "format": FORMAT, "arch": result.arch, "classes": result.classes,
        "preprocess": backbone.preprocess.to_dict(), "settings": settings,
        "start_weights": backbone.weights_source,
        "start_weights_sha256": backbone.weights_sha256, "best_epoch": result.best_epoch,
        "test_acc_head": result.test_acc_head, "test_acc": result.test_acc,
        "stopped_early": result.stopped_early, "cache_seconds": result.cache_seconds,
        "cached_views": result.cached_views,
        "head_view_seconds": result.head_view_seconds,
        "head_loss_plain": result.head_loss_plain,
        "head_loss_views": result.head_loss_views,
        "head_max_weight": result.head_max_weight,
        "head_history": result.head_history,
        "history": result.history,
        "split": {s: [paths[i] for i in getattr(split, s)] for s in ("train", "val", "test")},
        "use": f"embedkit extract PHOTOS --store S --model {result.out}; embedkit classify "
               f"photo.jpg --model {result.out}",
    }  # fmt: skip
    atomic_write_bytes(result.out / "finetune.json", json.dumps(info, indent=1).encode())
