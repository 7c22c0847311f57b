"""Pixel-level evidence for near-duplicate pairs: compare images' pixel fingerprints.

A fingerprint (``images.pixelprint``: greyscale, trimmed, whole and centre views, 16 x 16
correlation thumbnails, pHashes in 8 orientations, dHashes) is computed by extraction and kept
in the store (``store.pixels``); ``fingerprints`` computes it from the files for what a store
does not have (older stores, bare arrays with paths). A pair is compared in the views and
orientation that match best (``compare``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..extraction.cores import usable_cores
from ..extraction.pool import Decoded, DecodePool
from ..images.pixelprint import (
    FILE_DRAFT,
    N_ORIENT,
    THUMB,
    VIEWS,
    PixelPrint,
    orientations,
    pixel_prints,
)
from ..images.pixelprint import trim_flat_border as trim_flat_border  # re-exported

READ_BLOCK = 1024  # fingerprints hashed at once (their grey views held until then)
MAX_WORKERS = 8  # decode processes by default, at most
PROGRESS_EVERY = 16  # files read between two progress calls
# (view of a, view of b) compared: whole-whole, centre-centre (rotated or edge-marked
# copies), centre of a vs whole of b and back (b or a is a crop of the other).
VIEW_PAIRS = ((0, 0), (1, 1), (1, 0), (0, 1))


def _orientation_perms(side: int) -> np.ndarray:
    """(8, side*side) int: flat index permutations giving each orientation of a flat array."""
    grid = np.arange(side * side).reshape(side, side)
    return np.stack([o.ravel() for o in orientations(grid)])


_PERM = _orientation_perms(THUMB)


def _warp_matrix(m: np.ndarray, shift: np.ndarray, side: int = THUMB) -> np.ndarray:
    """(side*side, side*side) float32: bilinear resampling of a flat (side, side) thumbnail,
    output pixel o read at input ``m @ (o - c) + c + shift`` (c the centre; edges clamped)."""
    c = (side - 1) / 2
    yy, xx = np.mgrid[0:side, 0:side].reshape(2, -1).astype(np.float64)
    src = m @ np.stack([yy - c, xx - c]) + c + shift[:, None]
    sy, sx = np.clip(src[0], 0, side - 1), np.clip(src[1], 0, side - 1)
    y0, x0 = np.minimum(np.floor(sy), side - 2), np.minimum(np.floor(sx), side - 2)
    fy, fx = sy - y0, sx - x0
    out = np.zeros((side * side, side * side), dtype=np.float64)
    rows = np.arange(side * side)
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                      (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):  # fmt: skip
        np.add.at(out, (rows, ((y0 + dy) * side + x0 + dx).astype(np.int64)), w)
    return out.astype(np.float32)


def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


# Small warps a copy's thumbnail is compared under (``warped_corr``): turns by a few degrees
# (of the centre views: a turned copy's blank corners stay out) and the crop of a 5-10% border
# at an offset (of the whole views: the smaller side read from the larger one's thumbnail
# zoomed in, shifted up to ~0.6 of a thumbnail pixel, 4% of a side).
WARP_TURNS = (-6.0, -4.0, -2.0, 2.0, 4.0, 6.0)  # degrees
WARP_SCALES, WARP_SHIFTS = (0.90, 0.95), (-0.6, 0.0, 0.6)  # fraction of a side kept; pixels
_TURN_M = np.stack([_warp_matrix(_rotation(d), np.zeros(2)) for d in WARP_TURNS])
_CROP_M = np.stack(
    [
        _warp_matrix(np.eye(2) * s, np.array([dy, dx]))
        for s in WARP_SCALES
        for dy in WARP_SHIFTS
        for dx in WARP_SHIFTS
    ]
)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=-1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def warped_corr(fp: Fingerprints, a: np.ndarray, b: np.ndarray, orient: np.ndarray) -> np.ndarray:
    """(P,) the best luminance correlation of the pairs' thumbnails (b in orientation
    ``orient``) under the small warps above: a turn of a's centre view against b's, or a's
    whole view zoomed into a crop against b's whole (and the other way round)."""
    out = np.full(len(a), -1.0, dtype=np.float64)
    if len(a) == 0:
        return out
    for v, mats, both in ((1, _TURN_M, False), (0, _CROP_M, True)):
        ta = fp.thumb[a, v].astype(np.float32)
        tb = np.take_along_axis(fp.thumb[b, v], _PERM[orient], axis=1).astype(np.float32)
        for m in mats:
            out = np.maximum(out, np.einsum("nd,nd->n", _unit_rows(ta @ m.T), tb))
            if both:
                out = np.maximum(out, np.einsum("nd,nd->n", ta, _unit_rows(tb @ m.T)))
    return out


