"""Duplicates of a folder that is not a store: pixels and bytes, no model, no store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from skimage import data as skdata
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.errors import InvalidArgumentError
from embedkit.index.file_duplicates import find_file_duplicates, move_file_duplicates

runner = CliRunner()

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "moon", "brick", "grass")


def _photos(root: Path) -> dict[str, set[str]]:
    """Real photos, some with edited copies (in a subfolder too); returns family -> files."""
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    families: dict[str, set[str]] = {}
    for name in PHOTOS:
        im = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        p = root / f"{name}.jpg"
        im.save(p, quality=92)
        families[name] = {str(p)}
    cat = Image.open(root / "chelsea.jpg").convert("RGB")
    edits = {
        "sub/chelsea_small.jpg": cat.resize((cat.width // 2, cat.height // 2)),
        "chelsea_grey.png": cat.convert("L"),
        "chelsea_mirror.jpg": cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "chelsea_turned.jpg": cat.rotate(4, resample=Image.Resampling.BILINEAR),
    }
    for rel, im in edits.items():
        im.save(root / rel)
        families["chelsea"].add(str(root / rel))
    coffee = Image.open(root / "coffee.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned, displayed upright (a phone photo)
    coffee.transpose(Image.Transpose.ROTATE_90).save(
        root / "coffee_phone.jpg", quality=90, exif=exif.tobytes()
    )
    ImageEnhance.Contrast(coffee).enhance(0.6).save(root / "sub/coffee_flat.jpg", quality=90)
    shutil.copy(root / "coffee.jpg", root / "sub/coffee_copy.jpg")  # byte-identical
    families["coffee"] |= {str(root / f) for f in ("coffee_phone.jpg", "sub/coffee_flat.jpg")}
    families["coffee"].add(str(root / "sub/coffee_copy.jpg"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return families


def test_folder_groups_real_copies_by_pixels_alone(tmp_path: Path) -> None:
    families = _photos(tmp_path / "pics")
    logs: list[str] = []
    seen: list[tuple[int, int]] = []
    result = find_file_duplicates(
        tmp_path / "pics", progress=lambda d, t: seen.append((d, t)), log=logs.append
    )
    found = sorted(sorted(m.path for m in g.members) for g in result.groups)
    want = sorted(sorted(fam) for fam in families.values() if len(fam) > 1)
    assert found == want  # every copy found, no unrelated photo joined
    assert len(result.files) == sum(len(f) for f in families.values()) + 1  # + broken.jpg
    assert [Path(p).name for p, _ in result.failures] == ["broken.jpg"]
    assert seen and seen[-1] == (len(result.files), len(result.files))
    members = {Path(m.path).name: m for g in result.groups for m in g.members}
    assert members["coffee_copy.jpg"].exact and members["coffee.jpg"].exact
    assert all(m.evidence in {"pixels", "identical", "centre"} for m in members.values())
    assert all("embedding" not in m.why for m in members.values())
    linked = [m for m in members.values() if m.evidence == "pixels"]
    assert linked and all("pHash distance" in m.why for m in linked)
    # the keeper of the cat is the largest copy, not the half-size one
    cat = next(g for g in result.groups if any("chelsea" in m.path for m in g.members))
    assert cat.keeper.width * cat.keeper.height == 451 * 300
    assert any("no embeddings" in s for s in logs)


def test_folder_duplicates_import_no_model_runtime(tmp_path: Path) -> None:
    _photos(tmp_path / "pics")
    code = (
        "import sys; from embedkit.index.file_duplicates import find_file_duplicates as f; "
        f"r = f({str(tmp_path / 'pics')!r}); "
        "print(len(r.groups), 'torch' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "False", "False"]


def test_cli_on_a_folder_lists_moves_and_undoes(tmp_path: Path) -> None:
    families = _photos(tmp_path / "pics")
    r = runner.invoke(app, ["duplicates", str(tmp_path / "pics"), "--json"])
    assert r.exit_code == 0, r.output
    groups = json.loads(r.stdout)
    assert sorted(len(g) for g in groups) == sorted(len(f) for f in families.values() if len(f) > 1)
    r = runner.invoke(app, ["duplicates", str(tmp_path / "pics"), "--to-remove"])
    assert r.exit_code == 0, r.output
    to_remove = r.stdout.split()
    assert len(to_remove) == sum(len(f) - 1 for f in families.values() if len(f) > 1)
    aside = tmp_path / "aside"
    r = runner.invoke(app, ["duplicates", str(tmp_path / "pics"), "--move-to", str(aside)])
    assert r.exit_code == 0, r.output
    assert not any(os.path.exists(p) for p in to_remove)
    assert (aside / "sub" / "coffee_copy.jpg").exists() or (aside / "coffee.jpg").exists()
    (undo,) = aside.glob("embedkit-undo-*.csv")
    r = runner.invoke(app, ["undo-move", str(undo)])
    assert r.exit_code == 0, r.output
    assert all(os.path.exists(p) for p in to_remove)


def test_cli_on_a_folder_refuses_embedding_options(tmp_path: Path) -> None:
    _photos(tmp_path / "pics")
    for extra in (["--threshold", "0.9"], ["--no-verify"]):
        r = runner.invoke(app, ["duplicates", str(tmp_path / "pics"), *extra])
        assert r.exit_code != 0
        assert "not a store" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["duplicates", str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "does not exist" in r.output


def test_bad_keep_rule_and_missing_folder_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        find_file_duplicates(tmp_path / "nowhere")
    (tmp_path / "a").mkdir()
    with pytest.raises(InvalidArgumentError):
        find_file_duplicates(tmp_path / "a", keep="bogus")
    empty = find_file_duplicates(tmp_path / "a")
    assert find_file_duplicates([str(tmp_path / "a")]).files == []
    assert empty.groups == [] and empty.files == []
    assert move_file_duplicates(empty, tmp_path / "aside").moved == []


def test_contrast_and_turn_do_not_change_the_fingerprint_much() -> None:
    """Recipe 2: the flat-border rule is relative (a low-contrast photo at 60% contrast was
    trimmed a quarter per side), and a small turn's blank corner triangles are painted over."""
    from embedkit.images.pixelprint import _content_box, _corner_mask, grey_views

    moon = Image.fromarray(skdata.moon()).convert("RGB")
    flat = ImageEnhance.Contrast(moon).enhance(0.6)
    a = np.asarray(moon.convert("L"))
    assert _content_box(a) == _content_box(np.asarray(flat.convert("L")))
    page = Image.new("RGB", (420, 540), "white")
    page.paste(Image.fromarray(skdata.text()).convert("RGB").resize((340, 120)), (40, 60))
    turned = page.rotate(5, resample=Image.Resampling.BILINEAR)  # black corners
    painted = _corner_mask(np.asarray(turned.convert("L")))
    assert painted is not None
    mask, level = painted
    assert mask[0, 0] and mask[-1, -1] and level > 200  # the black corners, in the margin's white
    assert grey_views(turned).shape == (2, 32, 32)
    framed = Image.new("L", (500, 620), 0)
    framed.paste(page.convert("L"), (40, 40))  # a frame is for trimming, not a turn's corner
    assert _corner_mask(np.asarray(framed)) is None


