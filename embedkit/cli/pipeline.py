"""CLI verbs that show the pipeline: ``trace`` (one image, stage by stage) and ``compare``
(models side by side on your labelled photos)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ._app import app
from ._kit import console, print_json, run_command

if TYPE_CHECKING:
    from ..pipeline.trace import Stage

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda.")]


def _shape(shape: list[int]) -> str:
    return " x ".join(str(n) for n in shape)


def _what(stage: Stage) -> str:
    d: dict[str, Any] = stage.detail
    if stage.name == "file":
        return (
            f"{d.get('format')} {d['bytes']:,} bytes, mode {d.get('mode')}, "
            f"{d.get('size', ['?', '?'])[1]}x{d.get('size', ['?', '?'])[0]} px, "
            f"EXIF orientation {d.get('exif_orientation')}"
        )
    if stage.name == "decoded":
        draft = f", JPEG draft of {d['full_size'][1]}x{d['full_size'][0]}" if d["draft"] else ""
        warn = f", warnings: {'; '.join(d['warnings'])}" if d["warnings"] else ""
        return f"RGB (H x W x 3){draft}{warn}"
    if stage.name == "resized":
        side = d["resize_short_side_to"]
        how = f"short side -> {side}" if side is not None else f"to {d['resize_to']}"
        return (
            f"{d['interpolation']} resize {how}, {d['crop']}; values {d['min']:.0f}..{d['max']:.0f}"
        )
    if stage.name == "normalized":
        return (
            f"{d['formula']}, mean {d['mean']}, std {d['std']} ({d['channel_order']}); "
            f"range {d['min']:.3f}..{d['max']:.3f}"
        )
    if stage.name == "features":
        return f"{d['what']}; L2 norm {d['l2_norm']:.3f}, range {d['min']:.3f}..{d['max']:.3f}"
    if stage.name == "logits":
        return f"{d['classifier']}; range {d['min']:.2f}..{d['max']:.2f}"
    if stage.name == "softmax":
        return f"sum {d['sum']:.4f}, max {d['max']:.3f}, entropy {d['entropy_nats']:.2f} nats"
    if stage.name == "top_k":
        return ", ".join(d["classes"])
    return ""


@app.command("trace")
@run_command
def trace_cmd(
    image: Annotated[Path, typer.Argument(help="One image file.", show_default=False)],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Preset or timm name, or a fine-tune folder (`embedkit finetune --out DIR`: "
            "its head and classes end the trace); default: the probe's, else "
            "efficientnet_lite0.",
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="Weights file (.safetensors/.pth); a fine-tune's DIR/model.safetensors is that "
            "fine-tuned model.",
        ),
    ] = None,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Random weights on purpose (no classifier).")
    ] = False,
    probe: Annotated[
        Path | None,
        typer.Option("--probe", help="A probe directory: its classes replace the ImageNet head."),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes shown.")] = 5,
    json_out: JsonOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Show what happens to one image, stage by stage: file, decoded RGB, resized crop,
    normalised tensor, backbone features, logits, softmax, top-k; real shapes, values, times.

    The features are the vector `extract` stores for this file (checked while tracing).

    Examples: embedkit trace cat.jpg; embedkit trace cat.jpg --model resnet50 --json;
    embedkit trace cat.jpg --probe cats.probe; embedkit trace photo.jpg --model ft/
    """
    from ..pipeline.trace import trace

    tr = trace(
        image,
        model,
        weights=weights,
        random_init=random_init,
        probe=probe,
        top_k=top_k,
        device=device,
    )
    if json_out:
        print_json(tr.to_dict())
        return
    t = Table(title=f"{tr.path} through {tr.model} ({tr.weights})", title_justify="left")
    t.add_column("stage")
    t.add_column("shape")
    t.add_column("dtype")
    t.add_column("ms", justify="right")
    t.add_column("what")
    for s in tr.stages:
        t.add_row(s.name, _shape(s.shape), s.dtype, f"{s.seconds * 1000:.1f}", _what(s))
    console.print(t)
    if tr.classifier is None:
        console.print("no classifier: random or headless weights; pass --probe to use yours")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@app.command("compare")
@run_command
def compare_cmd(
    labelled_dir: Annotated[
        Path,
        typer.Argument(help="Folder of photos, one subfolder per class.", show_default=False),
    ],
    models: Annotated[
        str,
        typer.Option(
            "--models",
            help="Comma-separated presets, timm names or fine-tune folders, e.g. "
            "efficientnet_lite0,efficientnet_lite1,resnet50 or efficientnet_lite0,ft/.",
        ),
    ] = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2",
    labels: Annotated[
        Path | None,
        typer.Option("--labels", "-l", help="CSV `path,label`; default: parent folder names."),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init",
            help="Allow random weights (recorded as `random`); without it such models are skipped.",
        ),
    ] = False,
    stores_dir: Annotated[
        Path | None,
        typer.Option(
            "--stores-dir", help="Keep each model's store here (reruns reuse them); default temp."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write comparison.json and comparison.png into this folder."),
    ] = None,
    chart: Annotated[Path | None, typer.Option("--chart", help="Write the PNG chart here.")] = None,
    missing: Annotated[
        str, typer.Option("--missing", help="Images without a label: `error` or `drop`.")
    ] = "error",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shared split.")] = 0,
    json_out: JsonOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Compare models on your labelled photos: k-NN and linear-probe accuracy on one shared
    group-aware split, end-to-end images/s on this machine, dimension and weights source.

    Models without weights here are listed as skipped, with the reason.

    Example: embedkit compare photos/ --models efficientnet_lite0,efficientnet_lite1 --out cmp
    """
    from ..pipeline.compare import compare_models

    names = [m.strip() for m in models.split(",") if m.strip()]
    png = chart if chart is not None else (out / "comparison.png" if out is not None else None)
    results = compare_models(
        labelled_dir,
        names,
        labels=labels,
        random_init=random_init,
        stores_dir=stores_dir,
        missing=missing,
        seed=seed,
        device=device,
        chart=png,
    )
    rows = [r.to_dict() for r in results]
    if out is not None:
        import json

        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    if json_out:
        print_json(rows)
        return
    done = next((r for r in results if not r.skipped), None)
    split = f"{done.n_train} train / {done.n_test} test images" if done else ""
    t = Table(title=f"models on {labelled_dir} ({split})", title_justify="left")
    for col, just in (("model", "left"), ("dim", "right"), ("k-NN acc", "right"),
                      ("probe acc", "right"), ("img/s", "right"), ("weights", "left")):  # fmt: skip
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in results:
        if r.skipped:
            t.add_row(r.model, "-", "-", "-", "-", f"skipped: {r.reason}")
            continue
        speed = "-" if r.img_per_s is None else f"{r.img_per_s:.1f}"
        t.add_row(r.model, str(r.dim), _pct(r.knn_acc), _pct(r.probe_acc), speed, r.weights or "")
    console.print(t)
    if png is not None:
        console.print(f"chart: {png}")
