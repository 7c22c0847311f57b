"""Fine-tune a backbone on your labelled photos, in two phases, and save weights ``extract``
can load.

Phase 1 trains a linear head on frozen features: ``train.train_probe`` (L-BFGS, weight decay
chosen on validation) on the backbone's pooled features (dead features left out, see
``phase1_head``), folded into one dense layer (``W / scale``, ``b - W @ (mean / scale)``). Phase
2 unfreezes the last ``unfreeze`` units of the backbone (see ``trainable_units``) and trains
them with the head: AdamW, linear warm-up then cosine decay, early stopping on the validation
loss of the group-aware split (the split of ``labels.split_rows``, near-duplicate groups from
the pretrained features), random horizontal flips. BatchNorm statistics stay frozen (eval mode):
with the few hundred images this is meant for, re-estimating them hurts more than it helps, and
the fine-tuned features then come from the exact forward ``extract`` runs.

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
from ..models.finetuned import FORMAT

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..models.backbone import Backbone
    from .probe import Probe

# (phase, row): phase is "head" (frozen features, L-BFGS) or "finetune"; row has HISTORY_COLUMNS.
FinetuneCallback = Callable[[str, dict[str, float]], None]
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
        val_fraction, test_fraction, group_threshold, seed: the split, as for probes.
        resume: continue from ``out/checkpoint.*`` (same images and settings).
        on_epoch: called as ``on_epoch(phase, row)`` after every epoch.

    Raises:
        ProbeError: too few labelled images, or nothing to resume.
        InvalidArgumentError: bad settings.
    """
    import torch

    from ..models.backbone import load_backbone

    if epochs < 0 or unfreeze < 0 or batch_size < 1 or patience < 1 or lr <= 0:
        raise InvalidArgumentError(
            "need epochs >= 0, unfreeze >= 0, batch_size >= 1, patience >= 1 and lr > 0"
        )
    out = Path(out)
    settings = {
        "model": model, "unfreeze": unfreeze, "epochs": epochs, "lr": lr,
        "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "batch_size": batch_size,
        "patience": patience, "val_fraction": val_fraction, "test_fraction": test_fraction,
        "group_threshold": group_threshold, "seed": seed,
        "weights": None if weights is None else os.path.abspath(os.fspath(weights)),
        "random_init": random_init,
    }  # fmt: skip
    ckpt = _read_checkpoint(out) if resume else None
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

    frozen = _features(backbone, pixels, batch_size)
    from .labels import near_duplicate_groups, split_rows

    groups = near_duplicate_groups(frozen, hashes, group_threshold)
    split = split_rows(y_names, groups, val_fraction=val_fraction, test_fraction=test_fraction,
                       seed=seed)  # fmt: skip
    head = torch.nn.Linear(backbone.dim, len(classes)).to(dev)
    result = FinetuneResult(out, out / "model.safetensors", backbone.arch or backbone.name,
                            [str(c) for c in classes])  # fmt: skip

    # Phase 1: the head on frozen features (skipped on resume: the checkpoint holds it).
    if ckpt is None:
        probe, w, b = phase1_head(
            frozen, y_names, groups=groups, seed=seed, val_fraction=val_fraction,
            test_fraction=test_fraction,
            on_epoch=None if on_epoch is None else (lambda wd, row: on_epoch("head", row)),
        )  # fmt: skip
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(w))
            head.bias.copy_(torch.from_numpy(b.astype(np.float32)))
        result.head_history = list(probe.history)
        assert probe.test is not None
        result.test_acc_head = float(probe.test.accuracy)
    else:
        result.head_history = ckpt["head_history"]
        result.test_acc_head = ckpt["test_acc_head"]

    # Phase 2: unfreeze the last units and train them with the head.
    net = backbone.model
    for p in net.parameters():
        p.requires_grad_(False)
    units = trainable_units(net)[-unfreeze:] if unfreeze else []
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
    trained = _TrainedState(net, head)
    start_epoch, best_loss, best_epoch, bad = 1, float("inf"), 0, 0
    history: list[dict[str, float]] = []
    best = trained.state()
    if ckpt is not None:
        start_epoch, best_loss, best_epoch, bad, history, best = _restore(
            ckpt, trained, opt, sched, out
        )
    else:
        best_loss = _evaluate(backbone, head, pixels, y, split.val, batch_size)[0]
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(start_epoch, epochs + 1):
        if bad >= patience:
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])  # per epoch: a resumed run redoes the same
        order = rng.permutation(split.train)
        n_seen, loss_sum, correct = 0, 0.0, 0
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            batch = pixels[rows].copy()
            flip = rng.random(len(rows)) < 0.5
            batch[flip] = batch[flip, :, ::-1]
            x = backbone.preprocess.normalize(torch.from_numpy(batch).to(dev))
            target = torch.from_numpy(y[rows]).to(dev)
            logits = head(net(x.contiguous(memory_format=torch.channels_last)))
            loss = loss_fn(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n_seen += len(rows)
            loss_sum += float(loss.detach()) * len(rows)
            correct += int((logits.argmax(1) == target).sum())
        val_loss, val_acc = _evaluate(backbone, head, pixels, y, split.val, batch_size)
        row = {"epoch": epoch, "train_loss": loss_sum / max(n_seen, 1),
               "train_acc": correct / max(n_seen, 1), "val_loss": val_loss, "val_acc": val_acc,
               "seconds": time.perf_counter() - t0}  # fmt: skip
        history.append(row)
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, bad, best = val_loss, epoch, 0, trained.state()
        else:
            bad += 1
        _write_checkpoint(out, trained, opt, sched, best, {
            "format": FORMAT, "settings": settings, "epoch": epoch, "best_loss": best_loss,
            "best_epoch": best_epoch, "bad_epochs": bad, "history": history,
            "head_history": result.head_history, "test_acc_head": result.test_acc_head,
        })  # fmt: skip
        if on_epoch is not None:
            on_epoch("finetune", row)
    result.stopped_early = bad >= patience and len(history) > 0 and history[-1]["epoch"] < epochs
    trained.load(best)
    result.history, result.best_epoch = history, best_epoch
    result.test_acc = _evaluate(backbone, head, pixels, y, split.test, batch_size)[1]
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
    on_epoch: Callable[[float, dict[str, float]], None] | None = None,
) -> tuple[Probe, np.ndarray, np.ndarray]:
    """The probe on frozen features, folded into one dense layer: (probe, weight (C, D), bias).

    Dead features (std below ``DEAD_FEATURE_RATIO`` x the median std on the training rows:
    channels the pretrained ReLUs keep at ~0 for these photos; ~1/3 of efficientnet_lite0's on
    the textile benchmark, std ~1e-6) are set to their mean first, so they get no weight. The
    probe standardises features, and would otherwise fit their float noise and fold into
    weights of ``W / scale`` ~ 1e4-5e4: the first phase 2 steps wake those channels up and the
    logits explode (validation loss 9.4 after one warm-up epoch, benchmarks/finetune.py).
    """
    from .labels import split_rows
    from .train import train_probe

    train = split_rows(y_names, groups, val_fraction=val_fraction,
                       test_fraction=test_fraction, seed=seed).train  # fmt: skip
    std = frozen[train].std(axis=0, dtype=np.float64)
    dead = std < DEAD_FEATURE_RATIO * np.median(std)
    features = frozen.copy()
    features[:, dead] = frozen[train][:, dead].mean(axis=0)  # constant: scale 1, weight 0
    probe = train_probe(
        features, y_names, groups=groups, seed=seed, val_fraction=val_fraction,
        test_fraction=test_fraction, device="cpu", knn_k=None, on_epoch=on_epoch,
    )  # fmt: skip
    w = probe.weight / probe.scale[None, :]
    b = probe.bias - w @ probe.mean
    return probe, w, b


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


