"""Linear probes on stored features: training with an epoch trace, evaluation, save/load.

A probe is multinomial logistic regression on standardised features, trained full-batch with
L-BFGS in torch (the classic linear-probe recipe of CLIP / DINO evaluations). One *epoch* is one
L-BFGS iteration: one pass over the whole training split plus its line search. The weight decay
is chosen on the validation split from a small grid; the final test metrics are computed once,
on a test split that no duplicate (same content hash) of a training image reaches
(``labels.split_rows``); the metrics themselves are ``metrics.Evaluation``.

Saved probes are a directory: ``probe.safetensors`` (weight, bias, mean, scale),
``split.safetensors`` (the store ids of each split), ``probe.json`` (classes, standardisation,
settings, the store's model fingerprint) and the human-readable trace and metrics (CSV + PNG).
No pickle anywhere.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from .classify import Prediction, embed_image_files, rank_top_k, resolve_store, softmax
from .defaults import DEFAULT_MAX_EPOCHS, DEFAULT_WEIGHT_DECAYS, HISTORY_COLUMNS
from .errors import InvalidArgumentError, ProbeError
from .labels import MissingLabels, labelled_features, split_rows
from .metrics import Evaluation

if TYPE_CHECKING:
    from .store import Store

FORMAT = "embedkit.probe/1"
# Objective: mean cross-entropy + wd/2 * ||W||^2 on standardised features (wd grid in
# defaults.py). Converged when the largest gradient entry is below GRAD_TOLERANCE
# (scikit-learn's default tol for lbfgs, on the same mean objective), or when an epoch no
# longer moves the objective (TOLERANCE, relative: below float32 resolution) twice in a row,
# with an L-BFGS restart in between (see _fit_softmax).
GRAD_TOLERANCE = 1e-4
TOLERANCE = 1e-8
EpochCallback = Callable[[float, dict[str, float]], None]


# ---------------------------------------------------------------------------------------------
# training


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
        from .knn import DEFAULT_TEMPERATURE, knn_classify  # here: knn.py imports this module

        knn = knn_classify(xtr, labels[split.train], test_x, k=knn_k)
        probe.knn = Evaluation.from_predictions(probe.classes, test_y, knn.labels)
        probe.settings["knn"] = {"k": knn_k, "temperature": DEFAULT_TEMPERATURE}
    return probe


def train_store_probe(
    store: Store | str | Path,
    labels: str | Path | None = None,
    *,
    missing: MissingLabels = "error",
    **options: Any,
) -> Probe:
    """``labelled_features`` + ``train_probe``: a probe on a store's labelled images.

    Args:
        store: the store (or its path).
        labels: a ``path,label`` / ``id,label`` CSV, or None for parent folder names.
        missing: ``error`` or ``drop`` stored images without a label (see ``labelled_features``).
        **options: passed to ``train_probe`` (``weight_decays``, ``max_epochs``, ``seed``,
            ``device``, ``knn_k``, ``on_epoch``, split fractions).
    """
    data = labelled_features(store, labels, missing=missing)
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
        n_unlabelled_dropped=data.n_dropped,
        store=str(getattr(store, "path", store)),
    )
    return probe


# ---------------------------------------------------------------------------------------------
# the probe


def _canonical(fp: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if fp is None else json.loads(json.dumps(fp, sort_keys=True, default=str))


@dataclass
class Probe:
    """A trained linear probe: ``softmax(((x - mean) / scale) @ weight.T + bias)``.

    Attributes:
        classes: class names, the order of the outputs.
        weight: float32 (C, D). bias: float32 (C,).
        mean, scale: float32 (D,) standardisation, computed on the training split.
        fingerprint: the model fingerprint of the training features (None for bare arrays).
        settings: the training settings and chosen weight decay.
        history: one row per epoch of the chosen run: epoch, train_loss, train_acc,
            val_loss, val_acc.
        grid: one row per weight decay tried: weight_decay, epochs, val_acc, val_loss.
        split: int64 keys (store ids) of the train / val / test rows.
        test: metrics on the test split; knn: the k-NN classifier's on the same split.
    """

    classes: list[str]
    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    fingerprint: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    grid: list[dict[str, Any]] = field(default_factory=list)
    split: dict[str, np.ndarray] = field(default_factory=dict)
    test: Evaluation | None = None
    knn: Evaluation | None = None

    def check_features(self, features: np.ndarray, fingerprint: dict[str, Any] | None) -> None:
        """Raise ``ProbeError`` unless ``features`` come from the probe's model."""
        if self.fingerprint is not None:
            if fingerprint is None:
                raise ProbeError(
                    f"this probe was trained on {self.fingerprint.get('model')} features; pass "
                    "the features' fingerprint (store.fingerprint) so they can be checked"
                )
            mine, theirs = _canonical(self.fingerprint), _canonical(fingerprint)
            assert mine is not None and theirs is not None
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                k = diff[0]
                raise ProbeError(
                    f"features come from another model: the probe was trained with {k}="
                    f"{mine.get(k)!r}, these have {k}={theirs.get(k)!r}; use a store extracted "
                    "with the probe's model, or train a probe on this store"
                )
        if features.ndim != 2 or features.shape[1] != self.weight.shape[1]:
            raise ProbeError(
                f"features have shape {features.shape} but the probe expects dimension "
                f"{self.weight.shape[1]}; use features from the probe's model"
            )

    def predict_proba(
        self, features: np.ndarray, *, fingerprint: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Class probabilities, float32 (N, C) in ``classes`` order."""
        features = np.asarray(features, dtype=np.float32)
        self.check_features(features, fingerprint)
        z = (features - self.mean) / self.scale
        return softmax(z @ self.weight.T + self.bias).astype(np.float32)

    def predict(
        self, features: np.ndarray, *, fingerprint: dict[str, Any] | None = None
    ) -> np.ndarray:
        """The most probable class name per row, (N,)."""
        proba = self.predict_proba(features, fingerprint=fingerprint)
        return np.asarray(self.classes)[proba.argmax(axis=1)]

    def evaluate(
        self,
        features: np.ndarray,
        labels: Sequence[str] | np.ndarray,
        *,
        fingerprint: dict[str, Any] | None = None,
    ) -> Evaluation:
        """Accuracy, per-class precision/recall/F1 and confusion matrix on labelled features."""
        labels = np.asarray(labels).astype(str)
        unknown = sorted(set(labels) - set(self.classes))
        if unknown:
            raise ProbeError(
                f"labels include classes the probe was not trained on: {', '.join(unknown[:5])}; "
                "remove those rows or train a probe with them"
            )
        pred = self.predict(features, fingerprint=fingerprint)
        return Evaluation.from_predictions(self.classes, labels, pred)

    def evaluate_store(
        self,
        store: Store | str | Path,
        labels: str | Path | None = None,
        *,
        split: Literal["test", "all"] = "test",
        missing: MissingLabels | None = None,
    ) -> Evaluation:
        """Evaluate on a store's labelled images: the probe's test split, or all of them.

        ``missing`` defaults to the mode the probe was trained with.
        """
        if split not in ("test", "all"):
            raise InvalidArgumentError(f"split must be one of: test, all (got {split!r})")
        data = labelled_features(
            store, labels, missing=missing or self.settings.get("missing", "error")
        )
        rows = np.arange(len(data.keys))
        if split == "test":
            rows = np.flatnonzero(np.isin(data.keys, self.split.get("test", [])))
            if len(rows) == 0:
                raise ProbeError(
                    "none of the probe's test images are labelled in this store; pass "
                    "--split all to evaluate on every labelled image"
                )
        return self.evaluate(data.features[rows], data.labels[rows], fingerprint=data.fingerprint)

    def classify(
        self,
        *,
        store: Store | str | Path | None = None,
        images: Sequence[str | Path] | None = None,
        top_k: int = 5,
        device: str = "auto",
    ) -> list[Prediction]:
        """Top-k classes for a store's images, or for image files run through its model."""
        if store is None:
            raise ProbeError(
                "pass --store: the store the probe was trained on (or one extracted with the "
                "same model) provides the features or the model for new images"
            )
        store = resolve_store(store)
        fp = dict(store.fingerprint)
        if images is None:
            features, paths = store.vectors, [str(p) for p in store.paths]
        else:
            self.check_features(np.zeros((0, self.weight.shape[1]), np.float32), fp)
            features = embed_image_files(
                store, images, normalize=bool(fp.get("normalize")), device=device
            )
            paths = [str(p) for p in images]
        probs = self.predict_proba(features, fingerprint=fp)
        return rank_top_k(probs, self.classes, paths, top_k)

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the probe, its trace (CSV + PNG) and its test metrics to ``directory``."""
        from .plots import plot_history

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale},
            str(d / "probe.safetensors"),
        )
        save_file(
            {k: np.ascontiguousarray(v, np.int64) for k, v in self.split.items()},
            str(d / "split.safetensors"),
        )
        meta = {
            "format": FORMAT,
            "classes": self.classes,
            "standardization": {
                "mean": "probe.safetensors:mean",
                "scale": "probe.safetensors:scale",
                "formula": "(x - mean) / scale",
                "computed_on": "train split",
            },
            "settings": self.settings,
            "fingerprint": self.fingerprint,
            "grid": self.grid,
            "test": None if self.test is None else self.test.summary(),
            "knn": None if self.knn is None else self.knn.summary(),
        }
        (d / "probe.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        with (d / "history.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(HISTORY_COLUMNS))
            w.writeheader()
            w.writerows(self.history)
        if self.history:
            plot_history(self.history, d / "history.png")
        if self.test is not None:
            self.test.write(d, "test")
        if self.knn is not None:
            self.knn.write(d, "knn_test")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Probe:
        """Read a probe saved by ``save``."""
        d = Path(directory)
        try:
            meta = json.loads((d / "probe.json").read_text(encoding="utf-8"))
            tensors = load_file(str(d / "probe.safetensors"))
        except (OSError, ValueError) as exc:
            raise ProbeError(
                f"no readable probe at {d} ({exc.__class__.__name__}); train one with "
                "embedkit probe train --out DIR"
            ) from None
        if meta.get("format") != FORMAT:
            raise ProbeError(f"{d}/probe.json is not an {FORMAT} probe; retrain it")
        split = (
            load_file(str(d / "split.safetensors")) if (d / "split.safetensors").exists() else {}
        )
        history: list[dict[str, float]] = []
        if (d / "history.csv").exists():
            with (d / "history.csv").open(newline="", encoding="utf-8") as f:
                history = [
                    {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
                    for row in csv.DictReader(f)
                ]
        return cls(
            classes=list(meta["classes"]),
            weight=tensors["weight"],
            bias=tensors["bias"],
            mean=tensors["mean"],
            scale=tensors["scale"],
            fingerprint=meta.get("fingerprint"),
            settings=meta.get("settings", {}),
            history=history,
            grid=meta.get("grid", []),
            split=split,
        )


def load_probe(directory: str | Path) -> Probe:
    """Read a probe saved by ``Probe.save``."""
    return Probe.load(directory)
