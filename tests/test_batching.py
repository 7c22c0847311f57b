"""Batch sizes: CPU defaults per runtime and threads, and the CUDA probe's logic (on fakes)."""

from __future__ import annotations

import pytest

from embedkit.defaults import ORT_MAX_BATCH
from embedkit.extraction.cores import default_batch_size, probe_batch_size
from embedkit.models.backbone import precision_of

GB = 2**30


def test_cpu_defaults():
    assert default_batch_size("cpu", "torch") == 8
    assert default_batch_size("cpu", "onnx", threads=1) == 8
    assert default_batch_size("cpu", "onnx", threads=2) == 16
    assert default_batch_size("cpu", "onnx", threads=64) == ORT_MAX_BATCH
    assert default_batch_size("cuda", "torch") == 64


def fake_gpu(per_image_bytes: int, saturates_at: int, fits: int | None = None):
    """Forward time: fixed overhead + per-image cost that stops falling past ``saturates_at``;
    ``fits``: largest batch before an out-of-memory error."""
    calls = []

    def run(batch: int) -> tuple[float, int]:
        calls.append(batch)
        if fits is not None and batch > fits:
            raise MemoryError
        per_image = 1e-3 * max(1.0, saturates_at / batch) ** 0.5 if batch < saturates_at else 1e-3
        return 0.002 + batch * per_image, batch * per_image_bytes

    return run, calls


def test_probe_doubles_while_it_gets_faster():
    run, calls = fake_gpu(per_image_bytes=10 * 2**20, saturates_at=256)
    assert probe_batch_size(run, free_bytes=40 * GB) == 256
    assert calls[0] == 32 and calls[-1] == 512  # 512 was tried and gained < 5%


def test_probe_keeps_memory_headroom_and_survives_oom():
    run, _ = fake_gpu(per_image_bytes=100 * 2**20, saturates_at=10_000)
    # 70% of 16 GB = 11.2 GB: 64 x 100 MB fits, 128 x 100 MB (12.5 GB) does not.
    assert probe_batch_size(run, free_bytes=16 * GB) == 64
    run, _ = fake_gpu(per_image_bytes=1, saturates_at=10_000, fits=100)
    assert probe_batch_size(run, free_bytes=16 * GB) == 64  # 128 ran out of memory


@pytest.mark.parametrize("fits,expected", [(20, 16), (1, 1)])
def test_probe_halves_when_even_the_start_does_not_fit(fits, expected):
    run, _ = fake_gpu(per_image_bytes=1, saturates_at=10_000, fits=fits)
    assert probe_batch_size(run, free_bytes=16 * GB) == expected


def test_cpu_precision_is_fp32():
    import torch

    assert precision_of(torch.device("cpu")) == "fp32"
