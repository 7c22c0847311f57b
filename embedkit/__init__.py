"""embedkit: turn image collections into searchable, classifiable vectors.

The public API is what ``__all__`` lists; everything else is internal. Names load on first use
(PEP 562), so ``import embedkit`` and ``embedkit --help`` do not pay for torch and timm until a
model is actually needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "make_forward": "runtime",
    "RuntimeMismatchError": "runtime",
    "DuplicateMember": "duplicates",
    "DuplicateGroup": "duplicates",
    "group_duplicates": "duplicates",
    "Hit": "search",
    "QueryResult": "search",
    "IndexReport": "indexing",
    "Backbone": "backbones",
    "DEFAULT_MODEL": "backbones",
    "EmbedkitError": "errors",
    "ExtractSummary": "extract",
    "FAILURE_REASONS": "images",
    "Index": "index",
    "IndexStateError": "errors",
    "InvalidArgumentError": "errors",
    "PRESETS": "backbones",
    "Probe": "probe",
    "ProbeError": "errors",
    "Store": "store",
    "StoreError": "errors",
    "StoreLockedError": "errors",
    "StoreMismatchError": "errors",
    "WeightsMismatchError": "errors",
    "WeightsUnavailableError": "errors",
    "backbone_for_store": "embed",
    "choose_index_key": "index_choice",
    "classify": "classify",
    "embed": "embed",
    "export_store": "store_writer",
    "extract": "extract",
    "find_duplicates": "duplicates",
    "find_images": "sources",
    "imagenet_labels": "backbones",
    "index_store": "indexing",
    "knn_classify": "knn",
    "knn_evaluate": "knn",
    "list_models": "backbones",
    "load_backbone": "backbones",
    "load_probe": "probe",
    "open_index": "indexing",
    "open_rgb": "images",
    "open_store": "store",
    "search": "search",
    "store_info": "info",
    "train_probe": "train",
    "train_store_probe": "train",
}

if TYPE_CHECKING:
    from .backbones import (
        DEFAULT_MODEL,
        PRESETS,
        Backbone,
        imagenet_labels,
        list_models,
        load_backbone,
    )
    from .classify import classify
    from .duplicates import DuplicateGroup, DuplicateMember, find_duplicates, group_duplicates
    from .embed import backbone_for_store, embed
    from .errors import (
        EmbedkitError,
        IndexStateError,
        InvalidArgumentError,
        ProbeError,
        StoreError,
        StoreLockedError,
        StoreMismatchError,
        WeightsMismatchError,
        WeightsUnavailableError,
    )
    from .extract import ExtractSummary, extract
    from .images import FAILURE_REASONS, open_rgb
    from .index import Index
    from .index_choice import choose_index_key
    from .indexing import IndexReport, index_store, open_index
    from .info import store_info
    from .knn import knn_classify, knn_evaluate
    from .probe import Probe, load_probe
    from .runtime import RuntimeMismatchError, make_forward
    from .search import Hit, QueryResult, search
    from .sources import find_images
    from .store import Store, open_store
    from .store_writer import export_store
    from .train import train_probe, train_store_probe


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'embedkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "make_forward",
    "RuntimeMismatchError",
    "DuplicateMember",
    "DuplicateGroup",
    "group_duplicates",
    "Hit",
    "QueryResult",
    "IndexReport",
    "DEFAULT_MODEL",
    "FAILURE_REASONS",
    "PRESETS",
    "Backbone",
    "EmbedkitError",
    "ExtractSummary",
    "Index",
    "IndexStateError",
    "InvalidArgumentError",
    "Probe",
    "ProbeError",
    "Store",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "__version__",
    "backbone_for_store",
    "choose_index_key",
    "classify",
    "embed",
    "export_store",
    "extract",
    "find_duplicates",
    "find_images",
    "imagenet_labels",
    "knn_classify",
    "knn_evaluate",
    "index_store",
    "list_models",
    "load_backbone",
    "load_probe",
    "open_index",
    "open_rgb",
    "open_store",
    "search",
    "store_info",
    "train_probe",
    "train_store_probe",
]
