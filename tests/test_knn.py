"""Weighted k-NN (DINO protocol) on stored features."""

from __future__ import annotations

import numpy as np
import pytest

from embedkit.classification.knn import knn_classify
from embedkit.errors import InvalidArgumentError, ProbeError


def brute_force(train, labels, query, k, t):
    """The DINO vote written out with numpy, no FAISS."""
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    sims = q @ tr.T
    classes = sorted(set(labels))
    out = np.zeros((len(query), len(classes)))
    for i, row in enumerate(sims):
        for j in np.argsort(-row)[:k]:
            out[i, classes.index(labels[j])] += np.exp(row[j] / t)
    return out / out.sum(axis=1, keepdims=True)


def test_matches_a_brute_force_vote() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 24)).astype(np.float32)
    labels = np.array([f"c{i % 4}" for i in range(200)])
    query = rng.normal(size=(30, 24)).astype(np.float32)
    r = knn_classify(train, labels, query, k=20, temperature=0.07)
    np.testing.assert_allclose(r.scores, brute_force(train, labels, query, 20, 0.07), atol=1e-5)
    assert r.classes == ["c0", "c1", "c2", "c3"]
    np.testing.assert_array_equal(r.labels, np.array(r.classes)[r.scores.argmax(1)])


def test_votes_are_weighted_by_similarity_not_counted() -> None:
    # One very close "a" outweighs two farther "b" at T=0.07 (e^(1/0.07) >> 2 e^(0.5/0.07));
    # a plain majority vote would say "b".
    train = np.array([[1.0, 0.0], [0.5, np.sqrt(0.75)], [0.5, -np.sqrt(0.75)]], np.float32)
    r = knn_classify(train, ["a", "b", "b"], np.array([[1.0, 0.0]], np.float32), k=3)
    assert r.labels[0] == "a" and r.scores[0, 0] > 0.99
    hot = knn_classify(
        train, ["a", "b", "b"], np.array([[1.0, 0.0]], np.float32), k=3, temperature=100.0
    )
    assert hot.labels[0] == "b"  # at a high temperature the weights flatten to a majority


def test_separable_clusters_are_classified_perfectly() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 32)) * 4
    train = np.concatenate([c + 0.2 * rng.normal(size=(30, 32)) for c in centres])
    query = np.concatenate([c + 0.2 * rng.normal(size=(10, 32)) for c in centres])
    labels = np.repeat(list("abcde"), 30)
    r = knn_classify(train.astype(np.float32), labels, query.astype(np.float32))
    assert (r.labels == np.repeat(list("abcde"), 10)).all()


def test_k_larger_than_training_set_and_bad_arguments() -> None:
    train = np.eye(3, dtype=np.float32)
    r = knn_classify(train, ["a", "b", "c"], train, k=50)
    assert list(r.labels) == ["a", "b", "c"]
    with pytest.raises(InvalidArgumentError, match="k must be"):
        knn_classify(train, ["a", "b", "c"], train, k=0)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        knn_classify(train, ["a", "b", "c"], train, temperature=0)
    with pytest.raises(ProbeError, match="same model"):
        knn_classify(train, ["a", "b", "c"], np.ones((1, 4), np.float32))
