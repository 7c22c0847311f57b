"""CLI verbs for building and inspecting stores: extract, info, export, models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from ..defaults import DEFAULT_BATCH, DEFAULT_MODEL, ORT_PER_THREAD
from ..store.info import store_failures, store_info
from ..store.writer import export_store
from ._app import app
from ._clock import process_started
from ._kit import console, err_console, print_json, run_command

if TYPE_CHECKING:  # torch and timm load in the command, not at --help
    from ..extraction.run import ExtractSummary


@app.command("extract")
@run_command
def extract_cmd(
    sources: Annotated[
        list[Path],
        typer.Argument(
            help="Folders (recursive), image files, or .txt/.csv lists of paths.",
            show_default=False,
        ),
    ],
    store: Annotated[
        Path,
        typer.Option(
            "--store",
            "-s",
            help="Store directory; created if missing, updated incrementally if it exists.",
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            help="Preset (see `embedkit models`), any timm model name, or a fine-tune folder "
            "(`embedkit finetune --out DIR`)."
        ),
    ] = DEFAULT_MODEL,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="Weights file: .safetensors, or a state-dict .pth/.pt (timm or torchvision "
            "layout); a fine-tune's DIR/model.safetensors is that fine-tuned model."
        ),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init",
            help="Use random weights on purpose (recorded in the store). Never the default.",
        ),
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help=f"Images per forward pass (default: {DEFAULT_BATCH['cpu', 'torch']} for torch "
            f"on CPU, {ORT_PER_THREAD} per model thread for ONNX Runtime, probed from free "
            "memory on CUDA)."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Decode processes; 0 decodes in-process (default: one per core to start, then "
            "chosen with the model threads from the run's measured decode and model times)."
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda (auto picks CUDA when present).")
    ] = "auto",
    runtime: Annotated[
        str,
        typer.Option(
            help="torch | onnx | auto (auto: ONNX Runtime on CPU when installed and checked "
            "against torch, else torch)."
        ),
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            help="Model threads (default: chosen with the decode workers from measured times; "
            "usable cores - decode workers when --workers is given)."
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="local | ray (Ray Data on a cluster; needs `pip install embedkit\\[ray]`)."
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address (host:6379 or ray://host:10001) for --engine ray "
            "(default: RAY_ADDRESS, else start a local Ray)."
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show Ray's log lines (default: to a log file).")
    ] = False,
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize", help="Store L2-normalised vectors instead of raw pooled features."
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the run summary as JSON.")
    ] = False,
) -> None:
    """Embed images into a Parquet store (incremental, crash-safe; rerun to resume).

    Unchanged files are skipped, changed ones re-embedded, deleted ones dropped, renamed or
    copied ones reuse their vectors. Bad files are recorded with a reason, never fatal.

    Example: embedkit extract ~/Pictures --store pictures.store
    """
    from ..extraction.run import extract
    from .progress import ExtractProgress

    with ExtractProgress(enabled=not json_out) as progress:
        summary = extract(
            [str(s) for s in sources],
            store,
            model=model,
            weights=weights,
            random_init=random_init,
            batch_size=batch_size,
            workers=workers,
            device=device,
            normalize=normalize,
            runtime=runtime,
            threads=threads,
            engine=engine,
            address=address,
            verbose=verbose,
            on_progress=progress,
            started=process_started(),  # wall_s: what the user waited, imports included
        )
    for line in summary.warnings:
        err_console.print(Text("warning: ", style="bold yellow") + Text(line), soft_wrap=True)
    if json_out:
        print_json(summary.to_dict())
    else:
        _print_summary(summary)
        _print_info(store_info(store))


def _print_summary(s: ExtractSummary) -> None:
    done = s.embedded + s.reused
    rate = f", {s.images_per_s:.1f} img/s" if s.embedded else ""
    console.print(
        f"embedded {s.embedded}, reused {s.reused} (same content), skipped {s.unchanged} "
        f"unchanged, deleted {s.deleted}, failed {s.n_failed}; {done} new rows in "
        f"{s.wall_s:.1f}s since the command started (start-up and model load included{rate})"
    )
    if s.workers is not None:
        how = {
            "measured": "chosen from this run's timings",
            "initial": "the starting split: too few files to measure one",
            "override": "--threads",
        }
        console.print(
            f"cores: {s.workers} decode worker(s), {s.threads} model thread(s), batch "
            f"{s.batch_size} ({how.get(s.split or '', 'cores - workers')})"
        )
    if s.failed:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.failed.items()))
        console.print(f"failed by reason: {reasons}")


def _print_info(info: dict) -> None:
    t = Table(title=f"store {info['store']}", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    for key in (
        "rows",
        "failed",
        "dim",
        "model",
        "weights_source",
        "weights_sha256",
        "random_init",
        "normalize",
        "runtimes",
        "precision",
        "version",
        "parts",
        "bytes",
        "updated",
    ):
        value = info[key]
        if key == "runtimes":
            value = ", ".join(v for v in value if v)
        cell = Text(str(value))
        if key == "random_init" and value:
            cell = Text("True (random weights: vectors carry no meaning)", style="bold red")
        t.add_row(key, cell)
        ft = info.get("finetune")
        if key == "weights_sha256" and ft:
            base = str(ft.get("base_weights_sha256") or "?")[:12]
            t.add_row(
                "fine-tuned from",
                f"{ft['base_model']} ({ft['base_weights_source']}, sha256 {base}); classes "
                f"{', '.join(ft['classes'])}",
            )
    if info["failed_by_reason"]:
        t.add_row(
            "failed by reason",
            ", ".join(f"{k} {v}" for k, v in sorted(info["failed_by_reason"].items())),
        )
    pp = info["preprocess"] or {}
    t.add_row(
        "preprocess",
        f"{pp.get('size')} crop {pp.get('crop_pct')} {pp.get('interpolation')} "
        f"mean {pp.get('mean')} std {pp.get('std')}",
    )
    console.print(t)


@app.command("info")
@run_command
def info_cmd(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print JSON (keys: rows, failed, dim, model, weights_sha256, random_init, ...).",
        ),
    ] = False,
    failed: Annotated[
        bool,
        typer.Option(
            "--failed",
            help="List the files that failed, with reason and detail (with --json: a list of "
            "{id, path, root, reason, detail, size}).",
        ),
    ] = False,
) -> None:
    """Show what a store holds and how it was made (model, weights, preprocessing, failures)."""
    if failed:
        rows = store_failures(store)
        if json_out:
            print_json(rows)
            return
        t = Table("reason", "path", "detail")
        t.columns[1].overflow = "fold"
        for r in rows:
            t.add_row(r["reason"], r["path"], r["detail"] or "")
        if rows:
            console.print(t)
        console.print(f"{len(rows)} failed files")
        return
    info = store_info(store)
    if json_out:
        print_json(info)
    else:
        _print_info(info)


@app.command("export")
@run_command
def export_cmd(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    out: Annotated[Path, typer.Argument(help="Output .parquet file (one file, the live rows).")],
) -> None:
    """Write the store's live rows to ONE Parquet file for pandas, duckdb or polars.

    Example: embedkit export photos.store photos.parquet; then in duckdb:
    SELECT path, embedding FROM 'photos.parquet' WHERE status = 'ok'
    """
    n = export_store(store, out)
    console.print(f"wrote {n} rows to {out}")


@app.command("models")
@run_command
def models_cmd(
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON: name, dim, input_size, weights_available.")
    ] = False,
) -> None:
    """List the model presets, their vector size, and whether weights are on this machine.

    Any other timm model name works too (pass --weights FILE, or --random-init).
    """
    from ..models.backbone import list_models

    rows = list_models()
    if json_out:
        print_json(rows)
        return
    t = Table("model", "dim", "input", "weights here", "source")
    for r in rows:
        t.add_row(
            r["name"],
            str(r["dim"]),
            "x".join(map(str, r["input_size"][1:])),
            "yes" if r["weights_available"] else "no",
            str(r.get("source") or "-"),
        )
    console.print(t)
