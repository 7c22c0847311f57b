"""Duplicate groups: exact by content hash, near by k-NN graph + star groups; real photo edits."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedkit.errors import InvalidArgumentError
from embedkit.index.duplicates import find_duplicates, group_duplicates
from embedkit.index.ram import Index


def planted(n: int = 3000, dim: int = 64, seed: int = 0):
    """Random unit vectors (pairwise cosine ~0) with planted near copies and exact copies."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = [f"{i:064x}" for i in range(n)]
    # near copies: rows 1, 2 of 0 (a group of 3); row 11 of 10
    for src, dst, noise in ((0, 1, 0.05), (0, 2, 0.08), (10, 11, 0.05)):
        x[dst] = x[src] + noise * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
    # exact copy: same bytes, so same hash and same vector
    x[21] = x[20]
    hashes[21] = hashes[20]
    ids = rng.choice(2**60, n, replace=False).astype(np.int64)
    return x, ids, hashes


def test_groups_near_and_exact_copies_and_nothing_else() -> None:
    x, ids, hashes = planted()
    groups = group_duplicates(x, ids, hashes, threshold=0.95)
    as_sets = [{int(m.id) for m in g.members} for g in groups]
    expected = [set(ids[rows].tolist()) for rows in ([0, 1, 2], [10, 11], [20, 21])]
    assert sorted(map(sorted, as_sets)) == sorted(map(sorted, expected))
    big = groups[0]
    assert len(big.members) == 3 and big.members[0].id == ids[0]  # earliest row first
    assert all(0.95 <= m.score <= 1.0 for m in big.members)
    exact = next(g for g in groups if g.members[0].id == ids[20])
    assert all(m.exact and m.score == pytest.approx(1.0) for m in exact.members)
    assert exact.identical_pairs == 1 and exact.identical_copies == 1
    assert exact.members[0].identical_to == (int(ids[21]),)
    assert not any(m.exact for m in big.members) and big.identical_pairs == 0


def test_identity_is_judged_per_member_not_against_the_first() -> None:
    # A group whose first member is unique and whose later members are two byte-identical
    # pairs: every copy is exact, the first is not, and 2 pairs / 2 removable copies count.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    for dst, noise in ((1, 0.02), (2, 0.0), (3, 0.03), (4, 0.0)):
        x[dst] = x[0] + noise * rng.standard_normal(32).astype(np.float32)
    hashes = [f"h{i}" for i in range(40)]
    hashes[2] = hashes[1]
    hashes[4] = hashes[3]
    groups = group_duplicates(x, np.arange(40), hashes, threshold=0.95)
    (g,) = groups
    by_id = {m.id: m for m in g.members}
    assert not by_id[0].exact and by_id[0].identical_to == ()
    assert by_id[1].exact and by_id[1].identical_to == (2,) and by_id[2].identical_to == (1,)
    assert by_id[3].exact and by_id[4].exact
    assert g.identical_pairs == 2 and g.identical_copies == 2


def test_scores_are_each_members_best_similarity_in_the_group() -> None:
    # A chain a - b - c: c joined through b, and its score is its similarity to b (>= the
    # threshold), not its lower similarity to the first member a.
    rng = np.random.default_rng(3)
    base = rng.standard_normal((50, 32)).astype(np.float32)
    step = rng.standard_normal(32).astype(np.float32)
    step *= 0.25 * np.linalg.norm(base[0]) / np.linalg.norm(step)
    x = np.concatenate([base, base[:1] + step, base[:1] + 2 * step])
    (g,) = group_duplicates(x, np.arange(len(x)), threshold=0.95, k=1)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert float(unit[51] @ unit[0]) < 0.95  # the old score, measured against the leader
    by_id = {m.id: m for m in g.members}
    assert all(m.score >= 0.95 for m in g.members)
    assert by_id[51].closest == 50
    assert by_id[51].score == pytest.approx(float(unit[51] @ unit[50]), abs=1e-5)


