"""Classification metrics of one labelled set: accuracy, per-class P/R/F1, confusion matrix."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Evaluation:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of one labelled set."""

    classes: list[str]
    accuracy: float
    n: int
    per_class: list[dict[str, Any]]
    confusion: np.ndarray  # int64 (C, C); rows: true class, columns: predicted

    @classmethod
    def from_predictions(
        cls, classes: Sequence[str], true: np.ndarray, pred: np.ndarray
    ) -> Evaluation:
        from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

        classes = list(classes)
        p, r, f, s = precision_recall_fscore_support(true, pred, labels=classes, zero_division=0)
        per_class = [
            {
                "class": c,
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        ]
        return cls(
            classes=classes,
            accuracy=float(np.mean(true == pred)) if len(true) else float("nan"),
            n=len(true),
            per_class=per_class,
            confusion=confusion_matrix(true, pred, labels=classes).astype(np.int64),
        )

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "per_class": self.per_class}

    def write(self, directory: str | Path, prefix: str) -> list[Path]:
        """Write ``PREFIX_metrics.csv``, ``PREFIX_confusion.csv`` and ``PREFIX_confusion.png``."""
        from .plots import plot_confusion

        directory = Path(directory)
        metrics, conf = directory / f"{prefix}_metrics.csv", directory / f"{prefix}_confusion.csv"
        with metrics.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
            w.writeheader()
            w.writerows(self.per_class)
        with conf.open("w", newline="", encoding="utf-8") as f:
            w2 = csv.writer(f)
            w2.writerow(["true \\ predicted", *self.classes])
            for c, row in zip(self.classes, self.confusion, strict=True):
                w2.writerow([c, *row.tolist()])
        png = plot_confusion(self.confusion, self.classes, directory / f"{prefix}_confusion.png")
        return [metrics, conf, png]
