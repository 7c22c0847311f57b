"""CLI verbs for classification: ``classify`` (the model's own head: ImageNet's or a
fine-tune's) and ``probe train | eval | predict | knn`` (linear probes and k-NN on your own
labels)."""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from ..defaults import DEFAULT_MAX_EPOCHS, DEFAULT_WEIGHT_DECAYS, HISTORY_COLUMNS
from ..defaults import KNN_K as DEFAULT_K
from ..defaults import KNN_TEMPERATURE as DEFAULT_TEMPERATURE
from ._app import app
from ._kit import console, print_json, run_command
from .chart import epoch_chart

if TYPE_CHECKING:  # the library (torch, scikit-learn) loads in the command, not at --help
    from ..classification.head import Prediction
    from ..classification.knn import KnnEvaluation
    from ..classification.metrics import Evaluation

probe_app = typer.Typer(
    help="Linear probes and k-NN classifiers on stored features, trained on your own labels.",
    no_args_is_help=True,
)
app.add_typer(probe_app, name="probe")

StoreOpt = Annotated[
    Path, typer.Option("--store", "-s", help="Store directory (from `embedkit extract`).")
]
LabelsOpt = Annotated[
    Path | None,
    typer.Option(
        "--labels",
        "-l",
        help=(
            "CSV with header `path,label` or `id,label`; default: each image's parent folder name."
        ),
    ),
]


class Missing(str, enum.Enum):
    error = "error"
    drop = "drop"


class SplitChoice(str, enum.Enum):
    test = "test"
    all = "all"


MissingOpt = Annotated[
    Missing | None,
    typer.Option(
        "--missing",
        help=(
            "Stored images without a label: `error` (default; for eval/knn: the probe's own "
            "mode) or `drop` them (the count is printed)."
        ),
    ),
]
GroupThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--group-threshold",
        min=0.0,
        max=1.0,
        help=(
            "Cosine similarity at which near duplicates (edited copies) stay on one side of "
            "the split, as `embedkit duplicates` groups them (default: calibrated on the "
            "collection, ~0.90 on photos); 1 keeps only "
            "byte-identical files together."
        ),
    ),
]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes shown per image.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda.")]
ImagesArg = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Image files to classify (with --store: default every stored image).",
        show_default=False,
    ),
]


def _print_predictions(predictions: list[Prediction], json_out: bool, title: str) -> None:
    if json_out:
        print_json([p.to_dict() for p in predictions])
        return
    t = Table(title=title, title_justify="left")
    t.add_column("path")
    t.add_column("top classes (probability)")
    for p in predictions:
        t.add_row(p.path, ", ".join(str(c) for c in p.top))
    console.print(t)


