"""CLI verb ``finetune``: train the backbone's last layers on your labelled photos, watched
live (the epoch table and the loss/accuracy chart of ``probe train``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from ..defaults import HISTORY_COLUMNS
from ._app import app
from ._kit import console, print_json, run_command
from .chart import epoch_chart


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4f}"


class _PhaseView:
    """The live table of the current phase's epochs, with the chart once there are two."""

    TITLES = {"head": "phase 1: head on frozen features (L-BFGS)", "finetune": "phase 2: fine-tune"}

    def __init__(self, live: Live, rows: int = 12) -> None:
        self.live, self.rows = live, rows
        self.phase: str | None = None
        self.history: list[dict[str, float]] = []

    def __call__(self, phase: str, row: dict[str, float]) -> None:
        # phase 1 runs once per weight decay: a new run restarts at epoch 1
        if phase != self.phase or (self.history and row["epoch"] <= self.history[-1]["epoch"]):
            self.phase, self.history = phase, []
        self.history.append(row)
        t = Table(title=self.TITLES.get(phase, phase), title_justify="left")
        for col in HISTORY_COLUMNS:
            t.add_column(col, justify="right")
        for r in self.history[-self.rows :]:
            t.add_row(str(r["epoch"]), *(_fmt(r[c]) for c in HISTORY_COLUMNS[1:]))
        parts: list[Any] = [t]
        if len(self.history) >= 2:
            parts.append(epoch_chart(self.history, width=min(console.width, 110)))
        self.live.update(Group(*parts))


@app.command("finetune")
@run_command
def finetune_cmd(
    images: Annotated[
        Path, typer.Argument(help="Folder of photos, one subfolder per class.", show_default=False)
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the weights, checkpoints and report.")
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Preset or timm name to start from.")
    ] = "efficientnet_lite0",
    labels: Annotated[
        Path | None,
        typer.Option("--labels", "-l", help="CSV `path,label` (paths relative to the folder)."),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Start from this weights file.")
    ] = None,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Start from random weights (tests).")
    ] = False,
    unfreeze: Annotated[
        int, typer.Option(min=0, help="Backbone units trained in phase 2 (0: head only).")
    ] = 2,
    epochs: Annotated[int, typer.Option(min=0, help="Phase 2 epochs at most.")] = 10,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (the head gets 10x).")] = 1e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.05,
    warmup_epochs: Annotated[int, typer.Option(min=0, help="Linear warm-up epochs.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step.")] = 16,
    patience: Annotated[
        int, typer.Option(min=1, help="Stop after this many epochs without a better val loss.")
    ] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the split and the shuffling.")] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run checkpointed in --out.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
) -> None:
    """Fine-tune a backbone on your labelled photos: phase 1 trains a head on frozen features,
    phase 2 unfreezes the last --unfreeze units (AdamW, warm-up + cosine, early stopping on the
    group-aware validation split), checkpointing every epoch.

    Writes model.safetensors, finetune.json and checkpoint.*; no pickle. The --out folder is
    then a model: `--model OUT` in extract, classify (its classes), trace, search, compare.

    Example: embedkit finetune photos/ --out ft --unfreeze 2 --epochs 10
    """
    from ..classification.finetune import finetune

    kwargs: dict[str, Any] = dict(
        model=model, labels=labels, weights=weights, random_init=random_init, unfreeze=unfreeze,
        epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        batch_size=batch_size, patience=patience, seed=seed, device=device, resume=resume,
    )  # fmt: skip
    if json_out:
        print_json(finetune(images, out, **kwargs).to_dict())
        return
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        result = finetune(images, out, on_epoch=_PhaseView(live), **kwargs)
    console.print(
        f"test accuracy: {_fmt(result.test_acc_head)} (head only) -> {_fmt(result.test_acc)} "
        f"(fine-tuned, best epoch {result.best_epoch}"
        f"{', stopped early' if result.stopped_early else ''})"
    )
    console.print(
        f"model: {result.out} ({result.arch}, classes {', '.join(result.classes)}); use: "
        f"embedkit classify photo.jpg --model {result.out}, embedkit extract PHOTOS --store S "
        f"--model {result.out}"
    )
