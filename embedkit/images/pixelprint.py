"""The pixel fingerprint of one decoded image: what near-duplicate checks compare.

An image (EXIF orientation applied) is made greyscale (so greyscale and recoloured copies
compare alike), has the blank corners of a small turn painted over (``_corner_mask``), is
levelled when it is a page fed askew (``page_skew``), is stripped of flat frames and margins
(``trim_flat_border``), and is looked at in two views: the whole image and its centre
(``CENTRE`` of each side: what a 5-10% crop, a small rotation's corners or an edge watermark
leave alone). Per view:

- ``thumb``: a 16 x 16 thumbnail, zero mean and unit norm, so a dot product is the
  correlation of the two luminance layouts (brightness/contrast changes barely move it);
- ``phash``: the 64-bit DCT perceptual hash of each of the 8 turns and mirrors of the
  32 x 32 thumbnail, so a mirrored or 90-degree-turned copy is compared in its own orientation;
- ``dhash``: the 64-bit difference hash (9 x 8 horizontal gradients) as displayed.

Computed in two places that must agree: extraction's decode workers take the grey views of the
image they decoded for the model (``images.model_input.load_model_input(..., pixelprint=True)``,
2 KB per file), the extracting process hashes them a batch at a time and keeps them in the
store (``store.pixels``); ``index.verify`` does the same from the file when a store has none.
Both start from ``decode.open_rgb(..., draft_size=<the model's draft size>)``, so for one file
and one model they are equal (tests/test_pixelprint.py). Torch-free: it runs in decode workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

# What a fingerprint is, as a number: a stored fingerprint made under another recipe is
# ignored (recomputed). Bump it with any change below that changes the bits.
RECIPE = 2
SIDE = 32  # thumbnail side the hashes are computed from (pHash's classic 32 x 32)
# JPEG draft decoding for files fingerprinted without a model's draft size (a folder compared by
# pixels alone, bare arrays with paths): keeps at least this shorter side, ~10x faster than
# full size. A store's files use its model's draft size instead (what extraction computed).
FILE_DRAFT = 64
THUMB = 16  # correlation thumbnail side
N_ORIENT = 8  # identity, 3 turns, and the mirror of each
CENTRE = 0.92  # the centre view keeps this fraction of each side
VIEWS = ("whole", "centre")
# A leading or trailing row/column whose grey levels vary less than FLAT times the whole
# image's (standard deviations) is frame or margin, not content: letterboxed, framed and
# screenshot copies (and pages whose margins a crop cut) are compared on their content. At most
# MAX_TRIM of each side goes. Relative, so that a contrast change trims the same rows: an
# absolute 6 grey levels trimmed a quarter of each side off low-contrast photos (a cell, the
# moon) at 60% contrast and none at 100%, and the two no longer matched (recipe 1).
FLAT, MAX_TRIM = 0.10, 0.25
TRIM_SIDE = 128  # the shorter side (at least) flat borders are looked for at
EDGE_LINES = 2  # non-flat lines at the very edge a flat border may start after
# A turned copy (a scan fed askew, a photo straightened by a few degrees) has blank triangles
# in its corners, filled with one colour: left there, they dominate the thumbnails of
# low-detail images (two turned textures correlated 0.84, more than with their originals) and
# keep a turned page's margins from being trimmed like the original's. A corner region of one
# grey level (within CORNER_TOL) that is triangle-shaped (its area at least CORNER_SHAPE of the
# right triangle its two edge runs span, at most 3/4 of their rectangle) and small (at most
# CORNER_MAX of the image) is painted in the grey level around it, when two corners have one.
CORNER_TOL, CORNER_SHAPE, CORNER_MAX = 10, 0.35, 0.04
# A page fed askew (a scan, a photo of a sheet) is turned level before its views are taken, so
# that its thumbnails line up with the straight original's: a page-like content (at least PAGE
# of it within PAGE_TOL grey levels of its median: paper) is turned by the angle in SKEW_ANGLES
# whose row profile is sharpest, when that is SKEW_GAIN times sharper than as it is. Pictures
# and textures are not page-like and are left as they are.
PAGE, PAGE_TOL = 0.6, 12
SKEW_ANGLES = tuple(float(d) for d in range(-8, 9) if d)  # degrees
# Levelled text lines: a row profile 7.6-60x sharper than 5 degrees off (rendered pages);
# pictures that pass as page-like (a grey moon) gain at most ~1.8 from any turn.
SKEW_GAIN = 3.0
_SKEW_TAN = np.tan(np.deg2rad(np.array((0.0, *SKEW_ANGLES))))  # the shears, as is first

_BITS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


@dataclass(frozen=True)
class PixelPrint:
    """One image's fingerprint, per view (0 = whole, 1 = centre).

    Attributes:
        phash: (2, 8) uint64: the pHash of each orientation (0 = as displayed; see
            ``orientations``).
        thumb: (2, THUMB*THUMB) float16: the unit-norm zero-mean thumbnail as displayed.
        dhash: (2,) uint64: the dHash as displayed.
    """

    phash: np.ndarray
    thumb: np.ndarray
    dhash: np.ndarray


def orientations(a: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral transforms of a square array; index 0 is the identity, 4 the mirror."""
    turns = [np.rot90(a, t) for t in range(4)]
    return turns + [np.fliplr(t) for t in turns]


