"""embedkit: turn image collections into searchable, classifiable vectors.

The public API is what ``__all__`` lists; everything else is internal. Names load on first use
(PEP 562), so ``import embedkit`` and ``embedkit --help`` do not pay for torch and timm until a
model is actually needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "make_forward": "models.runtime",
    "RuntimeMismatchError": "models.runtime",
    "DuplicateMember": "index.duplicates",
    "DuplicateGroup": "index.duplicates",
    "group_duplicates": "index.duplicates",
    "move_duplicates": "index.duplicates",
    "undo_moves": "images.move",
    "KEEP_RULES": "index.keep",
    "Hit": "index.search",
    "QueryResult": "index.search",
    "IndexReport": "index.lifecycle",
    "Backbone": "models.backbone",
    "DEFAULT_MODEL": "defaults",
    "EmbedkitError": "errors",
    "ExtractSummary": "extraction.summary",
    "FAILURE_REASONS": "images.decode",
    "ImageFileError": "errors",
    "Index": "index.ram",
    "IndexStateError": "errors",
    "InvalidArgumentError": "errors",
    "PRESETS": "models.backbone",
    "Probe": "classification.probe",
    "ProbeError": "errors",
    "Store": "store.read",
    "StoreChangedError": "errors",
    "StoreError": "errors",
    "StoreLockedError": "errors",
    "StoreMismatchError": "errors",
    "WeightsMismatchError": "errors",
    "WeightsUnavailableError": "errors",
    "backbone_for_store": "extraction.embed",
    "choose_index_key": "index.choice",
    "classify": "classification.head",
    "embed": "extraction.embed",
    "export_store": "store.writer",
    "extract": "extraction.run",
    "find_duplicates": "index.duplicates",
    "find_file_duplicates": "index.file_duplicates",
    "FileDuplicates": "index.file_duplicates",
    "move_file_duplicates": "index.file_duplicates",
    "find_images": "images.sources",
    "imagenet_labels": "models.labels",
    "Embedder": "models.embedder",
    "embedder_for_store": "models.embedder",
    "index_store": "index.lifecycle",
    "knn_classify": "classification.knn",
    "knn_evaluate": "classification.knn",
    "list_models": "models.backbone",
    "load_backbone": "models.backbone",
    "load_model_input": "images.model_input",
    "load_probe": "classification.probe",
    "open_index": "index.lifecycle",
    "open_rgb": "images.decode",
    "open_store": "store.read",
    "search": "index.search",
    "store_info": "store.info",
    "store_failures": "store.info",
    "prune_store": "store.maintain",
    "reroot_store": "store.maintain",
    "train_probe": "classification.train",
    "train_store_probe": "classification.train",
    "create_app": "serve.app",
    "serve_store": "serve.app",
    "trace": "pipeline.trace",
    "Trace": "pipeline.trace",
    "compare_models": "pipeline.compare",
    "ModelComparison": "pipeline.compare",
    "finetune": "classification.finetune",
    "FinetuneResult": "classification.finetune",
}

if TYPE_CHECKING:
    from .classification.finetune import FinetuneResult, finetune
    from .classification.head import classify
    from .classification.knn import knn_classify, knn_evaluate
    from .classification.probe import Probe, load_probe
    from .classification.train import train_probe, train_store_probe
    from .errors import (
        EmbedkitError,
        ImageFileError,
        IndexStateError,
        InvalidArgumentError,
        ProbeError,
        StoreChangedError,
        StoreError,
        StoreLockedError,
        StoreMismatchError,
        WeightsMismatchError,
        WeightsUnavailableError,
    )
    from .extraction.embed import backbone_for_store, embed
    from .extraction.run import extract
    from .extraction.summary import ExtractSummary
    from .images.decode import FAILURE_REASONS, open_rgb
    from .images.model_input import load_model_input
    from .images.move import undo_moves
    from .images.sources import find_images
    from .index.choice import choose_index_key
    from .index.duplicates import (
        DuplicateGroup,
        DuplicateMember,
        find_duplicates,
        group_duplicates,
        move_duplicates,
    )
    from .index.file_duplicates import FileDuplicates, find_file_duplicates, move_file_duplicates
    from .index.keep import KEEP_RULES
    from .index.lifecycle import IndexReport, index_store, open_index
    from .index.ram import Index
    from .index.search import Hit, QueryResult, search
    from .models.backbone import DEFAULT_MODEL, PRESETS, Backbone, list_models, load_backbone
    from .models.embedder import Embedder, embedder_for_store
    from .models.labels import imagenet_labels
    from .models.runtime import RuntimeMismatchError, make_forward
    from .pipeline.compare import ModelComparison, compare_models
    from .pipeline.trace import Trace, trace
    from .serve.app import create_app, serve_store
    from .store.info import store_failures, store_info
    from .store.maintain import prune_store, reroot_store
    from .store.read import Store, open_store
    from .store.writer import export_store


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
    "move_duplicates",
    "undo_moves",
    "KEEP_RULES",
    "Hit",
    "QueryResult",
    "IndexReport",
    "DEFAULT_MODEL",
    "FAILURE_REASONS",
    "PRESETS",
    "Backbone",
    "EmbedkitError",
    "ExtractSummary",
    "ImageFileError",
    "Index",
    "IndexStateError",
    "InvalidArgumentError",
    "Probe",
    "ProbeError",
    "Store",
    "StoreChangedError",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "__version__",
    "backbone_for_store",
    "Embedder",
    "embedder_for_store",
    "choose_index_key",
    "classify",
    "embed",
    "export_store",
    "extract",
    "find_duplicates",
    "find_file_duplicates",
    "FileDuplicates",
    "move_file_duplicates",
    "find_images",
    "imagenet_labels",
    "knn_classify",
    "knn_evaluate",
    "index_store",
    "list_models",
    "load_backbone",
    "load_model_input",
    "load_probe",
    "open_index",
    "open_rgb",
    "open_store",
    "search",
    "store_info",
    "store_failures",
    "prune_store",
    "reroot_store",
    "train_probe",
    "train_store_probe",
    "create_app",
    "serve_store",
    "trace",
    "Trace",
    "compare_models",
    "ModelComparison",
    "finetune",
    "FinetuneResult",
]
