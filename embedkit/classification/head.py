"""Classification with the model's own head, kept at extraction: ImageNet's, or a fine-tune's.

Extraction stores the pooled features the model's classifier acts on (``forward_head(...,
pre_logits=True)``) and saves that classifier as ``STORE/head.safetensors``: the 1000-class
ImageNet head of pretrained weights, or the C-class head of a fine-tune folder (``embedkit
finetune``), whose class names the store records (``metadata["finetune"]["classes"]``,
``head_labels``). Applying it
(``features @ weight.T + bias``, then softmax) reproduces the full model's output without
re-running the backbone. New images go through the store's own model (``embedder_for_store``:
its cached ONNX export when there is one, without importing torch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError, ProbeError

if TYPE_CHECKING:
    from ..store.read import Store


@dataclass(frozen=True)
class TopClass:
    """One ranked class: its index in the classifier's output, its name and probability."""

    index: int
    label: str
    prob: float

    def __str__(self) -> str:
        return f"{self.label} {self.prob:.2f}"


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image: a stored one (absolute path and its store id, so that
    stores with several roots stay unambiguous) or a file given on the command line (its path
    as given, no id)."""

    path: str
    top: list[TopClass]
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{path, id, top: [{index, label, prob}]}``, the ``--json`` shape."""
        return {
            "path": self.path,
            "id": self.id,
            "top": [{"index": t.index, "label": t.label, "prob": t.prob} for t in self.top],
        }


