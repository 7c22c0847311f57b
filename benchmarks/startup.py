"""Whole-process wall times: what a user waits for, start-up included.

Usage: python benchmarks/startup.py [--n 120] [--reps 2] [--naive-default-threads]

Every number is one fresh ``python -m embedkit ...`` process (or a fresh naive script), timed
from spawn to exit, with the ONNX export of the default model already cached and verified (a
warm-up extract does that first, in its own cache under ``benchmarks/_work/startup``). Writes
the ``startup`` section of benchmarks/RESULTS.md. Targets, as ratios from this one run:

- ``search STORE new.jpg`` <= 2x ``search STORE stored.jpg`` (embedding one new image must
  not cost the torch + timm import, ~7 s, any more);
- ``extract`` of N six-megapixel JPEGs >= 3.5x faster than a naive per-image timm loop (a fresh
  process that imports timm, creates the model, and per file PIL-opens, applies timm's eval
  transform and runs the model);
- ``extract`` of an empty folder, reported as is.

Repeated timings are interleaved (A B A B ...) and the best kept: the machine is shared, and
the best run is the least disturbed one for every variant alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work" / "startup"
SIZE = (3000, 2000)  # 6 megapixels

NAIVE = """
import os, sys
import timm, torch
from PIL import Image
if os.environ.get("NAIVE_THREADS"):
    torch.set_num_threads(int(os.environ["NAIVE_THREADS"]))
model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
with torch.inference_mode():
    for p in sys.argv[1:]:
        model(tf(Image.open(p).convert("RGB")).unsqueeze(0))
"""


def make_photos(folder: Path, n: int) -> list[Path]:
    """Six-megapixel JPEGs: skimage photos upscaled, shifted and noised per file (made once)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:04d}.jpg" for i in range(n)]
    if all(p.is_file() for p in paths):
        return paths
    bases = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(0)
    for i, p in enumerate(paths):
        base = Image.fromarray(bases[i % len(bases)]).resize(SIZE, Image.Resampling.BICUBIC)
        arr = np.roll(np.asarray(base, dtype=np.int16), i * 53, axis=1)
        arr = arr + rng.integers(-8, 8, size=arr.shape, dtype=np.int16)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
    return paths