def _content_box(a: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of ``a`` (H, W) without its flat leading/trailing rows and
    columns (the whole of ``a`` when that would leave nothing)."""
    h, w = a.shape
    whole = (0, 0, w, h)
    # variance as E[x^2] - E[x]^2 in float64 sums: two passes instead of np.std's four
    x = a.astype(np.float32)
    x2 = x * x
    flat = (FLAT * FLAT) * float(x2.mean(dtype=np.float64) - x.mean(dtype=np.float64) ** 2)
    # a row is judged without its EDGE_LINES end pixels (and a column likewise): the sides
    # of a hairline frame cross every row and column
    e = EDGE_LINES if min(h, w) > 4 * EDGE_LINES else 0
    xr, xr2 = x[:, e : w - e], x2[:, e : w - e]
    xc, xc2 = x[e : h - e], x2[e : h - e]
    rows = xr2.mean(axis=1, dtype=np.float64) - xr.mean(axis=1, dtype=np.float64) ** 2 < flat
    cols = xc2.mean(axis=0, dtype=np.float64) - xc.mean(axis=0, dtype=np.float64) ** 2 < flat
    if rows.all() or cols.all():
        return whole  # no content row or column to trim to

    def lead(flags: np.ndarray) -> int:
        return int(np.argmin(flags)) if not flags.all() else len(flags)

    def run(flags: np.ndarray, limit: int) -> int:
        # up to EDGE_LINES non-flat lines at the very edge are stepped over when flat ones
        # follow: a hairline frame, or the blended edge a turned copy keeps once levelled
        n = lead(flags)
        for skip in range(1, EDGE_LINES + 1):
            m = lead(flags[skip:])
            if m >= EDGE_LINES:
                n = max(n, skip + m)
        return min(n, limit)

    top, bottom = run(rows, int(h * MAX_TRIM)), run(rows[::-1], int(h * MAX_TRIM))
    left, right = run(cols, int(w * MAX_TRIM)), run(cols[::-1], int(w * MAX_TRIM))
    if h - top - bottom < 4 or w - left - right < 4:
        return whole  # (nearly) all flat: nothing to trim to
    return left, top, w - right, h - bottom


def _dilate(mask: np.ndarray, n: int) -> np.ndarray:
    """``mask`` grown by ``n`` pixels (4-neighbourhood, as ``scipy.ndimage.binary_dilation``
    with its default structure)."""
    out = mask.copy()
    for _ in range(n):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _corner_mask(a: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(mask, grey level) of the blank corner triangles a small turn left in ``a`` (H, W),
    or None when fewer than two corners have one."""
    h, w = a.shape
    if h < 8 or w < 8:
        return None
    x = a.astype(np.int16)
    mask = np.zeros((h, w), dtype=bool)
    found = 0
    for y0, x0 in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
        # the runs of the corner's grey level along its row and column bound the triangle;
        # only that box is looked at (a few pixels, not the image), turned so that the
        # corner is its top-left
        box = x[::-1] if y0 else x
        box = box[:, ::-1] if x0 else box
        v = box[0, 0]
        run_x = int(np.argmin(np.abs(box[0] - v) <= CORNER_TOL))  # 0: the whole side
        run_y = int(np.argmin(np.abs(box[:, 0] - v) <= CORNER_TOL))
        if run_x < 2 or run_y < 2 or 0.5 * run_x * run_y > CORNER_MAX * h * w:
            continue
        same = np.abs(box[:run_y, :run_x] - v) <= CORNER_TOL
        # the region: each row's run of the corner's level from the edge (a triangle is that)
        runs = np.where(same.all(axis=1), run_x, np.argmin(same, axis=1))
        area = int(runs.sum())
        if not CORNER_SHAPE * 0.5 * run_x * run_y <= area <= 0.75 * run_x * run_y:
            continue  # not a triangle: a flat patch or frame of its own, not a turn's corner
        region = np.arange(run_x)[None, :] < runs[:, None]
        region = region[::-1] if y0 else region
        region = region[:, ::-1] if x0 else region
        ys = slice(h - run_y, h) if y0 else slice(0, run_y)
        xs = slice(w - run_x, w) if x0 else slice(0, run_x)
        mask[ys, xs] |= region
        found += 1
    if found < 2:
        return None
    ring = _dilate(mask, 2) & ~mask
    if not ring.any():
        return None
    return mask, int(np.median(a[ring]))


def page_skew(a: np.ndarray) -> tuple[float, int]:
    """(degrees, paper grey level): the turn (as ``Image.rotate`` takes it) that levels the
    lines of a page-like content crop ``a`` (H, W); 0.0 when it is not page-like or no turn is
    clearly better.

    Each candidate turn is scored by how sharply the ink's row profile alternates (level text
    lines: high) under the shear that approximates that turn, all angles in one ``bincount``
    of the ink pixels (turning the image 16 times cost ~10x more)."""
    hist = np.bincount(a.ravel(), minlength=256)
    level = int(np.argmax(hist))  # the paper's grey: the commonest level
    h, w = a.shape
    if (
        h < 16
        or w < 16
        or hist[max(0, level - PAGE_TOL) : level + PAGE_TOL + 1].sum() < PAGE * a.size
    ):
        return 0.0, level
    off = np.abs(a.astype(np.int16) - level)
    ys, xs = np.nonzero(off > PAGE_TOL)  # the ink (dark on light paper or the other way)
    if len(ys) < 32:
        return 0.0, level
    ink = off[ys, xs].astype(np.float64)
    # every angle's profile in one bincount: angle i's rows are shifted to [i * span, ...)
    span = h + 2 * w
    rows = np.rint(ys[None, :] - (xs - w / 2.0)[None, :] * _SKEW_TAN[:, None]).astype(np.int64)
    rows += w + span * np.arange(len(_SKEW_TAN))[:, None]
    profiles = np.bincount(rows.ravel(), np.tile(ink, len(_SKEW_TAN)), len(_SKEW_TAN) * span)
    scores = np.var(np.diff(profiles.reshape(len(_SKEW_TAN), span), axis=1), axis=1)
    best = int(np.argmax(scores))
    if best == 0 or scores[best] <= SKEW_GAIN * scores[0]:
        return 0.0, level
    return SKEW_ANGLES[best - 1], level


def trim_flat_border(a: np.ndarray) -> np.ndarray:
    """``a`` (H, W) without its flat leading/trailing rows and columns."""
    left, top, right, bottom = _content_box(a)
    return a[top:bottom, left:right]


def grey_views(img: Image.Image) -> np.ndarray:
    """(2, SIDE, SIDE) uint8: the whole and centre views of a decoded image, greyscale: what
    the fingerprint is computed from (``hash_views``), and all a decode worker sends back.

    Resized by Pillow in 8-bit greyscale (``L``), straight from the trimmed box: ~10x faster
    than a float image on a 540 x 420 page (the thumbnails are rounded to whole grey levels)."""
    grey = img.convert("L")
    # Flat borders are found on a copy reduced to about TRIM_SIDE (Pillow's SIMD box
    # reduction): the statistics of every row and column cost more than the rest together,
    # and a border located to within ``f`` pixels moves a 32 x 32 thumbnail by < 1/4 pixel.
    f = max(1, min(grey.size) // TRIM_SIDE)
    small = grey.reduce(f) if f > 1 else grey
    a = np.asarray(small)
    corners = _corner_mask(a)
    if corners is not None:
        mask, level = corners
        a = np.where(mask, np.uint8(level), a)
        grey = grey.copy()
        grey.paste(level, mask=Image.fromarray(mask).resize(grey.size, Image.Resampling.NEAREST))
    box = _content_box(a)
    angle, level = page_skew(a[box[1] : box[3], box[0] : box[2]])
    if angle:
        grey = grey.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=level)
        small = grey.reduce(f) if f > 1 else grey
        box = _content_box(np.asarray(small))
    left, top, right, bottom = (c * f for c in box)
    right = grey.width if right >= small.width * f else right
    bottom = grey.height if bottom >= small.height * f else bottom
    h, w = bottom - top, right - left
    dh, dw = int(h * (1 - CENTRE) / 2), int(w * (1 - CENTRE) / 2)
    boxes = ((left, top, right, bottom), (left + dw, top + dh, right - dw, bottom - dh))
    out = np.empty((len(VIEWS), SIDE, SIDE), dtype=np.uint8)
    for v, box in enumerate(boxes):
        out[v] = np.asarray(grey.resize((SIDE, SIDE), Image.Resampling.BOX, box=box))
    return out


def _rot90(c: np.ndarray) -> np.ndarray:
    """DCT-II coefficients (..., n, n) of ``np.rot90`` of the image they came from.

    ``rot90(X) = flipud(X.T)``; a transpose transposes the coefficients and reversing the rows
    multiplies coefficient row u by (-1)^u (the DCT-II basis is (anti)symmetric)."""
    sign = np.where(np.arange(c.shape[-1]) % 2 == 0, 1.0, -1.0).astype(c.dtype)
    return np.swapaxes(c, -1, -2) * sign[:, None]


def _fliplr(c: np.ndarray) -> np.ndarray:
    sign = np.where(np.arange(c.shape[-1]) % 2 == 0, 1.0, -1.0).astype(c.dtype)
    return c * sign[None, :]


def _low_orientations(low: np.ndarray) -> np.ndarray:
    """(M, 8, 8, 8): the low 8 x 8 DCT block of each of the ``orientations`` of the images
    whose block is ``low`` (M, 8, 8): one DCT per image instead of eight."""
    turns = [low]
    for _ in range(3):
        turns.append(_rot90(turns[-1]))
    return np.stack(turns + [_fliplr(t) for t in turns], axis=1)


@cache
def _dct_basis(n: int, k: int) -> np.ndarray:
    """(k, n): the first ``k`` orthonormal DCT-II basis rows of length ``n`` (what
    ``scipy.fft.dct(norm="ortho")`` multiplies by; two small products instead of importing
    scipy.fft, 0.4 s of every fresh process)."""
    u, i = np.arange(k)[:, None], np.arange(n)[None, :]
    basis = np.cos(np.pi * (2 * i + 1) * u / (2 * n)) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    return basis


@cache
def _box_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src): Pillow's BOX resize along one axis, as a matrix (read off Pillow itself)."""
    w = np.empty((dst, src), dtype=np.float64)
    for j in range(src):
        basis = np.zeros((1, src), dtype=np.float32)
        basis[0, j] = 1.0
        w[:, j] = np.asarray(
            Image.fromarray(basis).resize((dst, 1), Image.Resampling.BOX), np.float64
        )[0]
    return w


