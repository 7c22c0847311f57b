"""The index of verified ONNX exports: what lets a later process embed without torch or timm.

Once an export has been checked against torch (``runtime.make_forward``), ``record_verified``
writes an entry in ``index.json`` beside the exports, keyed by what ``load_backbone`` would read
*without* running it: the model name, the weights file (path, size, mtime_ns; or the random-init
seed), the installed torch and timm distribution versions, the opset and graph version. The
entry holds everything a store records (weights sha256, dim, preprocessing, versions, the probe
difference), the head, and the ``.onnx`` file's size and mtime. ``find_verified`` answers from
that index alone; ``embedder.cached_embedder`` turns its answer into an ``Embedder``.

Limits, on purpose: a weights file replaced by different bytes with the same size and mtime_ns
is taken for the old one; for timm hub weights the cached file recorded at export is used while
it is unchanged, even if a newer revision was downloaded beside it (the store path checks the
recorded sha256 against the store, so only a new ``extract`` could pick the older revision).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._fs import atomic_path, atomic_write_bytes
from .packaged import PACKAGED, package_weights_file

if TYPE_CHECKING:
    from .backbone import Backbone
    from .embedder import OnnxSession

DEFAULT_OPSET = 17  # ONNX Runtime >= 1.14 runs every op timm CNNs export to at 17
# Bump when the exported graph changes for the same inputs (wrapper, names, exporter flags).
GRAPH_VERSION = "1"
INPUT, OUTPUT = "pixels", "features"
INDEX_FILE = "index.json"
_INDEX_FORMAT = 1


def onnx_cache_dir() -> Path:
    """``$EMBEDKIT_CACHE/onnx`` when set, else ``~/.cache/embedkit/onnx``."""
    root = os.environ.get("EMBEDKIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "embedkit"
    return base / "onnx"


def find_verified(
    name: str,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    seed: int,
    opset: int,
    cache_dir: str | os.PathLike[str] | None = None,
    weights_sha256: str | None = None,
) -> tuple[Path, dict[str, Any], tuple[np.ndarray, np.ndarray] | None] | None:
    """The verified export for this model request: (its .onnx path, its index entry, the head
    or None), or None when there is none that is still intact."""
    folder = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
    entries = _read_index(folder)
    if not entries:
        return None
    versions = _dist_versions()
    for entry in _candidates(entries, name, weights, random_init, seed, opset, versions):
        if weights_sha256 is not None and entry["weights_sha256"] != weights_sha256:
            continue
        path = folder / entry["onnx"]
        if not _same_stat(path, entry["onnx_size"], entry["onnx_mtime_ns"]):
            continue
        head = _read_head(folder / entry["head"]) if entry.get("head") else None
        if entry.get("head") and head is None:
            continue
        return path, entry, head
    return None


def record_verified(
    backbone: Backbone,
    runner: OnnxSession,
    onnx_path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    cache_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Add the export of ``backbone``, just checked against torch, to the torch-free index.

    Called by ``runtime.make_forward``; a backbone whose weights file cannot be named without
    loading it (an unreadable hub cache) is simply not indexed.
    """
    import timm
    import torch

    lookup = _lookup_for_backbone(backbone, opset)
    if lookup is None:
        return
    folder = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
    st = onnx_path.stat()
    head_name = None
    if backbone.head is not None:
        head_name = onnx_path.name.removesuffix(".onnx") + ".head.safetensors"
        _write_head(folder / head_name, backbone.head)
    entry = {
        "lookup": lookup,
        "onnx": onnx_path.name,
        "onnx_size": st.st_size,
        "onnx_mtime_ns": st.st_mtime_ns,
        "onnx_sha256": runner.sha256,
        "opset": opset,
        "head": head_name,
        "arch": backbone.arch or backbone.name,
        "dim": backbone.dim,
        "preprocess": backbone.preprocess.to_dict(),
        "weights_source": backbone.weights_source,
        "weights_sha256": backbone.weights_sha256,
        "seed": backbone.seed,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "max_abs_diff": runner.probe_max_abs_diff,
        "tolerance": runner.probe_tolerance,
    }
    with _index_lock(folder):
        entries = _read_index(folder)
        entries[_digest(lookup)] = entry
        atomic_write_bytes(
            folder / INDEX_FILE,
            json.dumps({"format": _INDEX_FORMAT, "entries": entries}, indent=1).encode(),
        )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- internals ----------------------------------------------------------------------------------


