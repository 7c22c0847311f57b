"""Weight sources and key mapping: turn a file, a package or a hub cache into a timm state dict.

Sources give a state dict in the key layout of one timm architecture (``backbone._Loaded``
records it with the architecture it fits, a one-word provenance string and any preprocessing
overrides). Building the model and choosing between sources is ``backbone.py``'s job; reading,
hashing and mapping tensors is this module's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError, WeightsMismatchError, WeightsUnavailableError
from .packaged import LITE0_ARCH, LITE0_PACKAGE, lite0_package_path  # noqa: F401 (re-export)

StateDict = dict[str, torch.Tensor]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Checkpoint wrappers seen in the wild: timm train scripts, torchvision references, Lightning.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")

# torchvision's eval transform for its ImageNet weights: Resize(256, bilinear) + CenterCrop(224)
# with the usual ImageNet mean/std (torchvision/models/_api.py ImageClassification).
TORCHVISION_PREPROCESS: dict[str, Any] = {
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}

# LITE0_PACKAGE, LITE0_ARCH and lite0_package_path live in packaged.py (torch-free).


def state_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted keys, dtype, shape and raw bytes: same tensors -> same hash.

    ``num_batches_tracked`` is skipped: it is a training counter that inference never reads,
    and files of the same weights disagree on whether they carry it.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        if key.endswith("num_batches_tracked"):
            continue
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Read a ``.safetensors`` or ``.pth/.pt/.bin`` state dict (no pickled code) onto the CPU."""
    p = Path(path).expanduser()
    if p.suffix not in WEIGHT_SUFFIXES:
        raise InvalidArgumentError(
            f"weights file {p} has an unknown suffix; use one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    if not p.is_file():
        raise WeightsUnavailableError(f"weights file {p} does not exist; check the path")
    try:
        if p.suffix == ".safetensors":
            import safetensors.torch

            obj: Any = safetensors.torch.load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle that holds more than tensors
        raise WeightsUnavailableError(
            f"cannot read weights file {p} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "pass a plain state dict saved with safetensors or torch.save"
        ) from e
    for _ in range(3):  # {"state_dict": {"model": ...}} nests happen
        if isinstance(obj, Mapping) and not _is_tensor_map(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj or not _is_tensor_map(obj):
        raise WeightsMismatchError(
            f"weights file {p} holds no state dict of tensors; save model.state_dict() instead"
        )
    sd = {str(k): v for k, v in obj.items()}
    for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _is_tensor_map(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def classifier_keys(template: Mapping[str, torch.Tensor], classifier: str) -> list[str]:
    """Keys of the classifier module named by timm's ``pretrained_cfg['classifier']``."""
    return [k for k in template if k.startswith(classifier + ".")]


def fit_to_template(
    sd: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], classifier: str
) -> tuple[StateDict, bool]:
    """Check a timm-keyed state dict against the model's; returns (state dict, has 1000-class head).

    The backbone must match exactly (every key, every shape). The classifier may be absent
    (headless weights) or have another class count (a fine-tuned head); both load the backbone
    alone and report no ImageNet head.
    """
    head_keys = set(classifier_keys(template, classifier))
    out: StateDict = {}
    for key, ref in template.items():
        if key in head_keys:
            continue
        if key not in sd:
            if key.endswith("num_batches_tracked"):
                continue  # BatchNorm fills it in; older checkpoints omit it
            raise WeightsMismatchError(
                f"weights lack tensor {key!r} {tuple(ref.shape)} (and maybe more); "
                "pass weights saved from this model"
            )
        _check_shape(key, sd[key], key, ref)
        out[key] = sd[key]
    extra = [k for k in sd if k not in template]
    if extra:
        raise WeightsMismatchError(
            f"weights have tensor {extra[0]!r} {tuple(sd[extra[0]].shape)} that this model "
            f"lacks ({len(extra)} unexpected in all); pass weights saved from this model"
        )
    head_given = [k for k in head_keys if k in sd]
    has_head = bool(head_keys) and len(head_given) == len(head_keys)
    if has_head and all(sd[k].shape == template[k].shape for k in head_keys):
        out.update({k: sd[k] for k in head_keys})
        return out, _is_imagenet_head(template, head_keys)
    return out, False


def _is_imagenet_head(template: Mapping[str, torch.Tensor], head_keys: set[str]) -> bool:
    return any(k.endswith("weight") and template[k].shape[0] == 1000 for k in head_keys)


def _check_shape(src_key: str, src: torch.Tensor, dst_key: str, dst: torch.Tensor) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        where = src_key if src_key == dst_key else f"{src_key} -> {dst_key}"
        raise WeightsMismatchError(
            f"tensor {where} has shape {tuple(src.shape)} but the model needs "
            f"{tuple(dst.shape)}; pass weights for this architecture"
        )


def map_by_order(
    sd: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], classifier: str
) -> StateDict:
    """Map a foreign state dict onto timm keys by position, checking every shape and kind.

    Used where two implementations register the same tensors in the same order under other
    names (torchvision MobileNetV2 / EfficientNet-B0, lukemelas EfficientNet-Lite). The last
    name part (``weight``, ``bias``, ``running_mean``, ...) must agree too, which catches a
    shifted sequence where equal shapes (BN weight vs bias) alone would not.
    """
    head = set(classifier_keys(template, classifier))
    dst_keys = list(template)
    if len(sd) == len(template) - len(head):
        dst_keys = [k for k in template if k not in head]  # headless weights
    elif len(sd) != len(template):
        raise WeightsMismatchError(
            f"weights have {len(sd)} tensors but the model has {len(template)} "
            f"({len(template) - len(head)} without its classifier); pass weights for this "
            "architecture"
        )
    out: StateDict = {}
    for (src_key, src), dst_key in zip(sd.items(), dst_keys, strict=True):
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise WeightsMismatchError(
                f"tensor {src_key} does not line up with the model's {dst_key}; "
                "pass weights for this architecture"
            )
        _check_shape(src_key, src, dst_key, template[dst_key])
        out[dst_key] = src
    return out


def _vgg_from_torchvision(sd: Mapping[str, torch.Tensor]) -> StateDict:
    # timm's VGG keeps fc6/fc7 as convs (``pre_logits.fc1`` 7x7, ``fc2`` 1x1); same reshape as
    # timm.models.vgg._filter_fn, which is private, so it is restated here.
    renames = {"classifier.0.": "pre_logits.fc1.", "classifier.3.": "pre_logits.fc2.",
               "classifier.6.": "head.fc."}  # fmt: skip
    out: StateDict = {}
    for key, v in sd.items():
        new = key
        for old, repl in renames.items():
            if key.startswith(old):
                new = repl + key[len(old) :]
        if new == "pre_logits.fc1.weight" and v.ndim == 2 and v.shape[1] % 49 == 0:
            v = v.reshape(v.shape[0], v.shape[1] // 49, 7, 7)
        elif new == "pre_logits.fc2.weight" and v.ndim == 2:
            v = v.reshape(v.shape[0], v.shape[1], 1, 1)
        out[new] = v
    return out


def convert_torchvision(
    arch: str, sd: StateDict, template: Mapping[str, torch.Tensor], classifier: str
) -> StateDict | None:
    """Map a torchvision state dict onto the timm twin of ``arch``; None if it is not one.

    resnet50 needs no entry: torchvision and timm use the same keys, so its files take the
    timm path (and get timm's preprocessing, as nothing in the file tells them apart).
    """
    if arch == "vgg16" and "features.0.weight" in sd:
        return _vgg_from_torchvision(sd)
    if arch in ("mobilenetv2_100", "efficientnet_b0") and "features.0.0.weight" in sd:
        return map_by_order(sd, template, classifier)
    return None


def is_lukemelas_lite(sd: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in sd and "_blocks.0._depthwise_conv.weight" in sd


def hub_cached_file(arch: str) -> str | None:
    """Path of the timm pretrained weights in the local HF hub or torch hub cache, or None.

    Only looks at the disk, so it answers at once with no network at all.
    """
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # a name timm knows only without a pretrained tag
        return None
    if cfg is None:
        return None
    hub_id = cfg.hf_hub_id
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        for filename in [*names, "model.safetensors", "pytorch_model.bin"]:
            try:
                found = try_to_load_from_cache(hub_id, filename)
            except Exception:  # a malformed repo id or an unreadable cache: not cached
                return None
            if isinstance(found, str):
                return found
    if isinstance(cfg.url, str) and cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if cached.is_file():
            return str(cached)
    return None


def hub_repo_hint(arch: str) -> str:
    """What a user would put in the hub cache for ``arch`` (for error messages)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:
        cfg = None
    if cfg is not None and cfg.hf_hub_id:
        return f"hf-hub:{cfg.hf_hub_id}"
    return f"timm:{arch}"


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` for the duration: read the cache, never ask the network."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
