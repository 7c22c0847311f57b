"""Models side by side on your own labelled photos: k-NN and linear-probe accuracy on one
group-aware split, end-to-end speed, dimension and weights source.

Every model embeds the folder through ``extract`` (into temporary stores, or ``stores_dir``),
so the vectors are exactly the ones a real store would hold. The split is made once for all
models: rows are matched by path, and near-duplicate groups found by any model are merged
(union), so a copy of a test image is in no model's training split. ``train_probe`` then gets
the same rows, labels, groups and seed for every model, which makes its own split the shared
one (checked); its k-NN and probe test accuracies are the table's.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InvalidArgumentError, ProbeError, WeightsUnavailableError


@dataclass
class ModelComparison:
    """One model's row. Skipped models have only ``model``, ``skipped`` and ``reason``.

    Attributes:
        model: the model name.
        dim: embedding size.
        weights: where the weights came from (``package:...``, ``file:...``, ``timm:hub:...``)
            or ``random`` (``random_init``).
        knn_acc: weighted k-NN (k=20, T=0.07) accuracy on the shared test split.
        probe_acc: linear-probe accuracy on the shared test split.
        img_per_s: images embedded per second of the whole ``extract`` call (model loading,
            decoding, forward, writing), on this machine; None when nothing was embedded (a
            reused store).
        n_train, n_test: rows in the shared train and test splits.
    """

    model: str
    dim: int | None = None
    weights: str | None = None
    knn_acc: float | None = None
    probe_acc: float | None = None
    img_per_s: float | None = None
    n_train: int | None = None
    n_test: int | None = None
    skipped: bool = False
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.skipped:
            return {"model": self.model, "skipped": True, "reason": self.reason}
        return {
            "model": self.model,
            "dim": self.dim,
            "weights": self.weights,
            "knn_acc": self.knn_acc,
            "probe_acc": self.probe_acc,
            "img_per_s": self.img_per_s,
            "n_train": self.n_train,
            "n_test": self.n_test,
        }


def compare_models(
    labelled_dir: str | os.PathLike[str],
    models: Sequence[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    stores_dir: str | os.PathLike[str] | None = None,
    missing: str = "error",
    group_threshold: float | None = None,
    seed: int = 0,
    device: str = "auto",
    chart: str | os.PathLike[str] | None = None,
) -> list[ModelComparison]:
    """Embed ``labelled_dir`` with every model and compare them on one split.

    Args:
        labelled_dir: a folder of photos, one subfolder per class (or any folder with
            ``labels``).
        models: preset or timm names, or fine-tune folders (``finetune --out``: the fine-tuned
            backbone against its base), in the order of the result.
        labels: a ``path,label`` CSV (paths as stored, relative to ``labelled_dir``); default:
            parent folder names.
        random_init: allow random weights, recorded as ``random`` (tests, smoke runs); without
            it a model with no real weights is skipped with the reason. A fine-tune folder
            always brings its trained weights.
        stores_dir: keep each model's store here (``MODEL.store``; reruns reuse them); default
            a temporary folder, removed afterwards.
        missing: ``error`` or ``drop`` images without a label.
        group_threshold: cosine at which near duplicates share a split group (None: 0.90).
        seed: seeds the split.
        device: where the models run and the probes train.
        chart: write a PNG bar chart of the results here.

    Raises:
        InvalidArgumentError: no models, or a duplicate name.
        ProbeError: no model could be compared, or too few labelled images per class.
    """
    if not models:
        raise InvalidArgumentError("no models given; pass e.g. efficientnet_lite0,resnet50")
    if len(set(models)) != len(models):
        raise InvalidArgumentError(f"a model is listed twice: {', '.join(models)}")
    if not os.path.isdir(labelled_dir):
        raise InvalidArgumentError(f"{labelled_dir} is not a folder of labelled photos")
    if stores_dir is None:
        with tempfile.TemporaryDirectory(prefix="embedkit-compare-") as tmp:
            return _compare(
                labelled_dir,
                models,
                labels,
                random_init,
                Path(tmp),
                missing,
                group_threshold,
                seed,
                device,
                chart,
            )
    Path(stores_dir).mkdir(parents=True, exist_ok=True)
    return _compare(
        labelled_dir,
        models,
        labels,
        random_init,
        Path(stores_dir),
        missing,
        group_threshold,
        seed,
        device,
        chart,
    )


def _compare(
    labelled_dir: str | os.PathLike[str],
    models: Sequence[str],
    labels: str | os.PathLike[str] | None,
    random_init: bool,
    stores: Path,
    missing: str,
    group_threshold: float | None,
    seed: int,
    device: str,
    chart: str | os.PathLike[str] | None,
) -> list[ModelComparison]:
    from ..classification.labels import labelled_features, split_rows
    from ..classification.train import train_probe
    from ..extraction.run import extract
    from ..models.finetuned import finetuned_folder
    from ..store.read import open_store

    if missing not in ("error", "drop"):
        raise InvalidArgumentError(f"missing must be error or drop, got {missing!r}")
    mode: Literal["error", "drop"] = "drop" if missing == "drop" else "error"
    results: dict[str, ModelComparison] = {}
    data: dict[str, Any] = {}
    for name in models:
        store = stores / f"{name.replace('/', '_')}.store"
        t0 = time.perf_counter()
        try:
            summary = extract(
                [os.fspath(labelled_dir)],
                store,
                model=name,
                random_init=random_init and finetuned_folder(name) is None,
                device=device,
            )
        except WeightsUnavailableError as e:
            results[name] = ModelComparison(name, skipped=True, reason=str(e))
            continue
        wall = time.perf_counter() - t0
        st = open_store(store)
        md = st.metadata
        results[name] = ModelComparison(
            name,
            dim=int(md["dim"]),
            weights="random" if md.get("random_init") else str(md.get("weights_source")),
            img_per_s=summary.embedded / wall if summary.embedded else None,
        )
        csv = Path(labels) if labels is not None else None
        lf = labelled_features(st, csv, missing=mode, group_threshold=group_threshold)
        data[name] = lf
    if not data:
        reasons = "; ".join(f"{r.model}: {r.reason}" for r in results.values())
        raise ProbeError(f"no model could be compared: {reasons}")

    # One split for all: rows matched by path, near-duplicate groups merged across models.
    common = sorted(set.intersection(*(set(lf.paths.tolist()) for lf in data.values())))
    if not common:
        raise ProbeError("the models embedded no image in common; check the folder")
    rows = {name: _rows_by_path(lf.paths, common) for name, lf in data.items()}
    first = next(iter(data))
    y = data[first].labels[rows[first]]
    groups = _merged_groups([lf.groups[rows[n]] for n, lf in data.items()])
    split = split_rows(y, groups, seed=seed)
    keys = np.arange(len(common), dtype=np.int64)
    for name, lf in data.items():
        probe = train_probe(
            lf.features[rows[name]],
            y,
            groups=groups,
            keys=keys,
            fingerprint=lf.fingerprint,
            seed=seed,
            device=device,
        )
        if not np.array_equal(np.sort(probe.split["test"]), np.sort(keys[split.test])):
            raise RuntimeError("train_probe split differs from the shared split (bug)")
        assert probe.test is not None and probe.knn is not None
        r = results[name]
        r.probe_acc, r.knn_acc = float(probe.test.accuracy), float(probe.knn.accuracy)
        r.n_train, r.n_test = len(split.train), len(split.test)
    ordered = [results[name] for name in models]
    if chart is not None:
        plot_comparison(ordered, chart)
    return ordered


def _rows_by_path(paths: np.ndarray, common: list[str]) -> np.ndarray:
    where = {p: i for i, p in enumerate(paths.tolist())}
    return np.asarray([where[p] for p in common], dtype=np.int64)


def _merged_groups(per_model: list[np.ndarray]) -> np.ndarray:
    """Union of every model's groups: rows grouped together by any model share a group."""
    n = len(per_model[0])
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for groups in per_model:
        first: dict[str, int] = {}
        for i, g in enumerate(groups.tolist()):
            j = first.setdefault(g, i)
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.asarray([f"g{find(i)}" for i in range(n)])


def plot_comparison(results: Sequence[ModelComparison], path: str | os.PathLike[str]) -> Path:
    """A PNG: k-NN and probe accuracy per model (left), end-to-end img/s (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in results if not r.skipped]
    fig = Figure(figsize=(max(6.0, 1.6 * len(done) + 3), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_acc, ax_speed = fig.subplots(1, 2)
    x = np.arange(len(done))
    names = [r.model for r in done]
    ax_acc.bar(x - 0.2, [r.knn_acc or 0.0 for r in done], 0.4, label="k-NN")
    ax_acc.bar(x + 0.2, [r.probe_acc or 0.0 for r in done], 0.4, label="linear probe")
    ax_acc.set(title="test accuracy (shared split)", ylim=(0, 1.25), ylabel="accuracy")
    ax_acc.legend(loc="upper center", ncol=2)
    ax_speed.bar(x, [r.img_per_s or 0.0 for r in done], 0.5, color="tab:green")
    ax_speed.set(title="end-to-end speed", ylabel="images / s")
    for ax in (ax_acc, ax_speed):
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    skipped = [r.model for r in results if r.skipped]
    if skipped:
        fig.suptitle(f"skipped (no weights): {', '.join(skipped)}", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
