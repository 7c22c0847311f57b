"""The automatic decode/model split on decode-heavy folders: 4K PNGs and a PNG + JPEG mix.

Each row is a fresh ``embedkit extract`` process into a fresh store (default model, its ONNX
export cached), once with the split extract chooses from the run's own timings and once with
each fixed split of the cores. Writes the ``split`` section of benchmarks/RESULTS.md.

    python benchmarks/split.py [--pngs 40] [--jpegs 120]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _pngs(d: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 255, (27, 48, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((3840, 2160), Image.Resampling.BICUBIC))
        noisy = img.astype(np.int16) + rng.integers(-6, 6, img.shape)  # real photos are not smooth
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")


def _jpegs(d: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    for i in range(n):
        base = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((640, 480), Image.Resampling.BICUBIC)
        img.save(d / f"s{i:03d}.jpg", quality=90)


def _run(src: Path, store: Path, *opts: str) -> tuple[float, str]:
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "embedkit.cli", "extract", str(src), "--store", str(store), *opts],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    cores = next((ln for ln in r.stdout.splitlines() if ln.startswith("cores:")), "")
    # "cores: 2 decode worker(s), 1 model thread(s), batch 8 (...)" -> "2 workers + 1 thread"
    parts = cores.removeprefix("cores: ").split(",")
    split = (
        f"{parts[0].split()[0]} workers + {parts[1].split()[0]} threads" if len(parts) > 1 else "?"
    )
    return wall, split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pngs", type=int, default=40)
    ap.add_argument("--jpegs", type=int, default=120)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eksplit"))
    try:
        png, mixed = work / "png", work / "mixed"
        png.mkdir()
        _pngs(png, args.pngs)
        shutil.copytree(png, mixed)
        _jpegs(mixed, args.jpegs)
        _run(png, work / "warm.store")  # the ONNX export and the page cache, once
        cores = os.cpu_count() or 2
        # every split of the cores, and the one-worker split with a thread per core (which an
        # earlier version chose for 4K PNGs: 18-19 s against 12 s)
        pairs = sorted({(w, max(1, cores - w)) for w in range(1, cores + 1)} | {(1, cores)})
        fixed = [("--workers", str(w), "--threads", str(t)) for w, t in pairs]
        lines = [
            "| folder | split | chosen as | wall s | vs best fixed |",
            "|---|---|---|---:|---:|",
        ]
        folders = [(f"{args.pngs} 4K PNGs", png)]
        folders.append((f"{args.pngs} 4K PNGs + {args.jpegs} 640x480 JPEGs", mixed))
        for name, src in folders:
            auto = _run(src, work / "s.store")
            runs = [(" ".join(f), *_run(src, work / "s.store", *f)) for f in fixed]
            best = min(w for _, w, _ in runs)
            lines.append(
                f"| {name} | {auto[1]} | automatic | {auto[0]:.2f} | {auto[0] / best:.2f}x |"
            )
            for opts, wall, split in runs:
                lines.append(f"| {name} | {split} | `{opts}` | {wall:.2f} | {wall / best:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    body = (
        "Whole-process wall time of `embedkit extract` (default model, ONNX export cached) into a "
        f"fresh store; {os.cpu_count()} cores; load average at the end {load[0]:.1f}. The "
        "automatic split is chosen from the run's own decode and model timings after 2 batches "
        "(extraction/cores.py).\n\n" + "\n".join(lines)
    )
    print(body)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import write_section

    write_section(
        "split", "Decode/model split on decode-heavy folders (`benchmarks/split.py`)", body
    )


if __name__ == "__main__":
    main()
