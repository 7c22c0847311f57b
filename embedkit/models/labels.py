"""The 1000 ImageNet-1k class descriptions, from a file shipped in the package (no timm/torch).

``embedkit/data/imagenet_labels.txt`` was written once from ``timm.data.ImageNetInfo()``
(``index_to_description(i)`` for i in 0..999, one per line); tests compare it with timm's.
"""

from __future__ import annotations

import functools
from pathlib import Path

LABELS_FILE = Path(__file__).resolve().parent.parent / "data" / "imagenet_labels.txt"


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in index order (``281`` -> ``tabby, tabby cat``)."""
    return list(_labels())


@functools.lru_cache(maxsize=1)
def _labels() -> tuple[str, ...]:
    return tuple(LABELS_FILE.read_text(encoding="utf-8").splitlines())