def _lined_page() -> Image.Image:
    """A page of dark text-like lines on light paper."""
    from PIL import ImageDraw

    page = Image.new("L", (420, 540), 250)
    draw = ImageDraw.Draw(page)
    rng = np.random.default_rng(0)
    for i in range(22):
        y, w = 40 + i * 21, int(rng.integers(200, 340))
        draw.rectangle((40, y, 40 + w, y + 9), fill=40)
    return page.convert("RGB")


def test_a_page_fed_askew_is_levelled_before_it_is_fingerprinted() -> None:
    from embedkit.images.pixelprint import page_skew, pixel_prints
    from embedkit.index.verify import Fingerprints, compare

    page = _lined_page()
    turned = page.rotate(5, resample=Image.Resampling.BILINEAR)  # black corners, lines at 5 deg
    assert page_skew(np.asarray(page.convert("L")))[0] == 0.0
    assert page_skew(np.asarray(turned.convert("L")))[0] == -5.0
    cat = np.asarray(Image.fromarray(skdata.chelsea()).convert("L"))
    assert page_skew(cat)[0] == 0.0  # a photo is not a page: left as it is
    from embedkit.images.pixelprint import grey_views

    fp = Fingerprints.empty(2)
    for row, one in enumerate(pixel_prints(np.stack([grey_views(page), grey_views(turned)]))):
        fp.put(row, one)
    ev = compare(fp, np.array([0]), np.array([1]), warp=False)
    assert ev.confirmed[0] and ev.distance[0] <= 4, ev.describe(0)


