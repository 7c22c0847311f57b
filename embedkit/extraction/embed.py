"""Embed image files and in-memory images, and reload the exact model a store was made with."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..defaults import DEFAULT_MODEL
from ..errors import ImageFileError, StoreMismatchError, WeightsUnavailableError
from ..images.decode import ImageDecodeError, rgb_from_pil
from ..images.model_input import load_model_input
from ..store.read import l2_normalize, storable

if TYPE_CHECKING:  # torch and timm load only when a model is loaded by name
    from ..models.backbone import Backbone
    from ..models.embedder import Embedder
    from ..models.preprocess import Preprocess
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


ImageInput = Image.Image | str | os.PathLike[str]


def model_inputs(images: Iterable[ImageInput], preprocess: Preprocess) -> Iterator[np.ndarray]:
    """uint8 input crops for PIL images and image files, in order.

    A file goes through ``load_model_input``, exactly as extraction decodes it (same reads,
    allowlist, pixel cap, EXIF handling, JPEG draft rule), so it gets its stored vector. A PIL
    image is already decoded: it gets the same RGB treatment (``rgb_from_pil``) at full
    size; for a JPEG large enough to be draft-decoded (6x the model's resize target and up)
    that differs from the stored vector by cosine >= 0.999 (benchmarks/RESULTS.md, ``draft``).

    Raises:
        ImageFileError: a file or image cannot be decoded, with the reason extraction records.
    """
    for im in images:
        if isinstance(im, Image.Image):
            try:
                yield preprocess.to_uint8(rgb_from_pil(im))
            except ImageDecodeError as exc:
                raise ImageFileError(repr(im), exc.reason, exc.detail) from None
            continue
        try:
            yield load_model_input(im, preprocess).pixels
        except ImageDecodeError as exc:
            raise ImageFileError(storable(os.fspath(im)), exc.reason, exc.detail) from None


def embed(
    images: Iterable[ImageInput] | ImageInput,
    model: str | Backbone | Embedder = DEFAULT_MODEL,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    batch_size: int = 16,
    device: str = "auto",
    normalize: bool = False,
) -> np.ndarray:
    """Embed image files and PIL images with a backbone, exactly as ``extract`` embeds files.

    A file path gives the very vector ``extract`` stores for that file. PIL images get the same
    treatment as decoded files (EXIF orientation, mode conversion, alpha flattening, first
    frame) and the model's own preprocessing, at full size (see ``model_inputs``).

    Args:
        images: image file paths and PIL images (any mode), mixed freely; or just one.
        model: a preset or timm model name, a fine-tune folder (``finetune --out``), a loaded
            ``Backbone``, or an ``Embedder`` (``embedder_for_store``).
        weights: weights file, when ``model`` is a name.
        random_init: use random weights on purpose (never a silent fallback).
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        normalize: L2-normalise each vector.

    Returns:
        float32 array of shape (N, D).

    Raises:
        ImageFileError: an image cannot be decoded; ``reason`` is extraction's reason for it.
    """
    if isinstance(model, str):
        from ..models.backbone import load_backbone

        backbone: Backbone | Embedder = load_backbone(
            model, weights=weights, random_init=random_init, device=device
        )
    else:
        backbone = model
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]  # one image, not an iterable of path characters
    vectors = forward_batches(backbone, model_inputs(images, backbone.preprocess), batch_size)
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
        if backbone.finetuned is not None and "finetune" not in md:
            raise StoreMismatchError(
                f"store {store.path} was made from {backbone.finetuned.weights} before fine-tune "
                "folders were models (its sha256 leaves the head out); re-extract it into a new "
                f"store with --model {backbone.finetuned.dir}"
            )
        raise StoreMismatchError(
            f"the {name} weights found here (sha256 {str(backbone.weights_sha256)[:12]}) are not "
            f"the ones store {store.path} was made with ({str(md.get('weights_sha256'))[:12]}); "
            "provide the original weights file"
        )
    return backbone
