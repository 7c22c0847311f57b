"""Thumbnails of stored images, generated once and cached in ``STORE/thumbs/``.

A thumbnail is keyed by the row's id, content hash and size, so a re-extracted (changed) file
gets a new one; it is decoded through ``images.decode.open_rgb``, the decoder extraction uses
(EXIF orientation applied, pixel cap enforced).
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from ..errors import StoreError
from ..images.decode import ImageDecodeError, open_rgb

THUMBS_DIR = "thumbs"
THUMB_SIZE = 256  # px, longer side: two tiles per ~250 px CSS column on a 2x screen
REPORT_THUMB_SIZE = 160  # px; reports embed every thumbnail, so they stay small
JPEG_QUALITY = 82  # visually clean at thumbnail size, ~10 KB each


class MissingFileError(StoreError):
    """A stored row's file is gone from disk (moved or deleted since extraction)."""


def render_thumbnail(source: str, size: int = THUMB_SIZE) -> bytes:
    """JPEG bytes of ``source`` scaled to fit ``size`` x ``size``, EXIF-oriented.

    Raises:
        MissingFileError: the file is gone.
        StoreError: the file no longer decodes.
    """
    if not os.path.isfile(source):
        raise MissingFileError(f"{source} is gone from disk")
    try:
        decoded = open_rgb(source, draft_size=size)
    except ImageDecodeError as exc:
        raise StoreError(f"{source} no longer decodes ({exc})") from None
    image = decoded.image
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return buf.getvalue()


def thumbnail(
    store_dir: Path, id_: int, content_hash: str | None, source: str, size: int = THUMB_SIZE
) -> bytes:
    """JPEG bytes of one row's thumbnail: from the cache, or rendered and cached.

    Written to a temporary file and renamed, so concurrent requests never read half a file; a
    store on a read-only disk still gets thumbnails, just not cached ones.
    """
    folder = store_dir / THUMBS_DIR
    key = (content_hash or "nohash")[:16]
    target = folder / f"{id_:016x}-{key}-{size}.jpg"
    try:
        return target.read_bytes()
    except FileNotFoundError:
        pass
    data = render_thumbnail(source, size)
    try:
        folder.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jpg")
    except OSError:
        return data
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
    return data


def data_uri(store_dir: Path, id_: int, content_hash: str | None, source: str) -> str | None:
    """A ``data:image/jpeg;base64,...`` URI of a small thumbnail, or None when the file is gone
    or no longer decodes (reports show a placeholder then)."""
    try:
        data = thumbnail(store_dir, id_, content_hash, source, REPORT_THUMB_SIZE)
    except (StoreError, OSError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
