"""CLI verbs for retrieval: ``index``, ``search`` and ``duplicates``."""

from __future__ import annotations

import csv
import enum
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import InvalidArgumentError
from ..index.choice import DEFAULT_MAX_MEMORY
from ..index.duplicates import DEFAULT_K, DEFAULT_THRESHOLD, DuplicateGroup, find_duplicates
from ..index.lifecycle import index_store
from ..index.search import QueryResult, search
from ._app import app
from ._kit import OutputFormat, console, err_console, print_json, run_command

StoreArg = Annotated[Path, typer.Argument(help="Store directory (from `embedkit extract`).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
CsvOpt = Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")]


class MetricChoice(str, enum.Enum):
    cosine = "cosine"
    l2 = "l2"


def _log(message: str) -> None:
    err_console.print(message, soft_wrap=True)


def _format(json_: bool, csv_: bool) -> OutputFormat:
    if json_ and csv_:
        raise InvalidArgumentError("choose one of --json and --csv")
    return OutputFormat.json if json_ else OutputFormat.csv if csv_ else OutputFormat.table


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def _parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise InvalidArgumentError(f"--max-memory {text!r} is not a size like 512M, 4G or 4096")
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * 1024**power)


@app.command("index")
@run_command
def index_cmd(
    store: StoreArg,
    index_key: Annotated[
        str | None,
        typer.Option(
            "--index-key",
            help="Any FAISS factory string (e.g. Flat, HNSW32, IVF4096,Flat); default: chosen "
            "from the store's size, dimension and --max-memory.",
        ),
    ] = None,
    metric: Annotated[
        MetricChoice, typer.Option(help="cosine (normalised vectors, inner product) or l2.")
    ] = MetricChoice.cosine,
    max_memory: Annotated[
        str,
        typer.Option(
            "--max-memory",
            help="Memory budget of the index and the vectors it searches, e.g. 512M, 4G; "
            "past it the index goes on disk.",
        ),
    ] = f"{DEFAULT_MAX_MEMORY // 2**30}G",
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Build from scratch instead of updating.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Build or update the search index in STORE/index/ and report its measured recall@10.

    When the in-RAM index and the vectors would exceed --max-memory, builds an on-disk IVF-PQ
    index in STORE/index-ondisk/ instead (lists and vectors memory-mapped, exact re-ranking).
    """
    report = index_store(
        store,
        key=index_key,
        metric=metric.value,  # type: ignore[arg-type]
        max_memory=_parse_size(max_memory),
        rebuild=rebuild,
        log=_log if not json_ else None,
    )
    info = report.info
    if json_:
        print_json({"action": report.action, "message": report.message, **info})
        return
    table = Table(show_header=False, box=None)
    if "backend" in info:  # only the on-disk index says so; the in-RAM table is unchanged
        table.add_row("backend", str(info["backend"]))
    for name in ("key", "metric", "n", "dim", "params", "recall_at_10", "build_seconds"):
        table.add_row(name, str(info.get(name)))
    table.add_row("size", f"{info.get('size_bytes', 0) / 2**20:.1f} MiB")
    table.add_row("path", str(report.path))
    console.print(table)


@app.command("search")
@run_command
def search_cmd(
    store: StoreArg,
    queries: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files (embedded with the store's model), stored paths or stored ids.",
            show_default=False,
        ),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Results per query.")] = 10,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Every result with similarity >= this (distance <= this for an l2 index) "
            "instead of the top k.",
        ),
    ] = None,
    vector: Annotated[
        list[Path] | None,
        typer.Option("--vector", help="A .npy query vector (D,) or (N, D); repeatable."),
    ] = None,
    exclude_self: Annotated[
        bool, typer.Option("--exclude-self", help="Leave a stored query out of its own results.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda, for image queries.")] = "auto",
    json_: JsonOpt = False,
    csv_: CsvOpt = False,
) -> None:
    """Find the stored images most similar to each query."""
    fmt = _format(json_, csv_)
    results = search(
        store,
        queries or [],
        k=k,
        threshold=threshold,
        vector_files=vector or [],
        exclude_self=exclude_self,
        device=device,
        log=_log,
    )
    _print_search(results, fmt)


def _print_search(results: list[QueryResult], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.json:
        print_json([[h.__dict__ for h in r.hits] for r in results])
    elif fmt is OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["query", "rank", "score", "id", "path"])
        for r in results:
            for h in r.hits:
                writer.writerow([r.query, h.rank, f"{h.score:.6f}", h.id, h.path])
    else:
        for r in results:
            table = Table(title=f"{r.query}", title_justify="left")
            table.add_column("rank", justify="right")
            table.add_column("score", justify="right")
            table.add_column("path", overflow="fold")
            for h in r.hits:
                table.add_row(str(h.rank), f"{h.score:.4f}", h.path)
            console.print(table)
            if not r.hits:
                console.print("no results")


@app.command("duplicates")
@run_command
def duplicates_cmd(
    store: StoreArg,
    threshold: Annotated[
        float,
        typer.Option(help="Cosine similarity at or above which two images are near duplicates."),
    ] = DEFAULT_THRESHOLD,
    k: Annotated[
        int, typer.Option("-k", min=1, help="Neighbours looked up per image.")
    ] = DEFAULT_K,
    json_: JsonOpt = False,
    csv_: CsvOpt = False,
) -> None:
    """Group exact (same content) and near duplicates (resized, re-compressed, rotated...)."""
    fmt = _format(json_, csv_)
    groups = find_duplicates(store, threshold, k=k, log=_log)
    _print_duplicates(groups, fmt)
    images = sum(len(g.members) for g in groups)
    identical = sum(g.identical_copies for g in groups)
    summary = (
        f"{len(groups)} groups, {images} images in groups "
        f"({images - len(groups)} redundant copies, {identical} of them byte-identical)"
    )
    (console if fmt is OutputFormat.table else err_console).print(summary)


def _print_duplicates(groups: list[DuplicateGroup], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.json:
        print_json([[m.to_dict() for m in g.members] for g in groups])
    elif fmt is OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        header = ["group", "rank", "score", "closest", "exact", "identical_to", "id", "path"]
        writer.writerow(header)
        for n, g in enumerate(groups, 1):
            for rank, m in enumerate(g.members, 1):
                twins = " ".join(map(str, m.identical_to))
                row = [n, rank, f"{m.score:.6f}", m.closest, int(m.exact), twins, m.id, m.path]
                writer.writerow(row)
    else:
        table = Table()
        table.add_column("group", justify="right")
        table.add_column("score", justify="right")
        table.add_column("")
        table.add_column("path", overflow="fold")
        for n, g in enumerate(groups, 1):
            for rank, m in enumerate(g.members):
                table.add_row(
                    str(n) if rank == 0 else "",
                    f"{m.score:.4f}",
                    "identical" if m.exact else "",
                    str(m.path),
                    end_section=rank == len(g.members) - 1,
                )
        if groups:
            console.print(table)
