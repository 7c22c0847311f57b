"""Thread policy: usable cores (affinity, cgroup quota) and the workers/model-threads split."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embedkit.errors import InvalidArgumentError
from embedkit.extraction import cores as threads
from embedkit.extraction.cores import cgroup_cpu_quota, plan_threads, usable_cores


def test_policy_is_cores_minus_workers_at_least_one():
    assert plan_threads(workers=1, cores=4).intra_op == 3
    assert plan_threads(workers=0, cores=4).intra_op == 4
    p = plan_threads(workers=3, cores=4)
    assert (p.intra_op, p.source, p.oversubscribed) == (1, "policy", False)
    assert plan_threads(workers=6, cores=4).intra_op == 1  # never 0, never negative


def test_override_wins_and_says_so():
    p = plan_threads(workers=1, threads=4, cores=2)
    assert (p.intra_op, p.source, p.oversubscribed) == (4, "override", True)
    assert p.to_dict() == {"cores": 2, "workers": 1, "intra_op": 4, "source": "override"}


@pytest.mark.parametrize("kw", [{"workers": 1, "threads": 0}, {"workers": -1}])
def test_bad_values_are_refused(kw):
    with pytest.raises(InvalidArgumentError, match=">= "):
        plan_threads(**kw)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_usable_cores_respects_affinity_in_a_subprocess():
    one = min(os.sched_getaffinity(0))
    code = textwrap.dedent(f"""
        import os
        os.sched_setaffinity(0, {{{one}}})
        from embedkit.extraction.cores import usable_cores, plan_threads, default_workers
        print(usable_cores(), plan_threads(workers=0).intra_op, plan_threads(workers=2).intra_op,
              default_workers())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "1", "1"]
    # And the parent is untouched.
    assert usable_cores() >= 1


def test_quota_caps_cores(monkeypatch):
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 0.5)
    assert usable_cores() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 1.5)
    assert usable_cores() == min(2, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    assert usable_cores() == len(os.sched_getaffinity(0))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_cpu_max_smallest_on_the_path_wins(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "proc_cgroup"
    _write(proc, "0::/kubepods/pod1/ctr\n")
    _write(root / "kubepods" / "cpu.max", "max 100000\n")
    _write(root / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    _write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "400000 100000\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.5)
    _write(root / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(4.0)
    _write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, proc) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "proc_cgroup"
    _write(proc, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    d = root / "cpu,cpuacct" / "docker" / "abc"
    _write(d / "cpu.cfs_quota_us", "200000\n")
    _write(d / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(2.0)
    _write(d / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(root, proc) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "none", tmp_path / "missing") is None


def test_balanced_split_decode_bound_gives_decoders_every_core():
    # Measured on 2 cores, 12 MP JPEGs: decode 20.5 ms, efficientnet_lite0 12 core-ms.
    assert threads.balanced_split(2, 0.0205, 0.012) == (2, 1)
    assert threads.balanced_split(1, 0.0205, 0.012) == (1, 1)


def test_balanced_split_model_bound_gives_the_model_the_rest():
    # resnet50: 75 core-ms per image; one decoder keeps up, the model takes the other cores.
    assert threads.balanced_split(2, 0.020, 0.075) == (1, 1)
    assert threads.balanced_split(16, 0.020, 0.075) == (4, 12)
    assert threads.balanced_split(8, 0.001, 0.1) == (1, 7)


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("decode_s", [0.002, 0.02, 0.2])
@pytest.mark.parametrize("model_s", [0.002, 0.02, 0.2])
def test_balanced_split_never_shares_a_core_with_a_thread_team(cores, decode_s, model_s):
    w, t = threads.balanced_split(cores, decode_s, model_s)
    assert 1 <= w <= cores and 1 <= t <= cores
    assert w + t <= cores or t == 1  # a multi-thread team only on cores no worker uses
    # No split of the same kind is predicted to be more than 2% faster.
    rate = min(w / decode_s, t / model_s, cores / (decode_s + model_s))
    for t2 in range(1, cores + 1):
        for w2 in range(1, cores + 1):
            if w2 + t2 <= cores or t2 == 1:
                other = min(w2 / decode_s, t2 / model_s, cores / (decode_s + model_s))
                assert rate >= 0.98 * other


def test_balanced_split_refuses_nonsense():
    with pytest.raises(InvalidArgumentError):
        threads.balanced_split(2, 0.0, 0.01)


def test_balanced_split_lets_a_sleeping_team_share_cores_when_the_model_is_the_bottleneck():
    # resnet50 under ONNX Runtime with spinning off: 2 threads beside the one worker.
    assert threads.balanced_split(2, 0.020, 0.075, teams_may_share=True) == (1, 2)
    # Decode-bound runs still give the decoders the cores.
    assert threads.balanced_split(2, 0.0205, 0.012, teams_may_share=True) == (2, 1)
