"""Linear probe vs fine-tuned backbone on two real labelled sets, on the same split.

Usage: python benchmarks/finetune.py [--textiles-per-class 200] [--digits-per-class 50]
                                     [--epochs 6] [--unfreeze 3] [--lr 3e-4] [--quick]

Data (both install from PyPI): ``conformal-clip-data`` (simulated textile photos, 250x250 JPEG,
classes nominal / local / global; 1000/500/500 images) and scikit-learn's digits (1797 8x8
greyscale images upscaled to 64x64 PNG, 10 classes). Each set is subsampled (seeded, the same
count per class) and written as a labelled folder (one subfolder per class) under
``benchmarks/_work/finetune/``.

Per set, with the default model ``efficientnet_lite0`` (packaged ImageNet weights, offline):
- probe: ``embedkit.extract`` into a fresh store, then ``embedkit.train_store_probe`` (L-BFGS,
  weight decay chosen on validation);
- fine-tune: ``embedkit.finetune`` on the same folder (phase 1 head on frozen features, phase 2
  the last ``--unfreeze`` backbone units with AdamW, warm-up + cosine, early stopping).
Both split with ``split_rows`` on near-duplicate groups; the script checks that the train /
validation / test paths are identical and fails otherwise, so both test accuracies are on the
same test images. Writes the ``finetune`` section of benchmarks/RESULTS.md (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from embedkit.classification.finetune import finetune  # noqa: E402
from embedkit.classification.labels import labelled_features  # noqa: E402
from embedkit.classification.train import train_store_probe  # noqa: E402
from embedkit.extraction.run import extract  # noqa: E402

MODEL = "efficientnet_lite0"
WORK = Path(__file__).resolve().parent / "_work" / "finetune"


def textile_folder(out: Path, per_class: int, seed: int) -> Path:
    """``per_class`` textile photos of each class (seeded sample), copied to out/<class>/."""
    from conformal_clip_data import textile_simulated_root

    rng = np.random.default_rng(seed)
    shutil.rmtree(out, ignore_errors=True)
    for cls in sorted(p for p in textile_simulated_root().iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.jpg"))
        pick = sorted(rng.choice(len(files), size=min(per_class, len(files)), replace=False))
        (out / cls.name).mkdir(parents=True)
        for i in pick:
            shutil.copy2(files[i], out / cls.name / files[i].name)
    return out


def digits_folder(out: Path, per_class: int, seed: int) -> Path:
    """``per_class`` scikit-learn digits per class (seeded sample) as 64x64 grey PNGs."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    shutil.rmtree(out, ignore_errors=True)
    for y in np.unique(d.target):
        rows = np.flatnonzero(d.target == y)
        (out / str(y)).mkdir(parents=True)
        for i in sorted(rng.choice(rows, size=min(per_class, len(rows)), replace=False)):
            pixels = (d.images[i] * (255 / 16)).astype(np.uint8)  # digits are 0..16
            img = Image.fromarray(pixels).resize((64, 64), Image.Resampling.NEAREST)
            img.save(out / str(y) / f"{i:04d}.png")
    return out


