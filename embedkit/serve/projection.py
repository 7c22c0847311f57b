"""A 2-D map of a store's vectors: UMAP when ``umap-learn`` is installed, PCA otherwise."""

from __future__ import annotations

from typing import Literal

import numpy as np

MapMethod = Literal["auto", "umap", "pca"]
MAP_METHODS = ("auto", "umap", "pca")
PCA_FIT_ROWS = 20_000  # principal axes from a sample: the 2-D axes are stable well below this
SEED = 0  # the same store gives the same map
# ``auto`` uses UMAP up to this many rows: its neighbour graph takes minutes past it on a few
# cores, too long for a page to wait; ``umap`` asks for it whatever the size.
UMAP_AUTO_MAX_ROWS = 20_000


def project_2d(vectors: np.ndarray, method: MapMethod = "auto") -> tuple[np.ndarray, str]:
    """float32 (N, 2) coordinates scaled to [0, 1] per axis, and the method used.

    ``auto`` uses UMAP (cosine metric) when ``umap-learn`` imports and the store has between 16
    (its neighbour graph) and ``UMAP_AUTO_MAX_ROWS`` rows, else PCA (numpy SVD of the centred
    vectors).
    """
    n = len(vectors)
    if n == 0:
        return np.zeros((0, 2), np.float32), "pca"
    x = np.asarray(vectors, dtype=np.float32)
    used = "pca"
    xy = None
    wants_umap = method == "umap" or (method == "auto" and n <= UMAP_AUTO_MAX_ROWS)
    if wants_umap and n >= 16:  # UMAP's default 15 neighbours need 16 rows
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            umap = None
        if umap is not None:
            reducer = umap.UMAP(n_components=2, metric="cosine", random_state=SEED)
            xy = np.asarray(reducer.fit_transform(x), dtype=np.float64)
            used = "umap"
    if xy is None:
        xy = _pca(x)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    return ((xy - lo) / span).astype(np.float32), used


def _pca(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=0, dtype=np.float64)
    rng = np.random.default_rng(SEED)
    fit = x if len(x) <= PCA_FIT_ROWS else x[rng.choice(len(x), PCA_FIT_ROWS, replace=False)]
    centred = fit.astype(np.float64) - mean
    if len(fit) < 2:
        return np.zeros((len(x), 2))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = np.zeros((2, x.shape[1]))
    axes[: min(2, len(vt))] = vt[:2]
    # the sign of a singular vector is arbitrary: fix it so the same data maps the same way
    signs = np.sign(axes @ np.ones(x.shape[1]))
    axes *= np.where(signs == 0, 1.0, signs)[:, None]
    return (x.astype(np.float64) - mean) @ axes.T
