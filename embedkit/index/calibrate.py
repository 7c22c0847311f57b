"""Per-collection calibration of the embedding threshold for near duplicates.

How similar unrelated images are depends on the collection: with efficientnet_lite0, random
photo pairs have a median cosine around 0.17, random pairs of textile photos or text pages
around 0.91, while edited copies of a textile score as low as 0.79 (resized) to 0.67
(watermarked). A fixed threshold is therefore either useless (photos need ~0.90) or wrong
(textiles chain into one group). The background is estimated from random pairs, and the
threshold at which the embedding ALONE may call two images copies is put a fixed fraction of
the way from the background median to identity:

    threshold = 1 - FRACTION * (1 - median)

On photos this gives ~0.90 (the measured old default); on a homogeneous collection it goes
above ``HOMOGENEOUS`` and the embedding alone no longer decides: pairs need pixel evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Chosen on the tune split of benchmarks/duplicates.py: photos' median 0.17 -> 0.90.
FRACTION = 0.12
# Above this embedding threshold the collection is too homogeneous for the embedding alone
# (textiles and rendered pages: ~0.99): only pixel-verified pairs are copies.
HOMOGENEOUS = 0.97
PAIRS = 20_000  # random pairs sampled: the median is within ~0.01 with a few thousand
GRAM_ROWS = 4096  # up to this many sampled rows, their (rows x rows) similarities (64 MB)
FLOOR = 0.80  # never lower than this: two photos 0.8 apart are not copies on embedding alone


@dataclass(frozen=True)
class Calibration:
    """What the collection's background looks like and the threshold it implies.

    Attributes:
        median: median cosine similarity of random pairs (unrelated images, mostly).
        p99: their 99th percentile.
        threshold: cosine at or above which the embedding alone joins two images.
        homogeneous: the embedding alone cannot separate copies from unrelated images here.
        pairs: random pairs measured.
    """

    median: float
    p99: float
    threshold: float
    homogeneous: bool
    pairs: int

    def describe(self) -> str:
        line = (
            f"background similarity of random pairs: median {self.median:.3f}, 99th "
            f"percentile {self.p99:.3f} ({self.pairs} pairs); embedding threshold "
            f"{self.threshold:.3f}"
        )
        if self.homogeneous:
            line += (
                "; this collection is homogeneous: unrelated images are about as similar as "
                "edited copies, so the embedding alone decides nothing and only pairs "
                "confirmed by pixels are reported"
            )
        return line


def calibrate(vectors: Any, *, seed: int = 0, pairs: int = PAIRS) -> Calibration:
    """Estimate the background from up to ``pairs`` random pairs of rows of ``vectors``.

    ``vectors`` may be a memory-mapped array or row view: only the sampled rows are read.
    """
    n = len(vectors)
    if n < 2:
        return Calibration(0.0, 0.0, 1.0 - FRACTION, False, 0)
    rng = np.random.default_rng(seed)
    m = min(pairs, n * (n - 1) // 2)
    a = rng.integers(0, n, m)
    b = (a + rng.integers(1, n, m)) % n  # never a row with itself
    rows = np.unique(np.concatenate([a, b]))
    v = np.asarray(vectors[rows], dtype=np.float32)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    pos = np.searchsorted(rows, a), np.searchsorted(rows, b)
    if len(rows) <= GRAM_ROWS:
        # all pairs of the sampled rows in one matrix product: copying two (m, D) gathers
        # cost 0.4 s of 0.9 for 150 textiles (m = 11k pairs of 1280 floats)
        sims = (v @ v.T)[pos[0], pos[1]]
    else:
        sims = np.einsum("nd,nd->n", v[pos[0]], v[pos[1]])
    median = float(np.median(sims))
    threshold = max(FLOOR, 1.0 - FRACTION * (1.0 - median))
    return Calibration(
        median=median,
        p99=float(np.quantile(sims, 0.99)),
        threshold=min(threshold, 1.0),
        homogeneous=threshold > HOMOGENEOUS,
        pairs=m,
    )
