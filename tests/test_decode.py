"""DecodePool: every file exactly once, also across a resize mid-run."""

from __future__ import annotations

import pytest
from conftest import make_photo

from embedkit.extraction.pool import DecodePool
from embedkit.models.preprocess import Preprocess

PRE = Preprocess((32, 32), 1.0, "center", "bilinear", (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("new", [1, 2, 3])
def test_resize_mid_run_yields_every_file_once(tmp_path, new):
    paths = [make_photo(tmp_path / f"p{i}.jpg", i) for i in range(24)]
    seen = []
    with DecodePool(1, PRE) as pool:
        for n, (key, r) in enumerate(pool.imap_unordered(list(enumerate(map(str, paths))), 8)):
            assert r.status == "ok" and r.pixels.shape == (32, 32, 3) and r.seconds > 0
            seen.append(key)
            if n == 3:
                pool.resize(new)
        assert pool.workers == new
    assert sorted(seen) == list(range(24))


def test_resize_needs_worker_processes():
    with DecodePool(0, PRE) as pool, pytest.raises(ValueError):
        pool.resize(2)