def _features(backbone: Backbone, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    from ..extraction.embed import forward_batches

    return forward_batches(backbone, iter(pixels), batch_size)


def _evaluate(
    backbone: Backbone,
    head: nn.Module,
    pixels: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on ``rows``; NaN when there are none."""
    import torch

    if len(rows) == 0:
        return float("nan"), float("nan")
    feats = torch.from_numpy(_features(backbone, pixels[rows], batch_size))
    with torch.no_grad():
        logits = head(feats.to(backbone.device))
        target = torch.from_numpy(y[rows]).to(backbone.device)
        loss = float(torch.nn.functional.cross_entropy(logits, target))
        acc = float((logits.argmax(1) == target).float().mean())
    return loss, acc


class _TrainedState:
    """The tensors phase 2 changes: the backbone's (all, for simplicity) and the head's."""

    def __init__(self, net: nn.Module, head: nn.Module) -> None:
        self.net, self.head = net, head

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"net.{k}": v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        head = self.head.state_dict()
        out.update({f"head.{k}": v.detach().cpu().clone() for k, v in head.items()})
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                out[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
    return out


def _write_checkpoint(
    out: Path,
    trained: _TrainedState,
    opt: torch.optim.Optimizer,
    sched: Any,
    best: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    from safetensors.torch import save

    tensors = {**trained.state(), **_opt_tensors(opt)}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    out.mkdir(parents=True, exist_ok=True)
    # Tensors first, then the JSON that points at them: a crash between the two leaves the
    # previous JSON, which a resume detects by the epoch recorded in the tensors' metadata.
    atomic_write_bytes(out / "checkpoint.safetensors",
                       save({k: v.contiguous() for k, v in tensors.items()},
                            metadata={"epoch": str(meta["epoch"])}))  # fmt: skip
    meta = {**meta, "scheduler": sched.state_dict(), "opt_param_groups": [
        {k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]
    ]}  # fmt: skip
    atomic_write_bytes(out / "checkpoint.json", json.dumps(meta, indent=1).encode())


def _read_checkpoint(out: Path) -> dict[str, Any] | None:
    if not (out / "checkpoint.json").is_file() or not (out / "checkpoint.safetensors").is_file():
        return None
    meta: dict[str, Any] = json.loads((out / "checkpoint.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        return None
    return meta


def _restore(
    ckpt: dict[str, Any], trained: _TrainedState, opt: torch.optim.Optimizer, sched: Any, out: Path
) -> tuple[int, float, int, int, list[dict[str, float]], dict[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        if (f.metadata() or {}).get("epoch") != str(ckpt["epoch"]):
            raise ProbeError(f"checkpoint in {out} is torn (tensors and JSON of other epochs)")
    tensors = load_file(str(out / "checkpoint.safetensors"))
    trained.load({k: v for k, v in tensors.items() if k.startswith(("net.", "head."))})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    for g, saved in zip(sd["param_groups"], ckpt["opt_param_groups"], strict=True):
        g.update({k: v for k, v in saved.items() if k != "params"})
    opt.load_state_dict(sd)
    sched.load_state_dict(ckpt["scheduler"])
    return (int(ckpt["epoch"]) + 1, float(ckpt["best_loss"]), int(ckpt["best_epoch"]),
            int(ckpt["bad_epochs"]), list(ckpt["history"]), best)  # fmt: skip


def _save_model(
    result: FinetuneResult,
    trained: _TrainedState,
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
        "stopped_early": result.stopped_early, "head_history": result.head_history,
        "history": result.history,
        "split": {s: [paths[i] for i in getattr(split, s)] for s in ("train", "val", "test")},
        "use": f"embedkit extract PHOTOS --store S --model {result.out}; embedkit classify "
               f"photo.jpg --model {result.out}",
    }  # fmt: skip
    atomic_write_bytes(result.out / "finetune.json", json.dumps(info, indent=1).encode())
