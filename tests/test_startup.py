"""Start-up: commands that find their model's verified ONNX export cached import neither torch
nor timm; ``extract`` with nothing to embed loads no model; the summary time starts with the
process. Each command runs in a fresh interpreter, which then reports its ``sys.modules``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_photo

# Runs the CLI like the console script does, then says on stderr which heavy modules it loaded.
_WRAPPER = """
import sys
sys.argv = ["embedkit", *sys.argv[1:]]
code = 0
try:
    from embedkit.cli import app
    app()
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted(m for m in ("torch", "timm") if m in sys.modules)
sys.stderr.write("\\nHEAVY=" + ",".join(heavy) + "\\n")
sys.exit(code)
"""


def _run(tmp_path: Path, *args: str) -> tuple[str, list[str]]:
    """Run ``embedkit ARGS`` in a fresh interpreter; returns (stdout, heavy modules loaded)."""
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(_WRAPPER)
    env = {**os.environ, "EMBEDKIT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, str(wrapper), *args], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = [x for x in out.stderr.splitlines() if x.startswith("HEAVY=")][-1]
    return out.stdout, [m for m in line[len("HEAVY=") :].split(",") if m]


def _py(tmp_path: Path, code: str) -> str:
    env = {**os.environ, "EMBEDKIT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return out.stdout.strip()


@pytest.mark.slow
def test_cached_model_commands_do_not_import_torch(tmp_path):
    photos = tmp_path / "photos"
    for i in range(4):
        make_photo(photos / f"img{i}.jpg", i)
    query = make_photo(tmp_path / "query.jpg", 50)
    empty = tmp_path / "empty"
    empty.mkdir()
    model = ["--model", TINY, "--random-init", "--json"]
    first = tmp_path / "first.store"

    # The first extract loads the model, exports and checks the ONNX graph, and indexes it.
    out, heavy = _run(tmp_path, "extract", str(photos), "--store", str(first), *model)
    assert heavy == ["timm", "torch"] and json.loads(out)["embedded"] == 4
    assert (tmp_path / "cache" / "onnx" / "index.json").is_file()

    # From here on, nothing imports torch or timm.
    assert _py(tmp_path, "import sys, embedkit; print('torch' in sys.modules)") == "False"
    for args in (
        ["--help"],
        ["info", str(first)],
        ["search", str(first), str(photos / "img1.jpg"), "--json"],  # a stored path
        ["search", str(first), str(query), "--json"],  # a new image: embedded from the cache
        ["extract", str(photos), "--store", str(first), *model],  # all unchanged
    ):
        _, heavy = _run(tmp_path, *args)
        assert heavy == [], (args, heavy)

    # A new store from the cached model: no torch, and the very same store fingerprint,
    # metadata and vectors as the store the torch-loading run made.
    second = tmp_path / "second.store"
    out, heavy = _run(tmp_path, "extract", str(photos), "--store", str(second), *model)
    assert heavy == [] and json.loads(out)["embedded"] == 4
    out, heavy = _run(tmp_path, "extract", str(empty), "--store", str(tmp_path / "e.store"), *model)
    assert heavy == [] and json.loads(out)["embedded"] == 0

    from embedkit import open_store

    a, b = open_store(first), open_store(second)
    assert a.fingerprint == b.fingerprint
    skip = {"created", "updated"}
    assert {k: v for k, v in a.metadata.items() if k not in skip} == {
        k: v for k, v in b.metadata.items() if k not in skip
    }
    order = [a.paths.index(p) for p in b.paths]
    np.testing.assert_array_equal(a.vectors[order], b.vectors)

    # The query embedded without torch is the vector extraction gives the same file.
    make_photo(photos / "img9.jpg", 50)
    _run(tmp_path, "extract", str(photos), "--store", str(first), *model)
    hits = json.loads(_run(tmp_path, "search", str(first), str(query), "--json", "-k", "1")[0])
    top = hits[0]["hits"][0]
    assert top["path"].endswith("img9.jpg") and top["score"] > 0.9999


@pytest.mark.slow
def test_unchanged_rerun_loads_no_model_even_without_the_cache(tmp_path):
    """An existing store with nothing to embed: its own metadata is enough (no ONNX cache,
    ``--runtime torch``), and deletions are still recorded."""
    photos = tmp_path / "photos"
    for i in range(3):
        make_photo(photos / f"img{i}.jpg", i)
    store = str(tmp_path / "s.store")
    model = ["--model", TINY, "--random-init", "--json", "--runtime", "torch"]
    _, heavy = _run(tmp_path, "extract", str(photos), "--store", store, *model)
    assert heavy == ["timm", "torch"]
    (photos / "img2.jpg").unlink()
    out, heavy = _run(tmp_path, "extract", str(photos), "--store", store, *model)
    summary = json.loads(out)
    assert heavy == [] and (summary["unchanged"], summary["deleted"], summary["rows"]) == (2, 1, 2)
    # Another model asked for: it is loaded, and the mismatch is reported as before.
    wrapper = tmp_path / "wrap.py"
    bad = subprocess.run(
        [sys.executable, str(wrapper), "extract", str(photos), "--store", store, "--model",
         "test_resnet", "--random-init"],
        capture_output=True, text=True, env={**os.environ, "EMBEDKIT_CACHE": str(tmp_path / "c")},
    )  # fmt: skip
    assert bad.returncode == 1 and "new --store" in " ".join(bad.stderr.split())


def test_cached_embedder_refuses_what_it_cannot_vouch_for(tmp_path):
    """Only an indexed export of the same weights qualifies: a changed weights file, another
    seed, --runtime torch, or a changed .onnx file each send the caller to the loaded model."""
    from embedkit.models.backbone import load_backbone
    from embedkit.models.embedder import cached_embedder
    from embedkit.models.runtime import make_forward

    tiny = load_backbone(TINY, random_init=True, device="cpu")

    cache = tmp_path / "onnx"
    assert cached_embedder(TINY, random_init=True, device="cpu", cache_dir=cache) is None
    runner = make_forward(tiny, "auto", cache_dir=cache)
    assert runner.runtime == "onnx"
    emb = cached_embedder(TINY, random_init=True, device="cpu", cache_dir=cache)
    assert emb is not None and emb.fingerprint() == tiny.fingerprint()
    assert emb.weights_sha256 == tiny.weights_sha256 and emb.weights_source == "random-init"
    batch = np.random.default_rng(0).integers(0, 255, (2, *tiny.preprocess.size, 3), np.uint8)
    np.testing.assert_allclose(emb.forward_uint8(batch), tiny.forward(batch), rtol=0, atol=1e-4)
    assert cached_embedder(TINY, random_init=True, seed=1, device="cpu", cache_dir=cache) is None
    kw = {"random_init": True, "device": "cpu", "cache_dir": cache}
    assert cached_embedder(TINY, runtime="torch", **kw) is None
    assert cached_embedder(TINY, weights_sha256="0" * 64, **kw) is None
    onnx = runner.path  # type: ignore[union-attr]
    st = onnx.stat()
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cached_embedder(TINY, **kw) is None


def test_cached_embedder_tracks_the_weights_file(tmp_path):
    from safetensors.torch import save_file

    from embedkit.models.backbone import load_backbone
    from embedkit.models.embedder import cached_embedder
    from embedkit.models.runtime import make_forward

    src = load_backbone(TINY, random_init=True, device="cpu")
    file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(file))
    bb = load_backbone(TINY, weights=file, device="cpu")
    cache = tmp_path / "onnx"
    make_forward(bb, "onnx", cache_dir=cache)
    emb = cached_embedder(TINY, weights=file, device="cpu", cache_dir=cache)
    assert emb is not None and emb.weights_source == f"file:{file}"
    assert emb.weights_sha256 == bb.weights_sha256
    assert cached_embedder(TINY, device="cpu", cache_dir=cache) is None  # not the file asked for
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten, maybe new bytes
    assert cached_embedder(TINY, weights=file, device="cpu", cache_dir=cache) is None


def test_preprocess_and_labels_need_no_torch(tmp_path):
    code = (
        "import sys; from embedkit.models.preprocess import Preprocess; "
        "from embedkit.models.labels import imagenet_labels; import embedkit.models.embedder; "
        "from embedkit.classification.head import classify; "
        "print(len(imagenet_labels()), 'torch' in sys.modules, 'timm' in sys.modules)"
    )
    assert _py(tmp_path, code) == "1000 False False"


def test_shipped_labels_are_timms():
    import timm

    from embedkit import imagenet_labels

    info = timm.data.ImageNetInfo()
    assert imagenet_labels() == [info.index_to_description(i) for i in range(1000)]


def test_process_start_counts_time_before_the_cli_loaded(tmp_path):
    code = (
        "import time; time.sleep(0.6); t = time.time(); "
        "from embedkit.cli._clock import process_started; print(t - process_started())"
    )
    waited = float(_py(tmp_path, code))
    assert 0.6 <= waited < 30
    from embedkit.cli._clock import process_started

    assert process_started() <= time.time()


def test_nothing_to_embed_loads_no_model_but_mismatches_still_fail(
    tmp_path, photo_dir, monkeypatch
):
    import embedkit.extraction.run as run_mod
    import embedkit.models.backbone as backbone_mod
    from embedkit.errors import StoreMismatchError
    from embedkit.extraction.run import extract

    store = tmp_path / "s.store"
    kw = {"model": TINY, "random_init": True, "runtime": "torch", "workers": 0}
    assert extract([photo_dir], store, **kw).embedded == 7

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a run with nothing to embed")

    monkeypatch.setattr(backbone_mod, "load_backbone", no_model)
    monkeypatch.setattr(run_mod, "load_backbone", no_model, raising=False)  # a module-level import
    again = extract([photo_dir], store, **kw)
    assert (again.embedded, again.unchanged, again.rows) == (0, 7, 7)
    monkeypatch.undo()
    # Same files, other vectors asked for: not "nothing to do", the writer refuses as before.
    with pytest.raises(StoreMismatchError):
        extract([photo_dir], store, **kw, normalize=True)
