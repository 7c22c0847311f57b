"""How many images go through the model per forward pass.

Defaults per (device, runtime) on CPU, from measurements; on CUDA the batch is chosen by a
short probe (``probe_batch_size``): double the batch while it fits in the free GPU memory
(with headroom) and still makes the model faster per image.
"""

from __future__ import annotations

from collections.abc import Callable

# CPU torch eager gets slower past batch 8 on small caches (measured on 2 vCPUs: batch 32
# slower than 8). ONNX Runtime on CPU: per model thread (ORT_PER_THREAD). Measured on 2 vCPUs:
# with one thread, batch 4/8/16 run at the same speed (efficientnet_lite0 80 img/s, resnet50
# 13) and smaller batches keep the decode pipeline smoother end to end (lite0 on 12 MP JPEGs
# 50.4 img/s at 8 vs 48.9 at 16); with two threads ORT needs bigger batches to use both (lite0
# 89 / 102 / 126 img/s at 4 / 8 / 16). CUDA: the start of the probe, and the batch when
# probing is off.
DEFAULT_BATCH = {("cuda", "torch"): 64, ("cpu", "torch"): 8}
ORT_PER_THREAD, ORT_MAX_BATCH = 8, 64

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
