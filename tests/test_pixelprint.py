"""Pixel fingerprints: computed once by extraction, kept in the store, read by duplicates."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image
from scipy.fft import dctn
from test_duplicates_verify import _texture, _write_textures

import embedkit.extraction.pool as pool
import embedkit.index.verify as verify
from embedkit.extraction.run import extract
from embedkit.images.pixelprint import SIDE, hash_views, orientations
from embedkit.index.duplicates import find_duplicates
from embedkit.models.preprocess import Preprocess
from embedkit.store import pixels
from embedkit.store.read import open_store

_BITS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def _store(tmp_path: Path) -> tuple[Path, list[str]]:
    paths, _ = _write_textures(tmp_path / "tex")
    # A large JPEG, decoded by libjpeg at a reduced scale (the model's draft size): its
    # fingerprint depends on the draft size, which the stored one must match.
    big = _texture(99, size=96).resize((2000, 1600), Image.Resampling.BICUBIC)
    big.save(tmp_path / "tex" / "big.jpg", quality=90)
    big.resize((1000, 800)).save(tmp_path / "tex" / "big_half.jpg", quality=90)
    store = tmp_path / "s.store"
    extract([tmp_path / "tex"], store, model=TINY, random_init=True, workers=0)
    return store, paths


def _groups(store: Path) -> set[frozenset[str]]:
    return {frozenset(m.path or "" for m in g.members) for g in find_duplicates(store)}


class _Opens:
    """The files decoded for fingerprints so far, read back from a log that the (forked)
    decode workers append to: compares and counts like a list."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def _lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def __len__(self) -> int:
        return len(self._lines())

    def __eq__(self, other: object) -> bool:
        return self._lines() == other

    __hash__ = None  # type: ignore[assignment]


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> _Opens:
    """Every file ``index.verify.fingerprints`` decodes (in its decode workers)."""
    log = tmp_path / "opens.log"
    real = pool.open_rgb

    def counting(data, *args, **kwargs):  # type: ignore[no-untyped-def]
        with open(log, "a") as f:  # O_APPEND: whole lines from any process
            f.write(f"{len(data)} bytes\n")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(pool, "open_rgb", counting)  # inherited by the forked workers
    return _Opens(log)


def test_duplicates_on_a_store_does_not_decode_the_files_again(
    tmp_path: Path, opens: _Opens
) -> None:
    store, paths = _store(tmp_path)
    assert list((store / pixels.PIXELS_DIR).glob("*.arrow")), "extraction kept no fingerprints"
    groups = _groups(store)
    assert opens == []
    assert frozenset([paths[1], str(tmp_path / "tex" / "t01_exif.jpg")]) in groups
    assert frozenset([str(tmp_path / "tex" / n) for n in ("big.jpg", "big_half.jpg")]) in groups


def test_a_store_without_fingerprints_decodes_once_and_keeps_them(
    tmp_path: Path, opens: _Opens
) -> None:
    store, _ = _store(tmp_path)
    with_kept = _groups(store)
    shutil.rmtree(store / pixels.PIXELS_DIR)  # as a store written before they were kept
    logs: list[str] = []
    groups = find_duplicates(store, log=logs.append)
    assert {frozenset(m.path or "" for m in g.members) for g in groups} == with_kept
    n = len(open_store(store, vectors=False).ids)
    assert len(opens) == n
    assert any(f"{n} of {n} files decoded" in s for s in logs)
    assert _groups(store) == with_kept
    assert len(opens) == n  # the second call read what the first one kept


