"""embedkit: turn image collections into searchable, classifiable vectors.

The public API is what this module re-exports; everything else is internal.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backbones import DEFAULT_MODEL, PRESETS, Backbone, imagenet_labels, list_models, load_backbone
from .classify import classify
from .duplicates import find_duplicates
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
from .images import FAILURE_REASONS, find_images, open_rgb
from .index import Index, choose_index_key
from .info import store_info
from .knn import knn_classify, knn_evaluate
from .probe import Probe, load_probe, train_probe, train_store_probe
from .search import index_store, open_index, search
from .store import Store, export_store, open_store

__all__ = [
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
