"""How this machine's cores are used by ``extract``: the thread policy (decode workers vs model
threads) and the batch policy (images per forward pass).

## Threads

How many cores this process may really use, and how to split them between decode workers
and the model's intra-op threads without oversubscribing.

Why it matters: measured on 2 vCPUs, two OpenMP threads while another process keeps a core busy
make torch 5-40x slower (barrier spin-waits), so the model gets the cores the decode workers do
not use, never more (``plan_threads``). When the user fixes neither count, ``balanced_split``
re-chooses the split from the run's measured decode and model costs; it allows exactly two
kinds of sharing, both without spin-waiting teams: one model thread beside a worker per core
(decode-bound runs), and ONNX Runtime threads with spinning off beside lightly loaded workers
(model-bound runs). ``os.cpu_count()`` is the wrong number in a container: it ignores both the
CPU affinity mask (``taskset``, ``docker --cpuset-cpus``) and the cgroup CPU quota
(``docker --cpus``, Kubernetes limits). ``usable_cores`` respects both.

## Batches

How many images go through the model per forward pass.

Defaults per (device, runtime) on CPU, from measurements; on CUDA the batch is chosen by a
short probe (``probe_batch_size``): double the batch while it fits in the free GPU memory
(with headroom) and still makes the model faster per image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..defaults import DEFAULT_BATCH, ORT_MAX_BATCH, ORT_PER_THREAD
from ..errors import InvalidArgumentError

_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadPlan:
    """The resolved split, recorded next to the vectors it produced.

    Attributes:
        cores: usable cores (affinity and cgroup quota applied).
        workers: decode worker processes.
        intra_op: model threads (torch ``set_num_threads`` / ONNX Runtime intra-op).
        source: ``policy`` (cores - workers), ``override`` (``--threads``) or ``measured``
            (``balanced_split`` from the run's own decode and model timings).
    """

    cores: int
    workers: int
    intra_op: int
    source: str

    @property
    def oversubscribed(self) -> bool:
        """True when busy workers and model threads together exceed the usable cores."""
        return self.workers + self.intra_op > self.cores

    def to_dict(self) -> dict[str, int | str]:
        return {
            "cores": self.cores,
            "workers": self.workers,
            "intra_op": self.intra_op,
            "source": self.source,
        }


def usable_cores() -> int:
    """Cores this process may run on: affinity mask, capped by the cgroup CPU quota (>= 1)."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # macOS, Windows: no affinity API in os
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        # A quota of 1.5 CPUs still lets 2 threads run, each throttled; rounding up keeps the
        # second core in use and ceil() never gives more than the quota plus one.
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cgroup_cpu_quota(
    root: Path = _CGROUP_ROOT,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> float | None:
    """The CPU quota in CPUs (``2.0`` = two cores of time per period), or None when unlimited.

    cgroup v2: ``cpu.max`` = ``"QUOTA PERIOD"`` or ``"max PERIOD"``; cgroup v1:
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 = unlimited). Every ancestor of this
    process's cgroup can limit it, so the smallest quota on the path wins.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2 unified hierarchy: "0::/path"
            for d in _ancestors(root, rel):
                q = _v2_quota(d / "cpu.max")
                if q is not None:
                    quotas.append(q)
        elif "cpu" in controllers.split(","):
            for mount in (root / "cpu,cpuacct", root / "cpu", root / "cpuacct,cpu"):
                if mount.is_dir():
                    for d in _ancestors(mount, rel):
                        q = _v1_quota(d)
                        if q is not None:
                            quotas.append(q)
                    break
    return min(quotas) if quotas else None


def plan_threads(workers: int, threads: int | None = None, cores: int | None = None) -> ThreadPlan:
    """Split the usable cores: model threads = cores - decode workers, at least 1.

    Args:
        workers: decode worker processes (0 = decoding in the model process).
        threads: explicit model thread count (``--threads``); wins over the policy.
        cores: usable cores; default ``usable_cores()``.

    Raises:
        InvalidArgumentError: ``threads`` < 1 or ``workers`` < 0.
    """
    if workers < 0:
        raise InvalidArgumentError(f"workers must be >= 0, got {workers}")
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"threads must be >= 1, got {threads}; omit it for the default")
    n = usable_cores() if cores is None else max(1, cores)
    if threads is not None:
        return ThreadPlan(n, workers, threads, "override")
    return ThreadPlan(n, workers, max(1, n - workers), "policy")


def balanced_split(
    cores: int, decode_s: float, model_s: float, *, teams_may_share: bool = False
) -> tuple[int, int]:
    """``(decode workers, model threads)`` that should embed the most images per second.

    Args:
        cores: usable cores.
        decode_s: seconds one decode worker spends per image (read, hash, decode, resize).
        model_s: core-seconds the model spends per image (forward time x threads / batch).
        teams_may_share: the runtime's thread team sleeps instead of spin-waiting (ONNX
            Runtime with spinning off), so it may share cores with decode workers.

    The predicted rate of a split is ``min(w / decode_s, t / model_s, cores / (decode_s +
    model_s))``: decoders, model, and the CPU as a whole. A multi-thread team never shares a
    core with a worker unless ``teams_may_share`` (``w + t <= cores``): spinning teams beside
    a busy process collapse 5-40x. A *single* model thread may run beside up to ``cores``
    workers, for decode-bound runs: it has no team to spin-wait, and it is busy only
    ``model_s / (decode_s + model_s)`` of the time. Within 2% of the best rate, the split with
    fewer processes and threads wins (predictions are rough; idle threads are not free).

    Measured on 2 cores, 12 MP JPEGs (`benchmarks/RESULTS.md`): efficientnet_lite0 42 img/s
    with (1, 1), 50 with (2, 1); mobilenetv2_100 44 vs 60; resnet50 (model-bound) 12.6 with
    (1, 1), 16.9 with ONNX Runtime's 2 threads beside the worker.
    """
    if cores < 1 or decode_s <= 0 or model_s <= 0:
        raise InvalidArgumentError("balanced_split needs cores >= 1 and positive timings")
    cpu_rate = cores / (decode_s + model_s)
    scored = []
    for t in range(1, cores + 1):
        for w in range(1, cores + 1):
            if w + t > cores and t > 1 and not teams_may_share:
                continue
            rate = min(w / decode_s, t / model_s, cpu_rate)
            scored.append((rate, w, t))
    best = max(rate for rate, _, _ in scored)
    near = [(w + t, -t, w) for rate, w, t in scored if rate >= 0.98 * best]
    _, neg_t, w = min(near)
    return w, -neg_t


def default_workers(cores: int | None = None) -> int:
    """Decode workers when the user does not say: usable cores - 1 (one core for the model)."""
    n = usable_cores() if cores is None else cores
    return max(1, n - 1)


# --- internals ----------------------------------------------------------------------------------


def _ancestors(mount: Path, rel: str) -> list[Path]:
    """``mount/a/b``, ``mount/a``, ``mount``: each level of the cgroup path that exists here."""
    out = []
    p = Path(rel.strip() or "/")
    while True:
        d = mount / str(p).lstrip("/")
        if d.is_dir():
            out.append(d)
        if p == p.parent:
            break
        p = p.parent
    return out


def _v2_quota(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or float(period) <= 0:
        return None
    return float(quota) / float(period)


def _v1_quota(d: Path) -> float | None:
    try:
        quota = float((d / "cpu.cfs_quota_us").read_text())
        period = float((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


# -- batch policy ----------------------------------------------------------------------------------
# Probe limits: the batch never grows past PROBE_MAX, keeps MEMORY_HEADROOM of the free memory
# for the allocator's fragmentation and other processes, and stops doubling once a doubling
# gains less than MIN_GAIN in images per second.
PROBE_START, PROBE_MAX = 32, 1024
MEMORY_HEADROOM = 0.3
MIN_GAIN = 0.05


def default_batch_size(device: str, runtime: str, threads: int = 1) -> int:
    """Images per forward pass for a device, runtime and model thread count."""
    if (device, runtime) == ("cpu", "onnx"):
        return min(ORT_MAX_BATCH, ORT_PER_THREAD * max(1, threads))
    return DEFAULT_BATCH.get((device, runtime), 16)


def probe_batch_size(
    run: Callable[[int], tuple[float, int]],
    free_bytes: int,
    *,
    start: int = PROBE_START,
    limit: int = PROBE_MAX,
) -> int:
    """The batch to use, from trial forward passes.

    Args:
        run: runs one forward pass of a given batch size and returns ``(seconds, peak bytes
            of device memory it used)``; raises ``MemoryError`` when the batch does not fit.
        free_bytes: device memory free before the probe.
        start: first batch tried (returned even when nothing larger fits; when even it does
            not fit, halved down to 1).
        limit: largest batch tried.
    """
    batch, best, best_rate = start, 0, 0.0
    while batch <= limit:
        try:
            seconds, peak = run(batch)
        except MemoryError:
            if best == 0 and batch > 1:  # not even the start fits: try smaller
                batch, limit = batch // 2, batch // 2
                continue
            break
        rate = batch / max(seconds, 1e-9)
        fits = peak <= (1 - MEMORY_HEADROOM) * free_bytes
        if best and (not fits or rate < best_rate * (1 + MIN_GAIN)):
            break
        best, best_rate = batch, rate
        if not fits:
            break
        batch *= 2
    return max(best, 1)


def probe_cuda_batch_size(forward: Callable[..., object], size: tuple[int, int]) -> int:
    """``probe_batch_size`` with real CUDA forward passes of a uint8 (N, H, W, 3) batch."""
    import time

    import torch

    def run(batch: int) -> tuple[float, int]:
        x = torch.zeros(batch, size[0], size[1], 3, dtype=torch.uint8).pin_memory()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            forward(x)  # warm-up: cuDNN picks its algorithms for this shape
            t0 = time.perf_counter()
            forward(x)
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise MemoryError from None
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base

    free, _ = torch.cuda.mem_get_info()
    batch = probe_batch_size(run, free)
    torch.cuda.empty_cache()
    return batch
