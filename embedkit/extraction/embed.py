"""Embed in-memory images, and reload the exact model a store was made with."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..defaults import DEFAULT_MODEL
from ..errors import StoreMismatchError, WeightsUnavailableError
from ..images.decode import rgb_from_pil
from ..store.read import l2_normalize

if TYPE_CHECKING:  # torch and timm load only when a model is loaded by name
    from ..models.backbone import Backbone
    from ..models.embedder import Embedder
    from ..store.read import Store


def forward_batches(
    backbone: Backbone | Embedder, pixels: Iterable[np.ndarray], batch_size: int
) -> np.ndarray:
    """Run uint8 (H, W, 3) crops through the backbone in batches -> float32 (N, D)."""
    out: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for arr in pixels:
        batch.append(arr)
        if len(batch) == batch_size:
            out.append(backbone.forward(np.stack(batch)))
            batch = []
    if batch:
        out.append(backbone.forward(np.stack(batch)))
    if not out:
        return np.zeros((0, backbone.dim), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def embed(
    images: Iterable[Image.Image],
    model: str | Backbone | Embedder = DEFAULT_MODEL,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    batch_size: int = 16,
    device: str = "auto",
    normalize: bool = False,
) -> np.ndarray:
    """Embed PIL images with a backbone, exactly as ``extract`` embeds files.

    Images get the same treatment as decoded files (EXIF orientation, mode conversion, alpha
    flattening, first frame) and the model's own preprocessing.

    Args:
        images: PIL images, any mode.
        model: a preset or timm model name, a loaded ``Backbone``, or an ``Embedder``
            (``embedder_for_store``).
        weights: weights file, when ``model`` is a name.
        random_init: use random weights on purpose (never a silent fallback).
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        normalize: L2-normalise each vector.

    Returns:
        float32 array of shape (N, D).
    """
    if isinstance(model, str):
        from ..models.backbone import load_backbone

        backbone: Backbone | Embedder = load_backbone(
            model, weights=weights, random_init=random_init, device=device
        )
    else:
        backbone = model
    pp = backbone.preprocess
    vectors = forward_batches(
        backbone, (pp.to_uint8(rgb_from_pil(im)) for im in images), batch_size
    )
    return l2_normalize(vectors) if normalize else vectors


def backbone_for_store(store: Store, device: str = "auto") -> Backbone:
    """Reload the model that made ``store``, with the very same weights.

    Raises:
        WeightsUnavailableError: the recorded weights cannot be found on this machine.
        StoreMismatchError: weights were found but differ from the recorded hash.
    """
    md: dict[str, Any] = store.metadata
    source = str(md.get("weights_source", ""))
    name = str(md["model"])
    kwargs: dict[str, Any] = {"device": device}
    if md.get("random_init"):
        kwargs.update(random_init=True, seed=int(md.get("seed", 0)))
    elif source.startswith("file:"):
        file = source[len("file:") :]
        if not os.path.exists(file):
            raise WeightsUnavailableError(
                f"store {store.path} was made with weights file {file}, which is gone; "
                "put it back (same content) to embed new images for this store"
            )
        kwargs["weights"] = file
    from ..models.backbone import load_backbone

    backbone = load_backbone(name, **kwargs)
    if backbone.weights_sha256 != md.get("weights_sha256"):
        raise StoreMismatchError(
            f"the {name} weights found here (sha256 {str(backbone.weights_sha256)[:12]}) are not "
            f"the ones store {store.path} was made with ({str(md.get('weights_sha256'))[:12]}); "
            "provide the original weights file"
        )
    return backbone