def epoch_seconds(
    folder: Path, args: argparse.Namespace, n: int, rounds: int = 2
) -> dict[str, float]:
    """Phase 2 seconds per 1000 training images, whole backbone on every step (``views=0``, the
    path before the trunk cache) against the cached trunk, interleaved in this process on the
    same ``n`` crops of ``folder``; plus the cache's build time per view per 1000 images.
    """
    from types import SimpleNamespace

    from embedkit.classification.finetune import trainable_units
    from embedkit.classification.finetune_views import Phase2Inputs
    from embedkit.images.model_input import load_model_input
    from embedkit.models.backbone import load_backbone

    bb = load_backbone(MODEL, device="cpu")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files = [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]
    pixels = np.stack([load_model_input(f, bb.preprocess).pixels for f in files])
    y = np.arange(n) % 3
    split = SimpleNamespace(train=np.arange(n), val=np.arange(0), test=np.arange(0))
    for p in bb.model.parameters():
        p.requires_grad_(False)
    units = trainable_units(bb.model)[-args.unfreeze :]
    params = [p for u in units for p in u.parameters()]
    for p in params:
        p.requires_grad_(True)
    head = torch.nn.Linear(bb.dim, 3)
    opt = torch.optim.AdamW([*params, *head.parameters()], lr=1e-6)
    times: dict[str, list[float]] = {"whole": [], "cached": [], "cache_build": []}
    for _ in range(rounds):
        for views in (0, args.views):
            inputs = Phase2Inputs(bb, pixels, y, split, units, views=views,
                                  min_scale=args.min_scale, seed=0,
                                  batch_size=args.batch_size)  # fmt: skip
            rng = np.random.default_rng(0)
            t0 = time.perf_counter()
            for i in range(0, n, args.batch_size):
                pos = np.arange(i, min(n, i + args.batch_size))
                loss = torch.nn.functional.cross_entropy(
                    head(inputs.train_features(pos, rng)), torch.from_numpy(y[pos])
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
            per_k = (time.perf_counter() - t0) * 1000 / n
            times["cached" if views else "whole"].append(per_k)
            if views:
                times["cache_build"].append(inputs.seconds * 1000 / n / views)
    return {k: float(np.median(v)) for k, v in times.items()}


def run_set(name: str, folder: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    store, ft_out = work / "probe.store", work / "finetune"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(ft_out, ignore_errors=True)

    t0 = time.perf_counter()
    summary = extract([str(folder)], store, model=MODEL, device="cpu")
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = train_store_probe(store, device="cpu", knn_k=None)
    probe_s = time.perf_counter() - t0
    assert probe.test is not None
    print(f"[{name}] extract {summary.embedded} images {extract_s:.0f}s, probe "
          f"{probe.test.accuracy:.4f} in {probe_s:.1f}s", flush=True)  # fmt: skip

    def on_epoch(phase: str, row: dict[str, float]) -> None:
        if phase == "finetune":
            print(f"[{name}] epoch {int(row['epoch'])}: train loss {row['train_loss']:.3f} acc "
                  f"{row['train_acc']:.3f}, val loss {row['val_loss']:.3f} acc "
                  f"{row['val_acc']:.3f}, {row['seconds']:.0f}s", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    ft = finetune(
        folder, ft_out, model=MODEL, unfreeze=args.unfreeze, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, patience=args.patience, views=args.views,
        min_scale=args.min_scale, label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs, device="cpu", on_epoch=on_epoch,
    )  # fmt: skip
    ft_s = time.perf_counter() - t0
    info = json.loads((ft_out / "finetune.json").read_text(encoding="utf-8"))

    # Same split? The probe's split holds store ids; map them to the stored relative paths.
    data = labelled_features(store)
    path_of = dict(zip(data.keys.tolist(), data.paths.tolist(), strict=True))
    for part in ("train", "val", "test"):
        ours = sorted(path_of[int(k)] for k in probe.split[part])
        theirs = sorted(info["split"][part])
        if ours != theirs:
            raise SystemExit(
                f"[{name}] the probe and finetune {part} splits differ "
                f"({len(set(ours) ^ set(theirs))} paths): the comparison would not be fair"
            )
    epoch_s = [h["seconds"] for h in ft.history]
    timed = args.speed_images and name.split()[0] in args.speed_sets.split(",")
    speed = epoch_seconds(folder, args, args.speed_images) if timed else {}
    return {
        "n": summary.embedded, "classes": len(ft.classes),
        "split": tuple(len(info["split"][p]) for p in ("train", "val", "test")),
        "probe_acc": probe.test.accuracy, "probe_wd": probe.settings["weight_decay"],
        "head_acc": ft.test_acc_head, "ft_acc": ft.test_acc,
        "epochs": len(ft.history), "best_epoch": ft.best_epoch, "stopped_early": ft.stopped_early,
        "epoch_min": (float(np.mean(epoch_s)) / 60) if epoch_s else float("nan"),
        "extract_s": extract_s, "probe_s": probe_s, "ft_s": ft_s,
        "history": ft.history, "speed": speed, "cache_s": ft.cache_seconds,
        "views": ft.cached_views,
        "head_val": ft.head_history[-1]["val_loss"] if ft.head_history else float("nan"),
        "head_loss_plain": ft.head_loss_plain, "head_loss_views": ft.head_loss_views,
        "head_max_weight": ft.head_max_weight,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--textiles-per-class", type=int, default=300, help="1000: all 2000")
    ap.add_argument("--digits-per-class", type=int, default=50, help="200: all 1797")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--unfreeze", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--views", type=int, default=2, help="cached augmented views per image")
    ap.add_argument("--min-scale", type=float, default=0.8, help="random resized crop area")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--speed-images", type=int, default=64,
                    help="crops for the whole-vs-cached epoch timing (0: skip)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", default="textiles,digits", help="comma-separated subset to run")
    ap.add_argument("--speed-sets", default="textiles", help="sets whose epochs are timed")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (~1 min): 20 textiles / 8 digits per class, 1 epoch; "
                         "does not write RESULTS.md")  # fmt: skip
    args = ap.parse_args()
    if args.quick:
        args.textiles_per_class, args.digits_per_class, args.epochs = 20, 8, 1
        args.speed_images = min(args.speed_images, 32)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    load_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    sets = {
        "textiles (conformal-clip-data)": lambda w: textile_folder(
            w, args.textiles_per_class, args.seed
        ),
        "digits (scikit-learn, 8x8 -> 64x64)": lambda w: digits_folder(
            w, args.digits_per_class, args.seed
        ),
    }
    rows = []
    for name, make in sets.items():
        if name.split()[0] not in args.sets.split(","):
            continue
        work = WORK / name.split()[0]
        folder = make(work / "images")
        rows.append((name, run_set(name, folder, work, args)))
    total_min = (time.perf_counter() - started) / 60

    table = (
        "| data | images (classes) | train / val / test | probe test acc | finetune phase 1 "
        "(head only) test acc | fine-tuned test acc | gain vs probe (points) | 1 s.e. "
        "(points) | epochs run (best, early stop) | s / epoch (cached) | cache build s "
        "| extract + probe min | finetune min |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    ) + "\n".join(
        f"| {s} | {r['n']} ({r['classes']}) | {' / '.join(map(str, r['split']))} | "
        f"{100 * r['probe_acc']:.1f} | {100 * r['head_acc']:.1f} | **{100 * r['ft_acc']:.1f}** | "
        f"{100 * (r['ft_acc'] - r['probe_acc']):+.1f} | "
        f"{100 * np.sqrt(r['probe_acc'] * (1 - r['probe_acc']) / r['split'][2]):.1f} | "
        f"{r['epochs']} ({r['best_epoch']}, {'yes' if r['stopped_early'] else 'no'}) | "
        f"{60 * r['epoch_min']:.1f} | {r['cache_s']:.0f} | "
        f"{(r['extract_s'] + r['probe_s']) / 60:.2f} | {r['ft_s'] / 60:.2f} |"
        for s, r in rows
    )
    speed = (
        "| data | whole backbone s / 1000 train images | cached trunk s / 1000 | speed-up | "
        "cache build s / 1000 images / view |\n|---|---|---|---|---|\n"
    ) + "\n".join(
        f"| {s} | {r['speed']['whole']:.1f} | {r['speed']['cached']:.1f} | "
        f"{r['speed']['whole'] / r['speed']['cached']:.1f}x | {r['speed']['cache_build']:.1f} |"
        for s, r in rows if r["speed"]
    )  # fmt: skip
    curves = "\n".join(
        f"- {s}: phase 1 val loss {r['head_val']:.3f} (its train loss: plain crops "
        f"{r['head_loss_plain']:.3f}, augmented views {r['head_loss_views']:.3f}; max |W| "
        f"{r['head_max_weight']:.0f}); " + "; ".join(
            f"e{int(h['epoch'])} train {h['train_loss']:.3f}/{100 * h['train_acc']:.0f}% "
            f"val {h['val_loss']:.3f}/{100 * h['val_acc']:.0f}%" for h in r["history"]
        )
        for s, r in rows
    )  # fmt: skip
    print(table)
    print(speed)
    print(curves)
    print(f"total {total_min:.1f} min")
    if args.quick:
        return
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    body = (
        f"Model `{MODEL}` (packaged ImageNet weights), input 224x224 (the model's eval "
        f"preprocessing; `finetune` has no image-size option). {args.textiles_per_class} "
        f"textiles per class at most (of 1000/500/500) and {args.digits_per_class} digits per "
        "class at most (of ~180), seeded. Probe = `embedkit.extract` (ONNX Runtime) + "
        "`train_store_probe` (L-BFGS, weight decay chosen on validation accuracy). Fine-tune = "
        f"`embedkit.finetune(unfreeze={args.unfreeze}, epochs={args.epochs}, lr={args.lr:g} "
        f"(head 10x), batch_size={args.batch_size}, patience={args.patience}, "
        f"weight_decay=0.05, warmup_epochs={args.warmup_epochs}, views={args.views}, "
        f"min_scale={args.min_scale:g}, label_smoothing={args.label_smoothing:g})`: phase 1 "
        "head (L-BFGS) fitted on the pooled features of the plain training crops and of the "
        "same augmented views phase 2 trains on, weight decay of lowest validation loss; "
        "phase 2 on the frozen trunk's "
        "cached activations of `views` augmented views per training image (random resized "
        "crop, area >= min_scale, + flip), BatchNorm statistics frozen; with unfreeze=3 the "
        "trained units are `blocks.6`, `conv_head`, `bn2` (affine). Split: 70/15/15 per class, "
        "group-aware (near duplicates at cosine 0.90 on one side), seed 0; the script checks "
        "that the probe and finetune train/val/test paths are identical. Test accuracy in %, "
        "reported once (settings fixed before the run, nothing tuned on test); 1 s.e. = binomial "
        "standard "
        "error of the probe's test accuracy. 'phase 1' is finetune's own head on frozen torch "
        "features before phase 2. s / epoch: phase 2 training steps + validation. "
        f"Whole run {total_min:.1f} min; machine {platform.machine()}, {os.cpu_count()} cores "
        f"shared (load average {load_start} at the start, {load} at the end), torch "
        f"{torch.__version__} CPU, {torch.get_num_threads()} threads. "
        f"`python benchmarks/finetune.py`\n\n{table}\n\n"
        f"Phase 2 speed, whole backbone on every step (before the trunk cache; `views=0`) vs "
        f"the cached trunk, {args.speed_images} crops, interleaved in the same process, median "
        f"of 2 rounds:\n\n{speed}\n\n"
        f"Phase 2 curves (loss / accuracy):\n\n{curves}\n"
    )
    write_section("finetune", "Linear probe vs fine-tuning (`benchmarks/finetune.py`)", body)


if __name__ == "__main__":
    main()
