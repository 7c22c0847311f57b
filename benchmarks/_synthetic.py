"""Store metadata for the benchmarks' synthetic stores (vectors written without a model)."""

from __future__ import annotations

from typing import Any


def synthetic_metadata(dim: int) -> dict[str, Any]:
    """The fingerprint keys ``StoreWriter`` needs, for vectors that no model made."""
    return {
        "model": "synthetic",
        "weights_sha256": "0",
        "random_init": True,
        "preprocess": {},
        "dim": dim,
        "normalize": False,
    }
