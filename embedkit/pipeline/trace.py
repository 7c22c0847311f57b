"""One image through the pipeline, stage by stage, with the real shapes, values and times.

File -> decoded RGB -> resized and cropped uint8 -> normalised float tensor -> backbone features
-> classifier logits -> softmax -> top-k. Built from the very pieces extraction uses
(``images.decode.open_rgb`` with the JPEG draft rule, ``Preprocess.to_uint8`` and
``normalize``, the torch backbone and its head), and checked against the composed paths while it
runs: the crop must equal ``load_model_input(...).pixels`` and the features ``embed([path])``;
a difference is a bug in this module and raises ``TraceMismatchError``.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..defaults import DEFAULT_MODEL
from ..errors import ImageFileError, InvalidArgumentError
from ..images.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, open_rgb, read_image_file

if TYPE_CHECKING:
    from ..classification.probe import Probe
    from ..models.backbone import Backbone
    from ..models.preprocess import Preprocess

# Features of the trace and of ``embed`` come from the same model on the same input; on CPU they
# are bit-identical, the slack covers CUDA kernels picked per call (relative to the largest |x|).
_FEATURE_RTOL = 1e-5
_EXIF_ORIENTATION = 0x0112


class TraceMismatchError(RuntimeError):
    """The stage-by-stage pipeline disagrees with the composed one: a bug, not bad input."""


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    Attributes:
        name: ``file``, ``decoded``, ``resized``, ``normalized``, ``features``, ``logits``,
            ``softmax`` or ``top_k``.
        shape: the shape of what the stage produced (``[bytes]`` for the file).
        dtype: its element type (``uint8``, ``float32``, ...).
        seconds: wall time the stage took.
        detail: what the stage did and facts about its output (JSON-able).
    """

    name: str
    shape: list[int]
    dtype: str
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "seconds": self.seconds,
            "detail": self.detail,
        }


@dataclass
class Trace:
    """What happened to one image.

    Attributes:
        path: the image file as given.
        model: the model name; ``weights``: its weights source.
        stages: in pipeline order.
        features: float32 (dim,), the vector ``extract`` stores for this file.
        top: ``[(index, label, prob)]``, best first (empty when there is no classifier).
        classifier: ``imagenet``, ``finetune:DIR`` (a fine-tuned model's own head),
            ``probe:DIR`` or None.
    """

    path: str
    model: str
    weights: str
    stages: list[Stage]
    features: np.ndarray
    top: list[tuple[int, str, float]]
    classifier: str | None

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "model": self.model,
            "weights": self.weights,
            "classifier": self.classifier,
            "stages": [s.to_dict() for s in self.stages],
            "top": [{"index": i, "label": lab, "prob": p} for i, lab, p in self.top],
            "seconds": sum(s.seconds for s in self.stages),
        }


