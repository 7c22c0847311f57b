"""Extraction throughput: end-to-end vs model-only vs a naive per-image loop, in one process.

Usage: python benchmarks/extract.py [--model efficientnet_lite0] [--large 48] [--small 192]

Writes its section of benchmarks/RESULTS.md. Ratios matter, not absolute numbers: all three
are measured in the same process on the same machine, one after the other.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from embedkit.backbones import load_backbone  # noqa: E402
from embedkit.decode import default_workers  # noqa: E402
from embedkit.extract import extract  # noqa: E402


def make_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: a real photo resized to ``size``, shifted and noised per file."""
    from skimage import data

    base = Image.fromarray(data.chelsea()).resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(base).astype(np.int16)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        noise = rng.integers(-12, 12, size=(1, 1, 3), dtype=np.int16)
        grain = rng.integers(-6, 6, size=arr.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(np.roll(arr, i * 37, axis=1) + noise + grain, 0, 255).astype(np.uint8))
        p = folder / f"img_{i:04d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def model_only(backbone, n: int, batch_size: int) -> float:
    h, w = backbone.preprocess.size
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (batch_size, h, w, 3), dtype=np.uint8))
    backbone.forward(batch)  # warm-up
    done, t0 = 0, time.perf_counter()
    while done < n:
        backbone.forward(batch)
        done += batch_size
    return done / (time.perf_counter() - t0)


def naive_loop(backbone, paths: list[Path]) -> float:
    """What a first script does: open, full decode, timm transform, forward one at a time."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(backbone.model)
    tf = timm.data.create_transform(**cfg)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            x = tf(Image.open(p).convert("RGB")).unsqueeze(0)
            backbone.model(x)
    return len(paths) / (time.perf_counter() - t0)


def end_to_end(paths: list[Path], model: str, batch_size: int, workdir: Path) -> float:
    store = workdir / "bench.store"
    shutil.rmtree(store, ignore_errors=True)
    s = extract([str(paths[0].parent)], store, model=model, batch_size=batch_size)
    assert s.embedded == len(paths), s
    return s.embedded / s.wall_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--large", type=int, default=48, help="number of 12-megapixel JPEGs")
    ap.add_argument("--small", type=int, default=192, help="number of 640x480 JPEGs")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    backbone = load_backbone(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = {
            "12 MP JPEG (4000x3000)": make_jpegs(work / "large", args.large, (4000, 3000)),
            "small JPEG (640x480)": make_jpegs(work / "small", args.small, (640, 480), seed=1),
        }
        for label, paths in sets.items():
            e2e = end_to_end(paths, args.model, args.batch_size, work)
            mo = model_only(backbone, max(64, len(paths)), args.batch_size)
            naive = naive_loop(backbone, paths[: min(len(paths), 24)])
            rows.append((label, len(paths), e2e, mo, naive))

    header = ("| images | n | end-to-end img/s | model-only img/s | naive loop img/s "
              "| e2e / model-only (target >= 0.85) | e2e / naive (target >= 4 on 12 MP) |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for label, n, e2e, mo, naive in rows:
        lines.append(f"| {label} | {n} | {e2e:.1f} | {mo:.1f} | {naive:.1f} | {e2e / mo:.2f} | {e2e / naive:.1f} |")
    cpu = platform.processor() or platform.machine()
    body = "\n".join([
        f"Model `{args.model}`, batch {args.batch_size}, {default_workers()} decode worker(s), "
        f"torch {torch.__version__} on {os.cpu_count()} CPU cores ({cpu}), no GPU. "
        "End-to-end = `embedkit.extract` into a fresh store (find, hash, decode with JPEG draft, "
        "resize/crop in workers, forward, Parquet commit). Model-only = `Backbone.forward` on a "
        "ready uint8 batch of the same size. Naive = PIL open + full decode + timm transform + "
        "forward per image (first 24 files).",
        "",
        *lines,
    ])
    print(body)
    write_section("extract", "Extraction throughput (`benchmarks/extract.py`)", body)


if __name__ == "__main__":
    main()
