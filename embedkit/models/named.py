"""A ready ``Embedder`` for a model named by the caller (no store): torch-free when it can be.

The same sources, in the same order, as ``extract`` uses: the verified ONNX export in the cache
(``embedder.cached_embedder``, imports neither torch nor timm), else ``load_backbone`` run
through ``runtime.make_forward`` (which exports and checks the graph, so the next call is
torch-free). The ``Embedder`` carries the model's own head when its weights have one: ImageNet's,
or a fine-tune folder's (``models.finetuned``), with its class names.
"""

from __future__ import annotations

import os

from ..defaults import DEFAULT_MODEL
from .embedder import Embedder, cached_embedder


def embedder_by_name(
    name: str = DEFAULT_MODEL,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    device: str = "auto",
    runtime: str = "auto",
    threads: int | None = None,
) -> Embedder:
    """The model ``name`` (a preset, a timm name or a fine-tune folder; weights as for
    ``load_backbone``), ready to embed uint8 crops.

    Raises:
        InvalidArgumentError: unknown model, device or runtime.
        WeightsUnavailableError: no weight source for ``name`` (never random weights unasked).
        WeightsMismatchError: ``weights`` does not fit the model.
    """
    from ..extraction.cores import usable_cores

    found = cached_embedder(
        name,
        weights=weights,
        random_init=random_init,
        device=device,
        runtime=runtime,
        threads=threads or usable_cores(),
    )
    if found is not None:
        return found
    from .backbone import load_backbone  # torch and timm from here on
    from .runtime import make_forward

    backbone = load_backbone(name, weights=weights, random_init=random_init, device=device)
    return Embedder.from_backbone(backbone, make_forward(backbone, runtime, threads))
