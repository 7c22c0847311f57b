"""Which FAISS index to build: ``choose_index_key(n, dim, budget)``, pure and tested.

Exact search while it is cheap, HNSW while the graph fits the memory budget, inverted files
beyond, and compressed codes (8-bit scalar or product quantisation) with exact re-ranking when
even the raw vectors do not fit. The reasoning follows faiss's guidelines (wiki "Guidelines to
choose an index", ``contrib/factory_tools.py``) and autofaiss's ``get_optimal_index_keys_v2``.
Building, searching and saving the chosen index is ``index.py``'s job.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from ..defaults import DEFAULT_MAX_MEMORY as DEFAULT_MAX_MEMORY  # re-exported
from ..errors import InvalidArgumentError

Metric = Literal["cosine", "l2"]
METRICS: tuple[str, ...] = get_args(Metric)


# Exact search is cheap while one query costs at most ~50k x 512 multiply-adds (~5 ms on one
# core with BLAS, less in batches); below that an approximate index only adds build time.
FLAT_MAX_WORK = 50_000 * 512
# HNSW build costs ~efConstruction distance evaluations per vector per level and it cannot
# remove vectors (we tombstone and rebuild); past ~500k vectors the build takes minutes on a
# laptop while an inverted file has enough points to train 4*sqrt(n) centroids and reaches the
# same recall at a similar speed.
HNSW_MAX_N = 500_000
HNSW_M = 32  # graph degree: faiss's usual default; level 0 keeps 2*M links per vector
# An inverted file needs ~39 training points per centroid (faiss warns below that).
MIN_POINTS_PER_CENTROID = 39
# Bytes per vector on top of the codes: an IndexIDMap2 keeps an id array (8) and a reverse hash
# map (~40 per std::unordered_map node); an inverted file stores the id in its list (8).
ID_OVERHEAD = 48
IVF_ID_BYTES = 8


def _pow2_round(x: float) -> int:
    return int(2 ** round(math.log2(max(x, 1.0))))


def _nlist_for(n: int) -> int:
    """Centroids for an inverted file: ~4*sqrt(n) (faiss guideline: 4..16*sqrt(n)), a power of
    two, at most n/39 so that k-means has enough points, capped at 65536 (the 10M-vector row of
    the guideline)."""
    nlist = _pow2_round(4 * math.sqrt(n))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return min(nlist, 65_536)


def ivf_prefix(n: int) -> tuple[str, int]:
    """The inverted-file part of a factory key for ``n`` vectors and its list count, e.g.
    ``("IVF4096", 4096)`` or ``("IVF65536_HNSW32", 65536)``; shared with ``ondisk.ondisk_key``."""
    nlist = _nlist_for(n)
    # Past 16k centroids the exhaustive coarse quantizer dominates the search time; faiss
    # recommends an HNSW quantizer there (IVF65536_HNSW32 for 1M-10M vectors).
    quantizer = "_HNSW32" if nlist >= 16_384 else ""
    return f"IVF{nlist}{quantizer}", nlist


def estimate_memory(key: str, n: int, dim: int) -> int:
    """Approximate resident bytes of an index built from ``key`` holding ``n`` vectors."""
    ids = ID_OVERHEAD
    centroids = 0
    if "IVF" in key:
        nlist = int(key.split("IVF")[1].split(",")[0].split("_")[0])
        centroids = nlist * dim * 4
        ids = IVF_ID_BYTES
    if key == "Flat":
        per = 4 * dim
    elif key.startswith("HNSW"):
        m = int(key[4:].split(",")[0] or HNSW_M)
        per = 4 * dim + 2 * m * 4 + m * 4 // max(m - 1, 1) + 16  # level 0 + upper levels + offsets
    elif key.endswith(",Flat"):
        per = 4 * dim
    elif key.endswith("SQ8"):
        per = dim
    elif "PQ" in key:
        per = int(key.rsplit("PQ", 1)[1].split("x")[0])
        centroids += 256 * dim * 4  # the PQ codebooks
    else:
        raise InvalidArgumentError(f"cannot estimate the memory of index key {key!r}")
    return n * (per + ids) + centroids


def check_metric(metric: str) -> None:
    """Raise ``InvalidArgumentError`` listing the valid metrics unless ``metric`` is one."""
    if metric not in METRICS:
        raise InvalidArgumentError(f"metric {metric!r} is not one of: {', '.join(METRICS)}")


def choose_index_key(n: int, dim: int, max_memory_bytes: int, metric: str = "cosine") -> str:
    """The FAISS factory string for ``n`` vectors of ``dim`` floats within a memory budget.

    The metric does not change the choice: cosine is inner product on unit vectors, whose
    ranking equals L2's, so every key below suits both.

    Raises:
        InvalidArgumentError: a bad argument, or nothing fits in ``max_memory_bytes``.
    """
    check_metric(metric)
    if n < 0 or dim <= 0 or max_memory_bytes <= 0:
        raise InvalidArgumentError("n must be >= 0, dim and max_memory_bytes > 0")

    def fits(key: str) -> bool:
        return estimate_memory(key, n, dim) <= max_memory_bytes

    if n * dim <= FLAT_MAX_WORK and fits("Flat"):
        return "Flat"
    if n <= HNSW_MAX_N and fits(f"HNSW{HNSW_M}"):
        return f"HNSW{HNSW_M}"
    ivf, nlist = ivf_prefix(n)
    # Too few points to train an inverted file: exhaustive search over raw or compressed codes.
    candidates = [f"{ivf},Flat", f"{ivf},SQ8"] if nlist >= 16 else ["Flat", "SQ8"]
    # Product quantisation, the most bytes per vector that fit; PQ{m}x8 needs 256*39 training
    # points. No OPQ rotation: training one costs ~50 PQ trainings (minutes on 2 cores at 20k
    # vectors), and re-ranking the candidates with the stored vectors recovers the precision.
    if n >= 256 * MIN_POINTS_PER_CENTROID:
        pre = f"{ivf}," if nlist >= 16 else ""
        candidates += [f"{pre}PQ{m}" for m in (64, 32, 16, 8, 4) if m <= dim and dim % m == 0]
    for key in candidates:
        if fits(key):
            return key
    smallest = candidates[-1]
    raise InvalidArgumentError(
        f"no index for {n} vectors of dim {dim} fits in {max_memory_bytes} bytes; the smallest "
        f"({smallest}) needs about {estimate_memory(smallest, n, dim)}; raise --max-memory"
    )
