"""Decoding one image safely to RGB.

``read_image_file`` reads one file whole (refusing pipes, folders and oversized files);
``open_rgb`` decodes a file or its bytes to an RGB ``DecodedImage`` (EXIF orientation applied,
first frame only, alpha flattened, high bit depths range-scaled, optional JPEG draft) or raises
``ImageDecodeError`` with a reason from ``FAILURE_REASONS``. Per-file problems never raise
anything else, so one hostile file cannot stop a run. ``images.model_input`` composes both with
the model's resize + crop: the one entry for every path that turns a file into model input.
Finding the files to decode is ``images.sources``, which shares ``IMAGE_SUFFIXES``,
``FAILURE_REASONS`` and ``_describe`` from here.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import io
import os
import stat
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

from ..defaults import DEFAULT_MAX_PIXELS as DEFAULT_MAX_PIXELS  # re-exported

# Files are read whole into a decode worker's memory. The largest legitimate file under the
# pixel cap is an uncompressed 16-bit RGBA TIFF: 178,956,970 x 8 bytes = 1.43 GB. Anything
# bigger is not an image we would decode (a video or disk image renamed .jpg, a sparse file),
# and reading it would only risk the machine's memory.
MAX_FILE_BYTES = 2 * 2**30

# Transparent pixels are composited onto this colour, so that a cut-out product shot embeds
# the same whatever (undefined) colour its invisible pixels happen to hold.
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)


def _heif_plugin() -> bool:
    """Register pillow-heif (HEIC/HEIF, the iPhone default) with Pillow when it is installed.

    Imported by name so that it stays an optional install; a plugin that fails to register is
    treated as absent (a .heic file is then not an image, rather than a failure per file).
    """
    try:
        plugin = importlib.import_module("pillow_heif")
        plugin.register_heif_opener()
    except Exception:  # ImportError, or a broken build of the plugin
        return False
    return True


def _image_suffixes(heif: bool) -> frozenset[str]:
    # Camera and phone JPEGs come as .jpg/.jpeg/.jpe/.jfif, and as .mpo (multi-picture: stereo
    # cameras, phones' depth maps; frame 0 is the ordinary photo). Suffixes are compared
    # lowercased, so .JPG and .JPEG are these too.
    suffixes = {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo",
        ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp",
    }  # fmt: skip
    # AVIF needs libavif in Pillow's build; without it an .avif file could only fail.
    if features.check("avif"):
        suffixes.add(".avif")
    if heif:
        suffixes.update({".heic", ".heif"})
    return frozenset(suffixes)


_HEIF = _heif_plugin()
IMAGE_SUFFIXES: frozenset[str] = _image_suffixes(_HEIF)

# Pillow is only allowed to identify these formats: a renamed EPS/PDF must not reach
# Ghostscript, and exotic decoders are fuzzing surface we do not need. Multi-picture phone
# JPEGs (format "MPO") open through the JPEG entry; DIB is BMP without its file header.
_ALLOWED_FORMATS = (
    ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "DIB")
    + (("AVIF",) if ".avif" in IMAGE_SUFFIXES else ())
    + (("HEIF",) if _HEIF else ())
)

FAILURE_REASONS: tuple[str, ...] = (
    "empty_file",
    "unidentified",
    "truncated",
    "decompression_bomb",
    "decode_error",
    "unsupported_mode",
    "unsupported_format",
    "permission_denied",
    "not_found",
    "symlink_loop",
    "unreadable_dir",
    "not_a_file",  # a pipe, device or socket with an image suffix
    "too_large",  # a file bigger than MAX_FILE_BYTES, refused before reading it
    "decode_crash",  # set by the caller when a decode worker process dies on a file
)

_MAX_DETAIL = 200  # characters; details end up in every failed store row
_MAX_WARNINGS = 10  # a fuzzed TIFF can emit hundreds of identical-looking tag warnings


@dataclass
class DecodedImage:
    """A decoded first frame.

    Attributes:
        image: RGB image, possibly smaller than ``width`` x ``height`` after draft decoding.
        width: full-resolution width after EXIF orientation.
        height: full-resolution height after EXIF orientation.
        n_frames: frames (animation) or pages (TIFF) in the file; only the first is decoded.
        warnings: non-fatal problems seen while decoding (e.g. corrupt EXIF).
        box: after draft decoding, the full picture's extent (x0, y0, x1, y1) in ``image``
            pixels, to pass to the resize (``Preprocess.to_uint8``); None when ``image`` is
            the full-resolution picture.
    """

    image: Image.Image
    width: int
    height: int
    n_frames: int
    warnings: list[str] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None


class ImageDecodeError(Exception):
    """One file could not be decoded; ``reason`` is one of ``FAILURE_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in FAILURE_REASONS, reason
        # args == (reason, detail) so the error pickles back intact from a decode worker.
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def warnings_detail(notes: list[str]) -> str | None:
    """The ``detail`` an ``ok`` row records: a decode's non-fatal problems, or None."""
    return "; ".join(notes)[: _MAX_DETAIL * 2] or None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_MAX_DETAIL]


