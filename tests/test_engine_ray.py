"""RayEngine: same store as the local engine, a killed model actor, a killed driver then resume.

One local Ray instance (2 CPUs, no dashboard) is started for the module; the killed-driver test's
subprocess connects to it by address, so the kill exercises ``address=`` too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_photo

from embedkit.errors import InvalidArgumentError
from embedkit.extraction.run import extract
from embedkit.store.read import open_store

HAS_RAY = importlib.util.find_spec("ray") is not None


@pytest.fixture
def _ray_installed() -> None:
    # Ray is part of the test install (scripts/setup.sh): missing, it is a broken install, which
    # must fail the suite rather than skip these tests into a green run.
    if not HAS_RAY:
        pytest.fail("ray is not installed: pip install 'embedkit[ray]' (scripts/setup.sh does)")


needs_ray = pytest.mark.usefixtures("_ray_installed")


def test_missing_ray_says_how_to_install(monkeypatch):
    from embedkit.extraction import ray as engine_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(InvalidArgumentError, match=r"embedkit\[ray\]"):
        engine_ray.RayEngine(TINY, random_init=True)


@pytest.fixture(scope="module")
def ray_address():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _photos(d: Path, n: int) -> Path:
    for i in range(n):
        make_photo(d / f"{i:03d}.jpg", i)
    return d


def _local(src: Path, store: Path):
    return extract([src], store, model=TINY, random_init=True, workers=1, batch_size=4)


def _ray(src, store: Path, engine=None):
    from embedkit.extraction.ray import RayEngine

    engine = engine or RayEngine(TINY, random_init=True, batch_size=4, files_per_block=4)
    return extract(
        src if isinstance(src, list) else [src],
        store,
        model=TINY,
        random_init=True,
        workers=1,
        batch_size=4,
        commit_every=8,
        engine=engine,
    )


def _same_store(a_path: Path, b_path: Path) -> None:
    a, b = open_store(a_path), open_store(b_path)
    ia, ib = np.argsort(a.ids), np.argsort(b.ids)
    np.testing.assert_array_equal(a.ids[ia], b.ids[ib])
    np.testing.assert_allclose(a.vectors[ia], b.vectors[ib], rtol=1e-4, atol=1e-5)
    assert a.fingerprint == b.fingerprint
    ta, tb = a.table.sort_by("id"), b.table.sort_by("id")
    for col in ("id", "path", "content_hash", "status", "reason", "width", "height", "n_frames"):
        assert ta[col].to_pylist() == tb[col].to_pylist(), col


@needs_ray
@pytest.mark.slow
def test_ray_store_equals_local(ray_address, tmp_path):
    src = _photos(tmp_path / "photos", 10)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    make_photo(src / "copy.png", 3)  # same pixels as 003.jpg, other bytes
    local = _local(src, tmp_path / "local")
    s = _ray(src, tmp_path / "ray")
    assert (s.embedded, s.n_failed) == (local.embedded, local.n_failed) == (11, 1)
    _same_store(tmp_path / "ray", tmp_path / "local")
    # Incremental rerun through the ray engine: nothing to do; a copy reuses stored vectors.
    again = _ray(src, tmp_path / "ray")
    assert again.unchanged == 12 and again.embedded == 0
    (tmp_path / "more").mkdir()
    shutil.copy(src / "003.jpg", tmp_path / "more" / "003.jpg")
    more = _ray([src, tmp_path / "more"], tmp_path / "ray")
    assert more.reused == 1 and more.embedded == 0 and more.unchanged == 12


def _embedder_pids() -> list[int]:
    """Processes of Ray Data's model actors (Ray titles them ``ray::MapWorker(...Embedder)``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"MapWorker" in cmd and b"Embedder" in cmd:
            pids.append(int(entry))
    return pids


class _KillActorOnce:
    """Wraps a RayEngine: after the first chunk, SIGKILLs every model actor process."""

    def __init__(self, inner) -> None:
        self.inner, self.killed = inner, 0

    def run(self, tasks, known_hashes):
        for n, chunk in enumerate(self.inner.run(tasks, known_hashes)):
            if n == 0:
                for pid in _embedder_pids():
                    os.kill(pid, signal.SIGKILL)
                    self.killed += 1
            yield chunk


