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
from ..images.move import MoveReport, undo_moves
from ..images.sources import is_store_dir
from ..index.choice import DEFAULT_MAX_MEMORY
from ..index.duplicates import (
    DEFAULT_K,
    DEFAULT_THRESHOLD,
    DuplicateGroup,
    find_duplicates,
    move_duplicates,
)
from ..index.keep import KEEP_RULE_HELP
from ..index.lifecycle import index_store
from ..index.search import QueryResult, search
from ._app import app
from ._kit import OutputFormat, console, err_console, print_json, run_command

StoreArg = Annotated[Path, typer.Argument(help="Store directory (from `embedkit extract`).")]
SHOW_FAILURES = 20  # unreadable files listed by `duplicates FOLDER` (the rest are counted)
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
        # One object per query, echoing it, so results of several queries cannot be mixed up.
        print_json([{"query": r.query, "hits": [h.__dict__ for h in r.hits]} for r in results])
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


class KeepChoice(str, enum.Enum):
    best = "best"
    resolution = "resolution"
    size = "size"
    oldest = "oldest"
    newest = "newest"


@app.command("duplicates")
@run_command
def duplicates_cmd(
    store: Annotated[
        Path,
        typer.Argument(
            help="A store (from `embedkit extract`): embeddings and pixels. Or a folder of "
            "images (or an image list): pixels and bytes only, no model, no store written.",
            metavar="STORE|FOLDER",
            show_default=False,
        ),
    ],
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Embedding cosine at or above which two images are copies without pixel "
            f"evidence. Default: calibrated on the store's background (about {DEFAULT_THRESHOLD} "
            "on photos; on a homogeneous collection only pixel-confirmed pairs count).",
            show_default=False,
        ),
    ] = None,
    k: Annotated[
        int, typer.Option("-k", min=1, help="Neighbours looked up per image.")
    ] = DEFAULT_K,
    keep: Annotated[
        KeepChoice,
        typer.Option(
            help="Which member of each group to keep: "
            + "; ".join(f"{r}: {h}" for r, h in KEEP_RULE_HELP.items())
            + ". Ties go to the earliest stored."
        ),
    ] = KeepChoice.best,
    to_remove: Annotated[
        bool,
        typer.Option(
            "--to-remove",
            help="Print only the files that are not their group's keeper, one path per line "
            "(or --json / --csv), for review or `xargs`. Nothing is deleted.",
        ),
    ] = False,
    move_to: Annotated[
        Path | None,
        typer.Option(
            help="Move the non-keepers into this folder (relative paths kept, nothing "
            "overwritten, files changed since extraction skipped) and write an undo list "
            "there; `embedkit undo-move LIST` puts them back. Never deletes.",
        ),
    ] = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="Say for each member why it was judged a copy (identical bytes, pixels with "
            "pHash distance and correlation, or embedding cosine). JSON always has it.",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Decode candidate pairs' files and compare pixels (default). --no-verify "
            "judges by the embedding alone.",
        ),
    ] = True,
    json_: JsonOpt = False,
    csv_: CsvOpt = False,
) -> None:
    """Group exact and near duplicates, suggest a keeper per group, list or move aside the rest.

    Exact: same content hash. Near: resized, re-compressed, greyscale, recoloured, mirrored,
    EXIF-turned, slightly cropped or turned copies confirmed by their pixels, and (outside
    homogeneous collections) copies whose embeddings are above the calibrated threshold.
    Groups are stars around one centre, never chains. Nothing is ever deleted.

    On a folder of images (no store): `embedkit duplicates ~/Pictures` compares pixels and
    bytes only, without a model (seconds for thousands of files); extract a store first for
    the embedding's view too (heavier crops and overlays).
    """
    fmt = _format(json_, csv_)
    if store.exists() and not is_store_dir(str(store)):
        _file_duplicates(store, threshold, verify, k, keep, to_remove, move_to, explain, fmt)
        return
    groups = find_duplicates(store, threshold, k=k, keep=keep.value, verify=verify, log=_log)
    if move_to is not None:
        report = move_duplicates(groups, store, move_to)
        _print_moves(report, fmt, "moved")
        return
    _print_groups(groups, fmt, to_remove, explain)


def _print_groups(
    groups: list[DuplicateGroup], fmt: OutputFormat, to_remove: bool, explain: bool, extra: str = ""
) -> None:
    if to_remove:
        _print_to_remove(groups, fmt)
    else:
        _print_duplicates(groups, fmt, explain)
    images = sum(len(g.members) for g in groups)
    identical = sum(g.identical_copies for g in groups)
    summary = (
        f"{len(groups)} groups, {images} images in groups "
        f"({images - len(groups)} redundant copies, {identical} of them byte-identical){extra}"
    )
    (console if fmt is OutputFormat.table and not to_remove else err_console).print(summary)


