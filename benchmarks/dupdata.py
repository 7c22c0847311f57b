"""The near-duplicate benchmark collections, built from real images that install from PyPI.

Three collection types, each written to its own folder with a ground-truth family per file:
- ``photos``: scikit-image, scikit-learn and matplotlib sample photos (varied content);
- ``textiles``: conformal-clip-data's simulated textile photos (homogeneous: 250x250 fabric);
- ``documents``: pages of text rendered with matplotlib's DejaVu fonts from the docstrings of
  standard-library modules, plus scikit-image's ``page`` and ``text`` scans (homogeneous:
  black text on white).
Some originals get edited copies (``EDITS``); the others are distinct distractors. Each family
is put in the ``tune`` or the ``heldout`` split by a seeded shuffle; thresholds are chosen on
``tune`` only.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

FONTS = Path(__import__("matplotlib").get_data_path()) / "fonts" / "ttf"


def _resize(im: Image.Image, rng: random.Random) -> Image.Image:
    return im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.LANCZOS)


def _crop(im: Image.Image, rng: random.Random) -> Image.Image:
    f = rng.uniform(0.05, 0.10)  # fraction of each side removed in total
    dx, dy = int(im.width * f), int(im.height * f)
    ox, oy = rng.randint(0, dx), rng.randint(0, dy)
    return im.crop((ox, oy, ox + im.width - dx, oy + im.height - dy))


def _flip(im: Image.Image, rng: random.Random) -> Image.Image:
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _rotate5(im: Image.Image, rng: random.Random) -> Image.Image:
    return im.rotate(5, resample=Image.Resampling.BILINEAR)


def _bright(im: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Brightness(im).enhance(1.2)


def _grey(im: Image.Image, rng: random.Random) -> Image.Image:
    return im.convert("L").convert("RGB")


def _recolour(im: Image.Image, rng: random.Random) -> Image.Image:
    r, g, b = im.split()  # channels rotated: a different palette, the same luminance layout
    return Image.merge("RGB", (b, r, g))


def _contrast(im: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Contrast(im).enhance(0.6)


def _border(im: Image.Image, rng: random.Random) -> Image.Image:
    pad = max(4, im.width // 12)  # a letterbox frame, as screenshots and reposts add
    out = Image.new("RGB", (im.width + 2 * pad, im.height + 2 * pad), (255, 255, 255))
    out.paste(im, (pad, pad))
    return out


def _watermark(im: Image.Image, rng: random.Random) -> Image.Image:
    out = im.convert("RGBA")
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    size = max(10, im.width // 9)
    font = ImageFont.truetype(str(FONTS / "DejaVuSans-Bold.ttf"), size)
    draw = ImageDraw.Draw(layer)
    draw.text(
        (im.width // 12, im.height // 2 - size), "(c) SAMPLE", font=font, fill=(255, 255, 255, 150)
    )
    draw.text((im.width // 12, im.height // 2 + 2), "stock photo", font=font, fill=(0, 0, 0, 110))
    return Image.alpha_composite(out, layer).convert("RGB")


# name -> (edit, how it is saved). "exif90" stores the pixels turned 90 degrees with an EXIF
# orientation tag that turns them back, as phone cameras write.
EDITS: dict[str, Callable[[Image.Image, random.Random], Image.Image] | None] = {
    "resize50": _resize,
    "jpeg30": None,
    "crop": _crop,
    "hflip": _flip,
    "rotate5": _rotate5,
    "bright20": _bright,
    "exif90": None,
    "grey": _grey,
    "watermark": _watermark,
    "recolour": _recolour,
    "contrast60": _contrast,
    "border": _border,
}


@dataclass(frozen=True)
class Item:
    path: Path
    family: int  # original's family number; every file of a family is a copy of the others
    edit: str  # "original" or a key of EDITS
    split: str  # "tune" or "heldout"


def _save(im: Image.Image, path: Path, edit: str) -> None:
    if edit == "jpeg30":
        im.save(path, "JPEG", quality=30)
    elif edit == "exif90":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display": undoes the CCW turn below
        im.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=92, exif=exif)
    else:
        im.save(path, "JPEG", quality=92)


def _photos() -> list[Image.Image]:
    import matplotlib.cbook
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    names = [
        "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass",
        "gravel", "immunohistochemistry", "moon", "retina", "rocket",
        "cell", "colorwheel",
    ]  # fmt: skip
    out = [Image.fromarray(np.asarray(getattr(d, n)())).convert("RGB") for n in names]
    out += [Image.fromarray(a) for a in load_sample_images().images]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        out.append(Image.open(f).convert("RGB"))
    # The Hubble deep field (not itself in the set) gives four distinct, unedited quarters:
    # look-alike distractors.
    big = Image.fromarray(np.asarray(d.hubble_deep_field()))
    w, h = big.size
    out += [big.crop((x, y, x + w // 2, y + h // 2)) for x in (0, w // 2) for y in (0, h // 2)]
    return out


def _textiles(n: int, seed: int) -> list[Image.Image]:
    from conformal_clip_data import textile_simulated_root

    files = sorted(textile_simulated_root().rglob("*.jpg"))
    random.Random(seed).shuffle(files)
    return [Image.open(f).convert("RGB") for f in files[:n]]


def _documents(n: int) -> list[Image.Image]:
    import ast
    import sysconfig
    import textwrap

    import skimage.data as d

    # Module docstrings of the standard library, read from source (nothing imported).
    texts = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if len(texts) >= n - 2:
            break
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))) or ""
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if len(doc) > 400:
            texts.append(doc)
    fonts = [FONTS / "DejaVuSerif.ttf", FONTS / "DejaVuSans.ttf", FONTS / "DejaVuSansMono.ttf"]
    pages = []
    for i, doc in enumerate(texts):
        page = Image.new("RGB", (420, 540), (250, 250, 246))
        font = ImageFont.truetype(str(fonts[i % 3]), 12)
        draw = ImageDraw.Draw(page)
        y = 24
        for para in doc.split("\n"):
            for line in textwrap.wrap(para, 60) or [""]:
                draw.text((24, y), line, font=font, fill=(20, 20, 20))
                y += 15
                if y > 510:
                    break
            if y > 510:
                break
        pages.append(page)
    pages += [Image.fromarray(d.page()).convert("RGB"), Image.fromarray(d.text()).convert("RGB")]
    return pages


def build(
    out: Path, kind: str, *, n: int, edited: int, seed: int = 0, edits: list[str] | None = None
) -> list[Item]:
    """Write collection ``kind`` under ``out``: up to ``n`` originals, the first ``edited`` of
    them with one copy per edit. Returns every file with its family and split."""
    rng = random.Random(seed)
    originals = {
        "photos": _photos,
        "textiles": lambda: _textiles(n, seed),
        "documents": lambda: _documents(n),
    }[kind]()[:n]
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(originals)))
    random.Random(seed + 1).shuffle(order)
    split = {fam: ("tune" if r % 2 == 0 else "heldout") for r, fam in enumerate(order)}
    items = []
    for fam, im in enumerate(originals):
        p = out / f"{kind}_{fam:04d}.jpg"
        im.save(p, "JPEG", quality=95)
        items.append(Item(p, fam, "original", split[fam]))
        if fam >= edited:
            continue
        for name in edits or list(EDITS):
            fn = EDITS[name]
            q = out / f"{kind}_{fam:04d}_{name}.jpg"
            _save(fn(im, rng) if fn is not None else im, q, name)
            items.append(Item(q, fam, name, split[fam]))
    return items


def true_pairs(items: list[Item]) -> set[tuple[str, str]]:
    """Every pair of files of one family (sorted path strings)."""
    by_fam: dict[int, list[str]] = {}
    for it in items:
        by_fam.setdefault(it.family, []).append(str(it.path))
    return {
        (a, b) if a < b else (b, a)
        for fs in by_fam.values()
        for i, a in enumerate(fs)
        for b in fs[i + 1 :]
    }


def jpeg_bytes(im: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return buf.getvalue()
