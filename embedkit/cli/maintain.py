"""CLI verbs that keep a store in step with a collection: ``prune`` and ``reroot``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..store.maintain import MaintenanceReport, prune_store, reroot_store
from ._app import app
from ._kit import console, err_console, print_json, run_command

StoreArg = Annotated[Path, typer.Argument(help="Store directory.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Only report what would change; write nothing.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON: changed, kept, version.")]


def _report(r: MaintenanceReport, verb: str, json_: bool) -> None:
    if json_:
        print_json(r.to_dict())
        return
    for p in r.changed:
        console.print(f"{'would ' if r.dry_run else ''}{verb} {p}", soft_wrap=True)
    for p, why in r.kept:
        err_console.print(f"kept {p}: {why}", soft_wrap=True)
    how = "would be " if r.dry_run else ""
    console.print(f"{len(r.changed)} rows {how}{verb}, {len(r.kept)} left alone")


@app.command("prune")
@run_command
def prune_cmd(
    store: StoreArg,
    dry_run: DryRunOpt = False,
    missing_roots: Annotated[
        bool,
        typer.Option(
            "--missing-roots",
            help="Also drop the rows of source folders that are missing as a whole (by default "
            "they are kept: an unmounted drive is not a deletion).",
        ),
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Drop rows whose files are gone (deleted or moved away), and report them.

    Nothing is re-embedded; search and duplicates stop returning ghosts. For a folder that
    moved, `embedkit reroot` keeps its vectors instead.
    """
    _report(prune_store(store, dry_run=dry_run, missing_roots=missing_roots), "pruned", json_)


@app.command("reroot")
@run_command
def reroot_cmd(
    store: StoreArg,
    old: Annotated[str, typer.Argument(help="Folder the files were extracted from (or a parent).")],
    new: Annotated[Path, typer.Argument(help="Where that folder is now.")],
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Point rows at a moved or renamed source folder, keeping their vectors (no re-embedding).

    Rows get the ids a fresh extract of the new place computes, so a later `embedkit extract
    NEW` sees the files as unchanged. Files missing at the new place are left alone and listed.
    """
    _report(reroot_store(store, old, new, dry_run=dry_run), "rerooted", json_)
