"""A model handle that embeds uint8 crops, made without torch when the ONNX export is cached.

Importing torch costs ~3 s and timm ~6 s, more than most commands do. The ONNX export
(``runtime.ensure_onnx``) already holds the normalisation and the whole backbone, and takes the
uint8 NHWC crops the decoders make; ONNX Runtime imports in ~0.2 s. So once an export has been
checked against torch, ``onnx_cache`` indexes it, and ``cached_embedder`` answers from that index
alone, importing neither torch nor timm; anything it cannot vouch for (no entry, a changed file,
CUDA possibly present, ``--runtime torch``) returns None and the caller loads the model.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError, WeightsUnavailableError
from .finetuned import Finetuned, resolve_model
from .onnx_cache import DEFAULT_OPSET, INPUT, OUTPUT, file_sha256, find_verified
from .preprocess import Preprocess
from .provenance import Provenance

if TYPE_CHECKING:
    from ..store.read import Store
    from .backbone import Backbone


class OnnxSession:
    """An exported graph in ONNX Runtime (CPU), fed uint8 NHWC batches; imports no torch.

    The session is made on first use, so a handle that never embeds (nothing to do) costs
    nothing; ``set_threads`` before that only changes the count the session will get.
    """

    runtime = "onnx"
    # With spinning off, ORT's pool threads sleep while they wait for each other, so a decode
    # worker on one of their cores costs its own CPU time, not a stalled team.
    can_share_cores = True

    def __init__(
        self,
        path: Path,
        dim: int,
        preprocess: Preprocess,
        threads: int,
        opset: int,
        *,
        sha256: str | None = None,
        max_abs_diff: float | None = None,
        tolerance: float | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path, self.dim, self.preprocess = path, dim, preprocess
        self.threads, self.opset, self.shares_cores = threads, opset, False
        self.ort_version = ort.__version__
        self.probe_max_abs_diff, self.probe_tolerance = max_abs_diff, tolerance
        self._sha256 = sha256
        self._session: Any = None

    @property
    def session(self) -> Any:
        if self._session is None:
            self._session = self._make_session(self.threads, self.shares_cores)
        return self._session

    def forward(self, batch_uint8: Any) -> np.ndarray:
        """uint8 (N, H, W, 3) numpy (or a CPU torch tensor) -> float32 (N, dim)."""
        x = batch_uint8 if isinstance(batch_uint8, np.ndarray) else batch_uint8.cpu().numpy()
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise InvalidArgumentError(
                f"forward() takes a uint8 (N, H, W, 3) batch, got {x.dtype} "
                f"{tuple(x.shape)}; build it with preprocess.to_uint8"
            )
        (y,) = self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x)})
        return np.asarray(y, dtype=np.float32)

    def set_threads(self, threads: int, share_cores: bool = False) -> None:
        # ORT fixes its thread pool when the session is made; a new session costs ~0.1-0.5 s.
        if (threads, share_cores) != (self.threads, self.shares_cores):
            self.threads, self.shares_cores = threads, share_cores
            if self._session is not None:
                self._session = self._make_session(threads, share_cores)

    def _make_session(self, threads: int, share_cores: bool) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if share_cores:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1  # a CNN is one chain of ops; parallelism is inside them
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])

    @property
    def sha256(self) -> str:
        """sha256 of the .onnx file that runs (computed once, or recorded at verification)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def metadata(self) -> dict[str, Any]:
        return {
            "runtime": "onnx",
            "precision": "fp32",
            "threads": self.threads,
            "onnx_opset": self.opset,
            "onnxruntime_version": self.ort_version,
            "onnx_sha256": self.sha256,
            "onnx_max_abs_diff_vs_torch": self.probe_max_abs_diff,
            "onnx_tolerance": self.probe_tolerance,
        }


