"""A trained probe's predictions over a store, for review: misclassified first, and the
confusion matrix whose cells list their images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..classification.labels import labelled_features
from ..classification.probe import Probe
from ..errors import ProbeError
from ..store.read import Store


@dataclass(frozen=True)
class ProbeView:
    """Per stored row: its label (None when unlabelled), predicted class and probability."""

    classes: list[str]
    ids: np.ndarray
    paths: list[str]
    labels: list[str | None]
    predicted: list[str]
    prob: np.ndarray

    def summary(self) -> dict[str, Any]:
        index = {c: i for i, c in enumerate(self.classes)}
        matrix = np.zeros((len(self.classes), len(self.classes)), dtype=np.int64)
        for label, pred in zip(self.labels, self.predicted, strict=True):
            if label is not None and label in index:
                matrix[index[label], index[pred]] += 1
        labelled = int(matrix.sum())
        return {
            "classes": self.classes,
            "confusion": matrix.tolist(),  # rows: true class, columns: predicted class
            "labelled": labelled,
            "accuracy": float(np.trace(matrix) / labelled) if labelled else None,
            "rows": len(self.ids),
        }

    def predictions(
        self, true: str | None = None, predicted: str | None = None
    ) -> list[dict[str, Any]]:
        """Rows, misclassified first (most confident mistakes first), then unlabelled, then
        correct ones; filtered by true and/or predicted class."""
        out = []
        for i, id_ in enumerate(self.ids.tolist()):
            label, pred = self.labels[i], self.predicted[i]
            if (true is not None and label != true) or (
                predicted is not None and pred != predicted
            ):
                continue
            correct = None if label is None else label == pred
            out.append(
                {
                    "id": id_,
                    "key": str(id_),
                    "path": self.paths[i],
                    "label": label,
                    "predicted": pred,
                    "prob": float(self.prob[i]),
                    "correct": correct,
                }
            )
        order = {False: 0, None: 1, True: 2}
        out.sort(key=lambda r: (order[r["correct"]], -r["prob"]))
        return out


def probe_view(probe: Probe, store: Store, labels: str | Path | None = None) -> ProbeView:
    """Apply ``probe`` to every stored vector and attach labels (``labels`` CSV, or parent
    folder names, as ``embedkit probe train`` reads them).

    Raises:
        ProbeError: the probe comes from another model.
    """
    proba = probe.predict_proba(store.vectors, fingerprint=dict(store.fingerprint))
    best = proba.argmax(axis=1) if len(proba) else np.zeros(0, np.int64)
    by_id: dict[int, str] = {}
    try:
        data = labelled_features(store, labels, missing="drop", group_threshold=1.0)
        by_id = dict(zip(data.keys.tolist(), data.labels.tolist(), strict=True))
    except ProbeError:
        if labels is not None:  # a labels file the user named must be right
            raise
        # no image sits in a class folder: predictions only, no confusion matrix
    ids = np.asarray(store.ids, dtype=np.int64)
    return ProbeView(
        classes=list(probe.classes),
        ids=ids,
        paths=store.abspaths,
        labels=[by_id.get(i) for i in ids.tolist()],
        predicted=[probe.classes[c] for c in best.tolist()],
        prob=proba[np.arange(len(best)), best] if len(best) else np.zeros(0),
    )
