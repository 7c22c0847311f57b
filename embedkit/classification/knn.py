"""Weighted k-nearest-neighbour classification on stored features (the DINO protocol).

DINO (Caron et al. 2021, ``eval_knn.py``): L2-normalise the features, take the ``k`` most
cosine-similar training vectors, weight each neighbour's vote by ``exp(sim / T)`` and predict the
class with the largest summed weight. DINO's defaults are ``k=20`` and ``T=0.07``.

Search is an exact FAISS ``IndexFlatIP`` on the normalised vectors (inner product = cosine); the
store's own search index (``index.py``) is built for retrieval and may be approximate, while a
k-NN evaluation must be exact to be comparable across runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from ..defaults import KNN_K, KNN_TEMPERATURE
from ..errors import InvalidArgumentError, ProbeError
from .labels import MissingLabels, labelled_features, split_rows
from .metrics import Evaluation
from .probe import Probe

if TYPE_CHECKING:
    from ..store.read import Store

DEFAULT_K = KNN_K
DEFAULT_TEMPERATURE = KNN_TEMPERATURE


@dataclass(frozen=True)
class KnnResult:
    """Votes of a k-NN classifier.

    Attributes:
        classes: class names, sorted; column order of ``scores``.
        scores: float32 (N, C), each row the neighbours' ``exp(sim / T)`` votes per class,
            divided by their sum (so a row sums to 1).
        labels: the predicted class name per query row (argmax of ``scores``).
    """

    classes: list[str]
    scores: np.ndarray
    labels: np.ndarray


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_classify(
    train_features: np.ndarray,
    train_labels: Sequence[str] | np.ndarray,
    query_features: np.ndarray,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> KnnResult:
    """Classify ``query_features`` by weighted voting of their ``k`` nearest training rows.

    Args:
        train_features: float (N, D) features of the labelled rows.
        train_labels: N class names.
        query_features: float (M, D) features to classify (same model as the training rows).
        k: neighbours per query; capped at N.
        temperature: softmax temperature of the vote weights ``exp(cosine / temperature)``.

    Returns:
        The per-class votes and predicted labels for the M query rows.
    """
    if k < 1:
        raise InvalidArgumentError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise InvalidArgumentError(f"temperature must be positive, got {temperature}")
    train_labels = np.asarray(train_labels).astype(str)
    if train_features.ndim != 2 or len(train_features) != len(train_labels):
        raise InvalidArgumentError(
            f"need one label per training row: {len(train_labels)} labels for features "
            f"of shape {train_features.shape}"
        )
    if len(train_labels) == 0:
        raise ProbeError("k-NN needs at least one labelled training row; label some images")
    if query_features.ndim != 2 or query_features.shape[1] != train_features.shape[1]:
        raise ProbeError(
            f"query features have shape {query_features.shape} but training features have "
            f"dimension {train_features.shape[1]}; use features from the same model"
        )
    classes, y = np.unique(train_labels, return_inverse=True)
    k = min(k, len(y))

    index = faiss.IndexFlatIP(train_features.shape[1])
    index.add(_unit_rows(train_features))
    sims, nbrs = index.search(_unit_rows(query_features), k)

    # Subtracting each row's max before exp() avoids overflow (1/0.07 * 1 = e^14 is fine, but
    # smaller temperatures are not) and cancels in the normalisation below.
    logits = sims.astype(np.float64) / temperature
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    scores = np.zeros((len(query_features), len(classes)), dtype=np.float64)
    np.add.at(scores, (np.arange(len(query_features))[:, None], y[nbrs]), weights)
    scores /= scores.sum(axis=1, keepdims=True)
    return KnnResult(
        classes=[str(c) for c in classes],
        scores=scores.astype(np.float32),
        labels=classes[scores.argmax(axis=1)],
    )


@dataclass(frozen=True)
class KnnEvaluation:
    """k-NN test metrics, side by side with a linear probe's on the same split when given.

    Attributes:
        knn: the k-NN classifier's metrics on the test split.
        probe: the linear probe's metrics on the same rows, or None without a probe.
        n_train: labelled training rows the neighbours come from.
        k, temperature: the vote settings.
    """

    knn: Evaluation
    probe: Evaluation | None
    n_train: int
    k: int
    temperature: float


def knn_evaluate(
    store: Store | str | Path,
    labels: str | Path | None = None,
    *,
    probe: Probe | str | Path | None = None,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    missing: MissingLabels | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    group_threshold: float | None = None,
) -> KnnEvaluation:
    """Weighted k-NN over a store's training split, evaluated on its test split.

    ``group_threshold``: as for ``train_store_probe`` (near duplicates share a split side).

    With ``probe`` (a ``Probe`` or its directory) the probe's own train/test split is used and
    the probe is evaluated on the same test rows; otherwise the split is made here with
    ``split_rows`` (same arguments as ``train_probe``).
    """
    if isinstance(probe, (str, Path)):
        probe = Probe.load(probe)
    if missing is None:
        missing = probe.settings.get("missing", "error") if probe is not None else "error"
    data = labelled_features(
        store,
        labels,
        missing=missing,
        # With a probe its stored split is used: no need to find near-duplicate groups.
        group_threshold=1.0 if probe is not None else group_threshold,
    )
    if probe is not None:
        probe.check_features(data.features[:0], data.fingerprint)
        train = np.flatnonzero(np.isin(data.keys, probe.split.get("train", [])))
        test = np.flatnonzero(np.isin(data.keys, probe.split.get("test", [])))
        if len(train) == 0 or len(test) == 0:
            raise ProbeError(
                "the probe's train/test images are not labelled in this store; run without "
                "--probe to split this store's labels afresh"
            )
    else:
        split = split_rows(
            data.labels,
            data.groups,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
        train, test = split.train, split.test
    result = knn_classify(
        data.features[train], data.labels[train], data.features[test], k=k, temperature=temperature
    )
    classes = probe.classes if probe is not None else result.classes
    true = data.labels[test]
    return KnnEvaluation(
        knn=Evaluation.from_predictions(sorted(set(classes) | set(true)), true, result.labels),
        probe=None
        if probe is None
        else probe.evaluate(data.features[test], true, fingerprint=data.fingerprint),
        n_train=len(train),
        k=min(k, len(train)),
        temperature=temperature,
    )
