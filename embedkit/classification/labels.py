"""Labels for a store's images (a CSV or parent folders) and the group-aware data split."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import InvalidArgumentError, ProbeError, StoreError
from .head import resolve_store

if TYPE_CHECKING:
    from ..store.read import Store

MissingLabels = Literal["error", "drop"]

# A near-duplicate "group" larger than this share of the labelled rows is a similarity chain
# through a homogeneous collection (measured: distinct textile photos have median cosine 0.956
# with efficientnet_lite0), not a set of copies; see ``near_duplicate_groups``.
MAX_SPLIT_GROUP_FRACTION = 0.02


@dataclass(frozen=True)
class LabelledFeatures:
    """Labelled rows of a store, ready for ``train_probe``.

    Attributes:
        features: float32 (N, D) stored vectors of the labelled rows.
        labels: (N,) class names.
        groups: (N,) split groups: byte-identical files and near duplicates share one, and
            a group never straddles splits (``near_duplicate_groups``).
        keys: (N,) int64 store ids.
        paths: (N,) stored paths, for messages and predictions.
        fingerprint: the store's model fingerprint.
        n_dropped: stored images left out because they had no label (``missing="drop"``).
    """

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    keys: np.ndarray
    paths: np.ndarray
    fingerprint: dict[str, Any]
    n_dropped: int = 0


def _read_label_csv(path: Path, store: Store) -> tuple[dict[int, str], list[str]]:
    """Map store rows to labels from a ``path,label`` or ``id,label`` CSV; unknown keys listed."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = fields
            key_col = "id" if "id" in fields else "path"
            if "label" not in fields or key_col not in fields:
                raise ProbeError(
                    f"{path} needs a header row 'path,label' or 'id,label', found {fields}; "
                    "add the header"
                )
            by_row: dict[int, str] = {}
            unknown: list[str] = []
            for line, rec in enumerate(reader, start=2):
                raw = (rec.get(key_col) or "").strip()
                label = (rec.get("label") or "").strip()
                key: int | str = raw
                if key_col == "id":
                    try:
                        key = int(raw)
                    except ValueError:
                        raise ProbeError(
                            f"{path} line {line}: id {raw!r} is not an integer store id; "
                            "use a 'path,label' CSV for paths"
                        ) from None
                try:
                    row = store.row_of(key)
                except StoreError:
                    unknown.append(raw)
                    continue
                if not label:
                    continue  # counted as a missing label below
                if by_row.get(row, label) != label:
                    raise ProbeError(
                        f"{path} line {line}: {raw!r} is labelled both {by_row[row]!r} and "
                        f"{label!r}; keep one label per image"
                    )
                by_row[row] = label
    except OSError as exc:
        raise ProbeError(
            f"cannot read labels file {path}: {exc.strerror}; check the path"
        ) from None
    return by_row, unknown


def labelled_features(
    store: Store | str | Path,
    labels: str | Path | None = None,
    *,
    missing: MissingLabels = "error",
    group_threshold: float | None = None,
) -> LabelledFeatures:
    """Collect the stored features of labelled images.

    Args:
        store: the store (or its path).
        labels: a CSV with columns ``path,label`` (stored path, relative or absolute) or
            ``id,label`` (store id); when None, each image's parent folder name is its label.
        missing: what to do with stored images that have no label (not in the CSV, an empty
            label, or a file directly in the root folder): ``error`` (default) raises a
            ``ProbeError`` with the count; ``drop`` leaves them out and reports the count in
            ``n_dropped``.
        group_threshold: cosine similarity at which near duplicates share a split group
            (``near_duplicate_groups``; None: the duplicates default, 0.90); 1.0 keeps only
            byte-identical copies together.
    """
    if missing not in ("error", "drop"):
        raise InvalidArgumentError(f"missing must be one of: error, drop (got {missing!r})")
    store = resolve_store(store)
    paths = np.asarray([str(p) for p in store.paths], dtype=object)
    if len(paths) == 0:
        raise ProbeError(f"store {store.path} has no embedded images; run embedkit extract first")
    assigned = np.full(len(paths), None, dtype=object)
    if labels is None:
        for i, p in enumerate(paths):
            assigned[i] = PurePosixPath(p).parent.name or None
        fix = "move them into a folder named after their class or pass a labels CSV"
    else:
        by_row, unknown = _read_label_csv(Path(labels), store)
        if unknown:
            raise ProbeError(
                f"{len(unknown)} entries of {labels} are not embedded images of store "
                f"{store.path} (e.g. {unknown[0]!r}); fix the CSV, or extract those images first"
            )
        for row, label in by_row.items():
            assigned[row] = label
        fix = f"label them in {labels}"
    unlabelled = np.flatnonzero(assigned == None)  # noqa: E711  (elementwise on an object array)
    if len(unlabelled) and missing == "error":
        raise ProbeError(
            f"{len(unlabelled)} of {len(paths)} stored images have no label (e.g. "
            f"{paths[unlabelled[0]]!r}); {fix}, or pass --missing drop to use only the "
            f"{len(paths) - len(unlabelled)} labelled ones"
        )
    keep = np.flatnonzero(assigned != None)  # noqa: E711
    features = np.ascontiguousarray(store.vectors[keep], dtype=np.float32)
    hashes = np.asarray(store.hashes, dtype=object)[keep].astype(str)
    return LabelledFeatures(
        features=features,
        labels=assigned[keep].astype(str),
        groups=near_duplicate_groups(features, hashes, group_threshold),
        keys=np.asarray(store.ids, dtype=np.int64)[keep],
        paths=paths[keep].astype(str),
        fingerprint=dict(store.fingerprint),
        n_dropped=len(unlabelled),
    )


