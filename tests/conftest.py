"""Shared fixtures: tiny random-init models, generated photos, the hostile corpus."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tiny timm test model (random init): fast enough for unit tests on 2 CPU cores.
TINY = "test_efficientnet"

# The hostile-image corpus lives in the repository (tests/data/corpus, with its MANIFEST and the
# Pillow licence), so a fresh clone runs every corpus test; nothing here reads outside the clone.
CORPUS = Path(__file__).resolve().parent / "data" / "corpus"


def synthetic_metadata(dim: int) -> dict:
    """Store metadata for vectors written straight through ``StoreWriter`` (no model)."""
    return {
        "model": "synthetic",
        "weights_sha256": "0",
        "random_init": True,
        "preprocess": {},
        "dim": dim,
        "normalize": False,
    }


def make_photo(path: Path, seed: int, size: tuple[int, int] = (96, 72)) -> Path:
    """A smooth random colour image (JPEG or PNG by suffix), different for each seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    for i in range(6):
        make_photo(d / f"img{i}.jpg", i)
    make_photo(d / "sub" / "deep.png", 100)
    return d


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "MANIFEST.tsv").exists():
        pytest.fail(f"hostile corpus missing at {CORPUS}: the checkout is incomplete")
    return CORPUS


def tree_mtime_bump(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))
