"""The one typer app object; command modules register their verbs on it."""

from __future__ import annotations

import inspect

import typer
import typer.core


def _flag_type_hidden(display_type_rich):  # type: ignore[no-untyped-def]
    """typer >= 0.2x prints ``<bool>`` after every flag (``--json <bool>``), which reads as if
    the flag took a value; a flag takes none, so its type column stays empty."""

    def display(self, ctx):  # type: ignore[no-untyped-def]
        if getattr(self, "is_flag", False) and not getattr(self, "metavar", None):
            return None
        return display_type_rich(self, ctx)

    return display


if hasattr(typer.core.TyperOption, "display_type_rich"):
    typer.core.TyperOption.display_type_rich = _flag_type_hidden(  # type: ignore[method-assign]
        typer.core.TyperOption.display_type_rich
    )

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


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"embedkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the embedkit version and exit.",
        callback=_print_version,
        is_eager=True,
    ),
) -> None:
    """Turn image collections into searchable, classifiable vectors."""


def one_line_summaries(typer_app: typer.Typer) -> None:
    """Give each command of ``typer_app`` (and of its sub-apps) a one-line summary for the
    command list of ``--help``: the first paragraph of its docstring with the source's line
    breaks removed (typer keeps them, so a wrapped first paragraph printed as ragged lines).
    """
    for info in typer_app.registered_commands:
        doc = inspect.getdoc(info.callback) if info.callback else None
        if info.short_help is None and doc:
            info.short_help = " ".join(doc.split("\n\n", 1)[0].split())
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            one_line_summaries(group.typer_instance)
