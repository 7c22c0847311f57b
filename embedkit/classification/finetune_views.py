"""Phase 2's inputs: augmented views of the decoded crops, and the frozen trunk's activations
for them, computed once.

The *trunk* is every module of the backbone before the first unfrozen unit. It is frozen, and
BatchNorm statistics stay frozen too (eval mode, see ``finetune``), so its output for a given
input never changes during phase 2. ``finetune`` therefore runs it once over ``views``
augmented views of every training image (and over the plain crop of every validation image)
and trains the unfrozen units and the head on the stored activations, drawing one view per
image per epoch. The gradients are those of the whole backbone run on the same augmented batch
(tests/test_finetune_views.py); only the trunk's forward pass, most of the compute, is saved
(efficientnet_lite0 with ``unfreeze=3``: ~0.35 of its ~0.4 GMAC per 224 px image).

Memory: one view of one image is the trunk's output, 192 x 7 x 7 float32 = 37.6 KB for
efficientnet_lite0 with ``unfreeze=3`` (112 x 14 x 14 = 88 KB with ``unfreeze=4``).

``split_backbone`` only splits a backbone whose forward is its top-level children in order
(timm's CNNs: EfficientNet, MobileNet, ResNet, ConvNeXt...); it checks this on a real batch and
returns None otherwise (ViTs: position embeddings and class tokens live outside any child), and
``finetune`` then runs the whole backbone on every step, as before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..models.backbone import Backbone

# Random resized crop, as torchvision's RandomResizedCrop: area share in [min_scale, 1] of the
# stored crop, aspect ratio log-uniform in [3/4, 4/3], resized back to the crop's size.
ASPECT_RANGE = (3 / 4, 4 / 3)
# Largest relative difference between the split backbone and the whole one on the check batch;
# float32 reassociation only (channels_last vs not), measured ~1e-6.
SPLIT_TOLERANCE = 1e-4


def flat_modules(net: nn.Module) -> list[nn.Module]:
    """The top-level children in order, a ``Sequential`` of stages opened into its stages.

    The same walk as ``finetune.trainable_units``, parameterless modules (pooling, activations)
    included, so running them in order is the whole forward when the backbone is sequential.
    """
    from torch import nn

    mods: list[nn.Module] = []
    for child in net.children():
        mods.extend(child.children() if isinstance(child, nn.Sequential) else [child])
    return mods


def split_backbone(
    net: nn.Module, first_trained: nn.Module | None, check: torch.Tensor
) -> tuple[nn.Sequential, nn.Sequential] | None:
    """(trunk, rest) with ``rest(trunk(x)) == net(x)``, split before ``first_trained``.

    Args:
        net: the backbone (eval mode).
        first_trained: the first unfrozen unit, None when only the head trains (the trunk is
            then the whole backbone and ``rest`` the identity).
        check: a normalised input batch on which the split must reproduce ``net``.

    Returns:
        None when ``net``'s forward is not its children in order (checked on ``check``).
    """
    import torch
    from torch import nn

    mods = flat_modules(net)
    ids = [id(m) for m in mods]
    if first_trained is not None and id(first_trained) not in ids:
        return None
    k = len(mods) if first_trained is None else ids.index(id(first_trained))
    trunk, rest = nn.Sequential(*mods[:k]), nn.Sequential(*mods[k:])
    with torch.no_grad():
        try:
            split = rest(trunk(check))
        except (RuntimeError, TypeError, ValueError):  # shapes that only the model's own
            return None  # forward() arranges (flattening, tokens)
        whole = net(check)
    if split.shape != whole.shape:
        return None
    err = float((split - whole).abs().max()) / max(float(whole.abs().max()), 1e-12)
    return (trunk, rest) if err <= SPLIT_TOLERANCE else None


def augment(batch: np.ndarray, rng: np.random.Generator, min_scale: float) -> np.ndarray:
    """Random resized crop (area share in [``min_scale``, 1]) and horizontal flip of uint8
    (N, H, W, 3) crops -> uint8 (N, H, W, 3). ``min_scale=1``: flips only.

    PIL's bilinear resize of the crop box (~1 ms per 224 px image; ``F.interpolate`` with
    antialias took ~100 ms on this machine's CPU).
    """
    from PIL import Image

    n, h, w, _ = batch.shape
    out = batch.copy()
    flip = rng.random(n) < np.full(n, 0.5)
    for i in range(n):
        if min_scale < 1:
            area = h * w * rng.uniform(min_scale, 1.0)
            ratio = math.exp(rng.uniform(*np.log(ASPECT_RANGE)))
            ch = min(h, max(1, round(math.sqrt(area / ratio))))
            cw = min(w, max(1, round(math.sqrt(area * ratio))))
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            box = (left, top, left + cw, top + ch)
            out[i] = np.asarray(Image.fromarray(batch[i]).resize((w, h), Image.Resampling.BILINEAR,
                                                                 box=box))  # fmt: skip
        if flip[i]:
            out[i] = out[i, :, ::-1]
    return out


def trunk_views(
    trunk: nn.Module,
    pixels: np.ndarray,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    *,
    views: int,
    min_scale: float,
    seed: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """The trunk's output for ``views`` augmented views of each crop (0: the plain crops, one
    view): float32 (max(views, 1), N, ...) on the CPU, view ``v`` seeded by ``(seed, v)``.
    """
    import torch

    out = []
    for v in range(max(views, 1)):
        rng = np.random.default_rng([seed, 1, v])  # 1: the view stream, apart from epoch orders
        chunks = []
        for i in range(0, len(pixels), batch_size):
            batch = pixels[i : i + batch_size]
            if views:
                batch = augment(batch, rng, min_scale)
            x = normalize(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():  # not inference_mode: phase 2 saves these for backward
                chunks.append(trunk(x).float().cpu())
        out.append(torch.cat(chunks))
    return torch.stack(out)


class Phase2Inputs:
    """Phase 2's batches: from the frozen trunk's cached activations of ``views`` augmented
    views (``finetune_views``), or, with ``views=0`` or a backbone that does not split, the
    whole backbone on crops augmented on the fly.
    """

    def __init__(
        self,
        backbone: Backbone,
        pixels: np.ndarray,
        y: np.ndarray,
        split: Any,
        units: list[nn.Module],
        *,
        views: int,
        min_scale: float,
        seed: int,
        batch_size: int,
    ) -> None:
        import torch

        t0 = time.perf_counter()
        self.backbone, self.pixels, self.y, self.split = backbone, pixels, y, split
        self.min_scale, self.batch_size = min_scale, batch_size
        dev, net = backbone.device, backbone.model
        parts = None
        if views:
            check = self._normalize(torch.from_numpy(pixels[split.train[:2]]))
            parts = split_backbone(net, units[0] if units else None, check)
        self.rest: nn.Module | None = None
        self.train_cache = self.val_cache = None
        if parts is not None:
            trunk, self.rest = parts
            norm = backbone.preprocess.normalize
            self.train_cache = trunk_views(trunk, pixels[split.train], norm, views=views,
                                           min_scale=min_scale, seed=seed,
                                           batch_size=batch_size, device=dev)  # fmt: skip
            if len(split.val):
                self.val_cache = trunk_views(trunk, pixels[split.val], norm, views=0,
                                             min_scale=1.0, seed=seed, batch_size=batch_size,
                                             device=dev)[0]  # fmt: skip
        self.seconds = time.perf_counter() - t0

    def train_view_features(self, views: int, seed: int) -> np.ndarray:
        """Pooled features of the augmented training views phase 2 trains on: float32
        (V, n_train, D), for phase 1's head (``finetune.phase1_head``).

        From the cached trunk activations when there are some (all their views, through the
        frozen remainder, cheap), else ``views`` views augmented as phase 2 does on the fly and
        run through the whole backbone.
        """
        import torch

        if self.train_cache is not None and self.rest is not None:
            step = 4 * self.batch_size
            with torch.no_grad():
                return torch.stack([
                    torch.cat([
                        self.rest(_on(cache[i : i + step], self.backbone.device)).float().cpu()
                        for i in range(0, cache.shape[0], step)
                    ])
                    for cache in self.train_cache
                ]).numpy()  # fmt: skip
        crops = self.pixels[self.split.train]
        out = []
        for v in range(views):
            rng = np.random.default_rng([seed, 2, v])  # 2: phase 1's view stream
            out.append(features(self.backbone, augment(crops, rng, self.min_scale),
                                self.batch_size))  # fmt: skip
        return np.stack(out) if out else np.zeros((0, len(crops), self.backbone.dim), np.float32)

    def _normalize(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        import torch

        x = self.backbone.preprocess.normalize(batch_uint8.to(self.backbone.device))
        return x.contiguous(memory_format=torch.channels_last)

    def train_features(self, pos: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Pooled features (with grad) of the training rows at positions ``pos``."""
        import torch

        if self.train_cache is not None and self.rest is not None:
            view = rng.integers(len(self.train_cache), size=len(pos))
            x = self.train_cache[torch.from_numpy(view), torch.from_numpy(pos)]
            out: torch.Tensor = self.rest(_on(x, self.backbone.device))
            return out
        batch = augment(self.pixels[self.split.train[pos]], rng, self.min_scale)
        out = self.backbone.model(self._normalize(torch.from_numpy(batch)))
        return out

    def evaluate_val(self, head: nn.Module) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of the plain validation crops; NaN when none."""
        import torch

        rows = self.split.val
        if self.val_cache is None or self.rest is None or len(rows) == 0:
            return evaluate(self.backbone, head, self.pixels, self.y, rows, self.batch_size)
        with torch.no_grad():
            step = 4 * self.batch_size
            feats = torch.cat([
                self.rest(_on(self.val_cache[i : i + step], self.backbone.device))
                for i in range(0, len(rows), step)
            ])  # fmt: skip
            return loss_acc(head(feats), torch.from_numpy(self.y[rows]).to(feats.device))


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; channels_last when it is a feature map (as the backbone runs)."""
    import torch

    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def features(backbone: Backbone, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Pooled features of uint8 crops, by the forward ``extract`` runs: float32 (N, D)."""
    from ..extraction.embed import forward_batches

    return forward_batches(backbone, iter(pixels), batch_size)


def evaluate(
    backbone: Backbone,
    head: nn.Module,
    pixels: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on ``rows``; NaN when there are none."""
    import torch

    if len(rows) == 0:
        return float("nan"), float("nan")
    feats = torch.from_numpy(features(backbone, pixels[rows], batch_size))
    with torch.no_grad():
        logits = head(feats.to(backbone.device))
        return loss_acc(logits, torch.from_numpy(y[rows]).to(backbone.device))


def loss_acc(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    import torch

    loss = float(torch.nn.functional.cross_entropy(logits, target))
    return loss, float((logits.argmax(1) == target).float().mean())
