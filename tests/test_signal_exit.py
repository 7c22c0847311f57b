"""After Ctrl-C / SIGTERM has committed the store, the process leaves at once: a hang in the
interpreter's teardown (a native thread pool, a stuck thread) cannot keep it alive."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from conftest import slow_extract_command, wait_for_committed_rows

from embedkit.store.read import open_store


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_without_waiting_for_teardown(tmp_path, sig, status):
    n = 200
    # The teardown never ends (an exit handler that waits forever stands for a thread pool
    # stuck at exit).
    cmd, env, _, st = slow_extract_command(
        tmp_path, n=n, size=(640, 480), workers=1,
        prelude="import atexit, threading\natexit.register(threading.Event().wait)\n",
    )  # fmt: skip
    p = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_committed_rows(p, st, 2, timeout=180)
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