@dataclass(frozen=True)
class Fingerprints:
    """Per-image pixel fingerprints (``images.pixelprint``), rows aligned with the images.

    Attributes:
        ok: (N,) bool, False where there is none (file gone, unreadable).
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

    @classmethod
    def empty(cls, n: int) -> Fingerprints:
        return cls(
            ok=np.zeros(n, dtype=bool),
            phash=np.zeros((n, len(VIEWS), N_ORIENT), dtype=np.uint64),
            thumb=np.zeros((n, len(VIEWS), THUMB * THUMB), dtype=np.float16),
            dhash=np.zeros((n, len(VIEWS)), dtype=np.uint64),
            errors={},
        )

    def put(self, row: int, fp: PixelPrint) -> None:
        """Fill ``row`` with one image's fingerprint."""
        self.phash[row], self.thumb[row], self.dhash[row] = fp.phash, fp.thumb, fp.dhash
        self.ok[row] = True
        self.errors.pop(row, None)

    def row(self, row: int) -> PixelPrint:
        return PixelPrint(self.phash[row], self.thumb[row], self.dhash[row])


def fingerprints(
    paths: Sequence[str | None],
    *,
    workers: int | None = None,
    draft_size: int = FILE_DRAFT,
    out: Fingerprints | None = None,
    rows: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_read: Callable[[int, Decoded], None] | None = None,
) -> Fingerprints:
    """Fingerprints of the images at ``paths``; a path that is None or cannot be decoded is
    recorded in ``errors`` (its row stays ``ok = False``).

    Files are read in extraction's decode worker processes (``extraction.pool.DecodePool``,
    without a model input): a codec that crashes on a hostile file costs that file
    (``decode_crash``), and numpy's small steps run in parallel (threads held each other up on
    the GIL: 2 were ~1.2x one). The hashes are computed a block of files at a time.

    Args:
        paths: the files.
        workers: decode processes (default: one per usable core, at most ``MAX_WORKERS``).
        draft_size: JPEG draft rule (``decode.open_rgb``): a store's model draft size gives
            exactly the fingerprints extraction stored.
        out: fill these rows of an existing ``Fingerprints`` (``rows``: where ``paths`` go)
            instead of a new one.
        rows: with ``out``, the row of each path.
        progress: called as ``progress(done, total)`` while files are read.
        on_read: called as ``on_read(i, decoded)`` for each ``paths[i]`` read (content hash,
            full-resolution size).
    """
    fp = out if out is not None else Fingerprints.empty(len(paths))
    where = list(rows) if rows is not None else list(range(len(paths)))
    pending: list[tuple[int, np.ndarray]] = []  # grey views not hashed yet (2 KB each)

    def hash_pending() -> None:
        prints = pixel_prints(np.stack([v for _, v in pending]))
        for (row, _), one in zip(pending, prints, strict=True):
            fp.put(row, one)
        pending.clear()

    tasks = []
    for i, path in enumerate(paths):
        if path is None:
            fp.errors[where[i]] = "no file (bare vectors)"
        else:
            tasks.append((i, path))
    procs = workers or max(1, min(MAX_WORKERS, usable_cores()))
    done, total = len(paths) - len(tasks), len(paths)
    with DecodePool(procs if len(tasks) > 1 else 0, None, draft_size=draft_size) as pool:
        for i, got in pool.imap_unordered(tasks, 8 * procs):
            done += 1
            if got.status != "ok" or got.views is None:
                why = f"{got.reason}: {got.detail}" if got.detail else str(got.reason)
                fp.errors[where[i]] = why
            else:
                pending.append((where[i], got.views))
                if len(pending) >= READ_BLOCK:
                    hash_pending()
                if on_read is not None:
                    on_read(i, got)
            if progress is not None and (done % PROGRESS_EVERY == 0 or done == total):
                progress(done, total)
    if pending:
        hash_pending()
    return fp


def store_fingerprints(
    store: str | os.PathLike[str],
    metadata: dict[str, Any],
    paths: Sequence[str | None],
    hashes: Sequence[str | None],
) -> tuple[Fingerprints, int]:
    """Fingerprints of a store's rows: those extraction kept (``store.pixels``, by content
    hash), the rest decoded from ``paths`` with the store model's JPEG draft size (so they
    equal what extraction would have kept) and written back for the next call.

    Returns:
        The fingerprints and how many rows had to be decoded.
    """
    from ..models.preprocess import Preprocess  # torch-free
    from ..store.pixels import read_prints, segment_key, write_segment

    try:
        draft = Preprocess.from_dict(metadata["preprocess"]).draft_size
    except (KeyError, TypeError, ValueError):  # a store of bare vectors: no model, no draft
        draft = FILE_DRAFT
    key = segment_key(draft)
    got = read_prints(Path(store), key, hashes)
    fp = Fingerprints(got.found.copy(), got.phash, got.thumb, got.dhash, {})
    missing = np.flatnonzero(~got.found).tolist()
    if missing:
        fingerprints([paths[r] for r in missing], draft_size=draft, out=fp, rows=missing)
        found = {h: fp.row(r) for r in missing if fp.ok[r] and (h := hashes[r]) is not None}
        write_segment(Path(store), key, found)  # optional: a read-only store decodes again
    return fp, len(missing)


