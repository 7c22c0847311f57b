"""What JPEG draft decoding costs in vector quality, and what it saves in decode time.

Usage: python benchmarks/draft.py [--model efficientnet_lite0] [--quick]

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling); Pillow's ``Image.draft``
picks the largest of those scales whose result keeps both sides >= the size asked for.
Extraction (and every query path, ``images.model_input.load_model_input``) asks for
``Preprocess.draft_size``. This script compares, for the real default model with its real
weights, the vector of each JPEG decoded at full size against its drafted vector:

- ``before`` (until issue 11): draft down to the resize target itself (``max(scale_size)``),
  and resize with the geometry (output size, crop) of the drafted image, whose last pixel
  libjpeg rounds up;
- ``2x``, ``3x``: never draft below F x the resize target, so the model's resize still
  does the last >= F x of the reduction, with the geometry of the full picture (the draft
  ``box``). ``3x`` is the rule kept (``models.preprocess.DRAFT_FACTOR``).

Images: the four sample photos (``samples/``) and three skimage textures (grass, gravel,
brick: fine detail everywhere, the hard case for DCT scaling), each resized with PIL to
shorter sides of 2x, 4x and 10x the model input and to 12 MP, saved as quality-90 JPEGs.
Upscaled photos are smooth; the textures are tiled at their native resolution, so they keep
pixel-level detail at every size.

Timing is decode + resize + crop (``load_model_input``) of the JPEG bytes, best of 3,
interleaved (full, before, 2x, ..., full, ...) so that load from other processes hits all alike.

Writes the ``draft`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from embedkit.extraction.embed import forward_batches  # noqa: E402
from embedkit.images.model_input import load_model_input  # noqa: E402
from embedkit.models.backbone import load_backbone  # noqa: E402
from embedkit.models.preprocess import Preprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# name -> (draft_size = factor x max(scale_size), resize geometry from the full picture)
RULES = {"before": (1, False), "2x": (2, True), "3x": (3, True)}


@dataclass(frozen=True)
class _Rule:
    """A ``Preprocess`` with another draft size (``load_model_input`` needs only these two).

    ``geometry=False`` is the resize before issue 11: output size and crop computed from the
    drafted image's own size, whose last pixel libjpeg rounds up, instead of the full picture's.
    """

    pre: Preprocess
    draft_size: int
    geometry: bool = True

    def to_uint8(
        self, img: Image.Image, box: tuple[float, float, float, float] | None = None
    ) -> np.ndarray:
        return self.pre.to_uint8(img, box if self.geometry else None)


def _sources() -> dict[str, np.ndarray]:
    from skimage import data

    out = {
        p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted(REPO.glob("samples/*.jpg"))
    }
    for name in ("grass", "gravel", "brick"):
        gray = getattr(data, name)()
        out[name] = np.repeat(gray[..., None], 3, axis=2)
    return out


def _make(name: str, arr: np.ndarray, short: int | None, area: int | None) -> Image.Image:
    h, w = arr.shape[:2]
    if area is not None:
        k = (area / (w * h)) ** 0.5
    else:
        assert short is not None
        k = short / min(w, h)
    size = (round(w * k), round(h * k))
    if name in ("grass", "gravel", "brick"):  # tile at native resolution: detail at every size
        reps = (-(-size[1] // h), -(-size[0] // w), 1)
        return Image.fromarray(np.tile(arr, reps)[: size[1], : size[0]])
    return Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _draft_scale(size: tuple[int, int], draft_size: int) -> int:
    """The scale Pillow's JPEG ``draft`` picks (JpegImagePlugin.draft, Pillow 9-13)."""
    scale = min(size[0] // draft_size, size[1] // draft_size)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--quick", action="store_true", help="two images, two sizes")
    args = ap.parse_args()
    backbone = load_backbone(args.model)  # real weights: random ones would say nothing
    pre = backbone.preprocess
    target = max(pre.scale_size)
    rules = {k: _Rule(pre, f * target, geo) for k, (f, geo) in RULES.items()}
    side = max(pre.size)
    sizes: list[tuple[str, int | None, int | None]] = [
        (f"{m}x input ({m * side} px short side)", m * side, None) for m in (2, 4, 10)
    ] + [("12 MP", None, 12_000_000)]
    # The worst case of a rule: libjpeg halves the image to just over draft_size, so the
    # resize has only DRAFT_FACTOR x left to do (odd sizes: the last reduced pixel is partial).
    sizes += [
        (f"worst case of 3x at 1/{s} ({s * rules['3x'].draft_size + 1} px)",
         s * rules["3x"].draft_size + 1, None)
        for s in (2, 4)
    ]  # fmt: skip
    sources = _sources()
    if args.quick:
        sources = dict(list(sources.items())[:1] + list(sources.items())[-1:])
        sizes = sizes[1:3]
    print(
        f"model {args.model}: input {pre.size}, resize target {target} px, "
        f"rules {', '.join(f'{k} = draft_size {r.draft_size}' for k, r in rules.items())}; "
        f"{len(sources)} images; load average {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for label, short, area in sizes:
        cos: dict[str, list[float]] = {k: [] for k in rules}
        ms: dict[str, list[float]] = {k: [] for k in ["full", *rules]}
        scales: dict[str, set[int]] = {k: set() for k in rules}
        worst_name: dict[str, str] = {}
        px = ""
        for name, arr in sources.items():
            img = _make(name, arr, short, area)
            px = f"{img.size[0]}x{img.size[1]}"
            data = _jpeg(img)
            variants = {"full": (pre, False), **{k: (r, True) for k, r in rules.items()}}
            best = dict.fromkeys(variants, float("inf"))
            crops: dict[str, np.ndarray] = {}
            for _ in range(3):
                for key, (crop, draft) in variants.items():
                    t0 = time.perf_counter()
                    crops[key] = load_model_input(data, crop, draft=draft).pixels
                    best[key] = min(best[key], time.perf_counter() - t0)
            vecs = dict(zip(crops, forward_batches(backbone, crops.values(), 8), strict=True))
            for k, r in rules.items():
                cos[k].append(_cos(vecs["full"], vecs[k]))
                if cos[k][-1] == min(cos[k]):
                    worst_name[k] = name
                scales[k].add(_draft_scale(img.size, r.draft_size))
            for k in ms:
                ms[k].append(best[k] * 1000)
        rows.append((label, px, scales, cos, ms, worst_name))
    lines = [
        "| JPEG size | rule | draft scale | cosine min (image) | cosine median | decode ms full | "
        "decode ms drafted | speedup vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, px, scales, cos, ms, worst_name in rows:
        full = float(np.median(ms["full"]))
        for k in rules:
            dr = float(np.median(ms[k]))
            sc = ", ".join(f"1/{s}" for s in sorted(scales[k]))
            lines.append(
                f"| {label}, e.g. {px} | {k} | {sc} | {min(cos[k]):.5f} ({worst_name[k]}) | "
                f"{float(np.median(cos[k])):.5f} | {full:.1f} | {dr:.1f} | {full / dr:.2f}x |"
            )
    table = "\n".join(lines)
    print(table)
    worst = {k: min(min(r[3][k]) for r in rows) for k in rules}
    cost = [float(np.median(r[4]["3x"])) / float(np.median(r[4]["before"])) for r in rows]
    summary = (
        "Worst cosine, drafted vs full decode: "
        f"{', '.join(f'{k} {v:.5f}' for k, v in worst.items())}. The 3x rule takes "
        f"{min(cost):.2f}-{max(cost):.2f}x the decode time of the rule before (median per size)."
    )
    print(summary)
    if not args.quick:
        body = (
            f"Model {args.model} (real weights), input {pre.size[0]}x{pre.size[1]}, resize "
            f"target {target} px. Rule `before` (until issue 11): draft_size = "
            f"{rules['before'].draft_size}, resize geometry from the drafted size. Rules `Fx`: "
            f"draft_size = F x {target}, resize geometry from the full picture (`box`); `3x` is "
            "the rule kept (`DRAFT_FACTOR`). Images: "
            f"{', '.join(sources)} (textures tiled at native resolution), quality-90 JPEGs. "
            "Times: decode + resize + crop per file, median over images of the best of 3; "
            f"load average {os.getloadavg()[0]:.1f} on a shared machine: rows at draft scale "
            "1/1 decode exactly like the full decode, so their 'speedup' shows the timing "
            "noise. The cosine columns are exact (deterministic decode and forward).\n\n"
            f"{table}\n\n{summary}"
        )
        write_section(
            "draft", "JPEG draft decoding: quality and speed (`benchmarks/draft.py`)", body
        )


if __name__ == "__main__":
    main()
