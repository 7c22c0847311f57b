"""CLI verbs to look at a collection: ``serve`` (web gallery and JSON API) and ``report``
(self-contained HTML files)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from ..index.duplicates import DEFAULT_THRESHOLD
from ._app import app
from ._kit import console, err_console, run_command

StoreArg = Annotated[Path, typer.Argument(help="Store directory (from `embedkit extract`).")]


class MapChoice(str, enum.Enum):
    auto = "auto"
    umap = "umap"
    pca = "pca"


MapOpt = Annotated[
    MapChoice,
    typer.Option(
        "--map",
        help="2-D map projection: auto (UMAP when umap-learn is installed and the store has "
        "at most 20,000 images, else PCA), umap or pca.",
    ),
]


@app.command("serve")
@run_command
def serve_cmd(
    store: StoreArg,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Anything but 127.0.0.1/localhost needs a token "
            "(one is generated and printed when --token is not given)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            help="Secret every API call must carry (header X-Embedkit-Token or ?token=); "
            "the printed URL includes it."
        ),
    ] = None,
    probe: Annotated[
        Path | None,
        typer.Option(
            help="A probe directory (`embedkit probe train --out`): show its "
            "predictions, misclassified first, and its confusion matrix."
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="path,label CSV of true labels for --probe (default: folder names)."),
    ] = None,
    map_method: MapOpt = MapChoice.auto,
) -> None:
    """Browse a store in the web browser: gallery, similar images, upload search, duplicate
    review, a 2-D map, probe predictions; plus a JSON API (documented at /docs).

    Read-only: the server never deletes, moves or re-embeds files; it only caches thumbnails
    in STORE/thumbs. A running `embedkit extract` into the store shows up on the next request.
    Example: `embedkit serve photos.store`, then open http://127.0.0.1:8000/.
    """
    import uvicorn

    from ..serve.app import create_app
    from ..serve.guard import resolve_token

    secret = resolve_token(host, token)
    application = create_app(
        store, token=secret, probe=probe, labels=labels, map_method=map_method.value
    )
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={secret}" if secret else "")
    console.print(f"serving {store} at {url}  (Ctrl+C stops)", soft_wrap=True)
    if secret and not token:
        err_console.print("generated an API token; only the URL above opens the page")
    uvicorn.run(application, host=host, port=port, log_level="warning")


report_app = typer.Typer(
    help="Write self-contained HTML reports of a store (thumbnails embedded).",
    no_args_is_help=True,
)
app.add_typer(report_app, name="report")

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")]


@report_app.command("duplicates")
@run_command
def report_duplicates_cmd(
    store: StoreArg,
    out: OutOpt = Path("duplicates.html"),
    threshold: Annotated[
        float,
        typer.Option(help="Cosine similarity at or above which two images are near duplicates."),
    ] = DEFAULT_THRESHOLD,
) -> None:
    """Write the duplicate groups as one HTML file: copies side by side with resolution, file
    size, date and the suggested keeper. Nothing is deleted or moved."""
    from ..serve.reports import duplicates_report

    path = duplicates_report(store, out, threshold)
    console.print(f"wrote {path}", soft_wrap=True)


@report_app.command("map")
@run_command
def report_map_cmd(
    store: StoreArg,
    out: OutOpt = Path("map.html"),
    map_method: MapOpt = MapChoice.auto,
) -> None:
    """Write a 2-D map of the collection as one HTML file (similar images lie close
    together; hover a point for its thumbnail)."""
    from ..serve.reports import map_report

    path = map_report(store, out, method=map_method.value)
    console.print(f"wrote {path}", soft_wrap=True)
