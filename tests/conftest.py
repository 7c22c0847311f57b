"""Shared fixtures: tiny random-init models, generated photos, the hostile corpus."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def slow_extract_command(
    tmp_path: Path, *, n: int, size: tuple[int, int], workers: int, prelude: str = ""
) -> tuple[list[str], dict[str, str], Path, Path]:
    """(command, environment, photos, store) of an ``embedkit extract`` of ``n`` photos
    that a signal lands in mid-run: torch at batch 1 (slow per image), committing every 2
    rows, through ``embedkit.cli.main`` (``prelude``: Python run before it)."""
    src = tmp_path / "photos"
    for i in range(n):
        make_photo(src / f"{i:03d}.jpg", i, size=size)
    script = tmp_path / "cli.py"
    script.write_text(
        prelude + "from embedkit.extraction import run\n"
        "run.extract.__kwdefaults__['commit_every'] = 2\n"
        "from embedkit.cli import main\nmain()\n"
    )
    st = tmp_path / "s"
    cmd = [sys.executable, str(script), "extract", str(src), "--store", str(st),
           "--model", TINY, "--random-init", "--workers", str(workers), "--batch-size", "1",
           "--runtime", "torch"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return cmd, env, src, st


def wait_for_committed_rows(p: subprocess.Popen[str], st: Path, rows: int, timeout: float) -> None:
    """Until the run ``p`` has committed ``rows`` rows to ``st``, or ended, or ``timeout``
    seconds passed."""
    from embedkit.store.read import open_store

    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if (st / "manifest.json").exists() and len(open_store(st, vectors=False)) >= rows:
            return
        time.sleep(0.05)


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