def test_a_store_inside_the_folder_is_not_walked(tmp_path: Path) -> None:
    """`extract ~/Pictures --store ~/Pictures/pics.store`, then `serve` caches thumbnails in
    the store: neither extract nor duplicates may take them for photos."""
    from collections import Counter

    from embedkit.extraction.run import extract
    from embedkit.images.sources import _STORE_FORMAT, find_images
    from embedkit.store.read import FORMAT_NAME

    assert _STORE_FORMAT == f'"{FORMAT_NAME}"'.encode()
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.fromarray(skdata.chelsea()).save(pics / "cat.jpg")
    Image.fromarray(skdata.coffee()).save(pics / "coffee.jpg")
    store = pics / "pics.store"
    extract([pics], store, model="test_efficientnet", random_init=True, workers=0)
    (store / "thumbs").mkdir()
    Image.fromarray(skdata.chelsea()).resize((120, 80)).save(store / "thumbs" / "1.jpg")
    skipped: Counter[str] = Counter()
    found, _ = find_images(pics, skipped=skipped)
    assert [f.path for f in found] == ["cat.jpg", "coffee.jpg"] and skipped["store"] == 1
    assert find_file_duplicates(pics).groups == []  # the thumbnail is no copy of the cat


def test_flat_images_are_not_copies_by_their_pixels(tmp_path: Path) -> None:
    """A blank page, a black frame and a red dot hash alike (no structure): not copies."""
    d = tmp_path / "flat"
    d.mkdir()
    Image.new("RGB", (300, 400), "white").save(d / "blank.png")
    Image.new("RGB", (640, 480), "black").save(d / "black.jpg")
    Image.new("RGB", (1, 1), "red").save(d / "dot.png")
    Image.new("L", (2, 900), 30).save(d / "line.png")
    shutil.copy(d / "blank.png", d / "blank_copy.png")  # byte-identical: still a copy
    groups = find_file_duplicates(d).groups
    assert [sorted(Path(m.path).name for m in g.members) for g in groups] == [
        ["blank.png", "blank_copy.png"]
    ]
    assert all(m.evidence in {"identical", "centre"} for m in groups[0].members)


def test_a_hairline_at_the_edge_does_not_stop_the_margin_trim() -> None:
    """A hairline frame (or a levelled copy's blended edge) before a flat margin: the margin
    is still trimmed, so the page compares with its unframed original."""
    from embedkit.images.pixelprint import _content_box

    page = np.asarray(_lined_page().convert("L")).copy()
    lined = page.copy()
    lined[0, :] = lined[-1, :] = lined[:, 0] = lined[:, -1] = 0  # a 1-pixel black frame
    assert _content_box(lined) == _content_box(page)
    assert _content_box(page)[:2] != (0, 0)  # the margins are trimmed at all


def test_a_decoder_crash_costs_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A codec that kills its process on a hostile file: that file is a failure, the run and
    its groups go on (decoding runs in extraction's crash-isolated worker processes)."""
    import signal

    import embedkit.extraction.pool as pool

    real = pool.open_rgb

    def crashing(data, **kw):  # type: ignore[no-untyped-def]
        if bytes(data[:5]) == b"CRASH":
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(data, **kw)

    monkeypatch.setattr(pool, "open_rgb", crashing)  # inherited by the forked workers
    families = _photos(tmp_path / "pics")
    (tmp_path / "pics" / "hostile.jpg").write_bytes(b"CRASH" + b"\0" * 100)
    result = find_file_duplicates(tmp_path / "pics", workers=2)
    reasons = dict(result.failures)
    assert reasons[str(tmp_path / "pics" / "hostile.jpg")].startswith("decode_crash")
    found = sorted(sorted(m.path for m in g.members) for g in result.groups)
    assert found == sorted(sorted(fam) for fam in families.values() if len(fam) > 1)
