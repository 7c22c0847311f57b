"""Sizing ``RayEngine``'s work to the cluster's real nodes, and checking they can read the images.

Ray schedules a task or actor on ONE node, so a model actor asking for 4 CPUs never starts on
a cluster of 2-CPU nodes, however many there are, and Ray Data then waits forever (the bar
stays at 0). ``plan_pool`` sizes the pool from each node's CPUs and GPUs (``ray.nodes()``), and
``fit`` turns "does not fit" into a ``RayClusterError`` naming what was needed and what the
nodes have, after an optional bounded wait for an autoscaler to add nodes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgumentError, RayClusterError

# Seconds to wait for nodes that would fit the work (an autoscaler adding them); 0 = fail at once.
WAIT_ENV = "EMBEDKIT_RAY_RESOURCE_WAIT_S"
# Paths per node stat-ed by ``check_readable`` (spread over the task list).
LOCALITY_SAMPLE = 8
# Seconds for every node to answer the readability check (a task per node, no CPU reserved).
LOCALITY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Node:
    """One alive node: Ray id, IP, total CPUs and GPUs."""

    id: str
    ip: str
    cpus: float
    gpus: float

    def describe(self) -> str:
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.ip} {self.cpus:g} CPU{gpus}"


@dataclass(frozen=True)
class PoolPlan:
    """Model actors, GPUs and CPUs per actor, and the batch size they use."""

    actors: int
    gpus_per_actor: int
    cpus_per_actor: int
    batch_size: int


def alive_nodes(ray: Any) -> list[Node]:
    """The cluster's alive nodes with their total CPUs and GPUs."""
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        nodes.append(
            Node(
                n["NodeID"],
                n.get("NodeManagerAddress", "?"),
                res.get("CPU", 0.0),
                res.get("GPU", 0.0),
            )
        )
    return nodes


def _nodes_text(nodes: Sequence[Node]) -> str:
    return "; ".join(n.describe() for n in nodes) if nodes else "no alive nodes"