@needs_ray
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds actors through /proc")
def test_killed_model_actor_every_file_once(ray_address, tmp_path):
    from embedkit.extraction.ray import RayEngine

    src = _photos(tmp_path / "photos", 32)
    engine = _KillActorOnce(RayEngine(TINY, random_init=True, batch_size=4, files_per_block=4))
    s = _ray(src, tmp_path / "ray", engine=engine)
    assert engine.killed >= 1
    assert s.embedded == 32 and s.n_failed == 0
    store = open_store(tmp_path / "ray")
    assert store.table.num_rows == 32 and len(set(store.ids.tolist())) == 32
    _local(src, tmp_path / "local")
    _same_store(tmp_path / "ray", tmp_path / "local")


_DRIVER = textwrap.dedent("""
    import sys
    from embedkit.extraction.ray import RayEngine
    from embedkit.extraction.run import extract
    engine = RayEngine("test_efficientnet", random_init=True, batch_size=4, files_per_block=4,
                       address=sys.argv[3])
    extract([sys.argv[1]], sys.argv[2], model="test_efficientnet", random_init=True,
            batch_size=4, commit_every=4, engine=engine)
""")


@needs_ray
@pytest.mark.slow
def test_killed_driver_then_resume_exactly_once(ray_address, tmp_path):
    src = _photos(tmp_path / "photos", 40)
    st = tmp_path / "ray"
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    args = [sys.executable, str(script), str(src), str(st), ray_address]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill the driver once something is committed but (very likely) not everything.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        manifest = st / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["parts"]:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = open_store(st)
    assert len(set(partial.ids.tolist())) == len(partial.ids) < 40
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    store = open_store(st)
    assert store.table.num_rows == 40 and len(set(store.ids.tolist())) == 40
    assert sorted(store.paths) == sorted(f"{i:03d}.jpg" for i in range(40))
    _local(src, tmp_path / "local")
    _same_store(st, tmp_path / "local")


@needs_ray
@pytest.mark.slow
def test_cli_engine_ray_string(ray_address, tmp_path):
    """`embedkit extract --engine ray --address ADDR` goes through the same store path."""
    import json

    from typer.testing import CliRunner

    from embedkit.cli import app

    src = _photos(tmp_path / "photos", 6)
    r = CliRunner().invoke(
        app,
        [
            "extract",
            str(src),
            "--store",
            str(tmp_path / "s"),
            "--model",
            TINY,
            "--random-init",
            "--engine",
            "ray",
            "--address",
            ray_address,
            "--batch-size",
            "4",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["embedded"] == 6
    _local(src, tmp_path / "local")
    _same_store(tmp_path / "s", tmp_path / "local")
    bad = CliRunner().invoke(
        app, ["extract", str(src), "--store", str(tmp_path / "t"), "--engine", "spark"]
    )
    assert bad.exit_code == 1 and "local|ray" in bad.stderr


@needs_ray
@pytest.mark.slow
def test_ray_byte_identical_files_in_one_run_are_embedded_once(ray_address, tmp_path):
    src = _photos(tmp_path / "photos", 6)
    # 4 files per block: a.jpg lands in another block than 001.jpg, b.jpg in 004.jpg's block.
    for name in ("a.jpg", "z.jpg"):
        shutil.copy(src / "001.jpg", src / name)
    shutil.copy(src / "004.jpg", src / "b.jpg")
    s = _ray(src, tmp_path / "ray")
    assert (s.embedded, s.reused) == (6, 3)
    store = open_store(tmp_path / "ray")
    assert len(store) == 9
    for original, names in (("001.jpg", ("a.jpg", "z.jpg")), ("004.jpg", ("b.jpg",))):
        for name in names:
            np.testing.assert_array_equal(
                store.vectors[store.row_of(name)], store.vectors[store.row_of(original)]
            )
    local = _local(src, tmp_path / "local")
    assert (local.embedded, local.reused) == (6, 3)
    _same_store(tmp_path / "ray", tmp_path / "local")