def oriented_thumbs(fp: Fingerprints, rows: np.ndarray, view: int) -> np.ndarray:
    """(P, 8, THUMB*THUMB) float32: the thumbnails of ``rows`` in all 8 orientations."""
    return fp.thumb[rows, view].astype(np.float32)[:, _PERM]


_POP = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance between uint64 arrays (broadcast)."""
    x = np.bitwise_xor(a, b)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: a popcount instruction, ~8x faster
        return np.bitwise_count(x).astype(np.int64)
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
# ...or a moderate pHash distance with a correlation that one of the small warps above
# (``warped_corr``) raises to this, by at least this much: 5-degree turns and 5-10% crops of
# textures (correlation 0.5-0.7 as displayed, 0.80-0.89 warped; unrelated textiles <= 0.79).
# The gain keeps out look-alike pages, whose thumbnails correlate highly without any warp.
# Measured on the tune split: +277 copy pairs on textiles, 0 unrelated; documents +9 / 1.
WARP_PHASH, WARP_CORR, WARP_GAIN = 16, 0.80, 0.10


@dataclass(frozen=True)
class PixelEvidence:
    """Pixel comparison of row pairs (a[i], b[i]), b in its best-matching orientation."""

    distance: np.ndarray  # (P,) int: pHash bits that differ, of 64
    corr: np.ndarray  # (P,) float: luminance correlation of 16 x 16 thumbnails
    orientation: np.ndarray  # (P,) int: index into ORIENTATION_NAMES
    views: np.ndarray  # (P,) int: index into VIEW_PAIRS
    dhash: np.ndarray  # (P,) int: dHash bits that differ (same view, as displayed), of 64
    confirmed: np.ndarray  # (P,) bool: the pixel rule says copy
    # (P,) float: the correlation under the best small warp (``warped_corr``); NaN where it
    # was not needed (confirmed without it, or too far apart in pHash)
    warped: np.ndarray | None = None

    @property
    def score(self) -> np.ndarray:
        """(P,) the smaller of the two hash distances: how close the pair is, in bits."""
        return np.minimum(self.distance, self.dhash)

    def describe(self, i: int) -> str:
        va, vb = VIEW_PAIRS[int(self.views[i])]
        where = "" if (va, vb) == (0, 0) else f", {VIEWS[va]} vs {VIEWS[vb]}"
        warp = ""
        if self.warped is not None and not np.isnan(self.warped[i]):
            warp = f", {float(self.warped[i]):.2f} slightly turned or cropped"
        return (
            f"pHash distance {int(self.distance[i])}/64, dHash {int(self.dhash[i])}/64, "
            f"luminance correlation {float(self.corr[i]):.2f}{warp} "
            f"({ORIENTATION_NAMES[int(self.orientation[i])]}{where})"
        )


def _structured(fp: Fingerprints, rows: np.ndarray) -> np.ndarray:
    """(P,) bool: the whole view of each row has some structure (a non-zero thumbnail)."""
    return np.asarray((fp.thumb[rows, 0] != 0).any(axis=1))


def compare(fp: Fingerprints, a: np.ndarray, b: np.ndarray, *, warp: bool = True) -> PixelEvidence:
    """For row pairs (a[i], b[i]): the pHash distance and thumbnail correlation of the view
    pair and orientation of b (against a as displayed) with the smallest distance. Pairs with
    an unreadable or flat (one grey level) side are never confirmed.

    Args:
        fp: the fingerprints.
        a: rows.
        b: rows, paired with ``a``.
        warp: also confirm pairs by the small-warp search (``WARP_CORR``).
    """
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
        tb = np.take_along_axis(fp.thumb[b, vb], _PERM[orient], axis=1).astype(np.float32)
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
    # A flat image (one grey level: blank, a solid colour) has a zero thumbnail and hashes
    # that say nothing: a blank white page and a black frame are not copies by their pixels.
    ok = fp.ok[a] & fp.ok[b] & _structured(fp, a) & _structured(fp, b)
    confirmed = ok & (
        (best_d <= HASH_ALONE)
        | ((best_d <= HASH_WITH_CORR) & (best_c >= CORR))
        | ((dh <= DHASH) & (best_d <= DHASH_PHASH) & (best_c >= DHASH_CORR))
    )
    # the warps only for pairs the rule above left out and that are close enough in pHash
    warped = np.full(p, np.nan)
    todo = np.flatnonzero(ok & ~confirmed & (best_d <= WARP_PHASH) & warp)
    warped[todo] = warped_corr(fp, a[todo], b[todo], best_o[todo])
    with np.errstate(invalid="ignore"):  # NaN compares False
        confirmed |= (warped >= WARP_CORR) & (warped - best_c >= WARP_GAIN)
    return PixelEvidence(best_d, best_c, best_o, best_v, dh, confirmed, warped)
