"""A trained linear probe: prediction, evaluation, save/load (training is ``train.py``).

A probe is multinomial logistic regression on standardised features, trained by
``train.train_probe``; its metrics are ``metrics.Evaluation``.

Saved probes are a directory: ``probe.safetensors`` (weight, bias, mean, scale),
``split.safetensors`` (the store ids of each split), ``probe.json`` (classes, standardisation,
settings, the store's model fingerprint) and the human-readable trace and metrics (CSV + PNG).
No pickle anywhere.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from safetensors.numpy import load_file, save_file

from ..defaults import HISTORY_COLUMNS
from ..errors import InvalidArgumentError, ProbeError
from .head import Prediction, embed_image_files, rank_top_k, resolve_store, softmax
from .labels import MissingLabels, labelled_features
from .metrics import Evaluation

if TYPE_CHECKING:
    from ..store.read import Store

FORMAT = "embedkit.probe/1"


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
        store = resolve_store(store)
        # Another model's store first of all: its ids may even match (same files), and "no
        # test images labelled" would hide the real problem.
        self.check_features(np.zeros((0, self.weight.shape[1]), np.float32), store.fingerprint)
        data = labelled_features(
            store,
            labels,
            missing=missing or self.settings.get("missing", "error"),
            group_threshold=1.0,  # the probe's stored split decides; groups are not needed
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
        ids = None
        if images is None:
            features, paths, ids = store.vectors, store.abspaths, store.ids
        else:
            self.check_features(np.zeros((0, self.weight.shape[1]), np.float32), fp)
            features = embed_image_files(
                store, images, normalize=bool(fp.get("normalize")), device=device
            )
            paths = [str(p) for p in images]
        probs = self.predict_proba(features, fingerprint=fp)
        return rank_top_k(probs, self.classes, paths, top_k, ids)

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
        if (d / "finetune.json").is_file() and not (d / "probe.json").is_file():
            raise ProbeError(
                f"{d} is a fine-tuned model, not a probe: classify with its own head, "
                f"`embedkit classify --model {d} photo.jpg`, or `embedkit classify --store S` "
                f"on a store extracted with --model {d}"
            )
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
