"""Training linear probes on stored features, with an epoch trace.

A probe is multinomial logistic regression on standardised features, trained full-batch with
L-BFGS in torch (the classic linear-probe recipe of CLIP / DINO evaluations). One *epoch* is one
L-BFGS iteration: one pass over the whole training split plus its line search. The weight decay
is chosen on the validation split from a small grid; the final test metrics are computed once,
on a test split that no duplicate (same content hash) of a training image reaches
(``labels.split_rows``). The result is a ``probe.Probe``; the metrics themselves are
``metrics.Evaluation``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..defaults import DEFAULT_MAX_EPOCHS, DEFAULT_WEIGHT_DECAYS
from ..errors import InvalidArgumentError, ProbeError
from .labels import MissingLabels, labelled_features, split_rows
from .metrics import Evaluation
from .probe import Probe

if TYPE_CHECKING:
    from ..store.read import Store

# Objective: mean cross-entropy + wd/2 * ||W||^2 on standardised features (wd grid in
# defaults.py). Converged when the largest gradient entry is below GRAD_TOLERANCE
# (scikit-learn's default tol for lbfgs, on the same mean objective), or when an epoch no
# longer moves the objective (TOLERANCE, relative: below float32 resolution) twice in a row,
# with an L-BFGS restart in between (see _fit_softmax).
GRAD_TOLERANCE = 1e-4
TOLERANCE = 1e-8
EpochCallback = Callable[[float, dict[str, float]], None]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidArgumentError(f"device must be one of: auto, cpu, cuda (got {device!r})")
    return torch.device(device)


def _fit_softmax(
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    n_classes: int,
    weight_decay: float,
    max_epochs: int,
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """Full-batch L-BFGS on mean cross-entropy + wd/2 ||W||^2 (bias not decayed)."""
    w = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    # max_iter=1: one step() per epoch, so the trace has a row per L-BFGS iteration. Each
    # step() starts by re-evaluating the point its previous line search accepted; the cache
    # answers that call without another pass over the data, and gives the trace its train
    # loss/accuracy for free.
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=1,
        history_size=10,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )
    ce = torch.nn.functional.cross_entropy
    cache: dict[str, torch.Tensor] = {}

    def at_cached_point() -> bool:
        return bool(cache) and torch.equal(cache["w"], w) and torch.equal(cache["b"], b)

    def closure() -> torch.Tensor:
        if at_cached_point():
            w.grad, b.grad = cache["gw"].clone(), cache["gb"].clone()
            return cache["loss"]
        opt.zero_grad()
        logits = x @ w + b
        data_loss = ce(logits, y)
        loss = data_loss + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        assert w.grad is not None and b.grad is not None
        cache.update(
            w=w.detach().clone(),
            b=b.detach().clone(),
            loss=loss.detach(),
            gw=w.grad.clone(),
            gb=b.grad.clone(),
            ce=data_loss.detach(),
            acc=(logits.detach().argmax(1) == y).float().mean(),
        )
        return loss

    history: list[dict[str, float]] = []
    previous = float("inf")
    restarted = False
    for epoch in range(1, max_epochs + 1):
        opt.step(closure)
        if not at_cached_point():  # the line search returned an earlier trial point
            closure()
        with torch.no_grad():
            row = {
                "epoch": epoch,
                "train_loss": float(cache["ce"]),
                "train_acc": float(cache["acc"]),
            }
            if len(yv):
                lv = xv @ w + b
                row["val_loss"] = float(ce(lv, yv))
                row["val_acc"] = float((lv.argmax(1) == yv).float().mean())
            else:
                row["val_loss"] = row["val_acc"] = float("nan")
            objective = float(cache["loss"])
            grad_max = float(torch.maximum(cache["gw"].abs().max(), cache["gb"].abs().max()))
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if grad_max <= GRAD_TOLERANCE:
            break
        if abs(previous - objective) <= TOLERANCE * max(1.0, abs(objective)):
            # No progress: L-BFGS's curvature history can stall it (it then declines to step)
            # far from the optimum, so restart it from here once before calling it converged.
            if restarted:
                break
            opt.state.clear()
            restarted = True
        else:
            restarted = False
        previous = objective
    return w.detach(), b.detach(), history


def train_probe(
    features: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    groups: Sequence[str] | np.ndarray | None = None,
    keys: np.ndarray | None = None,
    fingerprint: dict[str, Any] | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_epochs: int = DEFAULT_MAX_EPOCHS,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    device: str = "auto",
    knn_k: int | None = 20,
    on_epoch: EpochCallback | None = None,
) -> Probe:
    """Train a softmax-regression probe; the weight decay is chosen on the validation split.

    Args:
        features: float (N, D) features (``LabelledFeatures.features``).
        labels: N class names.
        groups: N group keys (content hashes); a group never straddles splits.
        keys: N int64 ids saved with the split (store ids); default ``0..N-1``.
        fingerprint: the features' model fingerprint, checked again by ``predict``.
        weight_decays: the grid searched on the validation split.
        max_epochs: L-BFGS iterations per grid point at most; stops earlier on convergence.
        val_fraction: share of each class's distinct images used for validation.
        test_fraction: share used for the final test.
        seed: seeds the split.
        device: ``auto``, ``cpu`` or ``cuda``.
        knn_k: also report a weighted k-NN classifier (DINO protocol) on the same split;
            None to skip.
        on_epoch: called as ``on_epoch(weight_decay, row)`` after every epoch.

    Returns:
        The trained ``Probe``, with ``history`` (the chosen run's epochs) and ``test`` metrics.
    """
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    if features.ndim != 2 or len(features) != len(labels):
        raise InvalidArgumentError(
            f"need one label per feature row: {len(labels)} labels, features {features.shape}"
        )
    if not weight_decays or min(weight_decays) < 0:
        raise InvalidArgumentError(f"weight_decays must be non-negative, got {weight_decays}")
    if max_epochs < 1:
        raise InvalidArgumentError(f"max_epochs must be at least 1, got {max_epochs}")
    classes, y_all = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ProbeError(f"only one class ({str(classes[0])!r}) is labelled; label at least two")
    split = split_rows(
        labels, groups, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    keys = np.arange(len(labels), dtype=np.int64) if keys is None else np.asarray(keys, np.int64)
    dev = _resolve_device(device)
    started = time.perf_counter()

    xtr = features[split.train]
    mean = xtr.mean(axis=0, dtype=np.float64).astype(np.float32)
    scale = xtr.std(axis=0, dtype=np.float64).astype(np.float32)
    scale[scale < 1e-12] = 1.0  # a constant feature stays 0 after centring

    def tensor(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy((features[rows] - mean) / scale).to(dev)
        return x, torch.from_numpy(y_all[rows]).to(dev)

    x, y = tensor(split.train)
    xv, yv = tensor(split.val)
    runs = []
    for wd in weight_decays:
        callback = None if on_epoch is None else (lambda row, wd=wd: on_epoch(wd, row))
        w, b, hist = _fit_softmax(x, y, xv, yv, len(classes), wd, max_epochs, callback)
        runs.append((wd, w, b, hist))
    grid = [
        {
            "weight_decay": wd,
            "epochs": len(h),
            "val_acc": h[-1]["val_acc"],
            "val_loss": h[-1]["val_loss"],
        }
        for wd, _, _, h in runs
    ]
    if len(split.val):
        # best validation accuracy; ties go to the lower validation loss
        best = min(range(len(runs)), key=lambda i: (-grid[i]["val_acc"], grid[i]["val_loss"]))
        choice = "best validation accuracy"
    else:
        best = len(runs) // 2
        choice = "middle of the grid (the validation split is empty)"
    wd, w, b, history = runs[best]
    fit_seconds = time.perf_counter() - started

    probe = Probe(
        classes=[str(c) for c in classes],
        weight=np.ascontiguousarray(w.T.cpu().numpy()),
        bias=b.cpu().numpy(),
        mean=mean,
        scale=scale,
        fingerprint=fingerprint,
        settings={
            "weight_decay": wd,
            "weight_decay_choice": choice,
            "weight_decays": list(weight_decays),
            "max_epochs": max_epochs,
            "optimizer": "L-BFGS (full batch, strong Wolfe line search)",
            "loss": "mean cross-entropy + weight_decay/2 * ||W||^2 on standardised features",
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "seed": seed,
            "n_train": len(split.train),
            "n_val": len(split.val),
            "n_test": len(split.test),
            "device": str(dev),
            "fit_seconds": fit_seconds,
        },
        history=history,
        grid=grid,
        split={name: keys[getattr(split, name)] for name in ("train", "val", "test")},
    )
    test_x, test_y = features[split.test], labels[split.test]
    probe.test = probe.evaluate(test_x, test_y, fingerprint=fingerprint)
    if knn_k:
        from .knn import DEFAULT_TEMPERATURE, knn_classify  # lazy: faiss loads only for knn_k

        knn = knn_classify(xtr, labels[split.train], test_x, k=knn_k)
        probe.knn = Evaluation.from_predictions(probe.classes, test_y, knn.labels)
        probe.settings["knn"] = {"k": knn_k, "temperature": DEFAULT_TEMPERATURE}
    return probe


def train_store_probe(
    store: Store | str | Path,
    labels: str | Path | None = None,
    *,
    missing: MissingLabels = "error",
    group_threshold: float | None = None,
    **options: Any,
) -> Probe:
    """``labelled_features`` + ``train_probe``: a probe on a store's labelled images.

    Args:
        store: the store (or its path).
        labels: a ``path,label`` / ``id,label`` CSV, or None for parent folder names.
        missing: ``error`` or ``drop`` stored images without a label (see ``labelled_features``).
        group_threshold: cosine at which near duplicates stay on one side of the split (None:
            0.90, the duplicates default; 1.0: byte-identical copies only).
        **options: passed to ``train_probe`` (``weight_decays``, ``max_epochs``, ``seed``,
            ``device``, ``knn_k``, ``on_epoch``, split fractions).
    """
    data = labelled_features(store, labels, missing=missing, group_threshold=group_threshold)
    probe = train_probe(
        data.features,
        data.labels,
        groups=data.groups,
        keys=data.keys,
        fingerprint=data.fingerprint,
        **options,
    )
    probe.settings.update(
        labels=str(labels) if labels is not None else "parent folder names",
        missing=missing,
        group_threshold=group_threshold,
        n_split_groups=len(set(data.groups.tolist())),
        n_unlabelled_dropped=data.n_dropped,
        store=str(getattr(store, "path", store)),
    )
    return probe
