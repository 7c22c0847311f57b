"""Two Ray nodes on this machine against the local engine: img/s and Ray's overhead per image.

Starts a real cluster with ``ray start`` (a head and a second raylet, 2 CPUs each, token auth,
the same way tests/test_engine_ray_cluster.py does), then runs ``embedkit extract`` as a fresh
process three ways on the same JPEGs into fresh stores: the local engine, ``--engine ray`` on
a local Ray, and ``--engine ray --address`` on the two-node cluster. Both nodes share this
machine's cores, so the cluster row shows Ray's cost here, not a speed-up from more hardware.
Writes the ``ray_nodes`` section of benchmarks/RESULTS.md.

    python benchmarks/ray_nodes.py [--n 96] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _photos(d: Path, n: int, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
        img.save(d / f"{i:04d}.jpg", quality=90)
    return d


def _kill(marker: str) -> None:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    os.kill(int(entry), signal.SIGKILL)


def _extract(src: Path, store: Path, env: dict[str, str], *extra: str) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "embedkit.cli", "extract", str(src), "--store", str(store),
         "--json", *extra],
        env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"extract {' '.join(extra)} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout)
    out["process_wall_s"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="JPEGs to embed")
    ap.add_argument("--quick", action="store_true", help="24 images, no RESULTS.md")
    args = ap.parse_args()
    n = 24 if args.quick else args.n
    work = Path(tempfile.mkdtemp(prefix="ekb", dir="/tmp"))  # short: Ray's socket paths
    src = _photos(work / "photos", n, (1024, 768))
    token = secrets.token_hex(32)
    port = _free_port()
    ray_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ray_env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats"]
    rows = []
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # Warm the ONNX cache and the page cache once, so no row pays the export.
        _extract(src, work / "warm.store", env)
        local = _extract(src, work / "local.store", env)
        local_ray = _extract(src, work / "ray1.store", env, "--engine", "ray")
        head = [RAY, "start", "--head", "--port", str(port), "--temp-dir", str(work / "r"),
                "--include-dashboard", "false", "--dashboard-port", str(_free_port()),
                "--dashboard-agent-listen-port", str(_free_port()), *common]  # fmt: skip
        subprocess.run(head, env=ray_env, check=True, capture_output=True, timeout=120)
        worker = [RAY, "start", "--address", f"127.0.0.1:{port}",
                  "--dashboard-agent-listen-port", str(_free_port()), *common]  # fmt: skip
        subprocess.run(worker, env=ray_env, check=True, capture_output=True, timeout=120)
        client_env = {**env, "RAY_AUTH_TOKEN": token}
        two = _extract(src, work / "ray2.store", client_env, "--engine", "ray", "--address",
                       f"127.0.0.1:{port}")  # fmt: skip
        for name, r in (("local engine", local), ("Ray, local (1 node)", local_ray),
                        ("Ray, 2 nodes x 2 CPUs (`ray start`)", two)):  # fmt: skip
            rows.append((name, r))
    finally:
        _kill(str(work))
        shutil.rmtree(work, ignore_errors=True)

    base = rows[0][1]
    lines = [
        "| engine | process wall s | run embed s | img/s (run) | vs local | Ray cost per image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        over = (r["process_wall_s"] - base["process_wall_s"]) / n * 1000
        lines.append(
            f"| {name} | {r['process_wall_s']:.2f} | {r['embed_s']:.2f} | {r['images_per_s']:.1f}"
            f" | {base['process_wall_s'] / r['process_wall_s']:.2f}x | "
            + ("—" if r is base else f"{over:+.0f} ms")
            + " |"
        )
    load = os.getloadavg()
    body = (
        f"{n} JPEGs of 1024x768, default model (efficientnet_lite0, ONNX export cached), each "
        "row a fresh `embedkit extract` process into a fresh store; 'process wall' includes "
        "start-up, Ray's start or connect and the model load. Both nodes of the cluster run on "
        f"this machine's {os.cpu_count()} cores: the row shows what Ray costs per image here, "
        "not what more machines gain. Load average at the end "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}.\n\n" + "\n".join(lines)
    )
    print(body)
    if not args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_section

        write_section(
            "ray_nodes", "Ray: two nodes against the local engine (benchmarks/ray_nodes.py)", body
        )


if __name__ == "__main__":
    main()