def trace(
    path: str | os.PathLike[str],
    model: str | Backbone | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    probe: str | os.PathLike[str] | Probe | None = None,
    top_k: int = 5,
    device: str = "auto",
) -> Trace:
    """Run one image file through the pipeline and record every stage.

    Args:
        path: an image file.
        model: a preset or timm name, a fine-tune folder (its head and classes end the trace),
            or a loaded ``Backbone``; default the probe's model, else ``DEFAULT_MODEL``.
        weights, random_init, device: as for ``load_backbone`` (when ``model`` is a name).
        probe: a probe directory (or ``Probe``): its classes replace the ImageNet head.
        top_k: classes in the last stage.

    Raises:
        ImageFileError: the file cannot be decoded (extraction's reason).
        ProbeError: the probe was trained on another model's features.
        WeightsUnavailableError: no weights for the model.
        TraceMismatchError: the stages disagree with ``load_model_input`` / ``embed`` (a bug).
    """
    if top_k < 1:
        raise InvalidArgumentError(f"top_k must be at least 1, got {top_k}")
    pr = _load_probe(probe)
    backbone = _backbone(model, pr, weights, random_init, device)
    pp = backbone.preprocess
    stages: list[Stage] = []
    where = os.fspath(path)

    t = time.perf_counter()
    try:
        data = read_image_file(path)
    except ImageDecodeError as exc:
        raise ImageFileError(where, exc.reason, exc.detail) from None
    stages.append(Stage("file", [len(data)], "uint8", 0.0, _file_facts(where, data)))
    stages[-1] = _timed(stages[-1], t)

    t = time.perf_counter()
    try:
        img = open_rgb(data, max_pixels=DEFAULT_MAX_PIXELS, draft_size=pp.draft_size)
    except ImageDecodeError as exc:
        raise ImageFileError(where, exc.reason, exc.detail) from None
    w, h = img.image.size
    stages.append(
        _timed(
            Stage(
                "decoded",
                [h, w, 3],
                "uint8",
                0.0,
                {
                    "mode": img.image.mode,
                    "full_size": [img.height, img.width],
                    "draft": img.box is not None,
                    "draft_box": list(img.box) if img.box is not None else None,
                    "n_frames": img.n_frames,
                    "warnings": list(img.warnings),
                },
            ),
            t,
        )
    )

    t = time.perf_counter()
    pixels = pp.to_uint8(img.image, img.box)
    facts = _resize_facts(pp, pixels)
    stages.append(_timed(Stage("resized", list(pixels.shape), str(pixels.dtype), 0.0, facts), t))

    import torch

    from ..models.backbone import _autocast

    t = time.perf_counter()
    x = pp.normalize(torch.from_numpy(np.array(pixels))[None].to(backbone.device))
    xs = x.float().cpu().numpy()
    stages.append(
        _timed(Stage("normalized", list(x.shape), str(xs.dtype), 0.0, _norm_facts(pp, xs)), t)
    )

    t = time.perf_counter()
    with torch.inference_mode(), _autocast(backbone.device):
        y = backbone.model(x.contiguous(memory_format=torch.channels_last))
    feats = y.float().cpu().numpy().astype(np.float32)
    stages.append(
        _timed(
            Stage(
                "features",
                list(feats.shape),
                "float32",
                0.0,
                {
                    "l2_norm": float(np.linalg.norm(feats[0])),
                    **_range(feats),
                    "what": "pooled pre-logits (what extract stores)",
                },
            ),
            t,
        )
    )
    _check_composed(where, backbone, pixels, feats)

    top: list[tuple[int, str, float]] = []
    classifier: str | None = None
    if pr is not None:
        classifier = f"probe:{probe}" if not _is_probe(probe) else "probe"
        top = _probe_stages(stages, pr, backbone, feats, top_k)
    elif backbone.head is not None and not backbone.random_init:
        # (a random-init model has a 1000-way classifier too, but it names no real class)
        ft = backbone.finetuned
        classifier = "imagenet" if ft is None else f"finetune:{ft.dir}"
        top = _head_stages(stages, backbone, feats, top_k)
    return Trace(
        path=where,
        model=backbone.name,
        weights=backbone.weights_source,
        stages=stages,
        features=feats[0],
        top=top,
        classifier=classifier,
    )


# --- stages -------------------------------------------------------------------------------------


def _timed(stage: Stage, t0: float) -> Stage:
    return Stage(stage.name, stage.shape, stage.dtype, time.perf_counter() - t0, stage.detail)


def _range(a: np.ndarray) -> dict[str, float]:
    return {"min": float(a.min()), "max": float(a.max()), "value_mean": float(a.mean())}


def _file_facts(path: str, data: bytes) -> dict[str, Any]:
    facts: dict[str, Any] = {"path": path, "bytes": len(data)}
    # Header only (Image.open is lazy): what the file says before any decoding.
    try:
        with Image.open(io.BytesIO(data)) as im:
            facts.update(format=im.format, mode=im.mode, size=[im.height, im.width])
            try:
                facts["exif_orientation"] = int(im.getexif().get(_EXIF_ORIENTATION, 1))
            except Exception:  # broken EXIF: decode treats it as absent too
                facts["exif_orientation"] = None
    except Exception:  # decode below raises the typed error with extraction's reason
        pass
    return facts


def _resize_facts(pp: Preprocess, pixels: np.ndarray) -> dict[str, Any]:
    return {
        "interpolation": pp.interpolation,
        "resize_short_side_to": pp.scale_size[0] if pp.crop_mode != "squash" else None,
        "resize_to": list(pp.scale_size) if pp.crop_mode == "squash" else None,
        "crop": f"{pp.crop_mode} {pp.size[0]}x{pp.size[1]} (crop_pct {pp.crop_pct})",
        **_range(pixels.astype(np.float64)),
    }


def _norm_facts(pp: Preprocess, x: np.ndarray) -> dict[str, Any]:
    mean = [m * pp.pixel_scale for m in pp.mean]
    std = [s * pp.pixel_scale for s in pp.std]
    if all(abs(s - 1.0) < 1e-9 for s in std):  # VGG/Caffe style: subtract the mean only
        how = "x - mean (mean subtraction)"
    else:
        how = "(x - mean) / std"
    return {
        "formula": how,
        "channel_order": pp.channel_order,
        "mean": [round(m, 4) for m in mean],
        "std": [round(s, 4) for s in std],
        "layout": "NCHW",
        **_range(x),
    }