def _file_duplicates(
    source: Path,
    threshold: float | None,
    verify: bool,
    k: int,
    keep: KeepChoice,
    to_remove: bool,
    move_to: Path | None,
    explain: bool,
    fmt: OutputFormat,
) -> None:
    """``duplicates`` of a folder that is not a store: pixels and bytes, no model."""
    from ..index.file_duplicates import find_file_duplicates, move_file_duplicates
    from .progress import ExtractProgress

    if threshold is not None or not verify:
        raise InvalidArgumentError(
            f"{source} is not a store: its files are compared by their pixels, without "
            "embeddings, so --threshold and --no-verify do not apply (run `embedkit extract` "
            "first to use them)"
        )
    with ExtractProgress(enabled=fmt is OutputFormat.table, description="reading") as bar:
        result = find_file_duplicates(source, k=k, keep=keep.value, progress=bar, log=_log)
    for path, why in result.failures[:SHOW_FAILURES]:
        err_console.print(f"could not read {path}: {why}", soft_wrap=True, markup=False)
    if len(result.failures) > SHOW_FAILURES:
        err_console.print(f"... and {len(result.failures) - SHOW_FAILURES} more unreadable files")
    if move_to is not None:
        _print_moves(move_file_duplicates(result, move_to), fmt, "moved")
        return
    unread = f"; {len(result.failures)} files could not be read" if result.failures else ""
    among = f" among {len(result.files)} files{unread}"
    _print_groups(result.groups, fmt, to_remove, explain, among)


@app.command("undo-move")
@run_command
def undo_move_cmd(
    undo_list: Annotated[
        Path, typer.Argument(help="The embedkit-undo-*.csv written by `duplicates --move-to`.")
    ],
    json_: JsonOpt = False,
) -> None:
    """Put files moved by `embedkit duplicates --move-to` back where they were.

    A file that is there again is never overwritten (it is reported as skipped).
    """
    report = undo_moves(undo_list)
    _print_moves(report, OutputFormat.json if json_ else OutputFormat.table, "restored")


def _print_moves(report: MoveReport, fmt: OutputFormat, verb: str) -> None:
    if fmt is OutputFormat.json:
        print_json(report.to_dict())
        return
    if fmt is OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["from", "to"])
        writer.writerows(report.moved)
    for path, reason in report.skipped:
        err_console.print(f"skipped {path}: {reason}", soft_wrap=True)
    line = f"{verb} {len(report.moved)} files, skipped {len(report.skipped)}"
    if report.undo_file:
        line += f"; undo with: embedkit undo-move {report.undo_file}"
    (console if fmt is OutputFormat.table else err_console).print(line, soft_wrap=True)


def _print_to_remove(groups: list[DuplicateGroup], fmt: OutputFormat) -> None:
    rows = [(n, m, g.keeper) for n, g in enumerate(groups, 1) for m in g.to_remove]
    if fmt is OutputFormat.json:
        print_json(
            [
                {
                    "group": n,
                    "id": m.id,
                    "path": m.path,
                    "keeper_id": kp.id,
                    "keeper": kp.path,
                    "score": m.score,
                    "exact": m.exact,
                    "evidence": m.evidence,
                    "why": m.why,
                }
                for n, m, kp in rows
            ]
        )
    elif fmt is OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["group", "id", "path", "keeper_id", "keeper", "score", "exact"])
        for n, m, kp in rows:
            writer.writerow([n, m.id, m.path, kp.id, kp.path, f"{m.score:.6f}", int(m.exact)])
    else:
        # Plain paths, one per line, nothing else on stdout: safe to pipe.
        for _, m, _ in rows:
            sys.stdout.write(f"{m.path}\n")
        sys.stdout.flush()


def _print_duplicates(groups: list[DuplicateGroup], fmt: OutputFormat, explain: bool) -> None:
    if fmt is OutputFormat.json:
        print_json([[m.to_dict() for m in g.members] for g in groups])
    elif fmt is OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        header = ["group", "rank", "keep", "score", "closest", "exact", "identical_to", "id"]
        writer.writerow([*header, "path", "evidence", "linked_to", "why"])
        for n, g in enumerate(groups, 1):
            for rank, m in enumerate(g.members, 1):
                twins = " ".join(map(str, m.identical_to))
                row = [n, rank, int(m.keep), f"{m.score:.6f}", m.closest, int(m.exact), twins]
                writer.writerow([*row, m.id, m.path, m.evidence, m.linked_to, m.why])
    else:
        table = Table()
        table.add_column("group", justify="right")
        table.add_column("score", justify="right")
        table.add_column("")
        table.add_column("path", overflow="fold")
        if explain:
            table.add_column("why", overflow="fold")
        for n, g in enumerate(groups, 1):
            for rank, m in enumerate(g.members):
                cells = [
                    str(n) if rank == 0 else "",
                    f"{m.score:.4f}",
                    ("keep " if m.keep else "") + ("identical" if m.exact else m.evidence),
                    str(m.path),
                ]
                if explain:
                    cells.append(m.why)
                table.add_row(*cells, end_section=rank == len(g.members) - 1)
        if groups:
            console.print(table)
