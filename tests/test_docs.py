"""Every CLI command has help text and is documented in the README (sqlite-utils habit)."""

from __future__ import annotations

from pathlib import Path

import typer.main
from typer.testing import CliRunner

from embedkit.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, path)
        else:
            yield path, cmd


def test_every_command_has_help_and_is_in_readme():
    root = typer.main.get_command(app)
    commands = list(_commands(root))
    assert len(commands) >= 4
    runner = CliRunner()
    for path, cmd in commands:
        assert cmd.help and len(cmd.help.strip()) > 20, f"{path} has no help text"
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        assert f"embedkit {' '.join(path)}" in README, (
            f"`embedkit {' '.join(path)}` missing from README"
        )
        for param in cmd.params:
            if param.name != "help" and getattr(param, "help", None) is None and not param.hidden:
                if param.param_type_name == "option":
                    raise AssertionError(f"option {param.name} of {path} has no help")


def test_help_texts_survive_rich_markup():
    """typer renders help through Rich, which swallows ``[word ...]`` as a markup tag: the
    ``[ray]`` of ``pip install embedkit[ray]`` and ``[default: ...]`` notes vanished."""
    import re

    root = typer.main.get_command(app)
    unescaped = re.compile(r"(?<!\\)\[[a-z/]")
    for path, cmd in _commands(root):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            assert not unescaped.search(text), f"{path}: escape the [ in {text!r}"


def test_flags_read_as_flags_in_help():
    """typer prints ``--json <bool>`` for flags, as if they took a value; ours show none."""
    runner = CliRunner()
    root = typer.main.get_command(app)
    for path in [(), *(p for p, _ in _commands(root))]:
        r = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert r.exit_code == 0, (path, r.output)
        assert "<bool>" not in r.output, f"embedkit {' '.join(path)} --help shows <bool>"


def test_version_flag():
    import embedkit

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"embedkit {embedkit.__version__}"


def test_command_list_summaries_are_one_line_each():
    # A wrapped first docstring paragraph used to print as ragged lines in `embedkit --help`.
    runner = CliRunner()
    for args in ([], ["probe"], ["report"]):
        out = runner.invoke(app, [*args, "--help"], terminal_width=400, env={"COLUMNS": "400"})
        assert out.exit_code == 0, out.output
        panel = out.output.split("Commands")[1]
        rows = [line for line in panel.splitlines() if line.startswith("│")]
        assert rows, out.output
        for row in rows:
            assert row[1:].lstrip()[:1].isalpha() and "  " in row[2:].strip(), (args, row)
            name = row[1:].split()[0]
            assert name.replace("-", "").isalpha(), (args, row)
