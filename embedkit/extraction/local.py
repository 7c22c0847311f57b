"""Execution engines: turn (key, file) tasks into decoded results and vectors.

An engine yields ``Chunk``s; ``extract`` turns chunks into store rows, so every engine writes
exactly the same store. ``LocalEngine`` decodes in worker processes (``decode.DecodePool``)
while the model runs batches in this process; decoding of the next files overlaps the forward
pass of the current batch because workers keep decoding into the in-flight window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol, cast

import numpy as np

from ..images.decode import DEFAULT_MAX_PIXELS
from ..models.preprocess import Preprocess
from .copies import RunCopies
from .cores import balanced_split
from .pool import Chunk as Chunk  # re-exported: the engines' unit of results
from .pool import Decoded, DecodePool


class Engine(Protocol):
    def run(
        self, tasks: Sequence[tuple[int, str]], known_hashes: frozenset[str]
    ) -> Iterator[Chunk]:
        """Yield chunks covering every task exactly once."""
        ...


class Forward(Protocol):
    """A ``Backbone``, a ``runtime`` runner (torch or ONNX Runtime) or an ``Embedder``: takes
    uint8 (N, H, W, 3) numpy batches."""

    preprocess: Preprocess

    def forward(self, batch_uint8: np.ndarray) -> np.ndarray: ...


class LocalEngine:
    """Decode workers on this machine + the model in this process.

    With ``balance_cores`` set, the split between decode workers and model threads is
    re-chosen once, early in the run, from this run's own timings (``cores.balanced_split``):
    seconds per decoded file reported by the workers, and forward seconds x threads per image.
    The model must then have ``set_threads`` (the ``runtime`` runners do);
    ``batch_for_threads`` (when given) sets the batch size for the new thread count.
    """

    # Forward passes and decoded files to time before re-choosing the split.
    BALANCE_AFTER_BATCHES = 2
    BALANCE_AFTER_FILES = 4

    def __init__(
        self,
        model: Forward,
        batch_size: int,
        workers: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        *,
        balance_cores: int | None = None,
        batch_for_threads: Callable[[int], int] | None = None,
    ) -> None:
        self.model, self.batch_size = model, batch_size
        self.workers, self.max_pixels = workers, max_pixels
        self.balance_cores = balance_cores if workers > 0 else None
        self.batch_for_threads = batch_for_threads  # a new batch size with a new split
        self.balanced: tuple[int, int] | None = None  # (workers, threads) once re-chosen
        self._decode_s: list[float] = []
        self._model_s: list[float] = []  # core-seconds per image, one entry per batch

    def run(
        self, tasks: Sequence[tuple[int, str]], known_hashes: frozenset[str]
    ) -> Iterator[Chunk]:
        window = self._window()
        keys: list[int] = []
        results: list[Decoded] = []
        copies = RunCopies()  # byte-identical files of this run: embedded once
        with DecodePool(
            self.workers,
            self.model.preprocess,
            known_hashes=known_hashes,
            max_pixels=self.max_pixels,
        ) as pool:
            for key, r in pool.imap_unordered(tasks, window=window):
                if r.status != "ok":
                    yield Chunk([key], [r], None)
                    continue
                if copies.is_copy(key, r):
                    continue  # held: it follows the chunk that carries its original's vector
                keys.append(key)
                results.append(r)
                if self._balancing:
                    self._decode_s.append(r.seconds)
                if len(keys) >= self.batch_size:
                    chunk = self._forward(keys, results)
                    yield chunk
                    keys, results = [], []
                    yield from copies.after(chunk)
                    self._maybe_balance(pool)
        if keys:
            chunk = self._forward(keys, results)
            yield chunk
            yield from copies.after(chunk)
        yield from copies.ready()  # copies that came after their original's last chunk
        # Every original was in a yielded chunk: a copy is held only after its original's claim.
        assert not copies.orphans()

    def _window(self) -> int:
        # Enough files in flight to fill the next batch while this one runs, and to keep
        # every worker busy (as many as the balancing may choose).
        return max(2 * self.batch_size, 4 * max(self.workers, self.balance_cores or 0, 1))

    @property
    def _balancing(self) -> bool:
        return self.balance_cores is not None and self.balanced is None

    def _maybe_balance(self, pool: DecodePool) -> None:
        if (
            not self._balancing
            or len(self._model_s) < self.BALANCE_AFTER_BATCHES
            or len(self._decode_s) < self.BALANCE_AFTER_FILES
        ):
            return
        # The fastest batch is the least disturbed one (the first may carry warm-up costs);
        # the median decode is robust to a few huge or tiny files.
        may_share = bool(getattr(self.model, "can_share_cores", False))
        cores = self.balance_cores
        assert cores is not None  # _balancing
        workers, threads = balanced_split(
            cores, float(np.median(self._decode_s)), min(self._model_s), teams_may_share=may_share
        )
        shared = threads > 1 and workers + threads > cores
        self.model.set_threads(threads, shared)  # type: ignore[attr-defined]
        self.workers, self.balanced = workers, (workers, threads)
        if self.batch_for_threads is not None:
            self.batch_size = self.batch_for_threads(threads)
        pool.resize(workers, self._window())

    def _forward(self, keys: list[int], results: list[Decoded]) -> Chunk:
        # ok results always carry pixels (the cast is for the type checker, nothing is dropped)
        pixels: Any = np.stack(cast(list[np.ndarray], [r.pixels for r in results]))
        if getattr(getattr(self.model, "device", None), "type", "cpu") == "cuda":
            import torch  # only on CUDA, where torch runs the model anyway

            # pinned, so that the forward's non_blocking copy really overlaps
            pixels = torch.from_numpy(pixels).pin_memory()
        t0 = time.perf_counter()
        vectors = self.model.forward(pixels)
        if self._balancing:
            threads = getattr(self.model, "threads", 1)
            self._model_s.append((time.perf_counter() - t0) * threads / len(results))
        # Drop the pixels: they are not needed past this point and a batch of them is MBs.
        # (replace keeps everything else, e.g. the decode warnings an ok row records in detail)
        slim = [replace(r, pixels=None) for r in results]
        return Chunk(keys, slim, vectors)
