"""PNG plots of a probe's training curves and confusion matrix.

Figures are drawn with matplotlib's object API on an Agg canvas, so nothing touches pyplot's
global state or needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_history(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write loss and accuracy per epoch (train and validation) to a PNG at ``path``."""
    fig = Figure(figsize=(9, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for split, style in (("train", "-"), ("val", "--")):
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in history], style, label=split)
        ax_acc.plot(epochs, [row[f"{split}_acc"] for row in history], style, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """Write a confusion matrix (rows: true class, columns: predicted) to a PNG at ``path``."""
    n = len(classes)
    side = min(3.0 + 0.45 * n, 24.0)
    fig = Figure(figsize=(side, side), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), labels=list(classes), rotation=90)
    ax.set_yticks(range(n), labels=list(classes))
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    if n <= 30:  # beyond that the numbers are unreadable; the CSV has them
        top = confusion.max() if confusion.size else 0
        for i in range(n):
            for j in range(n):
                color = "white" if confusion[i, j] > top / 2 else "black"
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", color=color)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
