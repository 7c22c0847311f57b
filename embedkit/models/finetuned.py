"""A fine-tune output folder is a model: ``--model OUT`` or ``--weights OUT/model.safetensors``.

``embedkit finetune`` writes ``OUT/model.safetensors`` (timm keys of one architecture, the new
C-class head in its classifier slot) and ``OUT/finetune.json`` (that architecture, the class
names, the preprocessing it trained with, the weights it started from). ``resolve_model`` is the
one place that recognises such a folder: ``load_backbone``, ``embedder.cached_embedder`` and
``extract`` call it before anything else, so every command and function that takes a model
name (extract, embed, classify, trace, compare, search and probes through a store's recorded
weights file) takes a fine-tune folder too. What they load carries a ``Finetuned`` record: the
head's class names (``classify`` and ``trace`` use them instead of ImageNet's), and the base
model and weights, which a store records beside the fine-tuned weights' own sha256.

Torch-free: it reads one small JSON file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..defaults import DEFAULT_MODEL
from ..errors import InvalidArgumentError, WeightsUnavailableError
from .preprocess import Preprocess

FINETUNE_JSON = "finetune.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "embedkit.finetune/1"  # classification.finetune.FORMAT (that module imports numpy)


@dataclass(frozen=True)
class Finetuned:
    """What a fine-tune folder says about its model.

    Attributes:
        dir: the folder, absolute.
        arch: the timm architecture its weights are keyed for.
        classes: the head's class names, in output order.
        preprocess: the eval preprocessing it was trained with.
        base_model: the model name fine-tuning started from.
        base_weights_source: where the starting weights came from (``package:...``, ...).
        base_weights_sha256: their ``state_sha256`` (None in folders written before it was
            recorded).
        base_random_init: True when fine-tuning started from random weights.
    """

    dir: str
    arch: str
    classes: tuple[str, ...]
    preprocess: Preprocess
    base_model: str
    base_weights_source: str
    base_weights_sha256: str | None
    base_random_init: bool

    @property
    def weights(self) -> str:
        """``DIR/model.safetensors``: the backbone and the new head."""
        return os.path.join(self.dir, WEIGHTS_FILE)

    def to_metadata(self) -> dict[str, Any]:
        """The store's ``finetune`` record (the fine-tuned weights themselves are the store's
        ``weights_source`` and ``weights_sha256``)."""
        return {
            "dir": self.dir,
            "classes": list(self.classes),
            "base_model": self.base_model,
            "base_weights_source": self.base_weights_source,
            "base_weights_sha256": self.base_weights_sha256,
            "base_random_init": self.base_random_init,
        }


@dataclass(frozen=True)
class ModelRef:
    """A model request after ``resolve_model``: a timm/preset name, an optional weights file,
    and the fine-tune record when the weights are a fine-tune's."""

    name: str
    weights: str | None
    finetuned: Finetuned | None = None


def resolve_model(
    name: str | os.PathLike[str] | None,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
) -> ModelRef:
    """Turn ``--model`` / ``--weights`` into what the loaders read.

    A fine-tune folder as ``name`` becomes its architecture with ``DIR/model.safetensors``; a
    ``model.safetensors`` with a ``finetune.json`` beside it as ``weights`` is the same model
    (``name`` may then be its architecture, the model it started from, None or
    ``DEFAULT_MODEL``, which is what callers pass when nobody named a model). Anything else
    passes through unchanged (``None`` -> ``DEFAULT_MODEL``).

    Raises:
        InvalidArgumentError: a folder that is not a fine-tune output, a fine-tune with other
            ``weights`` or with ``random_init``, or a name that contradicts the fine-tune.
        WeightsUnavailableError: a fine-tune folder whose files are missing or unreadable.
    """
    ft = finetuned_folder(name) if name is not None else None
    if ft is not None:
        if weights is not None and not _same_file(weights, ft.weights):
            raise InvalidArgumentError(
                f"--model {name} is a fine-tuned model with its own weights ({ft.weights}); "
                "drop --weights"
            )
    elif weights is not None:
        ft = finetuned_beside(weights)
        named = None if name is None else os.fspath(name)
        if ft is not None and named not in (None, DEFAULT_MODEL, ft.arch, ft.base_model):
            raise InvalidArgumentError(
                f"{weights} is a fine-tune of {ft.base_model} (timm architecture {ft.arch}), "
                f"not of {name}; pass --model {ft.dir} (the fine-tune folder) or --model {ft.arch}"
            )
    if ft is None:
        return ModelRef(
            DEFAULT_MODEL if name is None else os.fspath(name),
            None if weights is None else os.fspath(weights),
        )
    if random_init:
        raise InvalidArgumentError(
            f"{ft.dir} is a fine-tuned model with trained weights; drop --random-init"
        )
    return ModelRef(ft.arch, ft.weights, ft)


def finetuned_folder(name: str | os.PathLike[str]) -> Finetuned | None:
    """The fine-tune record when ``name`` is a fine-tune folder, else None (a model name).

    A folder without ``finetune.json`` is refused when ``name`` looks like a path (has a
    separator, or starts with ``.`` or ``~``); a bare word naming a folder in the current
    directory (``resnet50/`` of photos) stays a model name.
    """
    text = os.fspath(name)
    path = Path(text).expanduser()
    if (path / FINETUNE_JSON).is_file():
        return _read(path)
    looks_like_path = os.sep in text or "/" in text or text.startswith((".", "~"))
    if looks_like_path and path.is_dir():
        raise InvalidArgumentError(
            f"{text} is a folder but not a fine-tune output (no {FINETUNE_JSON}); pass a preset "
            "or timm model name, or a folder written by `embedkit finetune --out`"
        )
    return None


def finetuned_beside(weights: str | os.PathLike[str]) -> Finetuned | None:
    """The fine-tune record when ``weights`` is a fine-tune's ``model.safetensors``."""
    path = Path(weights).expanduser()
    if path.name != WEIGHTS_FILE or not (path.parent / FINETUNE_JSON).is_file():
        return None
    return _read(path.parent)


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        return pa.samefile(pb)
    except OSError:  # one of them is missing: compare the names
        return os.path.abspath(pa) == os.path.abspath(pb)


def _read(folder: Path) -> Finetuned:
    file = folder / FINETUNE_JSON
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(
            f"cannot read {file} ({type(exc).__name__}); rerun `embedkit finetune --out "
            f"{folder}` or restore the file"
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise WeightsUnavailableError(
            f"{file} is not an {FORMAT} record; rerun `embedkit finetune --out {folder}`"
        )
    if not (folder / WEIGHTS_FILE).is_file():
        raise WeightsUnavailableError(
            f"{folder} has {FINETUNE_JSON} but no {WEIGHTS_FILE}: the fine-tune did not finish; "
            f"resume it with `embedkit finetune ... --out {folder} --resume`"
        )
    settings = info.get("settings") or {}
    return Finetuned(
        dir=os.path.abspath(folder),
        arch=str(info["arch"]),
        classes=tuple(str(c) for c in info["classes"]),
        preprocess=Preprocess.from_dict(info["preprocess"]),
        base_model=str(settings.get("model") or info["arch"]),
        base_weights_source=str(info.get("start_weights") or ""),
        base_weights_sha256=info.get("start_weights_sha256"),
        base_random_init=bool(settings.get("random_init")),
    )
