"""The index lock: one writer at a time for the indexes in a folder (a store's ``index/`` and
``index-ondisk/`` share ``STORE/.index.lock``).

Whoever writes an index (``Index.save``, ``OnDiskIndex.build`` / ``update`` / ``save_info``,
and ``lifecycle`` around its whole load-decide-write sequence) holds it; readers never take it:
they rely on the write order (data files under fresh names first, the small info file naming
them replaced last). A writer that finds the lock taken waits for it, up to ``wait_seconds()``,
then raises ``IndexLockedError`` naming the holder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .._fs import locked
from ..errors import IndexLockedError, IndexStateError, InvalidArgumentError

LOCK_NAME = ".index.lock"
# How long a search or `embedkit index` waits for another process's build, in seconds: an
# update takes seconds, an in-RAM rebuild of 1M vectors a few minutes, an on-disk build of 10M
# ~15 minutes on 2 cores (docs/scaling.md). Override with this environment variable.
WAIT_ENV = "EMBEDKIT_INDEX_WAIT"
DEFAULT_WAIT_S = 1800.0


def lock_path(directory: str | os.PathLike[str]) -> Path:
    """The lock file guarding the index in ``directory``: beside it, shared by its siblings."""
    return Path(directory).absolute().parent / LOCK_NAME


def wait_seconds() -> float:
    """The wait limit: ``$EMBEDKIT_INDEX_WAIT`` seconds, else ``DEFAULT_WAIT_S``."""
    raw = os.environ.get(WAIT_ENV)
    if raw is None:
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgumentError(f"{WAIT_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise InvalidArgumentError(f"{WAIT_ENV}={raw!r} must be >= 0 seconds")
    return value


@contextlib.contextmanager
def index_lock(
    directory: str | os.PathLike[str], log: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the lock of the index in ``directory`` (re-entrant within a thread).

    Raises:
        IndexLockedError: another process held it for longer than ``wait_seconds()``.
    """
    path = lock_path(directory)

    def busy(holder: str, timeout: float) -> Exception:
        return IndexLockedError(
            f"the index in {path.parent} is being written by {holder}, which did not finish "
            f"within {timeout:.0f}s; wait for it and retry (or set {WAIT_ENV} to wait longer)"
        )

    def waiting(holder: str) -> None:
        if log is not None:
            log(f"waiting for {holder} to finish writing the index in {path.parent}")

    stack = contextlib.ExitStack()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stack.enter_context(locked(path, timeout=wait_seconds(), busy=busy, waiting=waiting))
    except OSError as exc:  # e.g. a read-only store: it cannot be indexed either
        raise IndexStateError(
            f"cannot lock {path} to write the index: {exc.strerror or exc}; index the store "
            "where it is writable"
        ) from None
    with stack:
        yield