def plan_pool(
    nodes: Sequence[Node],
    *,
    concurrency: int | None,
    actor_cpus: int,
    batch_size: int | None,
    cpu_batch: int,
    gpu_batch: int,
) -> PoolPlan | str:
    """The pool that fits ``nodes``, or a sentence saying why nothing fits.

    GPU nodes: one actor per whole GPU. CPU only: each actor takes ``actor_cpus`` CPUs of one
    node; by default half the CPUs run models (at least one actor), and at least one CPU is
    left for decoding (a decode task takes 1 CPU), else decoding never starts.
    """
    total_cpus = sum(n.cpus for n in nodes)
    gpu_slots = sum(int(n.gpus) for n in nodes)
    if gpu_slots:
        actors = concurrency or gpu_slots
        if actors > gpu_slots:
            return (
                f"{actors} model actors need 1 GPU each, the nodes have {gpu_slots} whole GPUs "
                f"({_nodes_text(nodes)})"
            )
        if total_cpus < 1:
            return f"decoding needs 1 CPU on some node, the nodes have none ({_nodes_text(nodes)})"
        return PoolPlan(actors, 1, 0, batch_size or gpu_batch)
    slots = sum(int(n.cpus // actor_cpus) for n in nodes)
    if slots == 0:
        largest = max((n.cpus for n in nodes), default=0)
        return (
            f"a model actor needs {actor_cpus} CPU(s) on one node, the largest node has "
            f"{largest:g} ({_nodes_text(nodes)}); lower actor_cpus or add a bigger node"
        )
    default = max(1, sum(int(n.cpus // (2 * actor_cpus)) for n in nodes))
    actors = concurrency or default
    if actors > slots:
        return (
            f"{actors} model actors need {actor_cpus} CPU(s) each on one node, the nodes fit "
            f"{slots} ({_nodes_text(nodes)})"
        )
    if total_cpus - actors * actor_cpus < 1:
        return (
            f"{actors} model actor(s) of {actor_cpus} CPU(s) plus one decode task of 1 CPU need "
            f"{actors * actor_cpus + 1} CPUs, the cluster has {total_cpus:g} "
            f"({_nodes_text(nodes)}); add CPUs or use --engine local"
        )
    return PoolPlan(actors, 0, actor_cpus, batch_size or cpu_batch)


def resource_wait_s(value: float | None) -> float:
    """The wait for fitting nodes: the argument, else ``EMBEDKIT_RAY_RESOURCE_WAIT_S``, else 0."""
    if value is None:
        raw = os.environ.get(WAIT_ENV, "0")
        try:
            value = float(raw)
        except ValueError:
            raise InvalidArgumentError(f"{WAIT_ENV} must be seconds, got {raw!r}") from None
    if value < 0:
        raise InvalidArgumentError(f"the resource wait must be >= 0 seconds, got {value}")
    return value


def fit(
    ray: Any,
    plan: Callable[[Sequence[Node]], PoolPlan | str],
    wait_s: float,
    say: Callable[[str], None],
) -> PoolPlan:
    """Plan the pool on the current nodes; wait up to ``wait_s`` for nodes that fit it.

    Raises:
        RayClusterError: still nothing fits when the wait is over.
    """
    deadline = time.monotonic() + wait_s
    told = 0.0
    while True:
        result = plan(alive_nodes(ray))
        if isinstance(result, PoolPlan):
            return result
        now = time.monotonic()
        if now >= deadline:
            waited = f" (waited {wait_s:g} s for more nodes)" if wait_s else ""
            raise RayClusterError(
                f"the Ray cluster cannot run this extraction: {result}{waited}; an autoscaling "
                f"cluster: set {WAIT_ENV} to the seconds it needs to add nodes"
            )
        if now - told >= 10 or not told:  # a line every 10 s, not a frozen bar
            say(f"waiting for resources ({deadline - now:.0f} s left): {result}")
            told = now
        time.sleep(min(1.0, max(0.0, deadline - now)))


def _sample(paths: Sequence[str], k: int) -> list[str]:
    if len(paths) <= k:
        return list(paths)
    step = (len(paths) - 1) / (k - 1)
    return [paths[round(i * step)] for i in range(k)]


def _unreadable(paths: list[str]) -> list[tuple[str, str]]:
    """Runs on a node: the paths it cannot open for reading, with the OS error."""
    bad = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as e:
            bad.append((p, f"{type(e).__name__}: {e.strerror or e}"))
    return bad


def check_readable(
    ray: Any,
    paths: Sequence[str],
    nodes: Sequence[Node],
    *,
    sample: int = LOCALITY_SAMPLE,
    timeout_s: float = LOCALITY_TIMEOUT_S,
) -> None:
    """Every node opens a sample of ``paths``; the first node that cannot read one is an error.

    Raises:
        RayClusterError: names the node, an unreadable path and what the storage must be.
    """
    if not paths or not nodes:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_unreadable)
    chosen = _sample(paths, sample)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.id, soft=False)).remote(
            chosen
        )
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    for n, ref in zip(nodes, refs, strict=True):
        if ref not in done:
            raise RayClusterError(
                f"Ray node {n.ip} (id {n.id[:8]}) did not answer the image readability check "
                f"within {timeout_s:g} s; check that node (`ray status`)"
            )
        bad = ray.get(ref)
        if bad:
            path, err = bad[0]
            raise RayClusterError(
                f"Ray node {n.ip} (id {n.id[:8]}) cannot read {path} ({err}; {len(bad)} of "
                f"{len(chosen)} sampled images unreadable there): every node must see the images "
                "at the same absolute paths, e.g. a shared filesystem (NFS, CephFS, a cloud "
                "bucket mounted with FUSE) mounted at the same place; or use --engine local"
            )
