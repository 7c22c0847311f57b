"""The one way an image file becomes model input, for every entry path.

``load_model_input(source, preprocess)`` reads a file (or takes its bytes), hashes it, decodes
its first frame to RGB (``decode.open_rgb``: format allowlist, pixel cap, EXIF orientation,
JPEG draft rule) and resizes + center-crops it (``Preprocess.to_uint8``); on request it also
takes the pixel fingerprint (``images.pixelprint``) of the decoded image. Extraction workers
(local and Ray), ``embed`` on paths, search by file, classify by file and probe predict by file
all call it, so one file gives one vector whichever way it enters. Torch-free: it runs in
decode worker processes and on the query path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from .decode import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    _describe,
    content_hash,
    open_rgb,
    read_image_file,
)
from .pixelprint import grey_views


class Crop(Protocol):
    """What ``load_model_input`` needs from a ``models.preprocess.Preprocess``."""

    @property
    def draft_size(self) -> int: ...

    def to_uint8(
        self, img: Image.Image, box: tuple[float, float, float, float] | None = None
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class ModelInput:
    """One file, ready for the model.

    Attributes:
        pixels: uint8 (H, W, 3) after resize + center crop.
        width: full-resolution width after EXIF orientation (as stored by extraction).
        height: full-resolution height after EXIF orientation.
        n_frames: frames or pages in the file; only the first is used.
        content_hash: sha256 hex of the file's bytes (the store's ``content_hash``).
        warnings: non-fatal problems (corrupt EXIF, unreadable trailing PNG chunks, ...).
        views: uint8 (2, 32, 32): the grey views the decoded image's pixel fingerprint is
            computed from (``images.pixelprint``), when asked for.
    """

    pixels: np.ndarray
    width: int
    height: int
    n_frames: int
    content_hash: str
    warnings: list[str] = field(default_factory=list)
    views: np.ndarray | None = None


def load_model_input(
    source: str | os.PathLike[str] | bytes,
    preprocess: Crop,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = True,
    digest: str | None = None,
    pixelprint: bool = False,
) -> ModelInput:
    """Turn one image file into the model's uint8 input crop, exactly as extraction does.

    Args:
        source: a file path, or the file's bytes.
        preprocess: the model's ``Preprocess`` (its ``draft_size`` and ``to_uint8``).
        max_pixels: refuse images declaring more pixels (``decompression_bomb``).
        draft: let large JPEGs decode at a reduced scale (``preprocess.draft_size``). Every
            entry path leaves it on; ``False`` is for measuring what the draft costs.
        digest: the sha256 hex of ``source`` when the caller already computed it (a decode
            worker hashes first to skip files whose vector is already stored).
        pixelprint: also take the grey views of the decoded image (``images.pixelprint``)
            for near-duplicate checks: what ``index.verify`` computes from the file with this
            draft size, without decoding it again.

    Raises:
        ImageDecodeError: the file cannot be read or decoded; ``reason`` is the one extraction
            records for it.
    """
    data = source if isinstance(source, bytes) else read_image_file(source)
    img = open_rgb(data, max_pixels=max_pixels, draft_size=preprocess.draft_size if draft else None)
    try:
        pixels = preprocess.to_uint8(img.image, img.box)
    except ImageDecodeError:
        raise
    except Exception as e:  # a resize bug on one odd image must cost that file, not the run
        raise ImageDecodeError("decode_error", _describe(e)) from e
    views = None
    if pixelprint:
        try:
            views = grey_views(img.image)
        except Exception:  # noqa: BLE001 - no views costs a second decode later, not the file
            views = None
    return ModelInput(
        pixels=pixels,
        width=img.width,
        height=img.height,
        n_frames=img.n_frames,
        content_hash=digest if digest is not None else content_hash(data),
        warnings=img.warnings,
        views=views,
    )