def open_rgb(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> DecodedImage:
    """Decode the first frame of one image file to RGB.

    Args:
        source: a file path, or the file's bytes.
        max_pixels: refuse images whose declared width x height exceeds this, before any
            pixel is decoded. Pillow's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS``, equal to
            ``DEFAULT_MAX_PIXELS`` unless changed) still applies above it.
        draft_size: for JPEGs, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) whose
            sides stay at least this many pixels (much faster for large photos); ``box`` then
            says where the full picture lies in the reduced one. Ignored for other formats.
            Use ``images.model_input.load_model_input`` to get model input: it picks the
            draft size from the model's preprocessing, as every entry path does.

    Returns:
        The RGB image with its full-resolution size after orientation, frame count,
        warnings and draft box.

    Raises:
        ImageDecodeError: the file cannot be decoded; ``reason`` says why.
    """
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else read_image_file(source)
    if len(data) == 0:
        raise ImageDecodeError("empty_file", "0 bytes")
    return _decode(io.BytesIO(data), max_pixels, draft_size)


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """Read one image file whole, refusing what no image under the pixel cap can be.

    Every entry path (extraction workers, ``embed``, search and classify by file) reads files
    here, so a pipe, a folder or a 3 GiB video named ``.jpg`` fails the same way everywhere.

    Raises:
        ImageDecodeError: ``not_a_file`` (a folder, pipe, device or socket), ``too_large``
            (over ``MAX_FILE_BYTES``, refused before reading), ``not_found``,
            ``permission_denied``, ``symlink_loop`` or ``decode_error`` (any other read error).
    """
    try:
        # O_NONBLOCK: a file swapped for a named pipe since the scan must not block the open.
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageDecodeError("not_a_file", "not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise ImageDecodeError(
                    "too_large",
                    f"{st.st_size / 2**30:.1f} GiB; no image under the pixel cap is "
                    f"over {MAX_FILE_BYTES / 2**30:.0f} GiB",
                )
            return f.read()
    except PermissionError as e:
        raise ImageDecodeError("permission_denied", _describe(e)) from e
    except FileNotFoundError as e:
        raise ImageDecodeError("not_found", _describe(e)) from e
    except IsADirectoryError as e:
        raise ImageDecodeError("not_a_file", "is a directory") from e
    except OSError as e:
        reason = "symlink_loop" if e.errno == errno.ELOOP else "decode_error"
        raise ImageDecodeError(reason, f"read failed: {_describe(e)}") from e


def content_hash(data: bytes | bytearray | memoryview) -> str:
    """The store's ``content_hash`` of a file: sha256 of its bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def _decode(fp: BinaryIO, max_pixels: int, draft_size: int | None) -> DecodedImage:
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        # Record, never raise or print: a warning about a file is data about that file.
        warnings.simplefilter("always")
        try:
            im = Image.open(fp, formats=_ALLOWED_FORMATS)
        except Image.DecompressionBombError as e:
            raise ImageDecodeError("decompression_bomb", _describe(e)) from e
        except UnidentifiedImageError as e:
            raise ImageDecodeError("unidentified", "not a recognised image format") from e
        except ImageDecodeError:
            raise
        except Exception as e:  # fuzzed headers raise TypeError, SyntaxError, struct.error, ...
            raise ImageDecodeError("decode_error", _describe(e)) from e
        result: DecodedImage | None = None
        try:
            result = _decode_opened(im, max_pixels, draft_size, notes)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageDecodeError("decompression_bomb", _describe(e)) from e
        except OSError as e:
            raise _load_error(e) from e
        except Exception as e:  # same catch-all as at open: any decoder bug is this file's
            raise ImageDecodeError("decode_error", _describe(e)) from e
        finally:
            # The returned image may be ``im`` itself (an RGB file): closing would destroy it.
            if result is None or result.image is not im:
                im.close()
    seen: list[str] = []
    for w in caught:
        if issubclass(w.category, (ResourceWarning, DeprecationWarning)):
            continue  # about our process, not about the file
        if issubclass(w.category, Image.DecompressionBombWarning):
            continue  # max_pixels is the policy; Pillow's softer limit is noise under it
        text = f"{w.category.__name__}: {str(w.message).strip()}"[:_MAX_DETAIL]
        if text not in seen:
            seen.append(text)
    # Our own notes first: they say what was done about the problem.
    result.warnings = (notes + seen)[:_MAX_WARNINGS]
    return result


def _decode_opened(
    im: ImageFile.ImageFile, max_pixels: int, draft_size: int | None, notes: list[str]
) -> DecodedImage:
    width, height = im.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "decompression_bomb", f"{width}x{height} = {width * height} pixels > {max_pixels}"
        )
    try:
        # GIF counts frames by parsing to the end; a bad later frame must not fail frame 0.
        n_frames = int(getattr(im, "n_frames", 1))
    except Exception as e:
        notes.append(f"frame count unreadable ({_describe(e)}); recorded as 1")
        n_frames = 1
        im.seek(0)
    box: Box | None = None
    if draft_size is not None and im.format in ("JPEG", "MPO"):
        drafted = im.draft("RGB", (draft_size, draft_size))
        if drafted is not None and im.size != (width, height):
            # libjpeg scales by 1/2, 1/4 or 1/8 and rounds the size up: the last reduced
            # pixel may stand for fewer source pixels. ``box`` is the full picture's extent in
            # reduced pixels, so that the resize maps exactly what a full decode would.
            box = drafted[1]
    if im.format == "PNG":
        _tolerate_trailing_chunks(im, notes)
    pixels = _load_pixels(im, notes)

    # Metadata gets its own try: a broken EXIF/XMP block means "no orientation", never a
    # lost picture. Pillow's getexif() also reads XMP tiff:Orientation when EXIF has none.
    try:
        orientation = int(im.getexif().get(_ORIENTATION, 1))
    except Exception as e:
        notes.append(f"EXIF unreadable ({_describe(e)}); orientation treated as absent")
        orientation = 1
    method = _TRANSPOSE.get(orientation)
    out: Image.Image = pixels
    if method is not None:
        if box is not None:
            box = _transpose_box(box, pixels.size, method)
        out = pixels.transpose(method)
        if method in _SWAPS_AXES:
            width, height = height, width
    return DecodedImage(_to_rgb(out), width=width, height=height, n_frames=n_frames, box=box)


Box = tuple[float, float, float, float]
_ORIENTATION = 0x0112  # EXIF tag; values 2-8 as in ImageOps.exif_transpose
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset(
    {
        Image.Transpose.TRANSPOSE,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
    }
)


def _transpose_box(box: Box, size: tuple[int, int], method: Image.Transpose) -> Box:
    """Where ``box`` (x0, y0, x1, y1 in an image of ``size``) lands after ``transpose``."""
    x0, y0, x1, y1 = box
    w, h = size
    if method == Image.Transpose.FLIP_LEFT_RIGHT:
        return (w - x1, y0, w - x0, y1)
    if method == Image.Transpose.FLIP_TOP_BOTTOM:
        return (x0, h - y1, x1, h - y0)
    if method == Image.Transpose.ROTATE_180:
        return (w - x1, h - y1, w - x0, h - y0)
    if method == Image.Transpose.TRANSPOSE:  # (x, y) -> (y, x)
        return (y0, x0, y1, x1)
    if method == Image.Transpose.ROTATE_90:  # counter-clockwise: (x, y) -> (y, w - x)
        return (y0, w - x1, y1, w - x0)
    if method == Image.Transpose.ROTATE_270:  # clockwise: (x, y) -> (h - y, x)
        return (h - y1, x0, h - y0, x1)
    # TRANSVERSE: (x, y) -> (h - y, w - x)
    return (h - y1, w - x1, h - y0, w - x0)


def rgb_from_pil(image: Image.Image) -> Image.Image:
    """An in-memory PIL image to RGB exactly as ``open_rgb`` treats a file's first frame.

    EXIF orientation is applied (a corrupt EXIF counts as absent), alpha is flattened onto
    ``ALPHA_BACKGROUND`` and high bit depths are range-scaled. A multi-frame image is seeked
    to its first frame. The caller's image is otherwise left unchanged.

    Args:
        image: a PIL image in any mode, loaded or lazily opened.

    Raises:
        ImageDecodeError: the pixels cannot be loaded, or the mode cannot be converted.
    """
    notes: list[str] = []  # nowhere to report them for an in-memory image
    try:
        if getattr(image, "n_frames", 1) > 1 and image.tell() != 0:
            image.seek(0)
        if isinstance(image, ImageFile.ImageFile) and image.format == "PNG" and image.tile:
            _tolerate_trailing_chunks(image, notes)
        image.load()
    except OSError as e:
        raise _load_error(e) from e
    except Exception as e:  # as in open_rgb: a decoder bug is this image's failure
        raise ImageDecodeError("decode_error", _describe(e)) from e
    try:
        image = ImageOps.exif_transpose(image)  # a copy: the caller's image is not rotated
    except Exception:
        pass  # corrupt EXIF is treated as absent, as in open_rgb
    return _to_rgb(image)


def _load_error(e: OSError) -> ImageDecodeError:
    # Pillow reports a short read as "image file is truncated (N bytes not processed)".
    reason = "truncated" if "truncated" in str(e).lower() else "decode_error"
    return ImageDecodeError(reason, _describe(e))


def _tolerate_trailing_chunks(im: ImageFile.ImageFile, notes: list[str]) -> None:
    """Make a failure to read the PNG chunks *after* the pixel data non-fatal.

    Pillow reads those chunks (text, late eXIf) in ``load_end``, after every pixel has been
    decoded but before it checks the decoder's own error code; a file cut inside its last
    chunk then fails ``load()`` with complete pixels. Wrapping this one image's ``load_end``
    (an instance attribute, nothing global) keeps that error check in place.
    """
    original = im.load_end

    def load_end() -> None:
        try:
            original()
        except Exception as e:
            notes.append(f"PNG chunks after the pixels unreadable ({_describe(e)}); ignored")

    im.load_end = load_end  # type: ignore[method-assign]


# 16-bit RGB(A) TIFF samples, as Pillow's TIFF plugin names them: Pillow decodes them into 8-bit
# RGB(A) keeping only the high byte (1000..5080 of 65535 becomes 3..19, nearly black). Read raw
# (uncompressed) ones as 16-bit samples instead: rawmode -> (bands, the one-band 16-bit mode).
_RGB16 = {
    "RGB;16L": (3, "I;16"),
    "RGB;16B": (3, "I;16B"),
    "RGB;16N": (3, "I;16N"),
    "RGBA;16L": (4, "I;16"),
    "RGBA;16B": (4, "I;16B"),
    "RGBA;16N": (4, "I;16N"),
}


def _load_pixels(im: ImageFile.ImageFile, notes: list[str]) -> Image.Image:
    """``im.load()``, except for 16-bit RGB(A) TIFFs, which come back as 8-bit RGB(A) scaled
    from their own min..max like every other high-depth image (``_scale_to_uint8``)."""
    rawmodes = {t.args[0] for t in im.tile if t.args} if im.format == "TIFF" else set()
    if len(rawmodes) != 1 or next(iter(rawmodes)) not in _RGB16:
        im.load()
        return im
    bands, mode16 = _RGB16[next(iter(rawmodes))]
    w, h = im.size
    if all(t.codec_name == "raw" for t in im.tile) and mode16 != "I;16N":
        # Uncompressed strips: the same bytes read as one 16-bit band (w * bands) wide.
        tiles = []
        for t in im.tile:
            x0, y0, x1, y1 = cast(tuple[int, int, int, int], t.extents)
            args = cast(tuple[Any, ...], t.args)
            tiles.append(
                t._replace(extents=(x0 * bands, y0, x1 * bands, y1), args=(mode16, *args[1:]))
            )
        im.tile = tiles
        im._mode = mode16
        im._size = (w * bands, h)
        if hasattr(im, "_tile_size"):  # the TIFF plugin allocates the image from this
            im._tile_size = (w * bands, h)
        im.load()
        samples = np.asarray(im).reshape(h, w, bands).astype(np.uint16)
        alpha_max = 65535.0
    else:
        # Compressed (libtiff) strips only decode to 8 bits: scale the high bytes.
        im.load()
        samples = np.asarray(im)
        alpha_max = 255.0
        notes.append("compressed 16-bit RGB TIFF: scaled from the high byte of each sample")
    return _rgb_from_samples(samples, alpha_max)


def _rgb_from_samples(samples: np.ndarray, alpha_max: float) -> Image.Image:
    """(H, W, 3 or 4) high-depth samples -> 8-bit RGB(A): one min..max range for the three
    colour channels (so hues stay), alpha as a fraction of ``alpha_max``."""
    rgb = _scale_to_uint8(samples[..., :3])
    if samples.shape[-1] == 3:
        return Image.fromarray(rgb, "RGB")
    alpha = np.rint(samples[..., 3].astype(np.float32) * (255.0 / alpha_max)).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


_CONVERTIBLE = frozenset({"RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "L", "1", "P"})
_ALPHA = frozenset({"RGBA", "RGBa", "LA", "PA"})
_HIGH_DEPTH = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any supported mode to RGB; alpha flattened onto ``ALPHA_BACKGROUND``."""
    mode = im.mode
    has_alpha = mode in _ALPHA or (mode in ("L", "RGB", "P") and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode == "RGB":
        return im
    if mode in _CONVERTIBLE:
        # Pillow's JPEG plugin already undoes Adobe's inverted CMYK before this convert.
        return im.convert("RGB")
    if mode == "La":  # premultiplied: flatten is Lp + (1 - a) * background
        lp, a = (np.asarray(ch, dtype=np.float32) for ch in im.split())
        bg = np.asarray(ALPHA_BACKGROUND, dtype=np.float32)
        rgb = lp[..., None] + (1.0 - a[..., None] / 255.0) * bg
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if mode in _HIGH_DEPTH:
        return Image.fromarray(_scale_to_uint8(np.asarray(im)), "L").convert("RGB")
    raise ImageDecodeError("unsupported_mode", f"mode {mode!r}")


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map the image's own finite min..max to 0..255.

    ``convert("RGB")`` clips 16/32-bit values at 255, which turns most 16-bit scans into an
    all-white frame; scaling by the data's range keeps the picture. A constant image has no
    range: it keeps its value when that fits 0..255 (black stays black), else mid-grey.
    """
    a = a.astype(np.float32, copy=False)
    finite = np.isfinite(a)
    if not finite.any():
        raise ImageDecodeError("unsupported_mode", "float image has no finite values")
    lo = float(a[finite].min())
    hi = float(a[finite].max())
    if hi <= lo:
        value = lo if 0 <= lo <= 255 else 128.0
        return np.full(a.shape, round(value), dtype=np.uint8)
    scaled = (a - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    # +inf -> 255, -inf and NaN -> 0.
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
