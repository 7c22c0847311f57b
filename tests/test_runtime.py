"""Runtimes: ONNX Runtime matches torch, the export cache keys on what the graph depends on,
a disagreeing export is refused (auto falls back to torch), and a store mixing runtimes
searches correctly."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY, make_photo
from PIL import Image

from embedkit.errors import InvalidArgumentError
from embedkit.extraction.local import LocalEngine
from embedkit.extraction.run import extract
from embedkit.models import runtime
from embedkit.models.backbone import load_backbone
from embedkit.models.runtime import (
    ONNX_RTOL,
    OnnxRunner,
    RuntimeMismatchError,
    TorchRunner,
    ensure_onnx,
    make_forward,
    onnx_cache_dir,
    probe_batch,
)
from embedkit.store.read import open_store


@pytest.fixture(scope="session")
def tiny():
    return load_backbone(TINY, random_init=True, device="cpu")


@pytest.fixture(scope="session")
def tiny_resnet():
    return load_backbone("test_resnet", random_init=True, device="cpu")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == np.float32
    assert np.abs(a - b).max() <= ONNX_RTOL * np.abs(b).max()


@pytest.mark.parametrize("which", ["tiny", "tiny_resnet"])
def test_onnx_equals_torch(which, request, tmp_path):
    bb = request.getfixturevalue(which)
    r = make_forward(bb, "onnx", threads=1, cache_dir=tmp_path)
    assert isinstance(r, OnnxRunner) and (r.runtime, r.dim, r.threads) == ("onnx", bb.dim, 1)
    assert r.preprocess == bb.preprocess
    batch = probe_batch(bb.preprocess.size, n=5, seed=7)  # another batch size than the export's
    _assert_close(r.forward(batch), bb.forward(batch))
    meta = r.metadata()
    assert meta["runtime"] == "onnx" and meta["onnx_opset"] == runtime.DEFAULT_OPSET
    assert meta["onnx_max_abs_diff_vs_torch"] <= meta["onnx_tolerance"]
    assert meta["threads"] == 1 and meta["onnxruntime_version"] and len(meta["onnx_sha256"]) == 64


@pytest.mark.parametrize("name", ["torch", "onnx"])
def test_set_threads_changes_threads_not_vectors(tiny, tmp_path, name):
    r = make_forward(tiny, name, threads=1, cache_dir=tmp_path)
    batch = probe_batch(tiny.preprocess.size, n=3, seed=3)
    before = r.forward(batch)
    r.set_threads(2)
    assert r.threads == 2 and r.metadata()["threads"] == 2
    if name == "torch":
        assert torch.get_num_threads() == 2
    _assert_close(r.forward(batch), before)
    if name == "onnx":  # a team that sleeps while waiting, to share cores with decoders
        r.set_threads(2, share_cores=True)
        assert r.shares_cores and r.can_share_cores
        _assert_close(r.forward(batch), before)
    else:
        assert not r.can_share_cores
        with pytest.raises(InvalidArgumentError):
            r.set_threads(2, share_cores=True)


def test_forward_checks_its_input(tiny, tmp_path):
    r = make_forward(tiny, "onnx", threads=1, cache_dir=tmp_path)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        r.forward(torch.zeros(1, 3, 32, 32))


def test_cache_hit_skips_export(tiny, tmp_path, monkeypatch):
    path, exported = ensure_onnx(tiny, cache_dir=tmp_path)
    assert exported and path.parent == tmp_path and path.with_suffix(".json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no leftovers

    def boom(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(runtime, "_export", boom)
    assert ensure_onnx(tiny, cache_dir=tmp_path) == (path, False)
    assert make_forward(tiny, "onnx", cache_dir=tmp_path).runtime == "onnx"


def test_cache_invalidated_by_weights_and_preprocessing(tiny, tmp_path):
    path, _ = ensure_onnx(tiny, cache_dir=tmp_path)
    other_weights = load_backbone(TINY, random_init=True, device="cpu", seed=1)
    assert other_weights.weights_sha256 != tiny.weights_sha256
    p2, exported = ensure_onnx(other_weights, cache_dir=tmp_path)
    assert exported and p2 != path

    # Same weights, other normalisation: the graph includes it, so it is another export, and
    # that export follows the new preprocessing.
    pre = dataclasses.replace(tiny.preprocess, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    other_pre = dataclasses.replace(tiny, preprocess=pre)
    p3, exported = ensure_onnx(other_pre, cache_dir=tmp_path)
    assert exported and p3 not in (path, p2)
    r = make_forward(other_pre, "onnx", threads=1, cache_dir=tmp_path)
    batch = probe_batch(pre.size, n=2, seed=3)
    _assert_close(r.forward(batch), other_pre.forward(batch))
    assert ensure_onnx(tiny, opset=18, cache_dir=tmp_path)[0] != path


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path))
    assert onnx_cache_dir() == tmp_path / "onnx"
    monkeypatch.delenv("EMBEDKIT_CACHE")
    assert onnx_cache_dir().parts[-3:] == (".cache", "embedkit", "onnx")


def _impostor(tiny, tmp_path):
    """A backbone whose cache key is ``tiny``'s but whose weights are not: a stale export."""
    ensure_onnx(tiny, cache_dir=tmp_path)
    other = load_backbone(TINY, random_init=True, device="cpu", seed=2)
    return dataclasses.replace(other, weights_sha256=tiny.weights_sha256)


