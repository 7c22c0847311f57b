"""``finetune``: head on frozen features, then the last units; checkpoints, resume, extract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file
from test_compare import labelled_folder
from typer.testing import CliRunner

from embedkit.classification.finetune import finetune, phase1_head, trainable_units
from embedkit.cli import app
from embedkit.extraction.run import extract
from embedkit.models.backbone import load_backbone
from embedkit.store.read import open_store

SETTINGS = dict(model=TINY, random_init=True, epochs=3, unfreeze=1, batch_size=8, patience=5)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return labelled_folder(tmp_path / "photos", 8)


def test_two_phases_train_only_the_last_unit_and_extract_loads_it(
    photos: Path, tmp_path: Path
) -> None:
    seen: list[tuple[str, int]] = []
    r = finetune(photos, tmp_path / "ft", on_epoch=lambda ph, row: seen.append((ph, row["epoch"])),
                 **SETTINGS)  # fmt: skip
    assert {ph for ph, _ in seen} == {"head", "finetune"}
    assert [e for ph, e in seen if ph == "finetune"] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == [
        "checkpoint.json", "checkpoint.safetensors", "finetune.json", "model.safetensors",
    ]  # fmt: skip
    info = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert info["classes"] == ["blue", "red"] and info["arch"] == TINY
    assert len(info["history"]) == 3 and set(info["split"]) == {"train", "val", "test"}
    assert r.test_acc == 1.0  # colour classes

    start = load_backbone(TINY, random_init=True).model
    # the last epoch's weights (model.safetensors holds the best epoch's, maybe phase 1's)
    last_epoch = load_file(str(tmp_path / "ft" / "checkpoint.safetensors"))
    tuned = {k[4:]: v for k, v in last_epoch.items() if k.startswith("net.")}
    last = {id(p) for p in trainable_units(start)[-1].parameters()}
    changed = []
    for name, p in start.named_parameters():
        moved = not torch.equal(p.detach(), tuned[name])
        if moved:
            assert id(p) in last, f"{name} was frozen but changed"
        changed.append(moved)
    assert any(changed)
    assert load_file(str(r.weights))["classifier.weight"].shape == (2, start.num_features)

    extract([str(photos)], tmp_path / "s.store", model=r.arch, weights=r.weights)
    st = open_store(tmp_path / "s.store")
    assert st.metadata["weights_source"] == f"file:{r.weights}"
    bb = load_backbone(r.arch, weights=r.weights)
    # the file beside its finetune.json is the fine-tuned model, with its 2-class head
    assert bb.head is not None and bb.head[0].shape == (2, bb.dim)
    assert bb.finetuned is not None and bb.finetuned.classes == ("blue", "red")
    row = st.row_of("red/0.png")
    from embedkit.extraction.embed import embed

    np.testing.assert_allclose(st.vectors[row], embed([photos / "red" / "0.png"], bb)[0], atol=1e-5)


def test_resume_after_an_interruption_equals_the_uninterrupted_run(
    photos: Path, tmp_path: Path
) -> None:
    whole = finetune(photos, tmp_path / "whole", **SETTINGS)

    def stop_after_first(phase: str, row: dict[str, float]) -> None:
        if phase == "finetune" and row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(photos, tmp_path / "cut", on_epoch=stop_after_first, **SETTINGS)
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    assert json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["epoch"] == 1
    resumed = finetune(photos, tmp_path / "cut", resume=True, **SETTINGS)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a, b = load_file(str(whole.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

    from embedkit.errors import InvalidArgumentError, ProbeError

    with pytest.raises(InvalidArgumentError, match="other settings"):
        finetune(photos, tmp_path / "cut", resume=True, **{**SETTINGS, "epochs": 4})
    with pytest.raises(ProbeError, match="nothing to resume"):
        finetune(photos, tmp_path / "none", resume=True, **SETTINGS)


def test_phase1_head_gives_dead_features_no_weight() -> None:
    # Pooled ReLU channels that stay ~0 on these photos (std ~1e-6, as ~1/3 of
    # efficientnet_lite0's on the textile benchmark): standardised, their float noise got
    # weights W / scale of ~1e4, and phase 2's first steps, waking them up, blew up the logits.
    rng = np.random.default_rng(0)
    n, classes = 90, np.repeat(["a", "b", "c"], 30)
    live = rng.normal(size=(n, 4)) + 2.0 * (classes[:, None] == np.array(["a", "b", "c", "a"]))
    dead = 1e-6 * rng.random((n, 4))
    x = np.hstack([live, dead]).astype(np.float32)
    groups = np.arange(n).astype(str)
    probe, w, b = phase1_head(x, classes, groups=groups, seed=0, val_fraction=0.15,
                              test_fraction=0.15)  # fmt: skip
    assert np.all(w[:, 4:] == 0) and np.abs(w).max() < 100
    # the folded layer is the probe: same predictions on the (unchanged) live features
    assert (probe.predict(x) == np.asarray(probe.classes)[np.argmax(x @ w.T + b, 1)]).all()
    # and a woken-up dead channel (as after a phase 2 step) changes nothing
    woken = x.copy()
    woken[:, 4:] += 0.5
    assert np.allclose(woken @ w.T + b, x @ w.T + b)


def test_phase1_head_takes_the_weight_decay_of_lowest_validation_loss() -> None:
    # Phase 2 starts from this head and trains it by cross-entropy. On these features the most
    # accurate weight decay (0.1, val acc 0.89, loss 0.374; what train_probe alone picks) is
    # not the one of lowest validation loss (0.01: 0.78, 0.346).
    rng = np.random.default_rng(2)
    classes = np.repeat(["a", "b", "c"], 40)
    centers = rng.normal(size=(3, 40)) * 0.35
    x = rng.normal(size=(120, 40)) + centers[np.searchsorted(["a", "b", "c"], classes)]
    x = x.astype(np.float32)
    probe, w, b = phase1_head(x, classes, groups=np.arange(120).astype(str), seed=0,
                              val_fraction=0.15, test_fraction=0.15)  # fmt: skip
    losses = {row["weight_decay"]: row["val_loss"] for row in probe.grid}
    assert len(losses) == 5 and min(losses, key=losses.__getitem__) == 0.01
    assert probe.settings["weight_decay"] == 0.01
    accs = {row["weight_decay"]: row["val_acc"] for row in probe.grid}
    assert max(accs, key=accs.__getitem__) == 0.1  # the data still tells the two rules apart
    assert probe.history[-1]["val_loss"] == pytest.approx(losses[0.01])
    assert (probe.predict(x) == np.asarray(probe.classes)[np.argmax(x @ w.T + b, 1)]).all()


def test_early_stopping_keeps_the_best_epoch(photos: Path, tmp_path: Path) -> None:
    # a learning rate far too high: the validation loss gets worse, patience 1 stops it
    r = finetune(photos, tmp_path / "ft", **{**SETTINGS, "epochs": 8, "patience": 1, "lr": 1.0})
    assert r.stopped_early and len(r.history) < 8
    best = min(r.history, key=lambda h: h["val_loss"])
    assert r.best_epoch in (0, best["epoch"])


def test_cli_json(photos: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["finetune", str(photos), "--out", str(tmp_path / "ft"), "--model", TINY,
              "--random-init", "--epochs", "1", "--unfreeze", "1", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["arch"] == TINY and d["epochs"] == 1 and Path(d["weights"]).is_file()
