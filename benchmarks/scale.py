"""Search past RAM at scale: the on-disk IVF-PQ index on synthetic clustered vectors.

Writes a real store (Parquet parts through ``StoreWriter``) of ``--n`` clustered vectors of
``--dim`` floats, generated in chunks (never all in memory), then builds ``OnDiskIndex`` from it
in a child process, whose peak RSS is the build + search footprint. Reports build time by
phase, peak RSS, queries/s (batched and one at a time) and recall@10 against an exact streamed
scan on fresh queries. Writes the ``scale`` section of benchmarks/RESULTS.md.

    python benchmarks/scale.py            # 10M x 64-d (~2.6 GB of vectors, ~15-20 min on 2 cores)
    python benchmarks/scale.py --quick    # 200k x 64-d, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHUNK = 500_000  # rows generated and committed per part
CENTERS = 4096  # clusters of the synthetic data
NOISE = 0.6  # within-cluster standard deviation (centers ~ N(0, 1) per dim)


def centers(dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(CENTERS, dim)).astype(np.float32)


def sample(c: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, len(c), n)]
    x += NOISE * rng.standard_normal(x.shape, dtype=np.float32)
    return x


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (reset by exec) where /proc has it; ru_maxrss of a child
    would also count the RSS its parent had when it forked."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def write_store(path: Path, n: int, dim: int, seed: int) -> float:
    from _synthetic import synthetic_metadata

    from embedkit.store.read import STATUS_OK
    from embedkit.store.writer import StoreWriter

    shutil.rmtree(path, ignore_errors=True)
    c = centers(dim, seed)
    meta = synthetic_metadata(dim)
    t = time.perf_counter()
    with StoreWriter(path, meta) as w:
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            ids = np.arange(s, s + m, dtype=np.int64) * 2 + 1  # ids are not row numbers
            w.add(
                ids=ids,
                roots=["/synthetic"] * m,
                paths=[f"{i}.jpg" for i in range(s, s + m)],
                status=[STATUS_OK] * m,
                embedding=sample(c, m, seed + 1 + s // CHUNK),
            )
            w.commit()
    return time.perf_counter() - t


def build_and_search(
    store: Path, out: Path, dim: int, seed: int, queries: int, shard_rows: int, key: str | None
) -> dict:
    """Runs in the child process: its peak RSS is what the build and searches needed."""
    from embedkit.index.ondisk import OnDiskIndex, recall_at_k

    t = time.perf_counter()
    index = OnDiskIndex.build(store, out, shard_rows=shard_rows, key=key, seed=seed)
    build_s = time.perf_counter() - t
    c = centers(dim, seed)
    tune_q = sample(c, 200, seed + 10_000)
    t = time.perf_counter()
    index.tune(queries=tune_q)  # fresh queries: stored ones would find themselves
    tune_s = time.perf_counter() - t
    q = sample(c, queries, seed + 20_000)
    t = time.perf_counter()
    truth = index.exact(q)
    exact_s = time.perf_counter() - t
    index.search(q[:10], 10)  # warm the page cache a little, as a running service would be
    t = time.perf_counter()
    _, found = index.search(q, 10)
    batch_s = time.perf_counter() - t
    t = time.perf_counter()
    for row in q[:200]:
        index.search(row[None], 10)
    single_s = (time.perf_counter() - t) / 200
    rss = peak_rss_bytes()
    disk = {p.name: p.stat().st_size for p in index.data_dir.iterdir()}  # the build's folder
    return {
        "key": index.info["key"],
        "n": index.n,
        "dim": dim,
        "shards": index.info["shards"],
        "train_size": index.info["train_size"],
        "phases": index.info["build"],
        "build_s": build_s,
        "build_phases_s": sum(index.info["build"].values()),  # stream + train + add + merge
        "tune_s": tune_s,
        "params": index.params,
        "recall_at_10": recall_at_k(found, truth),
        "queries": queries,
        "qps_batch": queries / batch_s,
        "ms_single": 1000 * single_s,
        "exact_scan_qps": queries / exact_s,
        "peak_rss": rss,
        "disk": disk,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="200k vectors")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--key", default=None, help="factory key (default: ondisk_key(n, dim))")
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedkit-scale"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the store and index")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument(
        "--section", default="scale", help="RESULTS.md section to write (one per key compared)"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.n, args.shard_rows = 200_000, 50_000
    store, out = args.work / "store", args.work / "index"
    if args.child:
        res = build_and_search(
            store, out, args.dim, args.seed, args.queries, args.shard_rows, args.key
        )
        print(json.dumps(res))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"writing a store of {args.n} x {args.dim} ...", flush=True)
    write_s = write_store(store, args.n, args.dim, args.seed)
    store_bytes = sum(p.stat().st_size for p in (store / "parts").iterdir())
    print(f"  {write_s:.0f} s, {store_bytes / 1e9:.2f} GB of parts", flush=True)
    child = [
        sys.executable,
        __file__,
        "--child",
        "--n",
        str(args.n),
        "--dim",
        str(args.dim),
        "--queries",
        str(args.queries),
        "--shard-rows",
        str(args.shard_rows),
        "--work",
        str(args.work),
        "--seed",
        str(args.seed),
    ]
    if args.key:
        child += ["--key", args.key]
    if args.quick:
        child.append("--quick")
    done = subprocess.run(child, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    r = json.loads(done.stdout.strip().splitlines()[-1])
    r.update(write_s=write_s, store_bytes=store_bytes)
    print(json.dumps(r, indent=1))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    if not args.no_write:
        from _results import write_section

        write_section(
            args.section,
            f"Search past RAM: on-disk {r['key']} (`benchmarks/scale.py`)",
            report(r, args.quick),
        )


def report(r: dict, quick: bool) -> str:
    from embedkit.index.ondisk import ondisk_key

    gb = 1e9
    p = r["phases"]
    default = ondisk_key(r["n"], r["dim"])
    key_note = (
        ""
        if r["key"] == default
        else f" Key `{r['key']}` given with `--key` (the default `ondisk_key` would be "
        f"`{default}`)."
    )
    disk = r["disk"]
    load = os.getloadavg()[0]
    lines = [
        f"{r['n']:,} synthetic clustered vectors ({CENTERS} Gaussian clusters, noise {NOISE}) "
        f"of dim {r['dim']}, cosine, written as a real store ({r['store_bytes'] / gb:.2f} GB of "
        f"Parquet parts in {r['write_s']:.0f} s), then `OnDiskIndex.build` in a child process. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the "
        f"end{'; --quick run' if quick else ''}.{key_note}",
        "",
        "| key | n | shards | train points | stream s | train s | add s | merge s | build total s "
        "| tune s | peak RSS GB | lists GB | raw vectors GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| `{r['key']}` | {r['n']:,} | {r['shards']} | {r['train_size']:,} | "
        f"{p['stream_s']:.0f} | {p['train_s']:.0f} | {p['add_s']:.0f} | {p['merge_s']:.0f} | "
        f"{r['build_s']:.0f} | {r['tune_s']:.0f} | {r['peak_rss'] / gb:.2f} | "
        f"{disk.get('lists.ivfdata', 0) / gb:.2f} | {disk.get('vectors.f32', 0) / gb:.2f} |",
        "",
        "| nprobe | k_factor | recall@10 (vs exact, fresh queries) | queries | batched q/s "
        "| one query ms | exact streamed scan q/s |",
        "|---|---|---|---|---|---|---|",
        f"| {r['params']['nprobe']} | {r['params']['k_factor']} | {r['recall_at_10']:.3f} | "
        f"{r['queries']} | {r['qps_batch']:.0f} | {r['ms_single']:.2f} | "
        f"{r['exact_scan_qps']:.1f} |",
        "",
        "Peak RSS covers build, tuning, the exact ground truth and the searches; the lists and raw "
        "vectors are memory-mapped and were in the page cache (a warm service). Recall and "
        "params come from `tune()` on 200 other fresh queries (target recall@10 >= 0.95).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
