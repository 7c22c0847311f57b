"""Tests for embedkit.images (decode, sources): finding files, decoding hostile images."""

from __future__ import annotations

import csv
import os
import pickle
import re
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from embedkit.errors import InvalidArgumentError
from embedkit.images import decode as images
from embedkit.images import sources
from embedkit.images.decode import (
    ALPHA_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    FAILURE_REASONS,
    IMAGE_SUFFIXES,
    ImageDecodeError,
    open_rgb,
    rgb_from_pil,
)
from embedkit.images.sources import FoundFile, ScanFailure, find_images

REPO = Path(__file__).resolve().parents[1]
# shared/ sits beside the checkout, locally and in CI's fresh clone.
CORPUS = Path(__file__).resolve().parent / "data" / "corpus"
MANIFEST = CORPUS / "MANIFEST.tsv"
UNICODE_NAME = "synthetic__unicode_名前_фото_🌅.jpg"
BOMBS = ("decompression_bomb.gif", "synthetic__huge_ihdr_20000x20000.png")


def _manifest_rows() -> list[tuple[str, str]]:
    """(file, expected) pairs; expected is 'EMBED' or a failure reason."""
    if not MANIFEST.is_file():
        return []
    lines = [ln for ln in MANIFEST.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = list(csv.reader((ln for ln in lines if not ln.startswith("#")), delimiter="\t"))
    header, body = rows[0], rows[1:]
    fi, ei = header.index("file"), header.index("expected")
    out = []
    for row in body:
        m = re.match(r"SKIP reason=(\w+)", row[ei])
        out.append((row[fi], m.group(1) if m else "EMBED"))
    return out


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def _mad(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(_arr(a) - _arr(b)).mean())


# ------------------------------------------------------------------------------ the corpus


@pytest.mark.parametrize(("name", "expected"), _manifest_rows() or [("-", "EMBED")])
def test_corpus_manifest(name: str, expected: str) -> None:
    path = CORPUS / name
    if expected == "EMBED":
        d = open_rgb(path)
        assert d.image.mode == "RGB"
        assert 0 < d.width <= 10_000 and 0 < d.height <= 10_000
        assert d.image.size == (d.width, d.height)  # no draft requested
        assert d.n_frames >= 1
    else:
        assert expected in FAILURE_REASONS
        with pytest.raises(ImageDecodeError) as info:
            open_rgb(path)
        assert info.value.reason == expected, info.value.detail


def test_manifest_lists_every_image_in_the_corpus() -> None:
    found, failures = find_images([CORPUS])
    assert failures == []
    assert sorted(f.path for f in found) == sorted(name for name, _ in _manifest_rows())


def test_16bit_tiff_is_range_scaled_not_white() -> None:
    a = _arr(open_rgb(CORPUS / "16bit.cropped.tif").image)
    assert a.std() > 10 and a.mean() < 250
    assert a.min() == 0 and a.max() == 255  # the image's own min..max span the full range


def test_orientation_swaps_reported_size() -> None:
    d = open_rgb(CORPUS / "orientation_rectangle.jpg")
    assert (d.width, d.height) == (1, 2)
    assert d.image.size == (1, 2)


def test_orientation_6_matches_upright_reference() -> None:
    upright = Image.open(CORPUS / "hopper.jpg").convert("RGB")
    decoded = open_rgb(CORPUS / "hopper_orientation_6.jpg").image
    # Orientation 6: the stored pixels are the upright picture turned 90 degrees
    # counter-clockwise, and need a 90 degree clockwise turn (ROTATE_270) for display.
    stored = Image.open(CORPUS / "hopper_orientation_6.jpg").convert("RGB")
    assert _mad(stored, upright.transpose(Image.Transpose.ROTATE_90)) < 8
    assert _mad(decoded, upright) < 8
    assert _mad(decoded, stored) > 40  # the rotation really happened


def test_animated_gif_first_frame_and_frame_count() -> None:
    d = open_rgb(CORPUS / "dispose_prev.gif")
    assert d.n_frames == 5
    assert d.image.mode == "RGB" and d.image.size == (100, 100)


def test_cmyk_jpeg_matches_rgb_twin() -> None:
    cmyk = open_rgb(CORPUS / "pil_sample_cmyk.jpg").image
    rgb = open_rgb(CORPUS / "pil_sample_rgb.jpg").image
    assert _mad(cmyk, rgb) < 10


def test_transparent_png_flattened_on_background() -> None:
    src = Image.open(CORPUS / "transparent.png")
    alpha = np.asarray(src.getchannel("A"))
    out = np.asarray(open_rgb(CORPUS / "transparent.png").image)
    assert (alpha == 0).any()
    assert (out[alpha == 0] == ALPHA_BACKGROUND).all()


def test_corrupt_metadata_is_a_warning_not_a_failure() -> None:
    bad_exif = open_rgb(CORPUS / "hopper_bad_exif.jpg")
    assert any("Corrupt EXIF" in w for w in bad_exif.warnings)
    end_chunk = open_rgb(CORPUS / "truncated_end_chunk.png")
    assert end_chunk.image.size == (128, 128)
    assert any("Truncated File Read" in w for w in end_chunk.warnings)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("name", [n for n, e in _manifest_rows() if e == "EMBED"] or ["-"])
def test_rgb_from_pil_matches_open_rgb(name: str) -> None:
    # embed() on in-memory images must see the same pixels extract sees for the file.
    with Image.open(CORPUS / name) as lazy:
        size = lazy.size
        from_pil = rgb_from_pil(lazy)
        assert lazy.size == size  # the caller's image is not rotated in place
    assert from_pil.mode == "RGB"
    assert _mad(from_pil, open_rgb(CORPUS / name).image) == 0


def test_rgb_from_pil_errors() -> None:
    fake = Image.new("F", (2, 2), float("nan"))
    with pytest.raises(ImageDecodeError) as info:
        rgb_from_pil(fake)
    assert info.value.reason == "unsupported_mode"


def test_truncated_pixel_data_still_fails() -> None:
    # The tolerance for a cut-off trailing PNG chunk must not hide cut-off pixel data.
    data = (CORPUS / "transparent.png").read_bytes()
    with pytest.raises(ImageDecodeError) as info:
        open_rgb(data[: len(data) // 2])
    assert info.value.reason == "truncated"


def test_unicode_name_round_trips(tmp_path: Path) -> None:
    found, _ = find_images([CORPUS])
    (match,) = [f for f in found if f.path == UNICODE_NAME]
    assert match.abspath == os.path.join(str(CORPUS), UNICODE_NAME)
    assert open_rgb(match.abspath).image.size == (128, 128)
    # Also as a single named file and as a list-file entry.
    (single,), _ = find_images([CORPUS / UNICODE_NAME])
    assert single == FoundFile(str(CORPUS), UNICODE_NAME, match.abspath)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{CORPUS / UNICODE_NAME}\n", encoding="utf-8")
    (listed,), _ = find_images([lst])
    assert listed.path == UNICODE_NAME


def test_bombs_refused_without_large_allocation() -> None:
    # Pillow allocates pixels with malloc, which tracemalloc does not see; the peak RSS of a
    # fresh process does. A decoded 20000x20000 image would add >= 400 MB.
    script = f"""
import resource, sys
from embedkit.images.decode import open_rgb, ImageDecodeError
open_rgb({str(CORPUS / "hopper.jpg")!r})  # warm up imports and plugins first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in {BOMBS!r}:
    try:
        open_rgb({str(CORPUS)!r} + "/" + name)
        sys.exit("decoded " + name)
    except ImageDecodeError as e:
        assert e.reason == "decompression_bomb", (name, e.reason)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) < 50 * 2**20


# ------------------------------------------------------------------------------ decoding


def _save(tmp_path: Path, name: str, img: Image.Image, **kw: object) -> Path:
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_pixel_cap_checked_before_pixels_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(tmp_path, "big.png", Image.new("RGB", (2000, 1000), (1, 2, 3)))

    def no_load(self: object) -> None:
        raise AssertionError("pixels were loaded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with pytest.raises(ImageDecodeError) as info:
        open_rgb(path, max_pixels=1_000_000)
    assert info.value.reason == "decompression_bomb"
    assert "2000x1000" in info.value.detail


def test_default_max_pixels_is_where_pillow_raises() -> None:
    # Pillow warns above MAX_IMAGE_PIXELS and raises DecompressionBombError above twice that.
    assert DEFAULT_MAX_PIXELS == 178_956_970 == 2 * Image.MAX_IMAGE_PIXELS


def test_draft_decoding_keeps_full_size(tmp_path: Path) -> None:
    path = _save(tmp_path, "big.jpg", Image.new("RGB", (4000, 3000), (200, 80, 20)))
    d = open_rgb(path, draft_size=256)
    assert (d.width, d.height) == (4000, 3000)
    assert 256 <= min(d.image.size) < 3000
    assert d.image.mode == "RGB"


def test_draft_with_orientation_reports_rotated_full_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path, "rot.jpg", Image.new("RGB", (4000, 3000)), exif=exif)
    d = open_rgb(path, draft_size=256)
    assert (d.width, d.height) == (3000, 4000)
    w, h = d.image.size
    assert h > w and 256 <= w < 3000


def test_draft_ignored_for_png(tmp_path: Path) -> None:
    path = _save(tmp_path, "p.png", Image.new("RGB", (600, 400)))
    assert open_rgb(path, draft_size=64).image.size == (600, 400)


@pytest.mark.parametrize(
    ("mode", "dtype", "ext"), [("I;16", "<u2", "png"), ("I;16B", ">u2", "tif"), ("I", "=i4", "tif")]
)
def test_high_bit_depth_is_range_scaled(tmp_path: Path, mode: str, dtype: str, ext: str) -> None:
    ramp = np.linspace(1000, 3000, 64 * 32).reshape(32, 64).astype(dtype)
    # frombytes: Pillow's convert("I;16B") clips instead of byte-swapping.
    img = Image.frombytes(mode, (64, 32), ramp.tobytes())
    out = _arr(images._to_rgb(img))
    assert out.min() == 0 and out.max() == 255
    reread = open_rgb(_save(tmp_path, f"ramp.{ext}", img)).image
    assert _mad(reread, images._to_rgb(img)) == 0


def test_constant_16bit_image_is_not_white() -> None:
    flat = Image.fromarray(np.full((8, 8), 4000, dtype=np.uint16))
    assert (np.asarray(images._to_rgb(flat)) == 128).all()
    black = Image.fromarray(np.zeros((8, 8), dtype=np.uint16))
    assert (np.asarray(images._to_rgb(black)) == 0).all()


def test_float_image_scaling_and_non_finite(tmp_path: Path) -> None:
    a = np.array([[0.5, 1.5], [np.nan, np.inf]], dtype=np.float32)
    path = _save(tmp_path, "f.tif", Image.fromarray(a))
    out = np.asarray(open_rgb(path).image)[..., 0]
    assert out.tolist() == [[0, 255], [0, 255]]
    nan = _save(tmp_path, "nan.tif", Image.fromarray(np.full((2, 2), np.nan, np.float32)))
    with pytest.raises(ImageDecodeError) as info:
        open_rgb(nan)
    assert info.value.reason == "unsupported_mode"


def test_alpha_modes_flattened(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (10, 255))
    assert np.asarray(open_rgb(_save(tmp_path, "la.png", la)).image)[0].tolist() == [
        list(ALPHA_BACKGROUND),
        [10, 10, 10],
    ]
    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 50, 60, 70])
    p.putpixel((1, 0), 1)
    out = open_rgb(_save(tmp_path, "p.gif", p, transparency=0)).image
    assert np.asarray(out)[0].tolist() == [list(ALPHA_BACKGROUND), [50, 60, 70]]
    premult = Image.merge("La", [Image.new("L", (1, 1), 0), Image.new("L", (1, 1), 0)])
    assert np.asarray(images._to_rgb(premult))[0, 0].tolist() == list(ALPHA_BACKGROUND)


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"])
def test_other_modes_convert_to_rgb(mode: str) -> None:
    out = images._to_rgb(Image.new(mode, (3, 2)))
    assert out.mode == "RGB" and out.size == (3, 2)


def test_unknown_mode_is_unsupported() -> None:
    fake = types.SimpleNamespace(mode="XYZ", info={}, size=(1, 1))
    with pytest.raises(ImageDecodeError) as info:
        images._to_rgb(fake)  # type: ignore[arg-type]
    assert info.value.reason == "unsupported_mode"


def test_bytes_source_and_per_file_reasons(tmp_path: Path) -> None:
    png = _save(tmp_path, "x.png", Image.new("RGB", (5, 4), (9, 9, 9)))
    assert open_rgb(png.read_bytes()).image.size == (5, 4)
    cases = {
        b"": "empty_file",
        b"hello, not an image": "unidentified",
        # Only allowlisted formats are identified: a renamed EPS must never reach Ghostscript.
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n": "unidentified",
    }
    for data, reason in cases.items():
        with pytest.raises(ImageDecodeError) as info:
            open_rgb(data)
        assert info.value.reason == reason
    # A folder is refused as extraction refuses it (images.read_image_file, one reader).
    for path, reason in [(tmp_path / "missing.jpg", "not_found"), (tmp_path, "not_a_file")]:
        with pytest.raises(ImageDecodeError) as info:
            open_rgb(path)
        assert info.value.reason == reason


def test_unexpected_exception_becomes_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise TypeError("Missing dimensions")

    monkeypatch.setattr(images.Image, "open", boom)
    with pytest.raises(ImageDecodeError) as info:
        open_rgb(b"anything")
    assert info.value.reason == "decode_error"
    assert "TypeError" in info.value.detail


def test_failure_reasons_closed_set() -> None:
    assert set(FAILURE_REASONS) == {
        "empty_file", "unidentified", "truncated", "decompression_bomb", "decode_error",
        "unsupported_mode", "unsupported_format", "permission_denied", "not_found",
        "symlink_loop", "unreadable_dir", "not_a_file", "too_large", "decode_crash",
    }  # fmt: skip
    with pytest.raises(AssertionError):
        ImageDecodeError("made_up", "x")


def test_decode_error_pickles_for_worker_processes() -> None:
    err = pickle.loads(pickle.dumps(ImageDecodeError("truncated", "cut at byte 10")))
    assert (err.reason, err.detail) == ("truncated", "cut at byte 10")
    assert str(err) == "truncated: cut at byte 10"


def test_suffix_allowlist() -> None:
    assert {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".tif", ".tiff"} < (
        IMAGE_SUFFIXES
    )
    assert ".bmp" in IMAGE_SUFFIXES and ".pdf" not in IMAGE_SUFFIXES
    assert (".avif" in IMAGE_SUFFIXES) == bool(features.check("avif"))


# ------------------------------------------------------------------------------ finding


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for rel in ["b.jpg", "a/z.PNG", "a/b/c.webp", "a-c.gif", "notes.txt", "a/b/readme.md"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return root


def test_find_nested_folder_sorted_and_filtered(tree: Path) -> None:
    found, failures = find_images([tree])
    assert failures == []
    assert [f.path for f in found] == ["a-c.gif", "a/b/c.webp", "a/z.PNG", "b.jpg"]
    assert all(f.root == str(tree) for f in found)
    assert found[1].abspath == str(tree / "a" / "b" / "c.webp")


def test_hidden_files_and_folders_skipped_and_counted(tree: Path) -> None:
    # macOS AppleDouble files (._name.jpg: metadata, not a JPEG), thumbnail caches and trash
    # folders are not the user's photos; walking them gave one decode failure per photo.
    for rel in ["._b.jpg", "a/.DS_Store", ".thumbnails/b.jpg", "a/.Trash-1000/files/x.png"]:
        p = tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    skipped: Counter[str] = Counter()
    found, failures = find_images([tree], skipped=skipped)
    assert [f.path for f in found] == ["a-c.gif", "a/b/c.webp", "a/z.PNG", "b.jpg"]
    assert failures == [] and skipped["hidden"] == 4
    # Named explicitly, a hidden image is the user's choice and is taken.
    (named,), _ = find_images([tree / "._b.jpg"])
    assert named.path == "._b.jpg"


def test_symlink_loop_recorded_not_fatal(tree: Path) -> None:
    os.symlink(tree, tree / "a" / "loop")
    os.symlink(tree / "nowhere.jpg", tree / "broken.jpg")
    os.symlink(tree / "a" / "b", tree / "alias")  # a second name for a folder: listed once
    found, failures = find_images([tree])
    assert [f.path for f in found] == ["a-c.gif", "a/b/c.webp", "a/z.PNG", "b.jpg"]
    assert ScanFailure(str(tree), "a/loop", "symlink_loop", "links back to '.'") in failures
    assert [(f.path, f.reason) for f in failures] == [
        ("a/loop", "symlink_loop"),
        ("broken.jpg", "not_found"),
    ]


def test_unreadable_dir_recorded(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests often run as root, where chmod 000 blocks nothing: simulate the refusal.
    real_scandir = os.scandir
    blocked = str(tree / "a" / "b")

    def scandir(path: str) -> object:
        if os.fspath(path) == blocked:
            raise PermissionError(13, "Permission denied", blocked)
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    found, failures = find_images([tree])
    assert [f.path for f in found] == ["a-c.gif", "a/z.PNG", "b.jpg"]
    assert [(f.path, f.reason) for f in failures] == [("a/b", "unreadable_dir")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores chmod 000")
def test_unreadable_dir_real_chmod(tree: Path) -> None:
    locked = tree / "a" / "b"
    locked.chmod(0)
    try:
        found, failures = find_images([tree])
    finally:
        locked.chmod(0o755)
    assert [(f.path, f.reason) for f in failures] == [("a/b", "unreadable_dir")]


def test_list_files(tree: Path) -> None:
    lists = tree.parent / "lists"
    lists.mkdir()
    txt = lists / "in.txt"
    txt.write_text("# my picks\n\n../photos/b.jpg\n  ../photos/a/z.PNG  \nmissing.jpg\n")
    found, failures = find_images([txt])
    assert [(f.root, f.path) for f in found] == [
        (str(tree), "b.jpg"),
        (str(tree / "a"), "z.PNG"),
    ]
    assert [(f.root, f.path, f.reason) for f in failures] == [
        (str(lists), "missing.jpg", "not_found")
    ]

    with_header = lists / "h.csv"
    with_header.write_text("label,path\ncat,../photos/a-c.gif\ndog,../photos/b.jpg\n")
    no_header = lists / "n.csv"
    no_header.write_text(f"{tree / 'a' / 'b' / 'c.webp'},x\n../photos/gone.png,y\n")
    found, failures = find_images([with_header, no_header])
    assert [f.path for f in found] == ["a-c.gif", "b.jpg", "c.webp"]
    assert [(f.path, f.reason) for f in failures] == [("gone.png", "not_found")]


def test_explicit_files_and_dedupe(tree: Path) -> None:
    (tree / "doc.pdf").write_bytes(b"%PDF")
    found, failures = find_images([tree, tree / "b.jpg", str(tree / "doc.pdf")])
    assert [f.path for f in found] == ["a-c.gif", "a/b/c.webp", "a/z.PNG", "b.jpg"]
    assert [(f.path, f.reason) for f in failures] == [("doc.pdf", "unsupported_format")]
    (single,), _ = find_images(str(tree / "b.jpg"))
    assert single == FoundFile(str(tree), "b.jpg", str(tree / "b.jpg"))


def test_nonexistent_source_raises(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="does not exist") as info:
        find_images([tmp_path / "nope"])
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_pipes_and_devices_are_refused_not_opened(tmp_path: Path) -> None:
    """A named pipe blocks whoever opens it and /dev/zero never ends: both are recorded as
    not_a_file, in a folder, through a symlink and in a list file, and never reach a decoder."""
    folder = tmp_path / "pics"
    folder.mkdir()
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    from conftest import make_photo

    make_photo(folder / "ok.jpg", 1)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'pipe.jpg'}\n{folder / 'zero.jpg'}\n{folder / 'ok.jpg'}\n")
    for source in (folder, listing):
        found, failures = find_images([source])
        assert [f.path for f in found] == ["ok.jpg"]
        assert sorted((f.path, f.reason) for f in failures) == [
            ("pipe.jpg", "not_a_file"),
            ("zero.jpg", "not_a_file"),
        ]
    # A file swapped for a pipe after the scan: the decoder refuses it without blocking.
    code = (
        "from embedkit.extraction.pool import decode_file;"
        "from embedkit.models.backbone import load_backbone;"
        f"print(decode_file({str(folder / 'pipe.jpg')!r}, "
        "load_backbone('test_efficientnet', random_init=True).preprocess).reason)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "not_a_file", done.stderr


def test_huge_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A 3 GiB file named .jpg (sparse here: no disk used) is not read into memory."""
    from embedkit.extraction.pool import decode_file
    from embedkit.models.backbone import load_backbone

    big = tmp_path / "movie.jpg"
    with open(big, "wb") as f:
        f.truncate(3 * 2**30)
    pre = load_backbone("test_efficientnet", random_init=True).preprocess
    r = decode_file(str(big), pre)
    assert (r.status, r.reason) == ("failed", "too_large") and "3.0 GiB" in (r.detail or "")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_extreme_aspect_ratio_does_not_allocate_the_resized_image(tmp_path: Path) -> None:
    """A 1 x 200,000 banner resized to a 256-pixel short side would be 51M x 256 pixels (39 GB):
    only the crop is resampled, so the worker stays small."""
    from PIL import Image

    for shape in ((1, 200_000, 3), (200_000, 2, 3)):
        Image.fromarray(np.full(shape, 128, np.uint8)).save(tmp_path / f"{shape[0]}.png")
    # Peak RSS from /proc (VmHWM, reset by exec): ru_maxrss of a child still counts the RSS its
    # parent (this pytest process) had when it forked.
    code = (
        "import re, sys; from embedkit.extraction.pool import decode_file;"
        "from embedkit.models.backbone import load_backbone;"
        "pre = load_backbone('test_efficientnet', random_init=True).preprocess;"
        "shapes = [decode_file(p, pre).pixels.shape for p in sys.argv[1:]];"
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1);"
        "print(shapes, int(hwm) // 1024)"
    )
    files = [str(tmp_path / "1.png"), str(tmp_path / "200000.png")]
    done = subprocess.run(
        [sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shapes, peak_mb = done.stdout.rsplit("]", 1)
    assert shapes.count("(") == 2 and int(peak_mb) < 2048, done.stdout


# -- 16-bit colour TIFFs: scaled from min..max like greyscale, not cut to their high byte ------


def _sixteen_bit_twin(tmp_path: Path, bands: str, compression: str | None) -> tuple[Path, Path]:
    """An 8-bit photo and its 16-bit twin holding 1000 + 16 * value (1000..5080, a typical
    12-bit scanner range), as greyscale, RGB or RGBA (opaque) TIFF."""
    import tifffile  # the test extra (via scikit-image); a missing one fails the test

    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 255, (4, 4, 3)).astype(np.uint8))
    photo = np.asarray(base.resize((64, 48), Image.Resampling.BICUBIC))
    if bands == "L":
        photo = np.asarray(Image.fromarray(photo).convert("L"))
    eight = tmp_path / f"eight_{bands}.png"
    Image.fromarray(photo).save(eight)
    sixteen = 1000 + 16 * photo.astype(np.uint16)
    if bands == "RGBA":
        sixteen = np.dstack([sixteen, np.full(sixteen.shape[:2], 65535, np.uint16)])
    path = tmp_path / f"sixteen_{bands}_{compression}.tif"
    extra = {"extrasamples": ["unassalpha"]} if bands == "RGBA" else {}
    photometric = "minisblack" if bands == "L" else "rgb"
    tifffile.imwrite(path, sixteen, photometric=photometric, compression=compression, **extra)
    return eight, path


@pytest.mark.parametrize(
    ("bands", "compression"),
    [("L", None), ("RGB", None), ("RGBA", None), ("RGB", "zlib"), ("RGBA", "zlib")],
)
def test_16bit_tiffs_are_range_scaled_in_every_mode(
    tmp_path: Path, bands: str, compression: str | None
) -> None:
    eight, sixteen = _sixteen_bit_twin(tmp_path, bands, compression)
    ref = _arr(open_rgb(eight).image).astype(np.float64)
    got = _arr(open_rgb(sixteen).image).astype(np.float64)
    assert got.shape == ref.shape
    # min..max scaling: the full 0..255 range, and the same picture as the 8-bit original
    assert got.min() <= 5 and got.max() >= 250, (got.min(), got.max())
    corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
    assert corr >= 0.99, corr


def test_16bit_rgb_tiff_embeds_like_its_8bit_original(tmp_path: Path) -> None:
    from conftest import TINY

    from embedkit.extraction.embed import embed

    eight, sixteen = _sixteen_bit_twin(tmp_path, "RGB", None)
    a, b = embed([eight, sixteen], model=TINY, random_init=True)
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos >= 0.98, cos
