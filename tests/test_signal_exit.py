"""After Ctrl-C / SIGTERM has committed the store, the process leaves at once: a hang in the
interpreter's teardown (a native thread pool, a stuck thread) cannot keep it alive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, make_photo

from embedkit.store.read import open_store


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_without_waiting_for_teardown(tmp_path, sig, status):
    src = tmp_path / "photos"
    n = 200
    for i in range(n):
        make_photo(src / f"{i:03d}.jpg", i, size=(640, 480))
    st = tmp_path / "s"
    script = tmp_path / "cli.py"
    # The teardown never ends (an exit handler that waits forever stands for a thread pool
    # stuck at exit); commits every 2 rows, so the signal lands with rows committed.
    script.write_text(
        "import atexit, threading\n"
        "from embedkit.extraction import run\n"
        "run.extract.__kwdefaults__['commit_every'] = 2\n"
        "atexit.register(threading.Event().wait)\n"
        "from embedkit.cli import main\nmain()\n"
    )
    cmd = [sys.executable, str(script), "extract", str(src), "--store", str(st),
           "--model", TINY, "--random-init", "--workers", "1", "--batch-size", "1",
           "--runtime", "torch"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None:
            if (st / "manifest.json").exists() and len(open_store(st, vectors=False)) >= 2:
                break
            time.sleep(0.05)
        assert p.poll() is None, "the run ended before the signal could be sent"
        p.send_signal(sig)
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the interrupted run hung in the interpreter's teardown")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == status, err
    assert "committed work is kept" in err and "Traceback" not in err, err
    store = open_store(st)
    assert 0 < len(store) <= n and len(set(store.paths)) == len(store)
