"""Pixel-level evidence for near-duplicate pairs: a small greyscale fingerprint per image.

Each image is decoded once (EXIF orientation applied, JPEG draft decoding), made greyscale
(so greyscale and recoloured copies compare alike), stripped of flat frames and margins
(``trim_flat_border``), and looked at in two views: the whole image and its centre
(``CENTRE`` of each side: what a 5-10% crop, a small rotation's corners or an edge watermark
leave alone). Per view:
- ``thumb``: a 16 x 16 thumbnail, zero mean and unit norm, so a dot product is the
  correlation of the two luminance layouts (brightness/contrast changes barely move it);
- ``phash``: the 64-bit DCT perceptual hash of each of the 8 turns and mirrors of the
  32 x 32 thumbnail, so a mirrored or 90-degree-turned copy is compared in its own
  orientation.
A pair is compared in the views and orientation that match best (``compare``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.fft import dctn

from ..images.decode import ImageDecodeError, open_rgb

SIDE = 32  # thumbnail side the hashes are computed from (pHash's classic 32 x 32)
THUMB = 16  # correlation thumbnail side
DRAFT = 64  # JPEG draft decoding keeps at least this shorter side: ~10x faster than full size
READ_BLOCK = 1024  # files in flight at once while fingerprinting
N_ORIENT = 8  # identity, 3 turns, and the mirror of each
CENTRE = 0.92  # the centre view keeps this fraction of each side
VIEWS = ("whole", "centre")
# (view of a, view of b) compared: whole-whole, centre-centre (rotated or edge-marked
# copies), centre of a vs whole of b and back (b or a is a crop of the other).
VIEW_PAIRS = ((0, 0), (1, 1), (1, 0), (0, 1))


def _orientations(a: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral transforms of a square array; index 0 is the identity, 4 the mirror."""
    turns = [np.rot90(a, t) for t in range(4)]
    return turns + [np.fliplr(t) for t in turns]


def _orientation_perms(side: int) -> np.ndarray:
    """(8, side*side) int: flat index permutations giving each orientation of a flat array."""
    grid = np.arange(side * side).reshape(side, side)
    return np.stack([o.ravel() for o in _orientations(grid)])


_PERM = _orientation_perms(THUMB)
_BITS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def _phashes(stack: np.ndarray) -> np.ndarray:
    """(M,) uint64 pHashes of an (M, SIDE, SIDE) stack: the top-left 8 x 8 DCT coefficients
    against their median (the DC term left out of the median, as pHash does)."""
    low = dctn(stack, type=2, norm="ortho", axes=(1, 2))[:, :8, :8].reshape(len(stack), 64)
    bits = low > np.median(low[:, 1:], axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BITS).sum(axis=1, dtype=np.uint64)


@dataclass(frozen=True)
class Fingerprints:
    """Per-image pixel fingerprints, rows aligned with the images asked for.

    Attributes:
        ok: (N,) bool, False where the file could not be read (gone, unreadable).
        phash: (N, 2, 8) uint64: per view (whole, centre), the pHash of each orientation
            (0 = as displayed).
        thumb: (N, 2, THUMB*THUMB) float16: per view, the unit-norm zero-mean thumbnail as
            displayed (other orientations are derived when compared).
        dhash: (N, 2) uint64: per view, the 64-bit difference hash (9 x 8 horizontal
            gradients) as displayed: it survives small rotations, crops and overlaid text
            better than pHash.
        errors: row -> why it could not be read.
    """

    ok: np.ndarray
    phash: np.ndarray
    thumb: np.ndarray
    dhash: np.ndarray
    errors: dict[int, str]


