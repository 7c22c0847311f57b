"""Terminal charts of a training trace (loss and accuracy per epoch), drawn with plotext."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text


def epoch_chart(history: Sequence[dict[str, float]], width: int = 100, height: int = 14) -> Text:
    """Loss (left) and accuracy (right) per epoch, train and validation, as a rich ``Text``.

    Columns used: ``epoch``, ``train_loss``, ``val_loss``, ``train_acc``, ``val_acc`` (a column
    missing or NaN in every row is left out).
    """
    import plotext as plt  # plotext 5.x keeps global figure state; we build and clear it here

    epochs = [float(r["epoch"]) for r in history]
    _reset(plt)
    plt.plotsize(width, height)
    plt.theme("clear")
    plt.subplots(1, 2)
    for n, (title, cols) in enumerate(
        (("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc"))), 1
    ):
        plt.subplot(1, n)
        plt.title(title)
        for col in cols:
            ys = [float(r.get(col, float("nan"))) for r in history]
            pts = [(x, y) for x, y in zip(epochs, ys, strict=True) if y == y]
            if pts:
                plt.plot([p[0] for p in pts], [p[1] for p in pts], label=col.replace("_", " "))
        plt.xlabel("epoch")
    text = plt.build()
    _reset(plt)
    return Text.from_ansi(text)


def _reset(plt: Any) -> None:
    # clear_figure() only clears the active subplot: go back to the main figure first, or the
    # next chart nests its panels inside the last one's.
    plt.main()
    plt.clear_figure()