def hash_views(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pHashes (M, 8) uint64, thumbnails (M, THUMB*THUMB) float32 and dHashes (M,) uint64 of
    an (M, SIDE, SIDE) stack of greyscale views, all at once (a few ms for thousands)."""
    m = len(grey)
    grey = grey.astype(np.float32)
    # pHash: the top-left 8 x 8 DCT coefficients against their median (the DC term left out
    # of the median, as pHash does), per orientation.
    c = _dct_basis(SIDE, 8)
    low = c @ grey.astype(np.float64) @ c.T  # the low 8 x 8 of the orthonormal 2-D DCT-II
    coef = _low_orientations(low).reshape(m, N_ORIENT, 64)
    bits = coef > np.median(coef[:, :, 1:], axis=2, keepdims=True)
    phash = (bits.astype(np.uint64) * _BITS).sum(axis=2, dtype=np.uint64)
    k = SIDE // THUMB
    small = grey.reshape(m, THUMB, k, THUMB, k).mean(axis=(2, 4))
    small = small - small.mean(axis=(1, 2), keepdims=True)
    norm = np.maximum(np.linalg.norm(small.reshape(m, -1), axis=1), 1e-6)
    thumb = (small.reshape(m, -1) / norm[:, None]).astype(np.float32)
    # dHash: Pillow's BOX resize to 9 x 8, as two matrix products. Rounded to 1e-3 grey
    # levels so that equal neighbours (flat paper, a flat sky) stay equal whatever the
    # summation order: their bit is 0, never rounding noise.
    d = np.round(_box_weights(SIDE, 8) @ grey.astype(np.float64) @ _box_weights(SIDE, 9).T, 3)
    dbits = (d[:, :, 1:] > d[:, :, :-1]).reshape(m, 64)
    dhash = (dbits.astype(np.uint64) * _BITS).sum(axis=1, dtype=np.uint64)
    return phash, thumb, dhash


def pixel_prints(views: np.ndarray) -> list[PixelPrint]:
    """The fingerprints of images from their (N, 2, SIDE, SIDE) ``grey_views``."""
    n = len(views)
    phash, thumb, dhash = hash_views(views.reshape(n * len(VIEWS), SIDE, SIDE))
    nv = len(VIEWS)
    thumb16 = thumb.astype(np.float16)
    return [
        PixelPrint(
            phash[i * nv : (i + 1) * nv],
            thumb16[i * nv : (i + 1) * nv],
            dhash[i * nv : (i + 1) * nv],
        )
        for i in range(n)
    ]


def pixel_print(img: Image.Image) -> PixelPrint:
    """The fingerprint of one decoded image (as displayed: EXIF orientation applied)."""
    return pixel_prints(grey_views(img)[None])[0]