def near_duplicate_groups(
    features: np.ndarray,
    hashes: np.ndarray,
    threshold: float | None = None,
    *,
    max_group_fraction: float = MAX_SPLIT_GROUP_FRACTION,
) -> np.ndarray:
    """Split groups: byte-identical files and near duplicates (resized, re-compressed,
    cropped, rotated copies) share a group, so no copy of a test image is trained on.

    Near duplicates are the groups ``embedkit duplicates`` finds by embedding at ``threshold``
    (default: calibrated on the features' background, ~0.90 on photos; on a homogeneous
    collection the embedding alone groups nothing). With an explicit threshold on a homogeneous
    collection (textures, documents) the similarity graph can still join distinct images
    into large groups; a group holding more than
    ``max_group_fraction`` of the rows (and more than 10) is such a chain, not a set of copies,
    and its rows fall back to their content-hash groups.

    Returns:
        (N,) group keys (strings): a content hash, or ``dup:<id>`` for a near-duplicate group.
    """
    from ..index.duplicates import group_duplicates

    groups = np.asarray(hashes, dtype=object).astype(str).astype(object)
    if len(features) < 2 or (threshold is not None and threshold >= 1.0):
        return groups.astype(str)
    found = group_duplicates(
        features,
        np.arange(len(features)),
        list(hashes),
        threshold,  # None: calibrated on these features, as `embedkit duplicates` does
    )
    limit = max(10, int(max_group_fraction * len(features)))
    for g in found:
        rows = [m.id for m in g.members]
        if len(rows) > limit:
            continue  # a chain through a homogeneous collection: keep hash groups
        groups[rows] = f"dup:{min(rows)}"
    return groups.astype(str)


@dataclass(frozen=True)
class Split:
    """Row indices (into the labelled arrays) of the train, validation and test splits."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_rows(
    labels: Sequence[str] | np.ndarray,
    groups: Sequence[str] | np.ndarray | None = None,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Split:
    """Stratified, group-aware split: every row of a group lands in the same split.

    Within each class the groups (distinct images) are shuffled and dealt out by count:
    ``round(n * test_fraction)`` (at least 1) to test, ``round(n * val_fraction)`` to
    validation, and the rest (at least 1) to train. A group whose duplicates carry different
    labels is stratified by its first row's label.
    """
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and val_fraction + test_fraction < 1):
        raise InvalidArgumentError(
            "need 0 < test_fraction, 0 <= val_fraction and val_fraction + test_fraction < 1; "
            f"got val {val_fraction}, test {test_fraction}"
        )
    labels = np.asarray(labels).astype(str)
    groups = np.arange(len(labels)).astype(str) if groups is None else np.asarray(groups, str)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_label = labels[first]
    # which split each group goes to: 0 train, 1 val, 2 test
    assign = np.zeros(len(first), dtype=np.int8)
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(group_label == cls))
        n = len(members)
        if n < 2:
            raise ProbeError(
                f"class {str(cls)!r} has only {n} distinct image(s) (duplicates count once); each "
                "class needs at least 2 to be split into train and test; add images of it or "
                "remove it from the labels"
            )
        n_test = max(1, int(np.floor(n * test_fraction + 0.5)))
        n_val = min(int(np.floor(n * val_fraction + 0.5)), n - n_test - 1)
        assign[members[:n_test]] = 2
        assign[members[n_test : n_test + n_val]] = 1
    row_assign = assign[inverse]
    return Split(*(np.flatnonzero(row_assign == s) for s in (0, 1, 2)))