def _head_stages(
    stages: list[Stage], backbone: Backbone, feats: np.ndarray, top_k: int
) -> list[tuple[int, str, float]]:
    from ..classification.head import head_labels, softmax

    assert backbone.head is not None
    w, b = (t.detach().cpu().double().numpy() for t in backbone.head)
    t = time.perf_counter()
    # float64 like classification.head.head_probabilities (what `classify` computes)
    logits = feats.astype(np.float64) @ w.T + b
    ft = backbone.finetuned
    what = "ImageNet head (dense)" if ft is None else f"fine-tuned head (dense, {ft.dir})"
    facts: dict[str, Any] = {"classifier": what, **_range(logits)}
    stages.append(_timed(Stage("logits", list(logits.shape), "float64", 0.0, facts), t))
    names = head_labels(logits.shape[1], None if ft is None else ft.to_metadata())
    return _softmax_top(stages, softmax(logits), names, top_k, t)


def _probe_stages(
    stages: list[Stage], pr: Probe, backbone: Backbone, feats: np.ndarray, top_k: int
) -> list[tuple[int, str, float]]:
    from ..store.read import l2_normalize

    fp = {**backbone.fingerprint(), "model": backbone.name}
    fp.pop("name", None)
    fp.pop("arch", None)
    normalize = bool((pr.fingerprint or {}).get("normalize"))
    fp["normalize"] = normalize
    x = l2_normalize(feats) if normalize else feats
    t = time.perf_counter()
    pr.check_features(x, fp if pr.fingerprint is not None else None)
    z = ((x - pr.mean) / pr.scale) @ pr.weight.T + pr.bias
    facts: dict[str, Any] = {
        "classifier": "linear probe on standardised features",
        "l2_normalized_first": normalize,
        **_range(z),
    }
    stages.append(_timed(Stage("logits", list(z.shape), str(z.dtype), 0.0, facts), t))
    proba = pr.predict_proba(x, fingerprint=fp if pr.fingerprint is not None else None)
    return _softmax_top(stages, proba, list(pr.classes), top_k, t)


def _softmax_top(
    stages: list[Stage], probs: np.ndarray, names: list[str], top_k: int, t0: float
) -> list[tuple[int, str, float]]:
    from ..classification.head import rank_top_k

    t = time.perf_counter()
    p = probs[0]
    entropy = float(-(p * np.log(np.clip(p, 1e-300, None))).sum())
    facts: dict[str, Any] = {"sum": float(p.sum()), "max": float(p.max()), "entropy_nats": entropy}
    stages.append(_timed(Stage("softmax", list(probs.shape), str(probs.dtype), 0.0, facts), t))
    t = time.perf_counter()
    best = rank_top_k(probs, names, ["-"], top_k)[0].top
    top = [(c.index, c.label, c.prob) for c in best]
    facts = {"classes": [f"{lab} {p:.2f}" for _, lab, p in top]}
    stages.append(_timed(Stage("top_k", [len(top)], "int64", 0.0, facts), t))
    return top


# --- checks and loading -------------------------------------------------------------------------


def _check_composed(path: str, backbone: Backbone, pixels: np.ndarray, feats: np.ndarray) -> None:
    """The stages must compose to exactly what every entry path computes."""
    from ..extraction.embed import embed
    from ..images.model_input import load_model_input

    ref_pixels = load_model_input(path, backbone.preprocess).pixels
    if ref_pixels.shape != pixels.shape or not np.array_equal(ref_pixels, pixels):
        raise TraceMismatchError(
            f"trace of {path}: the staged crop differs from load_model_input's (bug)"
        )
    ref = embed([path], model=backbone)
    diff = float(np.abs(ref - feats).max())
    if ref.shape != feats.shape or diff > _FEATURE_RTOL * max(1.0, float(np.abs(ref).max())):
        raise TraceMismatchError(
            f"trace of {path}: staged features differ from embed()'s by {diff:.3g} (bug)"
        )


def _is_probe(probe: object) -> bool:
    from ..classification.probe import Probe

    return isinstance(probe, Probe)


def _load_probe(probe: str | os.PathLike[str] | Probe | None) -> Probe | None:
    if probe is None:
        return None
    from ..classification.probe import Probe, load_probe

    return probe if isinstance(probe, Probe) else load_probe(os.fspath(probe))


def _backbone(
    model: str | Backbone | None,
    pr: Probe | None,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    device: str,
) -> Backbone:
    from ..models.backbone import Backbone, load_backbone

    if isinstance(model, Backbone):
        return model
    fp = (pr.fingerprint or {}) if pr is not None else {}
    name = model or str(fp.get("model") or DEFAULT_MODEL)
    if pr is not None and fp.get("random_init") and weights is None:
        random_init = True  # the probe was trained on a random-init store's features
    return load_backbone(name, weights=weights, random_init=random_init, device=device)