def test_disagreeing_export_is_refused(tiny, tmp_path):
    with pytest.raises(RuntimeMismatchError, match="disagrees with torch.*--runtime torch"):
        make_forward(_impostor(tiny, tmp_path), "onnx", cache_dir=tmp_path)


def test_auto_falls_back_to_torch_with_a_warning(tiny, tmp_path):
    with pytest.warns(RuntimeWarning, match="falling back to torch"):
        r = make_forward(_impostor(tiny, tmp_path), "auto", threads=1, cache_dir=tmp_path)
    assert isinstance(r, TorchRunner)
    assert r.metadata()["runtime"] == "torch" and "disagrees" in r.metadata()["runtime_fallback"]


def test_auto_choice(tiny, tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean auto pick says nothing
        assert make_forward(tiny, "auto", cache_dir=tmp_path).runtime == "onnx"
        monkeypatch.setattr(runtime, "onnxruntime_available", lambda: False)
        assert make_forward(tiny, "auto", cache_dir=tmp_path).runtime == "torch"
    with pytest.raises(RuntimeMismatchError, match=r"pip install onnxruntime"):
        make_forward(tiny, "onnx", cache_dir=tmp_path)


def test_torch_runner_is_backbone_forward_with_threads(tiny):
    r = make_forward(tiny, "torch", threads=1)
    assert torch.get_num_threads() == 1 and r.metadata()["threads"] == 1
    batch = probe_batch(tiny.preprocess.size, n=2)
    np.testing.assert_array_equal(r.forward(batch), tiny.forward(batch))


@pytest.mark.parametrize("kw", [{"runtime": "tensorrt"}, {"runtime": "torch", "threads": 0}])
def test_bad_arguments(tiny, kw):
    with pytest.raises(InvalidArgumentError, match="torch|onnx|>= 1"):
        make_forward(tiny, **kw)


def test_store_mixing_runtimes_searches_correctly(tiny, tmp_path):
    src = tmp_path / "photos"
    paths = [make_photo(src / f"img{i}.jpg", i, size=(80, 64)) for i in range(8)]
    store = tmp_path / "s"
    onnx = make_forward(tiny, "onnx", threads=1, cache_dir=tmp_path / "cache")
    torch_r = make_forward(tiny, "torch", threads=1)
    # Half the files embedded by one runtime, the rest (added later) by the other.
    for runner, files in ((torch_r, paths[:4]), (onnx, paths[4:])):
        engine = LocalEngine(runner, batch_size=3, workers=0)  # the runner is duck-typed in
        s = extract([str(p) for p in files], store, model=TINY, random_init=True, engine=engine)
        assert s.embedded == 4
    st = open_store(store)
    assert st.vectors.shape == (8, tiny.dim)
    # Query every file with the *other* runtime; cosine top-1 must be the file itself.
    v = st.vectors / np.linalg.norm(st.vectors, axis=1, keepdims=True)
    for row, abspath in enumerate(st.abspaths):
        i = [str(p) for p in paths].index(abspath)
        runner = onnx if i < 4 else torch_r
        px = torch.from_numpy(np.array(tiny.preprocess.to_uint8(Image.open(abspath))[None]))
        q = runner.forward(px)[0]
        assert int(np.argmax(v @ (q / np.linalg.norm(q)))) == row
        _assert_close(q[None], st.vectors[row : row + 1])


@pytest.mark.slow
def test_default_model_real_weights_onnx_equals_torch(tmp_path):
    from skimage import data

    bb = load_backbone("efficientnet_lite0", device="cpu")  # tf_ arch: TF "same" padding
    r = make_forward(bb, "onnx", cache_dir=tmp_path)
    cat = np.array(bb.preprocess.to_uint8(Image.fromarray(data.chelsea())))
    batch = torch.cat([torch.from_numpy(cat[None]), probe_batch(bb.preprocess.size, n=3)])
    got, ref = r.forward(batch), bb.forward(batch)
    _assert_close(got, ref)
    assert np.abs(got - ref).max() < 1e-4  # measured 1.5e-5 on features up to ~5