@dataclass
class Embedder:
    """What embedding needs: preprocessing, the forward pass, and the model's provenance.

    Made by ``cached_embedder`` (ONNX, no torch) or ``Embedder.from_backbone`` (a loaded torch
    ``Backbone`` and its runner); both give the same store metadata and fingerprint.

    Attributes:
        runner: ``forward(uint8 NHWC numpy) -> float32 (N, dim)``, plus ``runtime``,
            ``threads``, ``set_threads`` and ``metadata()`` (``runtime`` runners, or
            ``OnnxSession``).
        head: the classifier ``(weight (C, dim), bias (C,))`` as float32: ImageNet's, a
            fine-tune's (``finetuned.classes``), or None.
        versions: ``torch_version`` and ``timm_version`` of the code that built the model.
        backbone: the torch ``Backbone`` when one was loaded (None on the torch-free path).
        finetuned: what the fine-tune folder says, for a fine-tune's weights.
    """

    name: str
    arch: str
    dim: int
    preprocess: Preprocess
    weights_source: str
    weights_sha256: str
    random_init: bool
    seed: int
    runner: Any
    head: tuple[np.ndarray, np.ndarray] | None = None
    device_type: str = "cpu"
    versions: dict[str, str | None] = field(default_factory=dict)
    backbone: Backbone | None = None
    finetuned: Finetuned | None = None

    def forward_uint8(self, batch_uint8: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, dim) features."""
        return self.runner.forward(batch_uint8)

    forward = forward_uint8  # the engines' ``Forward`` contract

    @property
    def provenance(self) -> Provenance:
        """The same record as ``Backbone.provenance`` of the model it was made from."""
        return Provenance.of(self)

    def fingerprint(self) -> dict[str, Any]:
        """Same keys and values as ``Backbone.fingerprint``."""
        return self.provenance.fingerprint()

    @classmethod
    def from_backbone(cls, backbone: Backbone, runner: Any = None) -> Embedder:
        """Wrap a loaded backbone (imports torch and timm, which it already needed)."""
        import timm
        import torch

        head = None
        if backbone.head is not None:
            w, b = backbone.head
            head = (w.detach().cpu().float().numpy(), b.detach().cpu().float().numpy())
        return cls(
            name=backbone.name,
            arch=backbone.arch or backbone.name,
            dim=backbone.dim,
            preprocess=backbone.preprocess,
            weights_source=backbone.weights_source,
            weights_sha256=backbone.weights_sha256,
            random_init=backbone.random_init,
            seed=backbone.seed,
            runner=runner if runner is not None else backbone,
            head=head,
            device_type=backbone.device.type,
            versions={"torch_version": torch.__version__, "timm_version": timm.__version__},
            backbone=backbone,
            finetuned=backbone.finetuned,
        )


def cached_embedder(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    seed: int = 0,
    device: str = "auto",
    runtime: str = "auto",
    threads: int = 1,
    opset: int = DEFAULT_OPSET,
    cache_dir: str | os.PathLike[str] | None = None,
    weights_sha256: str | None = None,
) -> Embedder | None:
    """The verified ONNX export for this model request, without importing torch or timm.

    Args:
        name, weights, random_init, seed: as for ``load_backbone``.
        device: only ``cpu``, or ``auto`` on a machine with no NVIDIA device, qualify (``auto``
            with a GPU present goes through torch, which decides).
        runtime: ``torch`` never qualifies.
        threads: ONNX Runtime intra-op threads (changeable with ``runner.set_threads``).
        weights_sha256: when given (a store's), only an entry with these weights qualifies.

    Returns:
        An ``Embedder`` over an ``OnnxSession``, or None when the model must be loaded.
    """
    ref = resolve_model(name, weights, random_init)  # a fine-tune folder: its arch and file
    if runtime == "torch" or device not in ("auto", "cpu") or (device == "auto" and cuda_present()):
        return None
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    name, weights = ref.name, ref.weights
    found = find_verified(name, weights, random_init, seed, opset, cache_dir, weights_sha256)
    if found is None:
        return None
    path, entry, head = found
    ft = ref.finetuned
    if ft is not None and (head is None or head[0].shape[0] != len(ft.classes)):
        return None  # an entry from before fine-tune heads were kept: load and re-record
    preprocess = Preprocess.from_dict(entry["preprocess"])
    runner = OnnxSession(
        path,
        int(entry["dim"]),
        preprocess,
        threads,
        int(entry["opset"]),
        sha256=entry["onnx_sha256"],
        max_abs_diff=entry["max_abs_diff"],
        tolerance=entry["tolerance"],
    )
    return Embedder(
        name=name,
        arch=entry["arch"],
        dim=int(entry["dim"]),
        preprocess=preprocess,
        weights_source=entry["weights_source"],
        weights_sha256=entry["weights_sha256"],
        random_init=random_init,
        seed=seed if random_init else int(entry.get("seed", 0)),
        runner=runner,
        head=head,
        versions={k: entry.get(k) for k in ("torch_version", "timm_version")},
        finetuned=ref.finetuned,
    )


def embedder_for_store(
    store: Store, device: str = "auto", runtime: str = "auto", threads: int | None = None
) -> Embedder:
    """The model that made ``store``, with the very same weights, ready to embed new images.

    Torch-free when the store's model has a verified ONNX export cached; otherwise loads it
    (``extraction.embed.backbone_for_store``) and runs it through ``runtime.make_forward``,
    which exports and verifies it, so that the next call is torch-free.

    Raises:
        WeightsUnavailableError: the recorded weights cannot be found on this machine.
        StoreMismatchError: weights were found but differ from the recorded hash.
    """
    md: dict[str, Any] = store.metadata
    source = str(md.get("weights_source", ""))
    weights = source[len("file:") :] if source.startswith("file:") else None
    if weights is not None and not os.path.exists(weights):
        raise WeightsUnavailableError(
            f"store {store.path} was made with weights file {weights}, which is gone; "
            "put it back (same content) to embed new images for this store"
        )
    random_init = bool(md.get("random_init"))
    found = cached_embedder(
        str(md["model"]),
        weights=weights,
        random_init=random_init,
        seed=int(md.get("seed", 0)),
        device=device,
        runtime=runtime,
        threads=threads or _cores(),
        weights_sha256=str(md.get("weights_sha256")),
    )
    if (
        found is not None
        and found.preprocess.to_dict() == md.get("preprocess")
        and found.dim == int(md["dim"])
    ):
        return found
    from ..extraction.embed import backbone_for_store  # torch and timm from here on
    from .runtime import make_forward

    backbone = backbone_for_store(store, device=device)
    return Embedder.from_backbone(backbone, make_forward(backbone, runtime, threads))


def cuda_present() -> bool:
    """True when an NVIDIA device node exists: then ``auto`` may mean CUDA and torch decides.

    Looking at /dev, not asking torch (which is what costs the seconds); a GPU hidden with
    CUDA_VISIBLE_DEVICES only makes the command take the slower, torch-loading path.
    """
    try:
        return any(n == "nvidiactl" or n.startswith("nvidia") for n in os.listdir("/dev"))
    except OSError:
        return False


# --- internals ----------------------------------------------------------------------------------


def _cores() -> int:
    from ..extraction.cores import usable_cores

    return usable_cores()
