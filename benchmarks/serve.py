"""``embedkit serve`` latency: search by id over HTTP against ``embedkit.search`` in-process,
and thumbnail throughput.

For each size, writes a real store through ``StoreWriter`` (clustered synthetic vectors, rows
pointing at a few real JPEGs so thumbnails have something to decode), builds its index, then
times ``embedkit.search(store, [id], k=10)`` in this process (the baseline) and
``GET /api/search?id=&k=10`` against ``embedkit serve``'s app on uvicorn in a child process,
with 1 and 16 concurrent clients (keep-alive httpx clients in threads). Thumbnails: cold
(decode + resize + cache write) and cached, over HTTP. Writes the ``serve`` section of
benchmarks/RESULTS.md.

    python benchmarks/serve.py                 # 10k and 100k x 256-d, ~3 min on 2 cores
    python benchmarks/serve.py --sizes 10000   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section  # noqa: E402

N_FILES = 48  # real JPEGs the rows point at (cycled); thumbnails are per id, so all are cold
PHOTO = (1600, 1200)  # px: a phone-camera-sized JPEG, what thumbnails usually start from
CLIENTS = 16


def write_store(path: Path, n: int, dim: int, photos: Path, seed: int = 0) -> float:
    from _synthetic import synthetic_metadata

    from embedkit.store.read import STATUS_OK
    from embedkit.store.writer import StoreWriter

    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(n // 100, 1), dim)).astype(np.float32)
    meta = synthetic_metadata(dim)
    t = time.perf_counter()
    with StoreWriter(path, meta) as w:
        for s in range(0, n, 50_000):
            m = min(50_000, n - s)
            x = centers[rng.integers(0, len(centers), m)]
            x = x + 0.5 * rng.standard_normal(x.shape).astype(np.float32)
            w.add(
                ids=(np.arange(s, s + m, dtype=np.int64) * 7919 + 13).tolist(),
                roots=[str(photos)] * m,
                paths=[f"{i % N_FILES}.jpg" for i in range(s, s + m)],
                status=[STATUS_OK] * m,
                content_hash=[f"{i:064x}" for i in range(s, s + m)],
                width=[PHOTO[0]] * m,
                height=[PHOTO[1]] * m,
                embedding=x,
            )
            w.commit()
    return time.perf_counter() - t


def make_photos(folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(N_FILES):
        base = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
        Image.fromarray(base).resize(PHOTO, Image.Resampling.BICUBIC).save(
            folder / f"{i}.jpg", quality=90
        )


def pct(ms: list[float]) -> tuple[float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def in_process(store: Path, ids: np.ndarray) -> tuple[float, float]:
    import embedkit
    from embedkit.store.read import open_store

    st = open_store(store, vectors=False)  # what the server holds: opened once
    embedkit.search(st, [int(ids[0])], k=10)  # warm: vectors attached, pages cached
    times = []
    for id_ in ids.tolist():
        t = time.perf_counter()
        embedkit.search(st, [id_], k=10)
        times.append(1000 * (time.perf_counter() - t))
    return pct(times)


class Server:
    """``create_app`` on uvicorn in a child process, so the clients do not share its GIL."""

    def __init__(self, store: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        code = (
            "import uvicorn, embedkit; "
            f"uvicorn.run(embedkit.create_app({str(store)!r}, map_method='pca'), "
            f"host='127.0.0.1', port={self.port}, log_level='warning')"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        import httpx

        deadline = time.monotonic() + 300  # the app brings the index up to date at start
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                if httpx.get(self.url + "/api/config", timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def over_http(url: str, ids: np.ndarray, clients: int) -> tuple[float, float, float]:
    """p50, p99 (ms) and requests/s of ``GET /api/search?id=`` from ``clients`` threads."""
    import httpx

    chunks = np.array_split(ids, clients)
    times: list[list[float]] = [[] for _ in range(clients)]

    def run(n: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            c.get("/api/search", params={"id": str(int(chunks[n][0])), "k": 10})  # connect
            for id_ in chunks[n].tolist():
                t = time.perf_counter()
                r = c.get("/api/search", params={"id": str(id_), "k": 10})
                times[n].append(1000 * (time.perf_counter() - t))
                assert r.status_code == 200 and r.json()[0]["id"] == id_, r.text

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    flat = [x for ts in times for x in ts]
    return (*pct(flat), len(flat) / wall)


def thumbs(url: str, ids: np.ndarray) -> tuple[float, float]:
    """Thumbnails/s over HTTP: cold (decode a 1600x1200 JPEG, resize, cache) and cached."""
    import httpx

    rates = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(2):
            t = time.perf_counter()
            for id_ in ids.tolist():
                r = c.get(f"/api/images/{id_}/thumb")
                assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            rates.append(len(ids) / (time.perf_counter() - t))
    return rates[0], rates[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=320, help="per HTTP measurement")
    ap.add_argument(
        "--lib-queries", type=int, default=40, help="in-process (slow: the index reopens per call)"
    )
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = ap.parse_args()

    from embedkit.index.lifecycle import index_store

    rows = []
    with tempfile.TemporaryDirectory(prefix="embedkit-serve-bench-") as tmp:
        photos = Path(tmp) / "photos"
        make_photos(photos)
        for n in args.sizes:
            store = Path(tmp) / f"s{n}"
            write_s = write_store(store, n, args.dim, photos)
            t = time.perf_counter()
            report = index_store(store, log=lambda _m: None)
            index_s = time.perf_counter() - t
            rng = np.random.default_rng(n)
            all_ids = np.arange(n, dtype=np.int64) * 7919 + 13
            ids = rng.choice(all_ids, args.queries, replace=False)
            lib50, lib99 = in_process(store, ids[: args.lib_queries])
            with Server(store) as url:
                one = over_http(url, ids, 1)
                many = over_http(url, ids, CLIENTS)
                cold, warm = thumbs(url, all_ids[:N_FILES])
            row = {
                "n": n,
                "key": report.info.get("key"),
                "write_s": write_s,
                "index_s": index_s,
                "lib": (lib50, lib99),
                "one": one,
                "many": many,
                "thumbs": (cold, warm),
            }
            rows.append(row)
            print(row, flush=True)
            shutil.rmtree(store, ignore_errors=True)

    head = (
        "| vectors | index | in-process p50 / p99 ms | HTTP 1 client p50 / p99 ms (req/s) | "
        "in-process p50 / HTTP p50 | "
        f"HTTP {CLIENTS} clients p50 / p99 ms (req/s) | thumbs/s cold / cached |\n"
        "|---:|---|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['n']:,} | {r['key']} | {r['lib'][0]:.1f} / {r['lib'][1]:.1f} | "
        f"{r['one'][0]:.1f} / {r['one'][1]:.1f} ({r['one'][2]:.0f}) | "
        f"{r['lib'][0] / r['one'][0]:.0f}x | "
        f"{r['many'][0]:.1f} / {r['many'][1]:.1f} ({r['many'][2]:.0f}) | "
        f"{r['thumbs'][0]:.0f} / {r['thumbs'][1]:.0f} |"
        for r in rows
    ]
    body = (
        f"Search by id (k=10) over `embedkit serve` against `embedkit.search` on the same opened "
        f"store in-process; {args.dim}-d clustered synthetic vectors written through "
        f"`StoreWriter`, {args.queries} random stored ids per HTTP cell ({args.lib_queries} "
        "in-process: `embedkit.search` reopens the index and reads the row's embedding column "
        "per call, which the server does once per store version); the server is uvicorn "
        f"(one worker) in a child process, clients are keep-alive httpx clients in threads of "
        f"the benchmark process. Thumbnails: {N_FILES} ids over {PHOTO[0]}x{PHOTO[1]} JPEGs, "
        f"cold (decode, resize to 256 px, cache) then cached. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs shared with other jobs (load average {os.getloadavg()[0]:.1f} "
        "at the end: absolute times vary run to run, the ratio less). "
        "`python benchmarks/serve.py`\n\n" + head + "\n".join(lines)
    )
    print(body)
    if not args.no_write:
        write_section("serve", "embedkit serve: search latency and thumbnails", body)


if __name__ == "__main__":
    main()