def test_extraction_fingerprints_equal_those_from_the_files(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    st = open_store(store, vectors=False)
    draft = Preprocess.from_dict(st.metadata["preprocess"]).draft_size
    kept = pixels.read_prints(store, pixels.segment_key(draft), st.hashes)
    assert kept.found.all()
    files = verify.fingerprints(st.abspaths, draft_size=draft)
    assert files.ok.all()
    np.testing.assert_array_equal(kept.phash, files.phash)
    np.testing.assert_array_equal(kept.dhash, files.dhash)
    np.testing.assert_array_equal(kept.thumb, files.thumb)
    # the key matters: a reader asking for another draft size finds none of them
    other = pixels.read_prints(store, pixels.segment_key(draft + 1), st.hashes)
    assert not other.found.any()


def _phash_each_orientation(grey: np.ndarray) -> np.ndarray:
    """The pHash of each orientation, one DCT per orientation (the definition)."""
    out = []
    for o in orientations(grey):
        low = dctn(o.astype(np.float64), type=2, norm="ortho")[:8, :8].ravel()
        bits = low > np.median(low[1:])
        out.append((bits.astype(np.uint64) * _BITS).sum(dtype=np.uint64))
    return np.array(out, dtype=np.uint64)


def test_orientation_hashes_from_one_dct_match_the_definition() -> None:
    rng = np.random.default_rng(0)
    grey = rng.uniform(0, 255, (6, SIDE, SIDE)).astype(np.float32)
    phash, thumb, dhash = hash_views(grey)
    for i in range(len(grey)):
        np.testing.assert_array_equal(phash[i], _phash_each_orientation(grey[i]))
        small = np.asarray(Image.fromarray(grey[i]).resize((9, 8), Image.Resampling.BOX))
        bits = (small[:, 1:] > small[:, :-1]).ravel()
        assert dhash[i] == (bits.astype(np.uint64) * _BITS).sum(dtype=np.uint64)
    assert np.allclose(np.linalg.norm(thumb, axis=1), 1.0, atol=1e-5)
    # a flat image: equal neighbours give 0 bits, not rounding noise
    _, _, flat = hash_views(np.full((1, SIDE, SIDE), 250.0, dtype=np.float32))
    assert flat[0] == 0


def _prints(n: int, seed: int) -> dict[str, pixels.PixelPrint]:
    rng = np.random.default_rng(seed)
    return {
        f"{seed:04d}{i:060d}": pixels.PixelPrint(
            rng.integers(0, 2**63, (2, 8), dtype=np.uint64),
            rng.standard_normal((2, 256)).astype(np.float16),
            rng.integers(0, 2**63, 2, dtype=np.uint64),
        )
        for i in range(n)
    }


def test_segments_merge_into_one_keeping_live_hashes(tmp_path: Path) -> None:
    key = pixels.segment_key(768)
    batches = [_prints(3, s) for s in range(pixels.MERGE_AT + 1)]
    for b in batches:
        assert pixels.write_segment(tmp_path, key, b)
    everything = {h: p for b in batches for h, p in b.items()}
    live = [h for i, h in enumerate(everything) if i % 2 == 0]
    (tmp_path / pixels.PIXELS_DIR / "junk.arrow").write_bytes(b"not arrow")  # ignored
    assert not pixels.merge_segments(tmp_path, key, lambda: live, at=len(batches) + 1)
    assert pixels.merge_segments(tmp_path, key, lambda: live)
    assert len(list((tmp_path / pixels.PIXELS_DIR).glob("*.arrow"))) == 1
    got = pixels.read_prints(tmp_path, key, [*everything, None])
    want = np.array([h in set(live) for h in everything] + [False])
    np.testing.assert_array_equal(got.found, want)
    for row, h in enumerate(everything):
        if want[row]:
            np.testing.assert_array_equal(got.phash[row], everything[h].phash)
            np.testing.assert_array_equal(got.thumb[row], everything[h].thumb)
            np.testing.assert_array_equal(got.dhash[row], everything[h].dhash)


def test_a_store_that_cannot_keep_them_still_finds_duplicates(
    tmp_path: Path, opens: _Opens
) -> None:
    store, _ = _store(tmp_path)
    want = _groups(store)
    shutil.rmtree(store / pixels.PIXELS_DIR)
    (store / pixels.PIXELS_DIR).write_bytes(b"")  # a file in the way: nothing can be kept
    assert not pixels.write_segment(store, pixels.segment_key(768), _prints(1, 0))
    assert _groups(store) == want  # decoded, not kept, no error
    n = len(open_store(store, vectors=False).ids)
    assert _groups(store) == want
    assert len(opens) == 2 * n
