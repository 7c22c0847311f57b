"""Decoding in worker processes, so a crashing decoder costs one file, not the run.

Workers read a file, hash it and turn it into the model's input crop with
``images.model_input.load_model_input``, the same function every query path uses (JPEG draft
rule, resize + crop). They return small uint8 arrays; the
model process does the rest on whole batches. When a worker dies (a segfault in a codec, the
OOM killer), the files that were in flight are retried one at a time in a fresh pool, and the
one that kills it again is recorded as ``decode_crash``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from .._fs import close_registered_fds
from ..images.decode import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    content_hash,
    open_rgb,
    read_image_file,
    warnings_detail,
)
from ..images.model_input import load_model_input
from ..images.pixelprint import FILE_DRAFT, grey_views
from ..models.preprocess import Preprocess


@dataclass(frozen=True)
class Decoded:
    """What a worker returns for one file."""

    status: str  # "ok" | "reuse" | "failed"
    content_hash: str | None
    pixels: np.ndarray | None = None  # uint8 (H, W, 3) after resize + crop
    width: int | None = None
    height: int | None = None
    n_frames: int | None = None
    reason: str | None = None
    detail: str | None = None
    seconds: float = 0.0  # wall time the worker spent on an "ok" file (for the thread policy)
    views: np.ndarray | None = None  # uint8 grey views for pixel fingerprints (store.pixels)


@dataclass
class Chunk:
    """Results for some files. ``vectors`` holds one row per ``ok`` result, in order."""

    keys: list[int]
    results: list[Decoded]
    vectors: np.ndarray | None


# Content hashes whose vectors the store already has. Set in the parent before the pool forks,
# so workers inherit it without pickling (copy-on-write).
_KNOWN_HASHES: frozenset[str] = frozenset()


def decode_file(
    abspath: str,
    preprocess: Preprocess | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    pixelprint: bool = True,
    draft_size: int = FILE_DRAFT,
) -> Decoded:
    """Read, hash and decode one file (``images.load_model_input``, with its pixel
    fingerprint unless ``pixelprint`` is False); never raises for a bad file. A file whose
    hash is in ``_KNOWN_HASHES`` is hashed only, not decoded. Without a ``preprocess``, only
    the pixel fingerprint's grey views are made, from the image JPEG-drafted to
    ``draft_size`` (``index.verify.fingerprints``: no model input)."""
    t0 = time.perf_counter()
    digest: str | None = None
    try:
        data = read_image_file(abspath)
        digest = content_hash(data)
        if digest in _KNOWN_HASHES:
            return Decoded("reuse", digest)
        if preprocess is None:
            return _fingerprint_only(data, digest, max_pixels, draft_size, t0)
        mi = load_model_input(
            data, preprocess, max_pixels=max_pixels, digest=digest, pixelprint=pixelprint
        )
    except ImageDecodeError as exc:
        return Decoded("failed", digest, reason=exc.reason, detail=exc.detail)
    except Exception as exc:  # noqa: BLE001 - a decoder bug must cost one file, not the run
        return Decoded(
            "failed",
            digest,
            reason="decode_error",
            detail=f"{type(exc).__name__}: {exc}",
        )
    return Decoded(
        "ok",
        digest,
        mi.pixels,
        mi.width,
        mi.height,
        mi.n_frames,
        # Non-fatal problems (corrupt EXIF, unreadable trailing chunks) stay with the row.
        detail=warnings_detail(mi.warnings),
        seconds=time.perf_counter() - t0,
        views=mi.views,
    )


def _init_worker() -> None:
    """Set up a forked decode worker.

    - Ignore SIGINT, which a terminal sends to the whole process group: the parent handles
      it (commits, then stops the workers). SIGTERM gets its default back (a fork inherits the
      parent's Python handler: the CLI's, Ray's driver's, a host application's): the executor
      terminates workers with it when the pool breaks, and a worker that outlived that
      blocked writing its result to a pipe nobody read, and the parent's exit waited for it
      forever. A worker killed by a group SIGTERM costs nothing (the parent is ending too).
    - Die with the parent (Linux): a ``kill -9`` of the run must not leave decoders behind.
    - Drop the inherited store-lock descriptors, so only the parent holds the store lock.
    - Silence C-level stderr: libtiff prints pages of tag warnings for odd TIFFs. Nothing
      that matters is lost: every per-file problem is recorded as a reason and detail.
    """
    # Ctrl-C is the parent's to handle (it commits and exits); workers are stopped by the
    # parent (``DecodePool.close(stop=True)``), or die with it (PR_SET_PDEATHSIG).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    close_registered_fds()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _crashed() -> Decoded:
    return Decoded(
        "failed", None, reason="decode_crash", detail="the decoder process died on this file"
    )


def _fingerprint_only(
    data: bytes, digest: str, max_pixels: int, draft_size: int, t0: float
) -> Decoded:
    decoded = open_rgb(data, max_pixels=max_pixels, draft_size=draft_size)
    return Decoded(
        "ok",
        digest,
        None,
        decoded.width,
        decoded.height,
        decoded.n_frames,
        detail=warnings_detail(decoded.warnings),
        seconds=time.perf_counter() - t0,
        views=grey_views(decoded.image),
    )


class DecodePool:
    """Unordered parallel ``decode_file`` over many files, isolated from decoder crashes."""

    def __init__(
        self,
        workers: int,
        preprocess: Preprocess | None,
        *,
        known_hashes: Iterable[str] = (),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft_size: int = FILE_DRAFT,
    ) -> None:
        self.workers = workers
        # one file's work, as the workers run it (a module function and its arguments pickle)
        self._decode = functools.partial(
            decode_file, preprocess=preprocess, max_pixels=max_pixels, draft_size=draft_size
        )
        self.known_hashes = frozenset(known_hashes)
        self._executor: ProcessPoolExecutor | None = None
        self._resize_to: int | None = None
        self._window = 1

    def _new_executor(self) -> ProcessPoolExecutor:
        global _KNOWN_HASHES
        _KNOWN_HASHES = self.known_hashes
        # fork: workers inherit _KNOWN_HASHES and the imported modules for free; they only
        # run Pillow and numpy, never torch, so forking a process that has torch loaded is safe.
        return ProcessPoolExecutor(
            self.workers, mp_context=mp.get_context("fork"), initializer=_init_worker
        )

    def resize(self, workers: int, window: int | None = None) -> None:
        """Use ``workers`` processes (and ``window`` files in flight) from the next submission
        of ``imap_unordered`` on.

        Files queued but not started move to the new pool; files being decoded finish in the
        old processes, which then exit. In-process decoding (0 workers) cannot change.
        """
        if workers < 1 or self.workers < 1:
            raise ValueError("resize needs worker processes on both sides")
        self._resize_to = workers
        if window is not None:
            self._window = window

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Leaving early (Ctrl-C, SIGTERM, an error, the consumer closing the generator): the
        # files in flight are not wanted any more, so the workers stop now instead of finishing
        # them (a 12 MP decode is seconds of a core, and the interpreter's exit would wait).
        self.close(stop=exc_type is not None)

    def close(self, stop: bool = False) -> None:
        """Shut the workers down: queued files are cancelled; with ``stop`` the files being
        decoded are abandoned too (the workers are killed: they hold nothing but pixels)."""
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        # The executor's own processes and result pipe (no public access); read before
        # shutdown, which forgets them.
        procs = list((getattr(executor, "_processes", None) or {}).values())
        result_writer = getattr(getattr(executor, "_result_queue", None), "_writer", None)
        executor.shutdown(wait=False, cancel_futures=True)
        if stop:
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.kill()  # SIGKILL: workers ignore SIGINT
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.join(timeout=5)
            # A worker killed while writing its result leaves half a message in the result
            # pipe, and the executor's manager thread then waits for the rest forever (and the
            # interpreter's exit waits for that thread). Closing our end of the pipe's write
            # side turns the wait into EOF, which the thread handles as a broken pool and ends.
            if result_writer is not None:
                with contextlib.suppress(Exception):
                    result_writer.close()

    def imap_unordered(
        self, tasks: Iterable[tuple[int, str]], window: int
    ) -> Iterator[tuple[int, Decoded]]:
        """Yield ``(key, Decoded)`` for ``(key, abspath)`` tasks, at most ``window`` in flight
        (``resize`` may change both later)."""
        self._window = window
        if self.workers <= 0:  # in-process decoding: no isolation, for debugging
            global _KNOWN_HASHES
            _KNOWN_HASHES = self.known_hashes
            for key, path in tasks:
                yield key, self._decode(path)
            return
        it = iter(tasks)
        pending: dict[Future[Decoded], tuple[int, str]] = {}

        def fill() -> None:
            nonlocal it
            if self._resize_to is not None and self._resize_to != self.workers:
                # cancel() only succeeds for work no process has taken yet.
                requeued = [pending.pop(f) for f in list(pending) if f.cancel()]
                it = itertools.chain(requeued, it)
                if self._executor is not None:
                    self._executor.shutdown(wait=False)  # started files still finish
                    self._executor = None
                self.workers = self._resize_to
            self._resize_to = None
            if self._executor is None:
                self._executor = self._new_executor()
            while len(pending) < self._window:
                task = next(it, None)
                if task is None:
                    return
                fut = self._executor.submit(self._decode, task[1])
                pending[fut] = task

        fill()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            suspects: list[tuple[int, str]] = []
            for fut in done:
                task = pending.pop(fut)
                try:
                    yield task[0], fut.result()
                except BrokenProcessPool:
                    suspects.append(task)
            if suspects:
                # Every other in-flight file is lost with the pool; results already finished
                # are still readable, the rest become suspects too.
                for fut, task in list(pending.items()):
                    pending.pop(fut)
                    if fut.done() and fut.exception() is None:
                        yield task[0], fut.result()
                    else:
                        suspects.append(task)
                yield from self._isolate(suspects)
            fill()

    def _isolate(self, suspects: list[tuple[int, str]]) -> Iterator[tuple[int, Decoded]]:
        """Retry files one at a time in fresh pools; the ones that kill a pool are crashes."""
        self.close()
        for key, path in suspects:
            if self._executor is None:
                self._executor = self._new_executor()
            try:
                result = self._executor.submit(self._decode, path).result()
            except BrokenProcessPool:
                self.close()
                result = _crashed()
            yield key, result
