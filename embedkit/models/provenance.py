"""Which model, weights and preprocessing made a set of vectors: one frozen record.

``Backbone`` (torch) and ``Embedder`` (torch-free) both expose it as ``.provenance``; the store
metadata, the compatibility fingerprint and the ONNX cache key are all built from it, so their
keys and values cannot drift apart. Torch-free: the store and the ONNX cache read it without
loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .finetuned import Finetuned
from .preprocess import Preprocess


@dataclass(frozen=True)
class Provenance:
    """Attributes:
    name: the model name asked for (a preset or any timm name).
    arch: the timm architecture actually built (``tf_efficientnet_lite0`` for the lite0
        package weights).
    weights_source: ``file:/abs/path``, ``package:NAME``, ``timm:hub:REPO`` or ``random-init``.
    weights_sha256: ``weights.state_sha256`` of the loaded tensors.
    random_init: True only when random weights were asked for.
    seed: the seed of random init (and of any classifier a headless file leaves unset).
    preprocess: the eval preprocessing these weights expect.
    dim: embedding size, measured by a dummy forward.
    finetuned: for a fine-tune's weights, its classes and base model and weights (recorded
        as the store's ``finetune``; the fine-tuned weights are ``weights_*``, head included).
    """

    name: str
    arch: str
    weights_source: str
    weights_sha256: str
    random_init: bool
    seed: int
    preprocess: Preprocess
    dim: int
    finetuned: Finetuned | None = None

    @classmethod
    def of(cls, model: Any) -> Provenance:
        """The record of a ``Backbone`` or an ``Embedder`` (both carry these fields; an empty
        ``arch`` means the name is the architecture)."""
        return cls(
            name=model.name,
            arch=model.arch or model.name,
            weights_source=model.weights_source,
            weights_sha256=model.weights_sha256,
            random_init=model.random_init,
            seed=model.seed,
            preprocess=model.preprocess,
            dim=model.dim,
            finetuned=model.finetuned,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What says which model, weights and preprocessing made the vectors (compared by
        probes and indexes; the keys are part of saved files: do not rename)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "weights_sha256": self.weights_sha256,
            "random_init": self.random_init,
            "preprocess": self.preprocess.to_dict(),
            "dim": self.dim,
        }

    def to_metadata(self) -> dict[str, Any]:
        """The model's part of a store's metadata (the keys stores were written with)."""
        md = {
            "model": self.name,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "random_init": self.random_init,
            "seed": self.seed,
            "preprocess": self.preprocess.to_dict(),
            "dim": self.dim,
        }
        if self.finetuned is not None:
            md["finetune"] = self.finetuned.to_metadata()
        return md