def _dist_versions() -> dict[str, str | None]:
    """Installed torch/timm versions from their metadata (no import; ~1 ms)."""
    out: dict[str, str | None] = {}
    for dist in ("torch", "timm"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _file_key(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    file = os.path.abspath(os.fspath(path))
    return {"file": file, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _lookup(
    name: str, source: str, file_key: dict[str, Any] | None, seed: int, opset: int
) -> dict[str, Any]:
    return {
        "graph_version": GRAPH_VERSION,
        "opset": opset,
        "name": name,
        "source": source,
        "weights_file": file_key,
        "seed": seed,  # only random init depends on it (0 otherwise)
        "versions": _dist_versions(),
    }


def _lookup_for_backbone(backbone: Backbone, opset: int) -> dict[str, Any] | None:
    source = backbone.weights_source
    if backbone.random_init:
        return _lookup(backbone.name, "random-init", None, backbone.seed, opset)
    file: str | os.PathLike[str] | None
    if source.startswith("file:"):
        file = source[len("file:") :]
    elif source.startswith("package:"):
        file = package_weights_file(backbone.name)
    elif source.startswith("timm:hub:"):
        from .weights import hub_cached_file

        file = hub_cached_file(backbone.name)
    else:
        return None
    key = _file_key(file) if file is not None else None
    if key is None:
        return None
    kind = source if source.startswith("file:") else source.split(":", 1)[0]
    return _lookup(backbone.name, kind, key, 0, opset)


def _candidates(
    entries: dict[str, Any],
    name: str,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    seed: int,
    opset: int,
    versions: dict[str, str | None],
) -> Iterator[dict[str, Any]]:
    """Index entries for what ``load_backbone`` would read, in its order of sources."""
    if random_init:
        lookups = [_lookup(name, "random-init", None, seed, opset)]
    elif weights is not None:
        key = _file_key(weights)
        if key is None:
            return
        lookups = [_lookup(name, f"file:{key['file']}", key, 0, opset)]
    elif name in PACKAGED and package_weights_file(name) is not None:
        file = package_weights_file(name)
        key = _file_key(file) if file is not None else None
        if key is None:
            return
        lookups = [_lookup(name, "package", key, 0, opset)]
    else:
        # Hub weights: which cached file timm would pick needs timm; take entries whose
        # recorded file is still there, unchanged.
        for entry in entries.values():
            lk = entry.get("lookup", {})
            wf = lk.get("weights_file") or {}
            if (
                lk.get("source") == "timm"
                and lk.get("name") == name
                and lk.get("opset") == opset
                and lk.get("graph_version") == GRAPH_VERSION
                and lk.get("versions") == versions
                and wf
                and _same_stat(Path(wf["file"]), wf["size"], wf["mtime_ns"])
            ):
                yield entry
        return
    for lk in lookups:
        entry = entries.get(_digest(lk))
        if entry is not None:
            yield entry


def _digest(lookup: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(lookup, sort_keys=True).encode()).hexdigest()


def _same_stat(path: Path, size: int, mtime_ns: int) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == mtime_ns


def _read_index(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or damaged: the next verified export rewrites it
    if not isinstance(data, dict) or data.get("format") != _INDEX_FORMAT:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _read_head(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    from safetensors.numpy import load_file

    try:
        t = load_file(str(path))
        return t["weight"].astype(np.float32), t["bias"].astype(np.float32)
    except Exception:  # noqa: BLE001 - a damaged cache file: not usable, load the model
        return None


def _write_head(path: Path, head: Any) -> None:
    from safetensors.numpy import save_file

    weight, bias = head
    arrays = {
        "weight": np.ascontiguousarray(weight.detach().cpu().float().numpy()),
        "bias": np.ascontiguousarray(bias.detach().cpu().float().numpy()),
    }
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp))


@contextlib.contextmanager
def _index_lock(folder: Path) -> Iterator[None]:
    """Serialise read-modify-write of index.json between processes (POSIX advisory lock)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".index.lock", "a+b") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows: last writer wins, a lost entry only costs a re-check
            pass
        yield
