"""The model's own eval preprocessing, split in two halves.

``Preprocess.to_uint8`` (resize + center crop, on a PIL image) runs in decode workers and
returns a small uint8 HWC array, which is cheap to pass between processes. ``Preprocess.
normalize`` (scale, mean/std) runs on whole batches in the model process; it is the only part
that needs torch, which it imports when called, so the dataclass loads without torch. Together they
reproduce timm's ``transforms_imagenet_eval`` exactly: ``Resize(floor(size / crop_pct))``
then ``CenterCrop(size)``, ``ToTensor``, ``Normalize(mean, std)`` (on a fully decoded image,
to float32 rounding: tests/test_entry_paths.py). ``draft_size`` is the JPEG draft rule that
``images.model_input.load_model_input`` applies on every entry path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch loads only where a batch is normalised in torch (Backbone.forward)
    import torch

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# Resized images above this many pixels (64 crops of 224 x 224, ~10 MB) only occur for extreme
# aspect ratios; those resample just the crop (see ``to_uint8``).
_MAX_RESIZED_PIXELS = 64 * 224 * 224


# JPEG draft rule: libjpeg may decode at 1/2, 1/4 or 1/8 scale as long as the shorter side
# keeps at least DRAFT_FACTOR x the resize target (``scale_size``), so the model's own
# antialiased resize still does the last >= 3x of the reduction. Measured with
# efficientnet_lite0's real weights on photos and textures from 2x the input to 12 MP
# (benchmarks/draft.py, RESULTS.md ``draft``): drafting down to 1x the target cost cosines
# down to 0.96 against a full decode; see RESULTS.md for the numbers of the rule kept here.
DRAFT_FACTOR = 3


@dataclass(frozen=True)
class Preprocess:
    """Resolved eval preprocessing, recorded in every store.

    Attributes:
        size: output (height, width) in pixels.
        crop_pct: fraction of the resized image kept by the center crop (timm convention).
        crop_mode: timm crop mode; ``center`` resizes the shorter side, ``squash`` both sides.
        interpolation: resize filter name, one of ``_PIL_INTERPOLATION``.
        mean: per-channel mean in the pixel scale given by ``pixel_scale``.
        std: per-channel std in the same scale.
        pixel_scale: pixels are divided by this before mean/std: 255 for the usual
            ``ToTensor`` convention, 1 for VGG/Caffe-style mean subtraction on 0..255 values.
        channel_order: ``RGB``, or ``BGR`` for Caffe-converted weights.
    """

    size: tuple[int, int]
    crop_pct: float
    crop_mode: str
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_scale: float = 255.0
    channel_order: str = "RGB"

    @classmethod
    def from_timm_config(cls, cfg: dict[str, Any]) -> Preprocess:
        """Build from ``timm.data.resolve_model_data_config(model)``."""
        _, h, w = cfg["input_size"]
        return cls(
            size=(int(h), int(w)),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            crop_mode=str(cfg.get("crop_mode", "center")),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            size=(int(d["size"][0]), int(d["size"][1])),
            crop_pct=float(d["crop_pct"]),
            crop_mode=str(d["crop_mode"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            pixel_scale=float(d.get("pixel_scale", 255.0)),
            channel_order=str(d.get("channel_order", "RGB")),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @property
    def scale_size(self) -> tuple[int, int]:
        """Size before the center crop, as timm computes it (``floor(size / crop_pct)``)."""
        h, w = self.size
        return math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)

    @property
    def draft_size(self) -> int:
        """Smallest side a JPEG may be draft-decoded to (see ``DRAFT_FACTOR``)."""
        return DRAFT_FACTOR * max(self.scale_size)

    def to_uint8(
        self, img: Image.Image, box: tuple[float, float, float, float] | None = None
    ) -> np.ndarray:
        """Resize and center-crop an RGB PIL image; returns uint8 (H, W, 3).

        Args:
            img: the picture, any mode (converted to RGB).
            box: the picture's extent in ``img`` pixels when ``img`` was draft-decoded
                (``DecodedImage.box``): the resize then maps the same geometry, output size
                and crop as for the full-resolution picture.
        """
        if img.mode != "RGB":
            img = img.convert("RGB")
        resample = _PIL_INTERPOLATION.get(self.interpolation, Image.Resampling.BILINEAR)
        th, tw = self.size
        # Geometry comes from the full picture: (bw, bh) is its size in ``img`` pixels.
        bx, by = (box[0], box[1]) if box is not None else (0.0, 0.0)
        bw, bh = (box[2] - box[0], box[3] - box[1]) if box is not None else img.size
        if self.crop_mode == "squash":
            sh, sw = self.scale_size
            img = img.resize((sw, sh), resample, box=box)
        else:
            # torchvision Resize(int) semantics: the shorter side becomes scale_size.
            short = self.scale_size[0] if self.size[0] == self.size[1] else None
            w, h = bw, bh
            if short is not None:
                if w <= h:
                    nw, nh = short, int(short * h / w)
                else:
                    nh, nw = short, int(short * w / h)
            else:
                nh, nw = self.scale_size
            top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
            if nw * nh > _MAX_RESIZED_PIXELS and top >= 0 and left >= 0:
                # Resample only the crop, without allocating the full resized image: a
                # 1 x 200,000 banner resized to a 256-pixel short side would be 51M x 256
                # pixels (39 GB). PIL maps output pixels and filter support through ``box``
                # like the full resize (measured: within 2 of resize-then-crop per uint8
                # value); ordinary photos keep the exact resize-then-crop of timm.
                sx, sy = w / nw, h / nh
                crop = (
                    bx + left * sx,
                    by + top * sy,
                    bx + (left + tw) * sx,
                    by + (top + th) * sy,
                )
                return np.asarray(img.resize((tw, th), resample, box=crop), dtype=np.uint8)
            if box is not None or (nw, nh) != img.size:
                img = img.resize((nw, nh), resample, box=box)
        w, h = img.size
        # torchvision CenterCrop rounding: top = round((h - th) / 2).
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        if top < 0 or left < 0:  # smaller than the crop: pad like torchvision (zeros)
            canvas = Image.new("RGB", (max(w, tw), max(h, th)))
            canvas.paste(img, (max(0, -left), max(0, -top)))
            img, top, left = canvas, max(top, 0), max(left, 0)
        img = img.crop((left, top, left + tw, top + th))
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), normalised, on ``batch.device``."""
        import torch  # lazily: the ONNX path (graph includes this step) never imports torch

        x = batch.permute(0, 3, 1, 2).float()
        if self.channel_order == "BGR":
            x = x.flip(1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * self.pixel_scale
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1) * self.pixel_scale
        return (x - mean) / std
