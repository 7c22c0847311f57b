"""Execution engines: turn (key, file) tasks into decoded results and vectors.

An engine yields ``Chunk``s; ``extract`` turns chunks into store rows, so every engine writes
exactly the same store. ``LocalEngine`` decodes in worker processes (``decode.DecodePool``)
while the model runs batches in this process; decoding of the next files overlaps the forward
pass of the current batch because workers keep decoding into the in-flight window.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .decode import Decoded, DecodePool
from .images import DEFAULT_MAX_PIXELS
from .preprocess import Preprocess


@dataclass
class Chunk:
    """Results for some files. ``vectors`` holds one row per ``ok`` result, in order."""

    keys: list[int]
    results: list[Decoded]
    vectors: np.ndarray | None


class Engine(Protocol):
    def run(
        self, tasks: Sequence[tuple[int, str]], known_hashes: frozenset[str]
    ) -> Iterator[Chunk]:
        """Yield chunks covering every task exactly once."""
        ...


class Forward(Protocol):
    """A ``Backbone``, or a ``runtime`` runner (torch or ONNX Runtime) over one."""

    preprocess: Preprocess

    def forward(self, batch_uint8: torch.Tensor) -> np.ndarray: ...


class LocalEngine:
    """Decode workers on this machine + the model in this process."""

    def __init__(
        self, model: Forward, batch_size: int, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.model, self.batch_size = model, batch_size
        self.workers, self.max_pixels = workers, max_pixels

    def run(
        self, tasks: Sequence[tuple[int, str]], known_hashes: frozenset[str]
    ) -> Iterator[Chunk]:
        # Enough files in flight to fill the next batch while this one runs, and to keep
        # every worker busy.
        window = max(2 * self.batch_size, 4 * max(self.workers, 1))
        keys: list[int] = []
        results: list[Decoded] = []
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
                keys.append(key)
                results.append(r)
                if len(keys) == self.batch_size:
                    yield self._forward(keys, results)
                    keys, results = [], []
        if keys:
            yield self._forward(keys, results)

    def _forward(self, keys: list[int], results: list[Decoded]) -> Chunk:
        pixels = torch.from_numpy(np.stack([r.pixels for r in results]))
        vectors = self.model.forward(pixels)
        # Drop the pixels: they are not needed past this point and a batch of them is MBs.
        slim = [
            Decoded(r.status, r.content_hash, None, r.width, r.height, r.n_frames) for r in results
        ]
        return Chunk(keys, slim, vectors)
