"""Linear probe: training core on arrays, labels from a store, save/load, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_photo

from embedkit.classification.labels import labelled_features, split_rows
from embedkit.classification.probe import HISTORY_COLUMNS, Probe
from embedkit.classification.train import train_probe
from embedkit.errors import ProbeError

FP = {
    "model": "m",
    "weights_sha256": "abc",
    "random_init": False,
    "preprocess": {"size": [8, 8]},
    "dim": 16,
    "normalize": False,
}


def blobs(
    n_per_class: int = 60, dim: int = 16, classes: int = 3, spread: float = 0.3, seed: int = 0
):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centres])
    y = np.repeat([f"class{i}" for i in range(classes)], n_per_class)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def probe() -> Probe:
    x, y = blobs()
    return train_probe(x, y, fingerprint=FP, device="cpu")


def test_separable_features_reach_full_accuracy(probe: Probe) -> None:
    assert probe.test is not None and probe.test.accuracy == 1.0
    assert probe.knn is not None and probe.knn.accuracy == 1.0
    assert probe.test.confusion.trace() == probe.test.n == probe.settings["n_test"]


def test_history_has_one_row_per_epoch_and_decreasing_loss(probe: Probe) -> None:
    h = probe.history
    assert [r["epoch"] for r in h] == list(range(1, len(h) + 1))
    assert all(tuple(r) == HISTORY_COLUMNS for r in h)
    chosen = next(g for g in probe.grid if g["weight_decay"] == probe.settings["weight_decay"])
    assert chosen["epochs"] == len(h) and len(probe.grid) == len(probe.settings["weight_decays"])
    losses = np.array([r["train_loss"] for r in h])
    assert losses[-1] < losses[0] < np.log(3) + 1e-6
    assert np.all(np.diff(losses) <= 1e-6)  # L-BFGS with a Wolfe line search never goes up


def test_traces_every_epoch_through_the_callback() -> None:
    x, y = blobs(20)
    seen: list[tuple[float, int]] = []
    p = train_probe(
        x,
        y,
        weight_decays=(1e-3, 1e-1),
        max_epochs=5,
        device="cpu",
        knn_k=None,
        on_epoch=lambda wd, row: seen.append((wd, row["epoch"])),
    )
    assert len(seen) == sum(g["epochs"] for g in p.grid) and all(g["epochs"] <= 5 for g in p.grid)


def test_save_load_round_trip(probe: Probe, tmp_path: Path) -> None:
    x, _ = blobs(seed=1)
    probe.save(tmp_path / "p")
    for name in (
        "probe.safetensors",
        "split.safetensors",
        "probe.json",
        "history.csv",
        "history.png",
        "test_metrics.csv",
        "test_confusion.csv",
        "test_confusion.png",
        "knn_test_confusion.png",
    ):
        assert (tmp_path / "p" / name).stat().st_size > 0, name
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["classes"] == probe.classes and meta["fingerprint"] == FP
    loaded = Probe.load(tmp_path / "p")
    np.testing.assert_array_equal(
        loaded.predict_proba(x, fingerprint=FP), probe.predict_proba(x, fingerprint=FP)
    )
    assert loaded.history == probe.history
    np.testing.assert_array_equal(loaded.split["test"], probe.split["test"])
    assert not list((tmp_path / "p").glob("*.pkl")) and not list((tmp_path / "p").glob("*.pt"))


def test_predict_refuses_another_model(probe: Probe) -> None:
    x, _ = blobs()
    with pytest.raises(ProbeError, match="weights_sha256"):
        probe.predict(x, fingerprint={**FP, "weights_sha256": "other"})
    with pytest.raises(ProbeError, match="fingerprint"):
        probe.predict(x)
    with pytest.raises(ProbeError, match="dimension"):
        probe.predict(x[:, :8], fingerprint=FP)


def test_load_missing_probe_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="probe train"):
        Probe.load(tmp_path)


def test_split_is_stratified_and_keeps_duplicates_together() -> None:
    labels = np.repeat(["a", "b", "c"], 40)
    groups = np.array([f"h{i // 3}" for i in range(120)])  # every image has 2 duplicates
    s = split_rows(labels, groups, seed=3)
    parts = [set(groups[idx]) for idx in (s.train, s.val, s.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sorted(np.concatenate([s.train, s.val, s.test]).tolist()) == list(range(120))
    for idx in (s.train, s.val, s.test):
        assert set(labels[idx]) == {"a", "b", "c"}


def test_class_with_one_sample_is_refused() -> None:
    x, y = blobs(10)
    y[0] = "lonely"
    with pytest.raises(ProbeError, match="'lonely' has only 1 distinct image"):
        train_probe(x, y, device="cpu")


def test_duplicates_count_once_for_stratification() -> None:
    labels = ["a"] * 5 + ["b"] * 2
    groups = ["1", "2", "3", "4", "5", "x", "x"]
    with pytest.raises(ProbeError, match="'b' has only 1 distinct"):
        split_rows(labels, groups)


# --- labels from a store -------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedkit.extraction.run import extract

    root = tmp_path_factory.mktemp("labelled")
    photos = root / "photos"
    for cls, offset in (("cat", 0), ("dog", 100)):
        for i in range(6):
            make_photo(photos / cls / f"{i}.png", offset + i)
    make_photo(photos / "loose.png", 999)  # no class folder
    extract([str(photos)], root / "s.store", model=TINY, random_init=True, workers=0)
    return root


def test_folder_labels_and_missing_rows(store_dir: Path) -> None:
    store = store_dir / "s.store"
    with pytest.raises(ProbeError, match=r"1 of 13 stored images have no label.*--missing drop"):
        labelled_features(store)
    data = labelled_features(store, missing="drop")
    assert data.n_dropped == 1 and sorted(set(data.labels)) == ["cat", "dog"]
    assert len(data.features) == 12 == len(data.keys) == len(data.groups)


def test_csv_labels_by_path_and_id(store_dir: Path, tmp_path: Path) -> None:
    from embedkit.store.read import open_store

    s = open_store(store_dir / "s.store")
    by_path = tmp_path / "p.csv"
    by_path.write_text(
        "path,label\n" + "".join(f"{p},{'x' if i % 2 else 'y'}\n" for i, p in enumerate(s.paths))
    )
    data = labelled_features(s, by_path)
    assert len(data.labels) == len(s.paths) and data.n_dropped == 0
    by_id = tmp_path / "i.csv"
    by_id.write_text("id,label\n" + "".join(f"{i},z{n % 2}\n" for n, i in enumerate(s.ids[:4])))
    with pytest.raises(ProbeError, match=f"{len(s.ids) - 4} of {len(s.ids)} stored images"):
        labelled_features(s, by_id)
    assert len(labelled_features(s, by_id, missing="drop").labels) == 4


def test_csv_errors_say_the_fix(store_dir: Path, tmp_path: Path) -> None:
    store = store_dir / "s.store"
    unknown = tmp_path / "u.csv"
    unknown.write_text("path,label\ncat/0.png,cat\nnope/1.png,cat\nnope/2.png,dog\n")
    with pytest.raises(ProbeError, match=r"2 entries of .* are not embedded images.*'nope/1.png'"):
        labelled_features(store, unknown)
    header = tmp_path / "h.csv"
    header.write_text("file,class\ncat/0.png,cat\n")
    with pytest.raises(ProbeError, match="header row 'path,label'"):
        labelled_features(store, header)
    conflict = tmp_path / "c.csv"
    conflict.write_text("path,label\ncat/0.png,cat\ncat/0.png,dog\n")
    with pytest.raises(ProbeError, match="labelled both"):
        labelled_features(store, conflict)


def test_cli_train_eval_predict_knn(store_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import embedkit.cli.probe  # noqa: F401  (registers the commands)
    from embedkit.cli._app import app

    store, out = str(store_dir / "s.store"), str(tmp_path / "p")
    runner = CliRunner()
    r = runner.invoke(app, ["probe", "train", "--store", store, "--out", out, "--device", "cpu"])
    assert r.exit_code == 1 and "--missing drop" in r.output
    # The random tiny model scores distinct synthetic photos > 0.9 alike. At a fixed 0.90 group
    # threshold (before calibration) whole classes chained into one near-duplicate group and
    # training refused ("only 1 distinct image"); the calibrated default sees a homogeneous
    # collection, groups nothing by embedding alone, and trains.
    r = runner.invoke(
        app,
        ["probe", "train", "--store", store, "--out", out, "--missing", "drop"]
        + ["--max-epochs", "5", "--device", "cpu"],
    )
    assert r.exit_code == 0 and "distinct image" not in r.output, r.output
    # --group-threshold 1 keeps only byte-identical files together.
    r = runner.invoke(
        app,
        [
            "probe",
            "train",
            "--store",
            store,
            "--out",
            out,
            "--missing",
            "drop",
            "--group-threshold",
            "1",
            "--max-epochs",
            "5",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        "train_loss" in r.output
        and "k-NN" in r.output
        and (tmp_path / "p" / "history.png").exists()
    )
    # the terminal chart of the chosen run: loss and accuracy panels with their legends
    assert "chosen: weight decay" in r.output
    assert "train loss" in r.output and "val acc" in r.output and "accuracy" in r.output
    r = runner.invoke(app, ["probe", "eval", out, "--store", store, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n"] >= 2
    r = runner.invoke(app, ["probe", "predict", out, "--store", store, "--json", "-k", "2"])
    assert r.exit_code == 0, r.output
    preds = json.loads(r.output)
    assert len(preds) == 13 and {t["label"] for t in preds[0]["top"]} == {"cat", "dog"}
    r = runner.invoke(app, ["probe", "knn", "--store", store, "--probe", out, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["probe"] is not None


def test_near_duplicates_share_a_split_group_and_chains_do_not() -> None:
    from embedkit.classification.labels import near_duplicate_groups

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    x[1] = x[0] + 0.02 * rng.standard_normal(32)  # an edited copy of image 0
    x[2] = x[0] + 0.03 * rng.standard_normal(32)
    hashes = np.array([f"h{i}" for i in range(200)])
    hashes[51] = hashes[50]  # a byte-identical file, with another vector (another run)
    g = near_duplicate_groups(x, hashes)
    assert g[0] == g[1] == g[2] and len({g[0], g[3], g[4]}) == 3
    assert g[50] == g[51]
    assert len(set(g.tolist())) == 200 - 2 - 1
    # Each group lands on one side of the split.
    s = split_rows(np.array(["a", "b"] * 100), g, seed=1)
    sides = [set(g[rows].tolist()) for rows in (s.train, s.val, s.test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    # A homogeneous collection: each vector close to the next, so the graph chains them all.
    base = rng.standard_normal(32)
    chain = np.stack([base + 0.03 * rng.standard_normal(32) for _ in range(100)])
    chain_hashes = np.array([f"c{i}" for i in range(100)])
    gc = near_duplicate_groups(chain.astype(np.float32), chain_hashes)
    assert len(set(gc.tolist())) == 100  # a chain is not a set of copies: hash groups stay
    assert (near_duplicate_groups(x, hashes, 1.0) == hashes).all()


def test_eval_on_another_models_store_names_the_mismatch(store_dir: Path, tmp_path: Path) -> None:
    from embedkit.classification.train import train_store_probe
    from embedkit.extraction.run import extract

    probe = train_store_probe(
        store_dir / "s.store", missing="drop", group_threshold=1.0, max_epochs=3, device="cpu"
    )
    # The user's other folder, made with another model: no id in common with the probe's split.
    import shutil

    photos = shutil.copytree(store_dir / "photos", tmp_path / "elsewhere")
    other = tmp_path / "other.store"
    extract([str(photos)], other, model="test_resnet", random_init=True, workers=0)
    with pytest.raises(ProbeError, match="another model"):
        probe.evaluate_store(other, missing="drop")


def test_epoch_chart_draws_every_series() -> None:
    from rich.console import Console

    from embedkit.cli.chart import epoch_chart

    history = [
        {"epoch": i, "train_loss": 1 / i, "val_loss": 1.2 / i, "train_acc": 0.5, "val_acc": 0.4}
        for i in range(1, 6)
    ]
    console = Console(width=100, record=True)
    console.print(epoch_chart(history, width=100, height=12))
    text = console.export_text()
    for label in ("loss", "accuracy", "train loss", "val loss", "train acc", "val acc", "epoch"):
        assert label in text, label
    assert len(text.splitlines()) >= 10
