"""RayEngine on a real two-node Ray cluster started with ``ray start`` on this machine.

The module fixture starts a head (``ray start --head --num-cpus 2``) and a second raylet
(``ray start --address ... --num-cpus 2``) with token authentication (``RAY_AUTH_MODE=token`` and
a fresh ``RAY_AUTH_TOKEN`` for both nodes), in their own temp folder and on free ports, and kills
exactly those processes afterwards (found by that temp folder in their command line), so other
Ray instances on the machine are left alone. The client side only gets ``RAY_AUTH_TOKEN``: the
engine must turn token auth on by itself.

Plan sizing (``plan_pool``) is also tested without a cluster, as plain functions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_photo

from embedkit.errors import RayClusterError
from embedkit.extraction.ray_fit import Node, PoolPlan, plan_pool
from embedkit.extraction.run import extract
from embedkit.store.read import open_store

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _plan(cpus: list[float], gpus: list[float] | None = None, **kw: object) -> PoolPlan | str:
    gpus = gpus or [0.0] * len(cpus)
    pairs = enumerate(zip(cpus, gpus, strict=True))
    nodes = [Node(f"n{i}", f"10.0.0.{i}", c, g) for i, (c, g) in pairs]
    args: dict = {"concurrency": None, "actor_cpus": 1, "batch_size": None}
    args.update(kw)
    return plan_pool(nodes, cpu_batch=16, gpu_batch=64, **args)


def test_plan_pool_from_each_node():
    # Two 2-CPU nodes: one 1-CPU actor per node (half the CPUs), two CPUs left to decode.
    assert _plan([2, 2]) == PoolPlan(2, 0, 1, 16)
    # 4 CPUs in total but no node has 4: a 4-CPU actor does not fit, and the error says so.
    msg = _plan([2, 2], actor_cpus=4)
    assert isinstance(msg, str)
    assert "needs 4 CPU(s) on one node" in msg and "largest node has 2" in msg
    assert "10.0.0.0 2 CPU" in msg
    # One CPU: an actor would hold it and decoding never start (the old endless 0/10).
    msg = _plan([1])
    assert isinstance(msg, str) and "need 2 CPUs, the cluster has 1" in msg
    # GPUs: one actor per whole GPU across nodes, CPUs left for decoding.
    assert _plan([8, 8], [1, 2]) == PoolPlan(3, 1, 0, 64)
    assert isinstance(_plan([8], [1], concurrency=2), str)
    # An explicit concurrency that no node layout fits.
    msg = _plan([2, 2], concurrency=5)
    assert isinstance(msg, str) and "fit 4" in msg


def test_watchdog_turns_a_stall_into_a_line_then_an_error(monkeypatch):
    from embedkit.extraction import ray_watch

    def slow():
        yield 1
        time.sleep(30)  # a cluster that stopped answering
        yield 2

    monkeypatch.setattr(ray_watch, "NOTICE_S", 0.3)
    said: list[str] = []
    got = []
    t0 = time.monotonic()
    with pytest.raises(RayClusterError, match=r"no results from the Ray cluster for 1 s \(2 n"):
        for x in ray_watch.watched(slow(), 1.0, lambda: "2 nodes", said.append):
            got.append(x)
    assert got == [1] and time.monotonic() - t0 < 5
    assert said and "waiting for results" in said[0]
    assert list(ray_watch.watched(iter(range(5)), 1.0, str, said.append)) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        list(ray_watch.watched(broken(), 1.0, str, said.append))


# --- the real cluster -----------------------------------------------------------------------


def _ray_bin() -> str:
    path = Path(sys.executable).with_name("ray")
    if not path.exists():
        pytest.fail(f"ray CLI not found next to {sys.executable}: pip install 'embedkit[ray]'")
    return str(path)


def _our_pids(marker: str) -> list[int]:
    """Processes whose command line names our cluster's temp folder (ours, nobody else's)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
    return pids


