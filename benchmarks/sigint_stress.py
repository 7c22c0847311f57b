"""Ctrl-C under load: how often does an interrupted ``embedkit extract`` fail to exit?

Runs ``--loops`` loops at once; each runs ``embedkit extract`` ``--runs`` times on a folder of
small JPEGs (a fresh store each time), sends SIGINT to the main process a random 1-3 s
(``--delay``) after its decode workers appeared (``--from-start``: after its start), and waits
``--limit`` seconds for it to exit. A run still alive then is a hang: its threads' C stacks
are saved with gdb (when installed) and ``/proc``, then it is killed. Every run that said it
committed must leave a store that opens.

    PYTHONPATH=$PWD python benchmarks/sigint_stress.py --runs 20 --loops 2 --out /tmp/stress
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

TINY = "test_efficientnet"


def make_photos(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        base = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((320, 240), Image.Resampling.BICUBIC)
        img.save(folder / f"{i:04d}.jpg", quality=90)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _dump(pid: int, path: Path) -> None:
    """C stacks of every thread of a hung process (gdb), and each thread's kernel wait."""
    lines = []
    if shutil.which("gdb"):
        gdb = subprocess.run(
            ["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines.append(gdb.stdout[-60000:])
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            comm = (task / "comm").read_text().strip()
            wchan = (task / "wchan").read_text().strip()
        except OSError:
            continue
        lines.append(f"task {task.name} {comm} wchan={wchan}")
    path.write_text("\n".join(lines))


def one_run(
    src: Path,
    store: Path,
    limit: float,
    dumps: Path,
    tag: str,
    from_start: bool,
    code: str,
    delay: tuple[float, float],
) -> dict:
    """One interrupted run; ``code``: the embedkit checkout to run (empty: this one)."""
    shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, "-m", "embedkit", "extract", str(src), "--store", str(store),
           "--model", TINY, "--random-init"]  # fmt: skip
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": code} if code else None
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
        cwd=code or None,
    )
    while not from_start and p.poll() is None and not _children(p.pid):
        if time.monotonic() - t0 > 120:
            break
        time.sleep(0.05)
    time.sleep(random.uniform(*delay))
    if p.poll() is not None:
        return {"outcome": "finished_first", "rc": p.returncode}
    p.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        _, err = p.communicate(timeout=limit)
        outcome = "exited"
    except subprocess.TimeoutExpired:
        outcome = "hang"
        _dump(p.pid, dumps / f"hang-{tag}.txt")
        os.killpg(p.pid, signal.SIGKILL)  # the session this run started
        _, err = p.communicate()
    rec = {"outcome": outcome, "rc": p.returncode, "exit_s": time.monotonic() - sent}
    committed = err is not None and "interrupted; committed work is kept" in err
    rec["said_interrupted"] = committed
    snippet = (
        "import sys; from embedkit.store.read import open_store as o; print(len(o(sys.argv[1])))"
    )
    check = subprocess.run(
        [sys.executable, "-c", snippet, str(store)], capture_output=True, text=True
    )
    if not (store / "manifest.json").exists():
        rec["store_rows"] = "none yet"  # interrupted before the first commit
    else:
        rec["store_rows"] = int(check.stdout) if check.returncode == 0 else None
    if outcome == "hang" or p.returncode not in (0, 130, -signal.SIGINT):
        rec["stderr"] = (err or "")[-300:]
        (dumps / f"{outcome}-{tag}.stderr").write_text(err or "")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--limit", type=float, default=30.0, help="seconds to exit after SIGINT")
    ap.add_argument(
        "--delay", type=float, nargs=2, default=(1.0, 3.0), help="min and max seconds to wait"
    )
    ap.add_argument(
        "--from-start",
        action="store_true",
        help="count the 1-3 s from the process start (the signal often lands while the model "
        "loads), not from the decode workers' start",
    )
    ap.add_argument(
        "--code",
        action="append",
        default=[],
        help="an embedkit checkout for the runs (repeat: loop i uses the i-th, round robin), "
        "e.g. the code before and after a change under the same load",
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/embedkit-sigint-stress"))
    args = ap.parse_args()
    # A shell starts background jobs with SIGINT ignored, and runs would inherit that (Python
    # keeps an inherited SIG_IGN): a handler here makes them start with the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args.out.mkdir(parents=True, exist_ok=True)
    src = args.out / "photos"
    if not src.exists():
        make_photos(src, args.images)
    results: list[dict] = []
    lock = threading.Lock()

    def loop(n: int) -> None:
        for i in range(args.runs):
            store = args.out / f"store-{n}"
            code = args.code[n % len(args.code)] if args.code else ""
            rec = one_run(
                src, store, args.limit, args.out, f"{n}-{i}", args.from_start, code, args.delay
            )
            rec["code"] = code
            with lock:
                results.append(rec)
                print(n, i, rec, f"load {os.getloadavg()[0]:.1f}", flush=True)

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(args.loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for code in sorted({r["code"] for r in results}):
        print(code or "(this checkout)", summary([r for r in results if r["code"] == code]))


def summary(results: list[dict]) -> str:
    outcomes = Counter(r["outcome"] for r in results)
    signalled = outcomes["exited"] + outcomes["hang"]
    # A run that said "committed work is kept" must have a readable store (a signal during
    # start-up, before the command runs, leaves none: Python's own traceback, no such line).
    bad_store = sum(1 for r in results if r.get("said_interrupted") and r["store_rows"] is None)
    rcs = Counter(r["rc"] for r in results if r["outcome"] == "exited")
    slow = sorted(r["exit_s"] for r in results if r["outcome"] == "exited")
    median = float(np.median(slow)) if slow else float("nan")
    return (
        f"runs {len(results)}, signalled {signalled}, hangs {outcomes['hang']}, "
        f"finished before the signal {outcomes['finished_first']}, exit codes {dict(rcs)}, "
        f"unreadable stores {bad_store}, exit after SIGINT median {median:.2f}s "
        f"max {max(slow, default=0.0):.2f}s"
    )


if __name__ == "__main__":
    main()
