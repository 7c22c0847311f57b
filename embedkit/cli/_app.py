"""The one typer app object; command modules register their verbs on it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="embedkit",
    help=(
        "Turn image collections into searchable, classifiable vectors.\n\n"
        "Typical use: `embedkit extract PHOTOS --store photos.store`, then "
        "`embedkit search photos.store query.jpg`, `embedkit duplicates photos.store`, "
        "`embedkit classify --store photos.store` or `embedkit probe train ...`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