def run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one fresh process, and its stdout."""
    t0 = time.perf_counter()
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} ... failed:\n{out.stderr[-3000:]}")
    return wall, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument(
        "--naive-default-threads",
        action="store_true",
        help="also run the naive loop with torch's default threads (1.5-3 min under load)",
    )
    a = ap.parse_args()

    photos = make_photos(WORK / "photos", a.n)
    query = make_photos(WORK / "query", 1)[0]  # a file that is in no store
    empty = WORK / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "EMBEDKIT_CACHE": str(WORK / "cache"),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    ek = [sys.executable, "-m", "embedkit"]
    stores = WORK / "stores"
    shutil.rmtree(stores, ignore_errors=True)
    stores.mkdir(parents=True)

    # Warm-up: the first extract of the default model exports and verifies its ONNX graph
    # (from an emptied cache, so that this one-time cost is measured too).
    shutil.rmtree(WORK / "cache", ignore_errors=True)
    first, _ = run([*ek, "extract", str(photos[0]), "--store", str(stores / "warm"), "--json"], env)
    store = stores / "main"
    run([*ek, "extract", str(photos[0].parent), "--store", str(store), "--json"], env)
    run([*ek, "search", str(store), str(photos[0]), "--json"], env)  # builds the index

    best: dict[str, float] = {}
    summaries: list[dict] = []

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    for rep in range(a.reps):
        target = stores / f"x{rep}"
        wall, out = run(
            [*ek, "extract", str(photos[0].parent), "--store", str(target), "--json"], env
        )
        keep("extract", wall)
        summaries.append(json.loads(out))
        naive = [sys.executable, "-c", NAIVE, *map(str, photos)]
        if rep == 0 and a.naive_default_threads:  # slow under load (see below): once
            keep("naive_default", run(naive, env)[0])
        keep("naive_1t", run(naive, {**env, "NAIVE_THREADS": "1"})[0])
        wall, _ = run(
            [*ek, "extract", str(empty), "--store", str(stores / f"e{rep}"), "--json"], env
        )
        keep("extract_empty", wall)
        for _ in range(2):
            keep("search_new", run([*ek, "search", str(store), str(query), "--json"], env)[0])
            keep(
                "search_stored", run([*ek, "search", str(store), str(photos[1]), "--json"], env)[0]
            )
        keep("help", run([*ek, "--help"], env)[0])

    s = min(summaries, key=lambda d: d["wall_s"])
    search_ratio = best["search_new"] / best["search_stored"]
    # Against the faster of the two naive variants: the conservative ratio.
    naive_best = min(best.get("naive_default", float("inf")), best["naive_1t"])
    extract_speedup = naive_best / best["extract"]
    load = os.getloadavg()[0]
    rows = [
        ("`embedkit --help`", best["help"], ""),
        ("`search STORE stored.jpg`", best["search_stored"], ""),
        ("`search STORE new.jpg` (6 MP, not stored)", best["search_new"], ""),
        ("`extract` of an empty folder (new store)", best["extract_empty"], ""),
        (f"`extract` of {a.n} six-megapixel JPEGs (new store)", best["extract"], ""),
        (f"naive per-image timm loop, same {a.n} files, 1 torch thread", best["naive_1t"], ""),
        ("first `extract` (1 file; exports + verifies the ONNX graph)", first, "once"),
    ]
    if "naive_default" in best:
        rows.append(("naive loop, torch's default threads", best["naive_default"], "once"))
    table = ["| command (fresh process, wall) | seconds | note |", "|---|---:|---|"]
    table += [f"| {name} | {sec:.2f} | {note} |" for name, sec, note in rows]
    verdict = [
        f"- search new/stored: **{search_ratio:.2f}x** (target <= 2x: "
        f"{'met' if search_ratio <= 2 else 'MISSED'})",
        f"- extract vs the faster naive loop: **{extract_speedup:.2f}x faster** (target >= 3.5x: "
        f"{'met' if extract_speedup >= 3.5 else 'MISSED'})",
        f"- extract's own summary: wall_s {s['wall_s']:.2f} s from process start (the CLI "
        f"passes it), of which decode + model + commits (embed_s) {s['embed_s']:.2f} s; split "
        f"{s['workers']} workers / {s['threads']} threads, batch {s['batch_size']}",
    ]
    body = "\n".join(
        [
            f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs visible, load average "
            f"{load:.2f} at the end; default model (efficientnet_lite0), ONNX Runtime, its "
            f"export cached and verified beforehand. Best of {a.reps} interleaved runs "
            "(search: of 2x that).",
            "",
            *table,
            "",
            *verdict,
            "",
            "The naive loop uses random weights (`pretrained=False`): same architecture and "
            "cost, no weight file to read, so it is, if anything, flattered. It runs with one "
            "torch thread: with torch's default (2 here) its batch-1 forward swings from 0.03 "
            "to 3 s per image whenever other processes use the cores (OpenMP teams spin at "
            "barriers, see extraction/cores.py; 103 s and 179 s for the 120 files in two "
            "runs on this shared box, `--naive-default-threads`), which would flatter us. The "
            "ratio is against the faster naive variant measured. Our extract reads JPEGs in "
            "draft mode (decoding at 1/2-1/8 scale), runs decode workers beside ONNX Runtime, "
            "and no longer imports torch or timm.",
            "",
            "Wall times on this 2-core box shared with other jobs vary 2-4x between runs "
            "(load average above); the ratios, measured in the same run, are what to compare.",
        ]
    )
    print(body)
    write_section("startup", "Start-up and whole-process times (benchmarks/startup.py)", body)


if __name__ == "__main__":
    main()