def fingerprint_array(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(8,) pHashes and (THUMB*THUMB,) thumbnail of one SIDE x SIDE greyscale array."""
    hashes = _phashes(np.stack(_orientations(grey)))
    small = grey.reshape(THUMB, SIDE // THUMB, THUMB, SIDE // THUMB).mean(axis=(1, 3))
    small = small - small.mean()
    small /= max(float(np.linalg.norm(small)), 1e-6)
    return hashes, small.ravel().astype(np.float32)


# A leading or trailing row/column whose grey levels vary less than this (of 255) is frame or
# margin, not content: letterboxed, framed and screenshot copies (and pages whose margins a
# crop cut) are compared on their content. At most MAX_TRIM of each side goes.
FLAT, MAX_TRIM = 6.0, 0.25


def trim_flat_border(a: np.ndarray) -> np.ndarray:
    """``a`` (H, W) without its flat leading/trailing rows and columns."""
    h, w = a.shape
    rows = a.std(axis=1) < FLAT
    cols = a.std(axis=0) < FLAT
    if rows.all() or cols.all():
        return a  # no content row or column to trim to

    def run(flags: np.ndarray, limit: int) -> int:
        n = int(np.argmin(flags)) if not flags.all() else len(flags)
        return min(n, limit)

    top, bottom = run(rows, int(h * MAX_TRIM)), run(rows[::-1], int(h * MAX_TRIM))
    left, right = run(cols, int(w * MAX_TRIM)), run(cols[::-1], int(w * MAX_TRIM))
    if h - top - bottom < 4 or w - left - right < 4:
        return a  # (nearly) all flat: nothing to trim to
    return a[top : h - bottom, left : w - right]


def _views(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """The whole and centre views of one file, each SIDE x SIDE greyscale."""
    from PIL import Image

    img = open_rgb(path, draft_size=DRAFT).image.convert("L")
    a = trim_flat_border(np.asarray(img, dtype=np.float32))
    h, w = a.shape
    dh, dw = int(h * (1 - CENTRE) / 2), int(w * (1 - CENTRE) / 2)
    out = []
    for view in (a, a[dh : h - dh, dw : w - dw]):
        small = Image.fromarray(view).resize((SIDE, SIDE), Image.Resampling.BOX)
        out.append(np.asarray(small, dtype=np.float32))
    return out


def _read(path: str | None) -> list[np.ndarray] | str:
    """The views of one file, or why it could not be read."""
    if path is None:
        return "no file (bare vectors)"
    try:
        return _views(path)
    except ImageDecodeError as e:
        return str(e)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def fingerprints(paths: list[str | None], *, threads: int | None = None) -> Fingerprints:
    """Fingerprints of the images at ``paths``; a path that is None or cannot be decoded is
    recorded in ``errors`` (its row stays ``ok = False``).

    Files are decoded by ``threads`` threads (default: one per CPU, at most 8): Pillow
    releases the GIL while decoding, which is most of the work.
    """
    n = len(paths)
    ok = np.zeros(n, dtype=bool)
    ph = np.zeros((n, len(VIEWS), N_ORIENT), dtype=np.uint64)
    th = np.zeros((n, len(VIEWS), THUMB * THUMB), dtype=np.float16)
    dh = np.zeros((n, len(VIEWS)), dtype=np.uint64)
    errors: dict[int, str] = {}
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, n, READ_BLOCK):  # a block at a time: N futures would not fit
            block = pool.map(_read, paths[start : start + READ_BLOCK])
            for i, views in enumerate(block, start):
                if isinstance(views, str):
                    errors[i] = views
                    continue
                for v, grey in enumerate(views):
                    ph[i, v], th[i, v] = fingerprint_array(grey)
                    dh[i, v] = _dhash(grey)
                ok[i] = True
    return Fingerprints(ok, ph, th, dh, errors)


def _dhash(grey: np.ndarray) -> np.uint64:
    from PIL import Image

    small = np.asarray(Image.fromarray(grey).resize((9, 8), Image.Resampling.BOX), np.float32)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return np.uint64((bits.astype(np.uint64) * _BITS).sum(dtype=np.uint64))


def oriented_thumbs(fp: Fingerprints, rows: np.ndarray, view: int) -> np.ndarray:
    """(P, 8, THUMB*THUMB) float32: the thumbnails of ``rows`` in all 8 orientations."""
    return fp.thumb[rows, view].astype(np.float32)[:, _PERM]


_POP = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance between uint64 arrays (broadcast)."""
    x = np.bitwise_xor(a, b)
    return _POP[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.int64)


ORIENTATION_NAMES = (
    "as is", "turned 90", "turned 180", "turned 270",
    "mirrored", "mirrored, turned 90", "mirrored, turned 180", "mirrored, turned 270",
)  # fmt: skip

# Pixel rule, chosen on the tune split of benchmarks/duplicates.py (all three collection
# types): a pHash distance this small alone is a copy (resized, re-compressed, re-exposed,
# greyscale, mirrored or EXIF-turned: distances 0-8; unrelated images: >= 8, 1 pair in ~30k
# below 6)...
HASH_ALONE = 8
# ...or a moderate distance together with a high luminance correlation (recoloured and
# watermarked copies: distance 10-16 at correlation 0.7-0.9 fail one of the two).
HASH_WITH_CORR, CORR = 14, 0.80
# ...or a small dHash distance backed by a pHash distance and a correlation that unrelated
# images rarely reach together (5-10% crops and 5-degree rotations of textures: dHash 12 at
# the median; unrelated textiles: 1 pair in 277k at <= 14).
DHASH, DHASH_PHASH, DHASH_CORR = 12, 18, 0.50


@dataclass(frozen=True)
class PixelEvidence:
    """Pixel comparison of row pairs (a[i], b[i]), b in its best-matching orientation."""

    distance: np.ndarray  # (P,) int: pHash bits that differ, of 64
    corr: np.ndarray  # (P,) float: luminance correlation of 16 x 16 thumbnails
    orientation: np.ndarray  # (P,) int: index into ORIENTATION_NAMES
    views: np.ndarray  # (P,) int: index into VIEW_PAIRS
    dhash: np.ndarray  # (P,) int: dHash bits that differ (same view, as displayed), of 64
    confirmed: np.ndarray  # (P,) bool: the pixel rule says copy

    @property
    def score(self) -> np.ndarray:
        """(P,) the smaller of the two hash distances: how close the pair is, in bits."""
        return np.minimum(self.distance, self.dhash)

    def describe(self, i: int) -> str:
        va, vb = VIEW_PAIRS[int(self.views[i])]
        where = "" if (va, vb) == (0, 0) else f", {VIEWS[va]} vs {VIEWS[vb]}"
        return (
            f"pHash distance {int(self.distance[i])}/64, dHash {int(self.dhash[i])}/64, "
            f"luminance correlation {float(self.corr[i]):.2f} "
            f"({ORIENTATION_NAMES[int(self.orientation[i])]}{where})"
        )


def compare(fp: Fingerprints, a: np.ndarray, b: np.ndarray) -> PixelEvidence:
    """For row pairs (a[i], b[i]): the pHash distance and thumbnail correlation of the view
    pair and orientation of b (against a as displayed) with the smallest distance. Pairs with
    an unreadable side are never confirmed."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    p = len(a)
    take = np.arange(p)
    best_d = np.full(p, 65, dtype=np.int64)
    best_c = np.zeros(p, dtype=np.float64)
    best_o = np.zeros(p, dtype=np.int64)
    best_v = np.zeros(p, dtype=np.int64)
    for v, (va, vb) in enumerate(VIEW_PAIRS):
        dists = hamming(fp.phash[a, va, :1], fp.phash[b, vb])  # (P, 8)
        orient = dists.argmin(axis=1)
        d = dists[take, orient]
        ta = fp.thumb[a, va].astype(np.float32)
        tb = fp.thumb[b, vb].astype(np.float32)[take[:, None], _PERM[orient]]
        c = np.einsum("nd,nd->n", ta, tb)
        # the best view pair: smallest distance, ties to the higher correlation
        better = (d < best_d) | ((d == best_d) & (c > best_c))
        best_d = np.where(better, d, best_d)
        best_c = np.where(better, c, best_c)
        best_o = np.where(better, orient, best_o)
        best_v = np.where(better, v, best_v)
    dh = np.minimum(
        hamming(fp.dhash[a, 0], fp.dhash[b, 0]), hamming(fp.dhash[a, 1], fp.dhash[b, 1])
    )
    ok = fp.ok[a] & fp.ok[b]
    confirmed = ok & (
        (best_d <= HASH_ALONE)
        | ((best_d <= HASH_WITH_CORR) & (best_c >= CORR))
        | ((dh <= DHASH) & (best_d <= DHASH_PHASH) & (best_c >= DHASH_CORR))
    )
    return PixelEvidence(best_d, best_c, best_o, best_v, dh, confirmed)
