"""One image, one vector: every way a file can enter gives the vector extraction stored.

Entry paths: extraction (local engine; the Ray engine calls the same ``pool.decode_file``),
``embed([path])``, search by file, classify by file and probe predict by file. Files: JPEGs at
1x, 2x, 4x and 10x the model input (the large ones are draft-decoded), EXIF-rotated drafted
JPEGs (all seven orientations), a PNG, an MPO and a PNG with a broken trailing metadata chunk.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import CORPUS, TINY
from PIL import Image
from safetensors.torch import save_file

from embedkit.classification.head import classify, embed_image_files
from embedkit.classification.train import train_store_probe
from embedkit.errors import ImageFileError
from embedkit.extraction.embed import backbone_for_store, embed
from embedkit.extraction.run import extract
from embedkit.images.decode import _TRANSPOSE, ImageDecodeError, _transpose_box, open_rgb
from embedkit.images.model_input import load_model_input
from embedkit.index.search import _resolve_queries, search
from embedkit.models.backbone import load_backbone
from embedkit.models.preprocess import Preprocess
from embedkit.store.read import open_store

# TINY's input is 160 px (crop_pct 0.95: resize target 168, draft_size 3 x 168 = 504).
INPUT = 160
ATOL = 1e-5  # float32 forward passes of different batch compositions; decode must add nothing


def _detailed(w: int, h: int, seed: int) -> Image.Image:
    """A smooth colour field plus pixel-level grain, so that draft decoding changes pixels."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
    arr = np.asarray(base.resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
    arr += rng.integers(-40, 40, (h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _with_orientation(img: Image.Image, orientation: int) -> tuple[Image.Image, Image.Exif]:
    """Stored pixels and EXIF such that a viewer shows ``img`` upright."""
    inverse = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return img.transpose(inverse), exif


def make_files(folder: Path) -> list[str]:
    """The test images, in two class folders (for the probe); returns relative paths."""
    names = []

    def put(rel: str, img: Image.Image, **save: object) -> None:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, **save)  # type: ignore[arg-type]
        names.append(rel)

    # 1x, 2x, 4x, 10x the model input; odd sizes, so libjpeg's last reduced pixel is partial.
    for k in (1, 2, 4, 10):
        put(f"a/x{k}.jpg", _detailed(INPUT * k + 1, INPUT * k * 4 // 3 + 1, k), quality=90)
    for o in range(2, 9):
        pixels, exif = _with_orientation(_detailed(1601, 1203, 100 + o), o)
        put(f"b/orient{o}.jpg", pixels, quality=90, exif=exif)
    put("b/plain.png", _detailed(300, 200, 7))
    left, right = _detailed(1203, 1601, 8), _detailed(1203, 1601, 9)
    put("a/stereo.mpo", left, format="MPO", save_all=True, append_images=[right])
    put("b/upper.JPG", _detailed(700, 500, 10), quality=90)
    shutil.copy(CORPUS / "truncated_end_chunk.png", folder / "b" / "end_chunk.png")
    names.append("b/end_chunk.png")
    return names


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("entry")
    names = make_files(root / "photos")
    torch.manual_seed(0)
    model = timm.create_model(TINY, num_classes=1000).eval()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "w.safetensors")
    )
    # workers=1: the files go through a real decode worker process, as in production.
    extract(
        [root / "photos"], root / "s.store", model=TINY, weights=root / "w.safetensors", workers=1
    )
    return root, names


def _stored(store_dir: Path, names: list[str]) -> np.ndarray:
    store = open_store(store_dir)
    return store.vectors[[store.row_of(n) for n in names]]


def test_every_file_is_embedded(world: tuple[Path, list[str]]) -> None:
    root, names = world
    store = open_store(root / "s.store")
    t = store.table.to_pydict()
    assert sorted(p for p, s in zip(t["path"], t["status"], strict=True) if s == "ok") == sorted(
        names
    ), t["reason"]
    rows = dict(
        zip(t["path"], zip(t["width"], t["height"], t["n_frames"], strict=True), strict=True)
    )
    assert rows["a/stereo.mpo"] == (1203, 1601, 2)  # frame 0 of two
    assert rows["b/orient6.jpg"] == (1601, 1203, 1)  # post-orientation size
    detail = dict(zip(t["path"], t["detail"], strict=True))
    # The broken trailing chunk is recorded with the row, not fatal.
    assert "Truncated File Read" in (detail["b/end_chunk.png"] or "")
    assert detail["a/x1.jpg"] is None


def test_embed_paths_equals_stored_rows(world: tuple[Path, list[str]]) -> None:
    root, names = world
    backbone = backbone_for_store(open_store(root / "s.store"), device="cpu")
    got = embed([root / "photos" / n for n in names], model=backbone)
    np.testing.assert_allclose(got, _stored(root / "s.store", names), rtol=0, atol=ATOL)


def test_embed_mixes_paths_and_pil_images(world: tuple[Path, list[str]]) -> None:
    root, names = world
    backbone = backbone_for_store(open_store(root / "s.store"), device="cpu")
    png = root / "photos" / "b" / "plain.png"
    got = embed([str(root / "photos" / "a" / "x1.jpg"), Image.open(png)], model=backbone)
    want = _stored(root / "s.store", ["a/x1.jpg", "b/plain.png"])
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    one = embed(root / "photos" / "a" / "x10.jpg", model=backbone)  # one path, not a list
    np.testing.assert_allclose(one, _stored(root / "s.store", ["a/x10.jpg"]), rtol=0, atol=ATOL)


def test_search_by_copied_file_uses_the_stored_vector(
    world: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """A copy outside the store (not a stored path) is embedded, and finds its original."""
    root, names = world
    store = open_store(root / "s.store")
    copies = []
    for n in names:
        c = tmp_path / n.replace("/", "_")
        shutil.copy(root / "photos" / n, c)
        copies.append(str(c))
    _, used = _resolve_queries(store, list(copies), [], "cpu")
    np.testing.assert_allclose(used, _stored(root / "s.store", names), rtol=0, atol=ATOL)
    for n, result in zip(names, search(store, copies, k=1, device="cpu"), strict=True):
        top = result.hits[0]
        assert top.path.endswith(n) and top.score >= 1 - 1e-5, (n, top)


def test_classify_by_file_equals_stored_features(world: tuple[Path, list[str]]) -> None:
    root, names = world
    store = open_store(root / "s.store")
    files = [root / "photos" / n for n in names]
    feats = embed_image_files(store, files, normalize=False, device="cpu")
    np.testing.assert_allclose(feats, _stored(root / "s.store", names), rtol=0, atol=ATOL)
    by_file = classify(store=store, images=files, top_k=3, device="cpu")
    photos = root / "photos"
    stored = {
        Path(p.path).relative_to(photos).as_posix(): p for p in classify(store=store, top_k=3)
    }
    for n, p in zip(names, by_file, strict=True):
        assert [t.index for t in p.top] == [t.index for t in stored[n].top]
        np.testing.assert_allclose(
            [t.prob for t in p.top], [t.prob for t in stored[n].top], rtol=0, atol=1e-6
        )


def test_probe_predict_by_file_equals_stored_rows(world: tuple[Path, list[str]]) -> None:
    root, names = world
    probe = train_store_probe(root / "s.store", max_epochs=3, device="cpu", seed=0)
    files = [root / "photos" / n for n in names]
    by_file = probe.classify(store=root / "s.store", images=files, top_k=2, device="cpu")
    stored = {
        Path(p.path).relative_to(root / "photos").as_posix(): p
        for p in probe.classify(store=root / "s.store", top_k=2)
    }
    for n, p in zip(names, by_file, strict=True):
        assert [t.label for t in p.top] == [t.label for t in stored[n].top]
        np.testing.assert_allclose(
            [t.prob for t in p.top], [t.prob for t in stored[n].top], rtol=0, atol=1e-6
        )


def test_query_paths_report_bad_files_with_extraction_reasons(
    world: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, _ = world
    store = open_store(root / "s.store")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((root / "photos" / "a" / "x2.jpg").read_bytes()[:3000])
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    for path, reason in ((cut, "truncated"), (text, "unidentified")):
        for call in (
            lambda p: embed([p], model=backbone_for_store(store, device="cpu")),
            lambda p: search(store, [p], device="cpu"),
            lambda p: classify(store=store, images=[p], device="cpu"),
        ):
            with pytest.raises(ImageFileError) as info:
                call(path)
            assert info.value.reason == reason and str(path) in str(info.value)
            assert "\n" not in str(info.value)


def test_cli_search_bad_file_is_one_line(world: tuple[Path, list[str]], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import embedkit.cli.search  # noqa: F401  (registers the commands)
    from embedkit.cli._app import app

    root, _ = world
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    r = CliRunner().invoke(app, ["search", str(root / "s.store"), str(bad), "--device", "cpu"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    with pytest.raises(ImageDecodeError) as info:
        open_rgb(bad)  # the reason extraction records for this file
    assert f": {info.value.reason} (" in r.output and len(r.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------- draft geometry


@pytest.mark.parametrize("method", sorted(_TRANSPOSE.values()))
def test_transposed_box_covers_the_same_pixels(method: Image.Transpose) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8))
    box = (1, 2, 5, 4)
    moved = tuple(int(v) for v in _transpose_box(box, img.size, method))
    assert img.transpose(method).crop(moved).tobytes() == img.crop(box).transpose(method).tobytes()


def test_drafted_jpeg_keeps_the_full_pictures_geometry() -> None:
    """An odd-sized drafted JPEG: libjpeg rounds the reduced size up (1601 / 2 -> 801), and the
    resize must map the full picture's extent, not the rounded one."""
    pre = load_backbone(TINY, random_init=True).preprocess
    buf = io.BytesIO()
    _detailed(1601, 2135, 3).save(buf, "JPEG", quality=95)
    d = open_rgb(buf.getvalue(), draft_size=pre.draft_size)
    assert d.image.size == (801, 1068) and d.box == (0, 0, 1601 / 2, 2135 / 2)
    full = load_model_input(buf.getvalue(), pre, draft=False).pixels.astype(np.float64)
    drafted = load_model_input(buf.getvalue(), pre).pixels.astype(np.float64)
    naive = pre.to_uint8(d.image).astype(np.float64)  # geometry of the rounded-up image
    assert np.abs(drafted - full).mean() < np.abs(naive - full).mean()
    assert np.abs(drafted - full).mean() < 2.0  # uint8 levels, on a grainy picture


def test_draft_rule_keeps_three_times_the_resize_target() -> None:
    pre = load_backbone(TINY, random_init=True).preprocess
    assert pre.draft_size == 3 * max(pre.scale_size)
    for short, scale in ((1007, 1), (1009, 2), (2017, 4), (4033, 8)):
        buf = io.BytesIO()
        Image.new("RGB", (short, short + 10), (90, 120, 30)).save(buf, "JPEG")
        d = open_rgb(buf.getvalue(), draft_size=pre.draft_size)
        assert d.image.size[0] == -(-short // scale), (short, d.image.size)
        assert min(d.image.size) >= pre.draft_size or scale == 1


# ------------------------------------------------------------- parity with timm's eval pipeline

# Models with different sizes, crop_pct and interpolation (bicubic, bilinear).
PARITY_MODELS = [TINY, "test_resnet", "test_vit", "efficientnet_lite0"]


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_full_decode_matches_timm_eval_transform(name: str, tmp_path: Path) -> None:
    """With draft off, ``load_model_input`` + ``normalize`` is timm's own eval transform.

    Tolerance 1e-5: both resize and crop with the same PIL calls (identical uint8); the only
    difference is float32 rounding of (x - 255 mean) / (255 std) against (x / 255 - mean) / std,
    a few ulp of values within about +-3.
    """
    model = timm.create_model(name, pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    pre = Preprocess.from_timm_config(cfg)
    files = []
    for i, (w, h) in enumerate(((640, 480), (333, 501), (1203, 1601), (150, 150))):
        files.append(tmp_path / f"{i}.jpg")
        _detailed(w, h, i).save(files[-1], quality=92)
    files.append(tmp_path / "p.png")
    _detailed(257, 190, 9).save(files[-1])
    for f in files:
        ours = pre.normalize(torch.from_numpy(load_model_input(f, pre, draft=False).pixels)[None])
        with Image.open(f) as im:
            theirs = transform(im.convert("RGB"))[None]
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) <= 1e-5, (name, f.name)


# ------------------------------------------------------------------- camera and hostile files


def test_camera_suffixes_are_walked_and_named(tmp_path: Path) -> None:
    """Phones and cameras write .JPG/.JPEG, .jpe, .jfif and .mpo: all are images, in a folder
    walk and when named; .mpo embeds its first picture."""
    from embedkit.images.sources import find_images

    names = ["a.JPG", "b.JPEG", "c.jpe", "d.jfif", "e.mpo", "f.Mpo"]
    for i, n in enumerate(names):
        img = _detailed(64, 48, i)
        if n.lower().endswith(".mpo"):
            img.save(
                tmp_path / n, format="MPO", save_all=True, append_images=[_detailed(64, 48, 9)]
            )
        else:
            img.save(tmp_path / n, format="JPEG")
    found, failures = find_images([tmp_path])
    assert failures == [] and sorted(f.path for f in found) == sorted(names)
    found, failures = find_images([tmp_path / "e.mpo", tmp_path / "a.JPG"])
    assert failures == [] and [f.path for f in found] == ["e.mpo", "a.JPG"]
    d = open_rgb(tmp_path / "e.mpo")
    assert d.n_frames == 2
    got = np.asarray(d.image, dtype=np.float64)
    mad = [np.abs(got - np.asarray(_detailed(64, 48, s), np.float64)).mean() for s in (4, 9)]
    assert mad[0] < 12 < 40 < mad[1], mad  # frame 0 (JPEG-compressed grain), not frame 1


def _png_with_chunk(kind: bytes, payload: bytes, before_pixels: bool) -> bytes:
    import struct
    import zlib

    buf = io.BytesIO()
    _detailed(50, 40, 1).save(buf, "PNG")
    png = buf.getvalue()
    body = kind + payload
    chunk = struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))
    at = 33 if before_pixels else png.rindex(b"IEND") - 4  # after IHDR, or before IEND
    return png[:at] + chunk + png[at:]


@pytest.mark.parametrize("before_pixels", [True, False])
def test_png_with_broken_exif_is_embedded_with_the_problem_in_detail(
    before_pixels: bool, tmp_path: Path
) -> None:
    from embedkit.extraction.pool import decode_file

    broken = b"MM\x00\x2a\x00\x00\x00\x08\xff\xff\x00\x01"  # IFD claims 65535 entries
    path = tmp_path / "meta.png"
    path.write_bytes(_png_with_chunk(b"eXIf", broken, before_pixels))
    pre = load_backbone(TINY, random_init=True).preprocess
    r = decode_file(str(path), pre)
    assert r.status == "ok" and (r.width, r.height) == (50, 40), r
    assert "EXIF" in (r.detail or ""), r.detail
    # ... and the query paths see the same pixels.
    assert np.array_equal(load_model_input(path, pre).pixels, r.pixels)


def test_heif_plugin_is_registered_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """pillow-heif (HEIC, the iPhone default) is optional: registered and its suffixes and
    format allowed when importable, absent otherwise."""
    import sys
    import types

    from embedkit.images import decode

    calls: list[str] = []
    fake = types.ModuleType("pillow_heif")
    fake.register_heif_opener = lambda: calls.append("registered")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pillow_heif", fake)
    assert decode._heif_plugin() is True and calls == ["registered"]
    assert {".heic", ".heif"} <= decode._image_suffixes(True)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails
    assert decode._heif_plugin() is False
    assert ".heic" not in decode._image_suffixes(False)
