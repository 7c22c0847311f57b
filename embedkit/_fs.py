"""Crash- and concurrency-safe file writes, and the advisory lock that serialises writers.

Every file embedkit publishes (a store manifest, a part, an index, an ONNX export) is written to
a temp file with a unique name next to its target, fsynced, moved over the target with
``os.replace`` (atomic on POSIX) and the directory fsynced, so that a reader sees the old file
or the new one, never half of one, and two writers never share a temp file.

``locked`` is an ``fcntl.flock`` on a lock file; it waits (with a timeout) instead of failing,
and is re-entrant within one thread, so a function that takes a lock can call another that takes
the same one. Locks are advisory: only code that takes them is kept out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# Temp files are ``.<target name>.<32 hex>.tmp``: hidden, unique, and found by ``*.tmp`` globs
# (a store writer removes ``.*.tmp`` orphans of killed runs).
TMP_SUFFIX = ".tmp"


def temp_name(target: Path) -> Path:
    """A unique temp path in ``target``'s folder (same filesystem, so ``os.replace`` works)."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (it was written and closed by someone else, e.g. faiss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable; a no-op where directories refuse fsync."""
    with contextlib.suppress(OSError):
        fsync_file(path)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a unique temp path next to ``target`` for the caller to write (by any means);
    on a normal exit it is fsynced and replaces ``target`` atomically, on an error it is removed
    and ``target`` is untouched."""
    final = Path(target)
    tmp = temp_name(final)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``target`` with ``data`` atomically and durably."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)


# -- descriptors forked children must not keep ---------------------------------------------------

# Descriptors that a forked child (a decode worker) must close: a store writer's lock fd,
# registered while held. flock locks belong to the open file, which a fork shares, so a worker
# that kept the fd would hold the store lock past its parent.
_close_in_children: set[int] = set()


def close_in_children(fd: int) -> None:
    """Register ``fd`` to be closed by ``close_registered_fds`` in forked children."""
    _close_in_children.add(fd)


def keep_in_children(fd: int) -> None:
    """Undo ``close_in_children`` (the fd is about to be closed by its owner)."""
    _close_in_children.discard(fd)


def close_registered_fds() -> None:
    """In a freshly forked child: close every registered descriptor."""
    for fd in list(_close_in_children):
        with contextlib.suppress(OSError):
            os.close(fd)
    _close_in_children.clear()


# -- locking -------------------------------------------------------------------------------------

# Locks this process holds: (lock path, thread id) -> depth. flock conflicts between two open
# files even within one process, so two threads exclude each other; one thread re-entering a
# lock it holds must not wait for itself.
_held: dict[tuple[str, int], int] = {}
_held_guard = threading.Lock()
# Polling interval while waiting, seconds: flock has no timeout of its own.
_POLL_S = (0.01, 0.25)


@contextlib.contextmanager
def locked(
    lock_file: str | os.PathLike[str],
    *,
    timeout: float,
    busy: Callable[[str, float], Exception],
    waiting: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created if missing) meanwhile.

    Args:
        lock_file: the lock file; its content says who holds it (``pid N``).
        timeout: seconds to wait for another holder before giving up.
        busy: builds the error raised on timeout from (holder, timeout).
        waiting: told the holder once, when the lock is taken and we start waiting.
    """
    key = (os.path.realpath(lock_file), threading.get_ident())  # one key per file
    with _held_guard:
        depth = _held.get(key, 0)
        if depth:
            _held[key] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    fd = acquire_flock(Path(key[0]), timeout, busy, waiting)
    with _held_guard:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_guard:
            del _held[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def acquire_flock(
    path: Path,
    timeout: float,
    busy: Callable[[str, float], Exception],
    waiting: Callable[[str], None] | None = None,
) -> int:
    """An fd of ``path`` (created if missing) holding an exclusive ``flock``, with ``pid N``
    written into it for whoever waits; after ``timeout`` seconds (0: one try) ``busy(holder,
    timeout)`` is raised. The caller unlocks and closes the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + timeout
    pause, told = _POLL_S[0], False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                if time.monotonic() >= deadline:
                    raise busy(holder, timeout) from None
                if waiting is not None and not told:
                    waiting(holder)
                    told = True
                time.sleep(pause)
                pause = min(pause * 2, _POLL_S[1])
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    return fd
