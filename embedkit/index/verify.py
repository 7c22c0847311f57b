"""Pixel-level evidence for near-duplicate pairs: a small greyscale fingerprint per image.

Each image is decoded once (EXIF orientation applied, JPEG draft decoding) and reduced to a
32 x 32 greyscale thumbnail. From it:
- ``thumb``: a 16 x 16 thumbnail, zero mean and unit norm, so that a dot product is the
  correlation of the two images' luminance layouts. Brightness, contrast, greyscale and
  recolouring barely change it (they are close to affine in luminance).
- ``phash``: the 64-bit DCT perceptual hash of each of the 8 turns and mirrors of the
  thumbnail, so a mirrored or 90-degree-turned copy is compared in its own orientation.
A pair is compared in the orientation that matches best (``compare``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy.fft import dctn

from ..images.decode import ImageDecodeError, open_rgb

SIDE = 32  # thumbnail side the hashes are computed from (pHash's classic 32 x 32)
THUMB = 16  # correlation thumbnail side
DRAFT = 64  # JPEG draft decoding keeps at least this shorter side: ~10x faster than full size
N_ORIENT = 8  # identity, 3 turns, and the mirror of each


def _orientations(a: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral transforms of a square array; index 0 is the identity, 4 the mirror."""
    turns = [np.rot90(a, t) for t in range(4)]
    return turns + [np.fliplr(t) for t in turns]


def _phash(a: np.ndarray) -> np.uint64:
    low = dctn(a, type=2, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term is left out of the median, as pHash does
    return np.uint64(int("".join("1" if b else "0" for b in bits), 2))


@dataclass(frozen=True)
class Fingerprints:
    """Per-image pixel fingerprints, rows aligned with the images asked for.

    Attributes:
        ok: (N,) bool, False where the file could not be read (gone, unreadable).
        phash: (N, 8) uint64, the pHash of each orientation (0 = as displayed).
        thumb: (N, 8, THUMB*THUMB) float32, unit-norm zero-mean thumbnails per orientation.
        errors: row -> why it could not be read.
    """

    ok: np.ndarray
    phash: np.ndarray
    thumb: np.ndarray
    errors: dict[int, str]


def fingerprint_array(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(8,) pHashes and (8, THUMB*THUMB) thumbnails of one SIDE x SIDE greyscale array."""
    hashes = np.array([_phash(o) for o in _orientations(grey)], dtype=np.uint64)
    small = grey.reshape(THUMB, SIDE // THUMB, THUMB, SIDE // THUMB).mean(axis=(1, 3))
    small = small - small.mean()
    small /= max(float(np.linalg.norm(small)), 1e-6)
    thumbs = np.stack([o.ravel() for o in _orientations(small)]).astype(np.float32)
    return hashes, thumbs


def _grey(path: str | os.PathLike[str]) -> np.ndarray:
    from PIL import Image

    img = open_rgb(path, draft_size=DRAFT).image.convert("L")
    img = img.resize((SIDE, SIDE), Image.Resampling.BOX, reducing_gap=None)
    return np.asarray(img, dtype=np.float32)


def fingerprints(paths: list[str | None]) -> Fingerprints:
    """Fingerprints of the images at ``paths``; a path that is None or cannot be decoded is
    recorded in ``errors`` (its row stays ``ok = False``)."""
    n = len(paths)
    ok = np.zeros(n, dtype=bool)
    ph = np.zeros((n, N_ORIENT), dtype=np.uint64)
    th = np.zeros((n, N_ORIENT, THUMB * THUMB), dtype=np.float32)
    errors: dict[int, str] = {}
    for i, p in enumerate(paths):
        if p is None:
            errors[i] = "no file (bare vectors)"
            continue
        try:
            ph[i], th[i] = fingerprint_array(_grey(p))
        except ImageDecodeError as e:
            errors[i] = f"{e.reason}: {e}" if hasattr(e, "reason") else str(e)
            continue
        except OSError as e:
            errors[i] = f"{type(e).__name__}: {e.strerror or e}"
            continue
        ok[i] = True
    return Fingerprints(ok, ph, th, errors)


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
HASH_ALONE = 6
# ...or a moderate distance together with a high luminance correlation (recoloured and
# watermarked copies: distance 10-16 at correlation 0.7-0.9 fail one of the two).
HASH_WITH_CORR, CORR = 10, 0.90


@dataclass(frozen=True)
class PixelEvidence:
    """Pixel comparison of row pairs (a[i], b[i]), b in its best-matching orientation."""

    distance: np.ndarray  # (P,) int: pHash bits that differ, of 64
    corr: np.ndarray  # (P,) float: luminance correlation of 16 x 16 thumbnails
    orientation: np.ndarray  # (P,) int: index into ORIENTATION_NAMES
    confirmed: np.ndarray  # (P,) bool: the pixel rule says copy


def compare(fp: Fingerprints, a: np.ndarray, b: np.ndarray) -> PixelEvidence:
    """For row pairs (a[i], b[i]): the smallest pHash distance and the largest thumbnail
    correlation over the 8 orientations of b against a as displayed. Pairs with an unreadable
    side are never confirmed."""
    dists = hamming(fp.phash[a, :1], fp.phash[b])
    corrs = np.einsum("nd,nod->no", fp.thumb[a, 0], fp.thumb[b])
    orient = dists.argmin(axis=1)
    take = np.arange(len(a))
    dist, corr = dists[take, orient], corrs[take, orient]
    ok = fp.ok[a] & fp.ok[b]
    confirmed = ok & ((dist <= HASH_ALONE) | ((dist <= HASH_WITH_CORR) & (corr >= CORR)))
    return PixelEvidence(dist, corr, orient, confirmed)