def resolve_store(store: Store | str | Path) -> Store:
    """Open ``store`` when it is a path; pass a ``Store`` through."""
    if isinstance(store, (str, Path)):
        from ..store.read import open_store

        return open_store(store)
    return store


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (N, C)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def head_probabilities(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Apply a linear classifier + softmax: float64 (N, C) probabilities.

    float64 because float32 matmuls over D=1280..4096 drift by ~1e-6 relative from the
    model's own (also float32) logits; in float64 our side adds no error of its own.
    """
    if features.shape[1] != weight.shape[1]:
        raise ProbeError(
            f"features have dimension {features.shape[1]} but the classifier expects "
            f"{weight.shape[1]}; the store's vectors and head come from different models, "
            "re-extract the store"
        )
    logits = features.astype(np.float64) @ weight.T.astype(np.float64) + bias.astype(np.float64)
    return softmax(logits)


def rank_top_k(
    probs: np.ndarray,
    names: Sequence[str],
    paths: Sequence[str],
    top_k: int,
    ids: Sequence[int] | np.ndarray | None = None,
) -> list[Prediction]:
    """Turn (N, C) probabilities into one ``Prediction`` per row, best class first."""
    if top_k < 1:
        raise InvalidArgumentError(f"top_k must be at least 1, got {top_k}")
    k = min(top_k, probs.shape[1])
    # argpartition then sort the k: O(C) per row instead of a full O(C log C) sort.
    part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(probs, part, axis=1).argsort(axis=1)[:, ::-1]
    best = np.take_along_axis(part, order, axis=1)
    return [
        Prediction(
            path=str(path),
            top=[TopClass(int(c), str(names[c]), float(probs[i, c])) for c in best[i]],
            id=None if ids is None else int(ids[i]),
        )
        for i, path in enumerate(paths)
    ]


def embed_image_files(
    store: Store, paths: Sequence[str | Path], *, normalize: bool, device: str = "auto"
) -> np.ndarray:
    """Embed image files exactly like the store's extraction did: the same decode
    (``load_model_input``, JPEG draft rule included), model and weights (torch-free when the
    store's ONNX export is cached).

    Raises:
        ImageFileError: a file cannot be decoded, with the reason extraction would record.
    """
    from ..extraction.embed import embed
    from ..models.embedder import embedder_for_store

    model = embedder_for_store(store, device=device)
    return embed(list(paths), model=model, normalize=normalize)


def head_labels(n_classes: int, finetune: dict[str, Any] | None = None) -> list[str]:
    """The names of a head's ``n_classes`` outputs: a fine-tune's classes (its store or
    ``Finetuned.to_metadata()`` record), else ImageNet's 1000, else ``class i``."""
    classes = list((finetune or {}).get("classes") or [])
    if classes:
        if len(classes) != n_classes:
            raise ProbeError(
                f"the fine-tuned head has {n_classes} outputs but {len(classes)} class names "
                f"are recorded ({finetune.get('dir') if finetune else '?'}); re-extract the store"
            )
        return [str(c) for c in classes]
    from ..models.labels import imagenet_labels  # a file in the package: no timm

    names = list(imagenet_labels())
    if len(names) != n_classes:  # a head over another label set (e.g. 11k classes)
        return [f"class {i}" for i in range(n_classes)]
    return names


def _finetune_record(emb: Any) -> dict[str, Any] | None:
    ft = emb.finetuned
    return None if ft is None else ft.to_metadata()


def _require_head(store: Store) -> tuple[np.ndarray, np.ndarray]:
    fp = store.fingerprint
    model = fp.get("model", "?")
    # A random-init model has a classifier too (extraction may even save it), but its 1000
    # outputs mean nothing; naming ImageNet classes from it would be silent garbage. (A
    # fine-tune started from random weights is trained: its store says random_init False.)
    if fp.get("random_init"):
        raise ProbeError(
            f"store {store.path} was extracted with a randomly initialised {model}, which has "
            "no ImageNet classifier; re-extract with pretrained weights, or train a probe on "
            "your own labels (embedkit probe train)"
        )
    head = store.head()
    if head is not None:
        return head
    raise ProbeError(
        f"store {store.path} has no ImageNet classifier: its {model} weights are headless; "
        "re-extract with weights that include the classifier, or train a probe on your own "
        "labels (embedkit probe train)"
    )


def classify(
    *,
    store: Store | str | Path | None = None,
    images: Sequence[str | Path] | None = None,
    top_k: int = 5,
    device: str = "auto",
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
) -> list[Prediction]:
    """Top-k classes from a backbone's own classifier: ImageNet's, or a fine-tune's classes.

    Two forms: with ``store``, the store's model and saved head (stored features, or
    ``images`` through the store's model); without it, ``images`` through ``model`` (default
    ``DEFAULT_MODEL``, real weights) and that model's head. A fine-tune folder as ``model`` (or
    a store extracted with one) classifies into the fine-tune's classes with its new head.
    Files are decoded exactly as ``extract`` decodes them (``embed`` -> ``load_model_input``).

    Args:
        store: the store (or its path); its saved head is applied.
        images: image files to classify; with a store and None, every stored image is
            classified from its stored features (no backbone run).
        top_k: classes per image, best first.
        device: where the backbone runs for ``images`` (``auto``, ``cpu``, ``cuda``).
        model: without a store, a preset or timm name (default ``DEFAULT_MODEL``), or a
            fine-tune folder (``embedkit finetune --out``).
        weights: without a store, a weights file for ``model`` (it must hold the classifier).
        random_init: refused (a random classifier names no real class); kept so that the
            error says why instead of a TypeError.

    Returns:
        One ``Prediction`` per image, in store order or in the order of ``images``.

    Raises:
        InvalidArgumentError: ``store`` together with ``model``/``weights``, or no images and
            no store.
        ProbeError: the model has no classifier (random init, headless weights).
        WeightsUnavailableError: no weights for ``model``.
    """
    if top_k < 1:
        raise InvalidArgumentError(f"top_k must be at least 1, got {top_k}")
    if store is None:
        return _classify_files(images, model, weights, random_init, top_k, device)
    if model is not None or weights is not None or random_init:
        raise InvalidArgumentError(
            "a store brings its own model: pass either store or model/weights, not both"
        )
    store = resolve_store(store)
    weight, bias = _require_head(store)
    if images is None:
        if store.fingerprint.get("normalize"):
            raise ProbeError(
                f"store {store.path} keeps L2-normalised vectors, but the ImageNet head needs "
                "the raw pooled features; pass image files, or re-extract without --normalize"
            )
        features, paths, ids = store.vectors, store.abspaths, store.ids
    else:
        features = embed_image_files(store, images, normalize=False, device=device)
        paths, ids = [str(p) for p in images], None
    probs = head_probabilities(features, weight, bias)
    names = head_labels(probs.shape[1], store.metadata.get("finetune"))
    return rank_top_k(probs, names, paths, top_k, ids)


def _classify_files(
    images: Sequence[str | Path] | None,
    model: str | None,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    top_k: int,
    device: str,
) -> list[Prediction]:
    from ..defaults import DEFAULT_MODEL

    name = model or DEFAULT_MODEL
    if random_init:
        raise ProbeError(
            f"a randomly initialised {name} has no ImageNet classifier (its 1000 outputs mean "
            "nothing); classify with pretrained weights, or train a probe on your own labels "
            "(embedkit probe train)"
        )
    if not images:
        raise InvalidArgumentError(
            "nothing to classify: pass image files, or a store to classify its stored images"
        )
    from ..extraction.embed import embed
    from ..models.named import embedder_by_name

    emb = embedder_by_name(name, weights=weights, device=device)
    if emb.head is None:
        raise ProbeError(
            f"{name} ({emb.weights_source}) has no ImageNet classifier: its weights are "
            "headless or trained on other classes; pass weights that include the 1000-class "
            "head, or train a probe on your own labels (embedkit probe train)"
        )
    features = embed([os.fspath(p) for p in images], model=emb)
    probs = head_probabilities(features, *emb.head)
    names = head_labels(probs.shape[1], _finetune_record(emb))
    return rank_top_k(probs, names, [str(p) for p in images], top_k)
