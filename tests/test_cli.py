"""The CLI edge: output formats, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json

import pytest
from conftest import TINY
from typer.testing import CliRunner

from embedkit.cli import app

runner = CliRunner()


def _ok(args: list[str]):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r


def test_extract_info_export_roundtrip(photo_dir, tmp_path):
    st = str(tmp_path / "s")
    r = _ok(
        [
            "extract",
            str(photo_dir),
            "--store",
            st,
            "--model",
            TINY,
            "--random-init",
            "--workers",
            "1",
            "--json",
        ]
    )
    summary = json.loads(r.stdout)
    assert summary["embedded"] == 7 and summary["failed"] == {}
    info = json.loads(_ok(["info", st, "--json"]).stdout)
    for key in ("rows", "failed", "dim", "model", "weights_sha256", "random_init"):
        assert key in info
    assert info["rows"] == 7 and info["random_init"] is True and info["model"] == TINY
    text = _ok(["info", st]).stdout
    assert "random weights" in text
    out = tmp_path / "all.parquet"
    _ok(["export", st, str(out)])
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 7


def test_models_json():
    rows = json.loads(_ok(["models", "--json"]).stdout)
    by = {r["name"]: r for r in rows}
    assert by["resnet50"]["dim"] == 2048 and by["vgg16"]["dim"] == 4096
    assert by["efficientnet_lite0"]["weights_available"] is True
    assert {"name", "dim", "input_size", "weights_available"} <= set(rows[0])


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["extract", "/no/such/folder", "--store", "{tmp}/s", "--model", TINY, "--random-init"],
            "does not exist",
        ),
        (["extract", "{photos}", "--store", "{tmp}/s", "--model", "resnet_5O"], "resnet"),
        (["extract", "{photos}", "--store", "{tmp}/s", "--model", "resnet50"], "--weights"),
        (
            [
                "extract",
                "{photos}",
                "--store",
                "{tmp}/s",
                "--device",
                "tpu",
                "--model",
                TINY,
                "--random-init",
            ],
            "auto",
        ),
        (["info", "{tmp}/nothing"], "does not exist"),
    ],
)
def test_user_mistakes_are_one_line_exit_1(args, needle, photo_dir, tmp_path):
    args = [a.format(tmp=tmp_path, photos=photo_dir) for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    err = r.stderr.strip()
    assert err.startswith("error:") and needle in err, err
    assert len(err.splitlines()) <= 3  # one logical line (rich may wrap at 80 columns)


def test_model_mismatch_message_says_what_to_do(photo_dir, tmp_path):
    st = str(tmp_path / "s")
    _ok(["extract", str(photo_dir), "--store", st, "--model", TINY, "--random-init", "--json"])
    r = runner.invoke(
        app, ["extract", str(photo_dir), "--store", st, "--model", "test_resnet", "--random-init"]
    )
    assert r.exit_code == 1 and "new --store" in " ".join(r.stderr.split())


def test_help_and_info_do_not_load_torch():
    """`embedkit --help` and `info` stay fast: the models load only in commands that use them."""
    import subprocess
    import sys

    code = (
        "import sys; from embedkit.cli import app; import embedkit; "
        "print(sorted(m for m in ('torch', 'timm', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_paths_with_brackets_print_as_they_are(tmp_path):
    """Rich would read "[red]" or "[2019]" in a path as markup and drop it from the table."""
    from conftest import make_photo

    src = tmp_path / "[2019] trip"
    for name, seed in (("[red]cat.jpg", 1), ("[bold]dog[_x].jpg", 2), ("plain.jpg", 3)):
        make_photo(src / name, seed)
    (src / "[bad].jpg").write_bytes(b"not an image")
    st = str(tmp_path / "s")
    _ok(["extract", str(src), "--store", st, "--model", TINY, "--random-init", "--workers", "1"])
    r = _ok(["search", st, str(src / "[red]cat.jpg"), "-k", "3"])
    # The table may fold a long path over lines: compare without borders and whitespace.
    flat = "".join(ch for ch in r.stdout if ch not in "│ \n")
    for name in ("[red]cat.jpg", "[bold]dog[_x].jpg"):
        assert name in flat, r.stdout
    r = runner.invoke(app, ["search", st, str(src / "[nope].jpg")])
    assert r.exit_code == 1 and "[nope].jpg" in r.output


def test_info_failed_lists_files_with_reason_and_detail(photo_dir, tmp_path):
    (photo_dir / "bad.jpg").write_bytes(b"this is text, not a JPEG")
    (photo_dir / "empty.png").write_bytes(b"")
    st = str(tmp_path / "s")
    _ok(["extract", str(photo_dir), "--store", st, "--model", TINY, "--random-init"])
    rows = json.loads(_ok(["info", st, "--failed", "--json"]).stdout)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert set(by_name) == {"bad.jpg", "empty.png"}
    assert by_name["bad.jpg"]["reason"] == "unidentified" and by_name["bad.jpg"]["detail"]
    assert by_name["empty.png"]["reason"] == "empty_file"
    assert all(r["path"].startswith(str(photo_dir)) for r in rows)
    out = _ok(["info", st, "--failed"]).stdout
    assert "bad.jpg" in out and "unidentified" in out and "2 failed files" in out


def test_export_to_a_folder_or_missing_folder_is_one_line(photo_dir, tmp_path):
    st = str(tmp_path / "s")
    _ok(["extract", str(photo_dir), "--store", st, "--model", TINY, "--random-init"])
    r = runner.invoke(app, ["export", st, str(tmp_path)])
    assert r.exit_code == 1 and "is a folder" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["export", st, str(tmp_path / "nope" / "x.parquet")])
    assert r.exit_code == 1 and "does not exist" in r.output
    assert not list(tmp_path.glob(".*.tmp"))