@app.command("classify")
@run_command
def classify_cmd(
    images: ImagesArg = None,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            "-s",
            help="Classify with this store's model and saved head (and, with no files, its "
            "stored images).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Without --store: a preset or timm name (default efficientnet_lite0), or a "
            "fine-tune folder (`embedkit finetune --out DIR`: its classes).",
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="Without --store: weights file with the 1000-class head, or a fine-tune's "
            "DIR/model.safetensors.",
        ),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option("--random-init", help="Refused: random weights have no ImageNet classifier."),
    ] = False,
    top_k: TopKOpt = 5,
    json_out: JsonOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Top-k classes from the backbone's own classifier: ImageNet's, or a fine-tune's.

    Without --store: image files through a pretrained model (default efficientnet_lite0, real
    weights offline), or through a fine-tuned one (--model DIR: its classes). With --store: the
    store's model and saved head, on the given files or, with none, on its stored features
    (a store extracted with --model DIR classifies into DIR's classes).

    Examples: embedkit classify cat.jpg; embedkit classify --model resnet50 -k 3 cat.jpg;
    embedkit classify --model ft/ photo.jpg; embedkit classify --store photos.store
    """
    from ..classification.head import classify

    preds = classify(
        store=store,
        images=images or None,
        top_k=top_k,
        device=device,
        model=model,
        weights=weights,
        random_init=random_init,
    )
    _print_predictions(preds, json_out, "classes from the model's own head")


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4f}"


class _EpochTable:
    """A live table of the current weight decay's epochs (the last ``rows`` of them)."""

    def __init__(self, live: Live, rows: int = 15) -> None:
        self.live, self.rows = live, rows
        self.wd: float | None = None
        self.history: list[dict[str, float]] = []

    def __call__(self, wd: float, row: dict[str, float]) -> None:
        if wd != self.wd:
            if self.wd is not None:
                last = self.history[-1]
                console.print(
                    f"weight decay {self.wd:g}: {len(self.history)} epochs, "
                    f"val acc {_fmt(last['val_acc'])}, val loss {_fmt(last['val_loss'])}"
                )
            self.wd, self.history = wd, []
        self.history.append(row)
        self.live.update(self._view(f"training, weight decay {wd:g}", self.history))

    def _view(self, title: str, history: list[dict[str, float]]) -> Group:
        # The live epoch table and, once there are two epochs, the loss/accuracy chart.
        parts: list[Any] = [self._table(title, history)]
        if len(history) >= 2:
            parts.append(epoch_chart(history, width=min(console.width, 110)))
        return Group(*parts)

    def _table(self, title: str, history: list[dict[str, float]]) -> Table:
        t = Table(title=title, title_justify="left")
        for col in HISTORY_COLUMNS:
            t.add_column(col, justify="right")
        for r in history[-self.rows :]:
            t.add_row(str(r["epoch"]), *(_fmt(r[c]) for c in HISTORY_COLUMNS[1:]))
        return t

    def finish(self, chosen_wd: float, history: list[dict[str, float]]) -> None:
        """Leave the CHOSEN weight decay's epochs on screen, not the last one tried."""
        if self.wd is not None and self.wd != chosen_wd and self.history:
            last = self.history[-1]
            console.print(
                f"weight decay {self.wd:g}: {len(self.history)} epochs, "
                f"val acc {_fmt(last['val_acc'])}, val loss {_fmt(last['val_loss'])}"
            )
        self.live.update(self._view(f"chosen: weight decay {chosen_wd:g}", history))


def _print_evaluation(ev: Evaluation, title: str) -> None:
    console.print(f"{title}: accuracy {ev.accuracy:.4f} on {ev.n} images")
    t = Table()
    for col in ("class", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for r in ev.per_class:
        t.add_row(
            r["class"],
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
            f"{r['f1']:.3f}",
            str(r["support"]),
        )
    console.print(t)


def _print_side_by_side(rows: list[tuple[str, Evaluation]]) -> None:
    t = Table(title="test split", title_justify="left")
    for col in ("classifier", "accuracy", "macro F1", "images"):
        t.add_column(col, justify="left" if col == "classifier" else "right")
    for name, ev in rows:
        macro = sum(r["f1"] for r in ev.per_class) / max(len(ev.per_class), 1)
        t.add_row(name, f"{ev.accuracy:.4f}", f"{macro:.4f}", str(ev.n))
    console.print(t)


@probe_app.command("train")
@run_command
def train_cmd(
    store: StoreOpt,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Directory for the probe, its trace and its metrics."),
    ],
    labels: LabelsOpt = None,
    missing: MissingOpt = None,
    weight_decay: Annotated[
        list[float] | None,
        typer.Option(
            "--weight-decay",
            help=(
                "Weight decays to try (repeat the option); the best on the validation split "
                f"wins (default: {', '.join(f'{w:g}' for w in DEFAULT_WEIGHT_DECAYS)})."
            ),
        ),
    ] = None,
    max_epochs: Annotated[
        int,
        typer.Option(
            min=1, help="L-BFGS epochs per weight decay at most (stops earlier when converged)."
        ),
    ] = DEFAULT_MAX_EPOCHS,
    val_fraction: Annotated[
        float, typer.Option(help="Share of each class's distinct images for validation.")
    ] = 0.15,
    test_fraction: Annotated[
        float, typer.Option(help="Share of each class's distinct images for the final test.")
    ] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    group_threshold: GroupThresholdOpt = None,
    knn_k: Annotated[
        int,
        typer.Option(
            help="Also report a k-NN classifier with this k on the same split; 0 to skip."
        ),
    ] = DEFAULT_K,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Train a linear probe on stored features (labels from a CSV or from folder names).

    Prints a live table per epoch, then test metrics; writes probe.safetensors, probe.json,
    history.csv/.png and test metrics/confusion matrix (CSV + PNG) to --out.

    Example: embedkit probe train --store photos.store --labels labels.csv --out cats.probe
    """
    options: dict[str, Any] = dict(
        missing=missing.value if missing else "error",
        max_epochs=max_epochs,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        group_threshold=group_threshold,
        knn_k=knn_k or None,
        device=device,
    )
    if weight_decay:
        options["weight_decays"] = weight_decay
    from ..classification.train import train_store_probe

    if json_out:
        probe = train_store_probe(store, labels, **options)
    else:
        with Live(console=console, refresh_per_second=8, transient=False) as live:
            table = _EpochTable(live)
            probe = train_store_probe(store, labels, on_epoch=table, **options)
            table.finish(float(probe.settings["weight_decay"]), list(probe.history))
        console.print()
    probe.save(out)
    if json_out:
        print_json(
            {
                "out": str(out),
                "settings": probe.settings,
                "grid": probe.grid,
                "test": probe.test.summary() if probe.test else None,
                "knn": probe.knn.summary() if probe.knn else None,
            }
        )
        return
    s = probe.settings
    if s.get("n_unlabelled_dropped"):
        console.print(
            f"dropped {s['n_unlabelled_dropped']} stored images without a label", style="yellow"
        )
    console.print(
        f"chose weight decay {s['weight_decay']:g} ({s['weight_decay_choice']}); "
        f"{s['n_train']} train / {s['n_val']} val / {s['n_test']} test images; "
        f"fit in {s['fit_seconds']:.2f}s"
    )
    if probe.test is not None:
        _print_evaluation(probe.test, "linear probe, test split")
        rows = [("linear probe", probe.test)]
        if probe.knn is not None:
            rows.append((f"k-NN (k={knn_k}, T={DEFAULT_TEMPERATURE})", probe.knn))
        _print_side_by_side(rows)
    console.print(f"saved to {out}")


@probe_app.command("eval")
@run_command
def eval_cmd(
    probe: Annotated[Path, typer.Argument(help="Probe directory (from `embedkit probe train`).")],
    store: StoreOpt,
    labels: LabelsOpt = None,
    split: Annotated[
        SplitChoice,
        typer.Option(help="`test`: the probe's held-out test images; `all`: every labelled image."),
    ] = SplitChoice.test,
    missing: MissingOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Also write metrics and confusion matrix (CSV + PNG) here."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a saved probe on a store's labelled images: accuracy, per-class P/R/F1.

    Example: embedkit probe eval cats.probe --store photos.store --labels labels.csv
    """
    from ..classification.probe import Probe

    ev = Probe.load(probe).evaluate_store(
        store, labels, split=split.value, missing=missing.value if missing else None
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ev.write(out, f"eval_{split.value}")
    if json_out:
        print_json({**ev.summary(), "confusion": ev.confusion.tolist(), "classes": ev.classes})
    else:
        _print_evaluation(ev, f"linear probe, {split.value} images")


@probe_app.command("predict")
@run_command
def predict_cmd(
    probe: Annotated[Path, typer.Argument(help="Probe directory (from `embedkit probe train`).")],
    images: ImagesArg = None,
    store: StoreOpt = ...,  # type: ignore[assignment]
    top_k: TopKOpt = 5,
    json_out: JsonOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Top-k probe classes for a store's images, or for image files via the store's model.

    Refuses a store made with another model, weights or preprocessing than the probe's.

    Example: embedkit probe predict cats.probe --store photos.store new.jpg
    """
    from ..classification.probe import Probe

    preds = Probe.load(probe).classify(
        store=store, images=images or None, top_k=top_k, device=device
    )
    _print_predictions(preds, json_out, f"probe {probe}")


@probe_app.command("knn")
@run_command
def knn_cmd(
    store: StoreOpt,
    labels: LabelsOpt = None,
    probe: Annotated[
        Path | None,
        typer.Option(
            "--probe", "-p", help="Use this probe's split and show its accuracy side by side."
        ),
    ] = None,
    k: Annotated[
        int, typer.Option("--k", min=1, help="Neighbours per vote (DINO: 20).")
    ] = DEFAULT_K,
    temperature: Annotated[
        float, typer.Option(help="Vote weight exp(cosine / T) (DINO: 0.07).")
    ] = DEFAULT_TEMPERATURE,
    missing: MissingOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the split (without --probe).")] = 0,
    group_threshold: GroupThresholdOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Weighted k-NN classification (DINO protocol) of the test split from the training split.

    Example: embedkit probe knn --store photos.store --labels labels.csv --probe cats.probe
    """
    from ..classification.knn import knn_evaluate

    r: KnnEvaluation = knn_evaluate(
        store,
        labels,
        probe=probe,
        k=k,
        temperature=temperature,
        missing=missing.value if missing else None,
        seed=seed,
        group_threshold=group_threshold,
    )
    if json_out:
        print_json(
            {
                "k": r.k,
                "temperature": r.temperature,
                "n_train": r.n_train,
                "knn": r.knn.summary(),
                "probe": r.probe.summary() if r.probe else None,
            }
        )
        return
    _print_evaluation(r.knn, f"k-NN (k={r.k}, T={r.temperature:g}), {r.n_train} training images")
    rows = [(f"k-NN (k={r.k}, T={r.temperature:g})", r.knn)]
    if r.probe is not None:
        rows.insert(0, ("linear probe", r.probe))
    _print_side_by_side(rows)