def test_exact_duplicates_group_even_when_vectors_differ() -> None:
    # same content hash is authoritative: e.g. two copies embedded by different runs
    x, ids, hashes = planted(200)
    hashes[50] = hashes[60]
    groups = group_duplicates(x, ids, hashes, threshold=0.99)
    assert any({m.id for m in g.members} == {ids[50], ids[60]} for g in groups)


def test_a_short_chain_is_one_star_around_its_middle() -> None:
    # a -> b -> c each 0.97 apart, a-c lower; with k=1 they still end in one group, b at its
    # centre (a longer chain does not: test_duplicates_verify.test_a_long_chain_is_not_one_group)
    rng = np.random.default_rng(3)
    base = rng.standard_normal((50, 32)).astype(np.float32)
    step = rng.standard_normal(32).astype(np.float32)
    step *= 0.25 * np.linalg.norm(base[0]) / np.linalg.norm(step)
    x = np.concatenate([base, base[:1] + step, base[:1] + 2 * step])
    ids = np.arange(len(x))
    groups = group_duplicates(x, ids, threshold=0.95, k=1)
    assert {m.id for m in groups[0].members} == {0, 50, 51}
    assert {m.id for m in groups[0].members if m.evidence == "centre"} == {50}


def test_uses_a_given_index_and_refuses_l2() -> None:
    x, ids, hashes = planted(500)
    index = Index.build(x, ids, key="HNSW32")
    groups = group_duplicates(x, ids, hashes, 0.95, index=index)
    assert len(groups) == 3
    with pytest.raises(InvalidArgumentError, match="cosine"):
        group_duplicates(x, ids, hashes, 0.95, index=Index.build(x, ids, metric="l2"))
    with pytest.raises(InvalidArgumentError, match=r"\[-1, 1\]"):
        group_duplicates(x, ids, hashes, 1.5)


def test_memory_is_linear_not_quadratic() -> None:
    # 20k x 20k float32 would be 1.6 GB; the k-NN graph stays far below
    x, ids, hashes = planted(20_000, 32)
    index = Index.build(x, ids, key="Flat")
    tracemalloc.start()
    group_duplicates(x, ids, hashes, 0.95, index=index)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100 * 2**20


# -- real photos and their edits (real weights) ---------------------------------------------


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf)


def write_photo_set(root: Path) -> dict[str, list[str]]:
    """Six skimage photos plus edited copies; returns {photo: [its files]}."""
    from skimage import data

    photos = {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
        "hubble": data.hubble_deep_field(),
    }
    root.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {}
    for name, arr in photos.items():
        im = Image.fromarray(arr).convert("RGB")
        w, h = im.size
        files = {
            f"{name}.png": im,
            f"{name}_small.jpg": im.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
            f"{name}_q30.jpg": _jpeg(im, 30),
            f"{name}_crop.jpg": im.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
        }
        for fname, edited in files.items():
            edited.save(root / fname, quality=90) if fname.endswith(".jpg") else edited.save(
                root / fname
            )
        # EXIF-rotated copy: pixels stored sideways, orientation tag 6 says "rotate back"
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(
            root / f"{name}_exif6.jpg", quality=90, exif=exif.tobytes()
        )
        groups[name] = [*files, f"{name}_exif6.jpg"]
    return groups


@pytest.mark.slow
def test_photo_edits_group_together_and_photos_do_not(tmp_path: Path) -> None:
    from embedkit.extraction.run import extract

    expected = write_photo_set(tmp_path / "photos")
    store = tmp_path / "s.store"
    extract([tmp_path / "photos"], store, workers=0)
    groups = find_duplicates(store)  # the default threshold must group every edit
    found = [sorted(Path(str(m.path)).name for m in g.members) for g in groups]
    assert sorted(found) == sorted(sorted(files) for files in expected.values())
