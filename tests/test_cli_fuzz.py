"""Every command, driven with bad arguments, answers with one line and a non-zero exit code:
never a traceback (issue: export to a folder or a missing folder, a tiny --max-memory)."""

from __future__ import annotations

import pytest
from conftest import TINY, make_photo
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.extraction.run import extract

runner = CliRunner()


@pytest.fixture(scope="module")
def bad_env(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    photos = tmp / "photos"
    for i in range(5):
        make_photo(photos / f"p{i}.jpg", i)
    store = tmp / "s"
    extract([photos], store, model=TINY, random_init=True, workers=0)
    (tmp / "adir").mkdir()
    (tmp / "notastore").mkdir()
    (tmp / "afile.txt").write_text("x")
    (tmp / "broken.jpg").write_bytes(b"not an image")
    (tmp / "labels.csv").write_text("path,label\nnope.jpg,a\n")
    return {
        "S": str(store),
        "DIR": str(tmp / "adir"),
        "NOSTORE": str(tmp / "notastore"),
        "MISSING": str(tmp / "missing"),
        "FILE": str(tmp / "afile.txt"),
        "BROKEN": str(tmp / "broken.jpg"),
        "LABELS": str(tmp / "labels.csv"),
        "PHOTO": str(photos / "p1.jpg"),
    }


BAD = [
    "info {MISSING}",
    "info {NOSTORE}",
    "info {FILE}",
    "info {NOSTORE} --failed",
    "export {S} {DIR}",
    "export {S} {MISSING}/out.parquet",
    "export {MISSING} {DIR}/x.parquet",
    "extract {MISSING} --store {DIR}/s2 --model test_efficientnet --random-init",
    "extract {PHOTO} --store {FILE} --model test_efficientnet --random-init",
    "extract {PHOTO} --store {S} --model test_resnet --random-init",
    "extract {PHOTO} --store {DIR}/s3 --model no_such_model_xyz",
    "extract {PHOTO} --store {DIR}/s4 --model test_efficientnet --random-init --batch-size 0",
    "index {MISSING}",
    "index {S} --max-memory lots",
    "index {S} --index-key Bogus12",
    "index {S} --max-memory 0",
    "search {S} {MISSING}/q.jpg",
    "search {S} {BROKEN}",
    "search {S} {FILE}",
    "search {S} --vector {FILE}",
    "search {S} {PHOTO} -k 0",
    "search {S} {PHOTO} --threshold 7",
    "search {NOSTORE} {PHOTO}",
    "duplicates {MISSING}",
    "duplicates {S} --threshold 2",
    "duplicates {S} --move-to {FILE}",
    "undo-move {MISSING}.csv",
    "undo-move {FILE}",
    "classify --store {MISSING}",
    "classify --store {S} {BROKEN}",
    "probe train {S} --labels {MISSING}.csv --out {DIR}/p",
    "probe train {S} --labels {LABELS} --out {DIR}/p",
    "probe eval {DIR}/noprobe {S}",
    "probe predict {DIR}/noprobe {S}",
    "probe knn {S} --labels {LABELS}",
]


# Odd but legal: may succeed or fail, never with a traceback.
ODD = [
    "index {S} --max-memory 1500K",
    "info {S} --failed --json",
    "duplicates {S} --to-remove --csv",
    "search {S} {PHOTO} {PHOTO} -k 100",
]


@pytest.mark.parametrize("args", ODD)
def test_odd_arguments_never_give_a_traceback(bad_env, args: str) -> None:
    argv = [a.format(**bad_env) for a in args.split()]
    r = runner.invoke(app, argv)
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"{args}: {type(r.exception).__name__}: {r.exception}"
    )
    assert r.exit_code in (0, 1) and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("args", BAD)
def test_bad_arguments_give_one_line_not_a_traceback(bad_env, args: str) -> None:
    argv = [a.format(**bad_env) for a in args.split()]
    r = runner.invoke(app, argv)
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"{args}: {type(r.exception).__name__}: {r.exception}"
    )
    assert r.exit_code != 0, f"{args} exited 0: {r.output}"
    assert "Traceback" not in r.output, r.output
    # One line for our errors (usage errors from click are a short box, also no traceback).
    if "error:" in r.output:
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len([ln for ln in lines if ln.startswith("error:")]) == 1, r.output
