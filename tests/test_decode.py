"""DecodePool: every file exactly once, also across a resize mid-run."""

from __future__ import annotations

import pytest
from conftest import make_photo

from embedkit.extraction.pool import DecodePool, decode_file
from embedkit.models.preprocess import Preprocess

_REAL_DECODE = decode_file
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


def test_a_broken_pool_leaves_no_worker_blocked_behind(tmp_path, monkeypatch):
    # When a worker crashes, the executor SIGTERMs the others. A worker had inherited its
    # parent's SIGTERM handler (Ray's driver, a host application): it lived on, wrote its result
    # (a 150 KB crop, more than a pipe holds) to a pipe nobody read any more and blocked, and
    # the interpreter's exit waited for it forever (a hung test suite after the Ray tests).
    import multiprocessing
    import signal
    import time

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a host's handler that returns

    import embedkit.extraction.pool as pool_mod

    monkeypatch.setattr(pool_mod, "decode_file", _slow_or_crashing)  # forked workers see it
    big = Preprocess((224, 224), 1.0, "center", "bilinear", (0.5,) * 3, (0.5,) * 3)
    slow = make_photo(tmp_path / "slow.jpg", 1)
    boom = tmp_path / "boom.jpg"
    boom.write_bytes(b"x")
    try:
        with DecodePool(2, big) as pool:
            out = dict(pool.imap_unordered([(0, str(slow)), (1, str(boom))], 2))
            assert out[0].status == "ok" and out[1].reason == "decode_crash"
            stuck = [p for p in multiprocessing.active_children() if p.is_alive()]
            time.sleep(2.0)  # past the old worker's 1.5 s decode: it would be writing now
            stuck = [p for p in stuck if p.is_alive() and p.pid in _blocked_writers(p)]
    finally:
        signal.signal(signal.SIGTERM, previous)
    for p in stuck:  # do not leave this session hanging at exit when the test fails
        p.kill()
    assert stuck == []


def _slow_or_crashing(path, *args, **kw):
    import os
    import time

    if path.endswith("boom.jpg"):
        time.sleep(0.3)  # the slow file is being decoded by then
        os._exit(139)
    if path.endswith("slow.jpg"):
        time.sleep(1.5)
    return _REAL_DECODE(path, *args, **kw)


def _blocked_writers(proc):
    """{pid} when ``proc`` sleeps in a pipe write (Linux /proc), else empty."""
    try:
        with open(f"/proc/{proc.pid}/wchan") as f:
            return {proc.pid} if "pipe_write" in f.read() else set()
    except OSError:
        return set()
