"""A watchdog on ``RayEngine``'s results: a stalled cluster becomes a line, then an error.

Ray Data waits without a word when the cluster's resources are held by other jobs or its
nodes are gone: the progress bar froze. ``watched`` pulls the results on a thread and, while
none arrive, prints a "waiting for results" line every ``NOTICE_S`` seconds with what the
cluster has free, and raises a ``RayClusterError`` after ``stall_s`` seconds without any
(committed work is kept: the rerun continues).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ..errors import InvalidArgumentError, RayClusterError

T = TypeVar("T")
# Seconds without any result before the run stops (model actors load in ~5-60 s; one batch
# takes seconds); raise it through this variable for very slow models or busy clusters.
STALL_ENV = "EMBEDKIT_RAY_STALL_S"
DEFAULT_STALL_S = 600.0
# Seconds between "waiting for results" lines.
NOTICE_S = 30.0


def stall_s(value: float | None) -> float:
    """The stall limit: the argument, else ``EMBEDKIT_RAY_STALL_S``, else 600 s."""
    if value is None:
        raw = os.environ.get(STALL_ENV, str(DEFAULT_STALL_S))
        try:
            value = float(raw)
        except ValueError:
            raise InvalidArgumentError(f"{STALL_ENV} must be seconds, got {raw!r}") from None
    if value <= 0:
        raise InvalidArgumentError(f"the stall limit must be > 0 seconds, got {value}")
    return value


def watched(
    items: Iterable[T],
    limit_s: float,
    describe: Callable[[], str],
    say: Callable[[str], None],
    on_abandon: Callable[[], None] = lambda: None,
) -> Iterator[T]:
    """Yield ``items`` (pulled on a thread); stop with an error after ``limit_s`` without one.

    ``on_abandon`` runs when the consumer leaves while the thread is still pulling (a stall,
    an error): the thread cannot be interrupted inside Ray, only left behind.
    """
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(kind: str, item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put((kind, item), timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as e:  # re-raised in the consumer's thread
            put("error", e)

    thread = threading.Thread(target=pump, daemon=True, name="embedkit-ray-results")
    thread.start()
    last = told = time.monotonic()
    try:
        while True:
            try:
                kind, item = q.get(timeout=min(1.0, limit_s / 4, NOTICE_S / 2))
            except queue.Empty:
                now = time.monotonic()
                if now - last >= limit_s:
                    raise RayClusterError(
                        f"no results from the Ray cluster for {limit_s:g} s ({describe()}); "
                        "committed files are kept and a rerun continues; check `ray status`, "
                        f"or raise {STALL_ENV} for a slow model or a busy cluster"
                    ) from None
                if now - told >= NOTICE_S:
                    say(
                        f"waiting for results from the Ray cluster for {now - last:.0f} s "
                        f"(stopping at {limit_s:g} s): {describe()}"
                    )
                    told = now
                continue
            last = told = time.monotonic()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        if thread.is_alive():
            on_abandon()


def no_auto_init(ray: Any) -> None:
    """Keep a left-behind Ray Data thread from starting a new local Ray after ``shutdown``.

    Ray Data calls Ray's auto-init from inside its iterator; once the driver shut its
    connection down, that would start a fresh local cluster in this process.
    """
    with contextlib.suppress(Exception):  # private switch, read at call time by auto_init_ray
        ray._private.auto_init_hook.enable_auto_connect = False


def describe_free(ray: Any) -> str:
    """What the cluster has free right now (for the waiting line and the error)."""
    try:
        free = ray.available_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception as e:  # the cluster itself may be what is gone
        return f"cannot ask the cluster: {type(e).__name__}"
    gpu = f", {free.get('GPU', 0):g} GPU" if free.get("GPU") else ""
    return f"{nodes} alive node(s), free now: {free.get('CPU', 0):g} CPU{gpu}"