def _kill(marker: str) -> None:
    # Not `ray stop --force`: it kills every Ray process on the machine, other users' too.
    for _ in range(3):
        pids = _our_pids(marker)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    if importlib.util.find_spec("ray") is None:
        pytest.fail("ray is not installed: pip install 'embedkit[ray]' (scripts/setup.sh does)")
    # Short path: Ray's unix sockets live under it (107-byte limit).
    temp = tempfile.mkdtemp(prefix="ekr", dir="/tmp")
    port = _free_port()
    token = secrets.token_hex(32)  # the format `ray get-auth-token --generate` writes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus", "2", "--disable-usage-stats", "--num-gpus", "0"]
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    try:
        head = [
            _ray_bin(), "start", "--head", "--port", str(port), "--temp-dir", temp,
            "--include-dashboard", "false", "--dashboard-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()), *common,
        ]  # fmt: skip
        r = subprocess.run(head, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"ray start --head failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
        address = f"127.0.0.1:{port}"
        worker = [
            _ray_bin(), "start", "--address", address,
            "--dashboard-agent-listen-port", str(_free_port()), *common,
        ]  # fmt: skip
        r = subprocess.run(worker, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"second node failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
        # The client has the token but not RAY_AUTH_MODE: the engine must turn token auth on.
        os.environ["RAY_AUTH_TOKEN"] = token
        os.environ.pop("RAY_AUTH_MODE", None)
        os.environ.pop("RAY_ADDRESS", None)
        yield address
    finally:
        import ray

        with contextlib.suppress(Exception):
            ray.shutdown()
        _kill(temp)
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _photos(d: Path, n: int) -> Path:
    for i in range(n):
        make_photo(d / f"{i:03d}.jpg", i)
    return d


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 150):
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "embedkit.cli", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r, time.monotonic() - t0


def _extract_args(src: Path, store: Path, *extra: str) -> list[str]:
    return ["extract", str(src), "--store", str(store), "--model", TINY, "--random-init",
            "--batch-size", "4", "--json", *extra]  # fmt: skip


@pytest.mark.slow
def test_two_nodes_same_store_as_local_and_quiet(cluster, tmp_path):
    src = _photos(tmp_path / "photos", 10)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    r, _ = _cli(_extract_args(src, tmp_path / "ray", "--engine", "ray", "--address", cluster))
    assert r.returncode == 0, r.stderr[-3000:]
    # Quiet by default: nothing from Ray on stderr (was 33 lines of INFO/warnings).
    assert r.stderr.strip() == "", r.stderr[-3000:]
    extract([src], tmp_path / "local", model=TINY, random_init=True, workers=1, batch_size=4)
    a, b = open_store(tmp_path / "ray"), open_store(tmp_path / "local")
    ia, ib = np.argsort(a.ids), np.argsort(b.ids)
    np.testing.assert_array_equal(a.ids[ia], b.ids[ib])
    assert len(a.ids) == 10
    np.testing.assert_allclose(a.vectors[ia], b.vectors[ib], rtol=1e-4, atol=1e-5)
    ta, tb = a.table.sort_by("id"), b.table.sort_by("id")
    for col in ("id", "path", "content_hash", "status", "reason"):
        assert ta[col].to_pylist() == tb[col].to_pylist(), col
    # --verbose shows Ray's lines again (RAY_ADDRESS instead of --address, too).
    r, _ = _cli(
        _extract_args(_photos(tmp_path / "few", 2), tmp_path / "v", "--engine", "ray", "--verbose"),
        env={"RAY_ADDRESS": cluster},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "INFO" in r.stderr and "Connect" in r.stderr


@pytest.mark.slow
def test_demand_no_node_fits_fails_fast(cluster, tmp_path, capsys):
    from embedkit.extraction.ray import RayEngine

    src = _photos(tmp_path / "photos", 3)
    # 3 CPUs per model actor: 4 CPUs in the cluster, but no single node has 3.
    engine = RayEngine(TINY, random_init=True, address=cluster, actor_cpus=3, resource_wait_s=2)
    t0 = time.monotonic()
    with pytest.raises(RayClusterError) as e:
        extract([src], tmp_path / "s", model=TINY, random_init=True, engine=engine)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "needs 3 CPU(s) on one node" in msg and "largest node has 2" in msg
    assert "waited 2 s" in msg and "\n" not in msg
    # The bounded wait said what it waits for, instead of a frozen bar.
    assert "waiting for resources" in capsys.readouterr().err


@pytest.mark.slow
def test_no_results_in_time_stops_with_one_line(cluster, tmp_path):
    src = _photos(tmp_path / "photos", 3)
    # Model actors take seconds to start: 0.5 s without a result is a stall here.
    args = _extract_args(src, tmp_path / "s", "--engine", "ray", "--address", cluster)
    r, took = _cli(args, env={"EMBEDKIT_RAY_STALL_S": "0.5"})
    assert r.returncode == 1 and took < 60, (took, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "no results from the Ray cluster for 0.5 s (2 alive node(s), free now:" in lines[0]


@pytest.mark.slow
def test_every_node_checks_the_images_are_readable(cluster, tmp_path):
    import ray

    from embedkit.extraction.ray_cluster import connect, default_log_file
    from embedkit.extraction.ray_fit import alive_nodes, check_readable

    src = _photos(tmp_path / "photos", 3)
    conn = connect(ray, cluster, verbose=False, log_file=default_log_file())
    try:
        nodes = alive_nodes(ray)
        assert len(nodes) == 2 and {n.cpus for n in nodes} == {2.0}
        check_readable(ray, [str(p) for p in sorted(src.iterdir())], nodes)  # all readable
        gone = tmp_path / "not-on-the-nodes" / "x.jpg"  # e.g. a local disk the nodes lack
        with pytest.raises(RayClusterError) as e:
            check_readable(ray, [str(src / "000.jpg"), str(gone)], nodes)
        msg = str(e.value)
        assert f"cannot read {gone}" in msg and "Ray node " in msg and "shared filesystem" in msg
    finally:
        if conn.started:
            ray.shutdown()


@pytest.mark.slow
def test_unreachable_or_refused_is_one_line_within_seconds(cluster, tmp_path):
    src = _photos(tmp_path / "photos", 1)
    closed = f"127.0.0.1:{_free_port()}"
    r, took = _cli(_extract_args(src, tmp_path / "a", "--engine", "ray", "--address", closed))
    assert r.returncode == 1 and took < 15, (took, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and closed in lines[0] and "Traceback" not in r.stderr
    assert "ray start --head" in lines[0]
    # The right address without the token: refused, and the line says what was tried.
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    env = {"HOME": str(home), "RAY_AUTH_TOKEN": "", "RAY_AUTH_MODE": "disabled"}
    r, took = _cli(_extract_args(src, tmp_path / "b", "--engine", "ray", "--address", cluster), env)
    assert r.returncode == 1 and took < 30, (took, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and cluster in lines[0] and "Traceback" not in r.stderr
    assert "refused this client" in lines[0] and "RAY_AUTH_MODE=disabled" in lines[0]


class _KillNodeAfterFirstChunk:
    """Wraps a RayEngine: after the first chunk, SIGKILLs a worker node's raylet (node death)."""

    def __init__(self, inner, marker: str) -> None:
        self.inner, self.marker, self.killed = inner, marker, 0

    def run(self, tasks, known_hashes):
        for n, chunk in enumerate(self.inner.run(tasks, known_hashes)):
            if n == 0:
                for pid in _our_pids(self.marker):
                    if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                        os.kill(pid, signal.SIGKILL)
                        self.killed += 1
            yield chunk


@pytest.mark.slow
def test_worker_node_killed_mid_run_every_file_once(cluster, tmp_path):
    """Last in the module: it adds a third node and kills it while the run uses it."""
    from embedkit.extraction.ray import RayEngine

    victim = f"victim{secrets.token_hex(4)}"
    r = subprocess.run(
        [_ray_bin(), "start", "--address", cluster, "--num-cpus", "2", "--num-gpus", "0",
         "--disable-usage-stats", "--dashboard-agent-listen-port", str(_free_port()),
         "--resources", f'{{"{victim}": 1}}'],
        env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    src = _photos(tmp_path / "photos", 30)
    inner = RayEngine(TINY, random_init=True, address=cluster, batch_size=2, files_per_block=2)
    engine = _KillNodeAfterFirstChunk(inner, victim)
    st = tmp_path / "ray"
    try:
        s = extract([src], st, model=TINY, random_init=True, commit_every=4, engine=engine)
        finished = s.embedded + s.n_failed
    except RayClusterError as e:  # stopped: what was committed must stay, the rerun finishes it
        finished = -1
        assert "\n" not in str(e)
    assert engine.killed == 1
    again = extract([src], st, model=TINY, random_init=True, engine=RayEngine(
        TINY, random_init=True, address=cluster, batch_size=2, files_per_block=2))  # fmt: skip
    store = open_store(st)
    assert store.table.num_rows == 30 and len(set(store.ids.tolist())) == 30
    assert set(store.table["status"].to_pylist()) == {"ok"}
    assert finished in (-1, 30) and (finished == -1 or again.embedded == 0)
    extract([src], tmp_path / "local", model=TINY, random_init=True, workers=1, batch_size=4)
    b = open_store(tmp_path / "local")
    ia, ib = np.argsort(store.ids), np.argsort(b.ids)
    np.testing.assert_allclose(store.vectors[ia], b.vectors[ib], rtol=1e-4, atol=1e-5)
