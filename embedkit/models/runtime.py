"""Which engine runs the backbone's forward pass: torch, or the same model in ONNX Runtime.

``make_forward(backbone, runtime, threads)`` is the one entry point. It returns a runner with the
``Backbone.forward`` contract (uint8 NHWC batch in, float32 (N, D) numpy out), so engines take
either. Measured on 2 vCPUs (AVX2, no native bf16; see benchmarks/RESULTS.md): ONNX Runtime is
1.4-1.7x faster than torch eager with channels_last on resnet50 and mobilenetv2.

ONNX export: the headless model *with* the normalisation (uint8 NHWC -> float, mean/std) is
exported once per cache key (arch, weights sha256, preprocessing, opset, torch and timm versions)
into ``$EMBEDKIT_CACHE/onnx`` (default ``~/.cache/embedkit/onnx``), written atomically. Every
``make_forward`` then checks the ONNX graph against torch on a probe batch and refuses it when
they disagree by more than ``ONNX_RTOL`` of the feature scale; ``auto`` then falls back to
torch with a warning, ``onnx`` raises. A checked export is recorded in the cache's index
(``onnx_cache.record_verified``), from which later processes run it without importing torch or
timm (``embedder.cached_embedder``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .._fs import atomic_path, atomic_write_bytes
from ..errors import EmbedkitError, InvalidArgumentError
from ..extraction.cores import usable_cores
from .backbone import Backbone, precision_of
from .embedder import OnnxSession
from .onnx_cache import DEFAULT_OPSET, GRAPH_VERSION, INPUT, OUTPUT, record_verified
from .onnx_cache import onnx_cache_dir as onnx_cache_dir
from .preprocess import Preprocess

Runtime = Literal["auto", "torch", "onnx"]
RUNTIMES: tuple[str, ...] = ("auto", "torch", "onnx")
# ONNX vs torch: max |difference| allowed, as a fraction of max |torch feature| on the probe
# batch. float32 kernels that sum in another order differ by ~1e-6 of the scale (lite0 real
# weights: 1.5e-5 absolute on features up to 5.3); 1e-3 still catches a wrong op or padding.
ONNX_RTOL = 1e-3
_GRAPH_VERSION, _INPUT, _OUTPUT = GRAPH_VERSION, INPUT, OUTPUT  # see onnx_cache.py


class RuntimeMismatchError(EmbedkitError):
    """The ONNX export disagrees with torch, or cannot be built; the message says what to use."""


class TorchRunner:
    """``Backbone.forward`` itself, with the thread count set."""

    runtime = "torch"

    def __init__(self, backbone: Backbone, threads: int, fallback: str | None = None) -> None:
        self.backbone, self.threads, self.fallback = backbone, threads, fallback
        self.dim, self.preprocess, self.device = backbone.dim, backbone.preprocess, backbone.device
        torch.set_num_threads(threads)  # process-wide: the model is the only torch user here

    def forward(self, batch_uint8: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.backbone.forward(batch_uint8)

    # OpenMP teams spin at barriers: two threads beside a busy process were 5-40x slower.
    can_share_cores = False

    def set_threads(self, threads: int, share_cores: bool = False) -> None:
        if share_cores:
            raise InvalidArgumentError("torch threads cannot share cores with decode workers")
        self.threads = threads
        torch.set_num_threads(threads)

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "runtime": "torch",
            "precision": precision_of(self.device),
            "threads": self.threads,
            "torch_version": torch.__version__,
        }
        if self.fallback:
            meta["runtime_fallback"] = self.fallback
        return meta


class OnnxRunner(OnnxSession):
    """The exported graph of ``backbone`` in ONNX Runtime (CPU), fed the same uint8 NHWC
    batches; the torch-free session itself is ``embedder.OnnxSession``."""

    def __init__(self, backbone: Backbone, path: Path, threads: int, opset: int) -> None:
        super().__init__(path, backbone.dim, backbone.preprocess, threads, opset)
        self.backbone = backbone
        self.device = torch.device("cpu")
        self.session  # noqa: B018 - made now, so a broken export fails here, not mid-run


def make_forward(
    backbone: Backbone,
    runtime: str = "auto",
    threads: int | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TorchRunner | OnnxRunner:
    """The forward pass for ``backbone`` on the chosen runtime, checked before first use.

    Args:
        backbone: a loaded backbone (the torch reference, and the source of the export).
        runtime: ``torch``, ``onnx``, or ``auto`` (ONNX Runtime on CPU when it is installed and
            its export matches torch; torch on CUDA or otherwise).
        threads: model threads (torch ``set_num_threads`` / ORT intra-op); default
            ``usable_cores()``. Pass ``cores.plan_threads(workers, ...).intra_op`` when decode
            workers share the machine.
        opset: ONNX opset for the export.
        cache_dir: where exports live; default ``onnx_cache_dir()``.

    Raises:
        InvalidArgumentError: unknown runtime, threads < 1, or ``onnx`` on a CUDA backbone.
        RuntimeMismatchError: ``onnx`` asked for, and onnxruntime is missing, the export fails,
            or it disagrees with torch on the probe batch.
    """
    if runtime not in RUNTIMES:
        raise InvalidArgumentError(f"unknown runtime {runtime!r}; use one of {'|'.join(RUNTIMES)}")
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"threads must be >= 1, got {threads}; omit it for the default")
    n = threads or usable_cores()
    on_cpu = backbone.device.type == "cpu"
    if runtime == "torch" or (runtime == "auto" and not on_cpu):
        return TorchRunner(backbone, n)
    if not on_cpu:
        raise InvalidArgumentError(
            f"runtime 'onnx' runs on CPU only, but the model is on {backbone.device}; "
            "use --device cpu, or --runtime torch|auto on CUDA"
        )
    if not onnxruntime_available():
        if runtime == "onnx":
            raise RuntimeMismatchError(
                "runtime 'onnx' needs onnxruntime (an embedkit dependency that is missing "
                "here): pip install onnxruntime, or use --runtime torch"
            )
        return TorchRunner(backbone, n)  # auto without onnxruntime: torch, nothing to warn
    try:
        path, _ = ensure_onnx(backbone, opset=opset, cache_dir=cache_dir)
        runner = OnnxRunner(backbone, path, n, opset)
        check_onnx(runner, backbone)
        # Checked: later runs of this model find it without torch (embedder.cached_embedder).
        # A cache that cannot be written only costs later runs the torch import.
        with contextlib.suppress(OSError):
            record_verified(backbone, runner, path, opset=opset, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - exporter/ORT errors are many types; auto survives
        if runtime == "onnx":
            if isinstance(exc, EmbedkitError):
                raise
            raise RuntimeMismatchError(
                f"ONNX export of {backbone.arch or backbone.name} failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); use --runtime torch"
            ) from exc
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        warnings.warn(
            f"ONNX Runtime not used, falling back to torch: {reason}", RuntimeWarning, stacklevel=2
        )
        return TorchRunner(backbone, n, fallback=reason)
    return runner


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_cache_key(backbone: Backbone, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Everything the exported graph depends on; its sha256 names the cache file."""
    import timm

    p = backbone.provenance
    return {  # key order is part of the hash: keep it
        "graph_version": _GRAPH_VERSION,
        "arch": p.arch,
        "weights_sha256": p.weights_sha256,
        "preprocess": p.preprocess.to_dict(),
        "dim": p.dim,
        "opset": opset,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }


def ensure_onnx(
    backbone: Backbone,
    *,
    opset: int = DEFAULT_OPSET,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, bool]:
    """The cached export for ``backbone``, exporting it first if needed.

    Returns:
        ``(path, exported)``: ``exported`` is False on a cache hit.
    """
    key = onnx_cache_key(backbone, opset)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
    path = folder / f"{digest}.onnx"
    if path.is_file():
        return path, False
    folder.mkdir(parents=True, exist_ok=True)
    key_json = json.dumps(key, indent=1, sort_keys=True).encode()
    atomic_write_bytes(folder / f"{digest}.json", key_json)
    with atomic_path(path) as tmp:  # the .onnx appears complete or not at all
        _export(backbone, tmp, opset)
    return path, True


def check_onnx(runner: OnnxRunner, backbone: Backbone, n: int = 3) -> float:
    """Compare ``runner`` with torch on a probe batch; returns the max abs difference.

    Raises:
        RuntimeMismatchError: difference above ``ONNX_RTOL`` x max |torch feature|, or a shape
            mismatch.
    """
    batch = probe_batch(backbone.preprocess.size, n)
    ref = backbone.forward(batch)
    got = runner.forward(batch)
    name = backbone.arch or backbone.name
    if got.shape != ref.shape:
        raise RuntimeMismatchError(
            f"ONNX export of {name} gives shape {got.shape}, torch {ref.shape}; "
            f"delete {runner.path} and retry, or use --runtime torch"
        )
    diff = float(np.abs(got - ref).max())
    tol = ONNX_RTOL * max(float(np.abs(ref).max()), 1e-12)
    runner.probe_max_abs_diff, runner.probe_tolerance = diff, tol
    if not diff <= tol:  # also catches NaN
        raise RuntimeMismatchError(
            f"ONNX export of {name} disagrees with torch: max abs diff {diff:.3g} > {tol:.3g} "
            f"({ONNX_RTOL:g} of the feature scale) on the probe batch; use --runtime torch"
        )
    return diff


def probe_batch(size: tuple[int, int], n: int = 3, seed: int = 0) -> torch.Tensor:
    """Deterministic photo-like uint8 (n, H, W, 3): smooth colour fields plus grain.

    Pure noise would test the model far from real inputs; smooth fields alone leave
    high-frequency paths (strided convs, padding) untested; both together cover both.
    """
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        img = np.zeros((h, w, 3), dtype=np.float32)
        for c in range(3):
            fy, fx, ph = rng.uniform(0.5, 6.0), rng.uniform(0.5, 6.0), rng.uniform(0, 6.3)
            img[..., c] = 127 + 100 * np.sin(2 * np.pi * (fy * yy / h + fx * xx / w) + ph)
        img += rng.normal(0, 12, size=img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return torch.from_numpy(out)


# --- internals ----------------------------------------------------------------------------------


class _WithPreprocess(nn.Module):
    """uint8 NHWC -> ``Preprocess.normalize`` -> model, as one graph (same math, same order)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, p: Preprocess) -> None:
        super().__init__()
        self.model, self.bgr = model, p.channel_order == "BGR"
        self.register_buffer("mean", torch.tensor(p.mean).view(1, 3, 1, 1) * p.pixel_scale)
        self.register_buffer("std", torch.tensor(p.std).view(1, 3, 1, 1) * p.pixel_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()
        if self.bgr:
            x = x.flip(1)
        return self.model((x - self.mean) / self.std)


def _export(backbone: Backbone, path: Path, opset: int) -> None:
    wrapper = _WithPreprocess(backbone.model, backbone.preprocess).eval()
    h, w = backbone.preprocess.size
    dummy = torch.zeros(1, h, w, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter: the dynamo one needs onnxscript, which is not a dependency.
        # torch >= 2.9 warns that it is deprecated; the export itself is what we check.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[_INPUT],
            output_names=[_OUTPUT],
            dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}},
        )
