"""``extract``: image files in, an incremental, crash-safe Parquet store out.

One run: find files -> plan (unchanged / to decode / deleted) against the committed store ->
decode in worker processes while the model runs batches -> commit parts every
``commit_every`` rows. A killed run loses at most the uncommitted rows; the rerun skips what
was committed (same size and mtime) and finishes the rest, so every file ends up exactly once.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from .._version import __version__
from ..defaults import DEFAULT_COMMIT_EVERY, DEFAULT_MODEL
from ..errors import InvalidArgumentError
from ..images.decode import DEFAULT_MAX_PIXELS
from ..images.sources import FoundFile, find_images
from ..models.embedder import Embedder, cached_embedder
from ..models.finetuned import resolve_model
from ..store.pixels import PrintSink, merge_segments
from ..store.read import (
    STATUS_OK,
    _read_parts,
    live_rows,
    read_manifest,
    storable,
)
from ..store.writer import StoreWriter
from .cores import (
    default_batch_size,
    default_workers,
    plan_threads,
    probe_cuda_batch_size,
    usable_cores,
)
from .local import Engine, LocalEngine
from .plan import plan_run
from .rows import Rows, StoredVectors, count_ok, record_deleted_and_failed
from .summary import ExtractSummary as ExtractSummary  # re-exported: the run returns it

ENGINES = ("local", "ray")


def store_metadata(model: Embedder, normalize: bool) -> dict[str, Any]:
    """Everything a store records about how its vectors were made (the same whether ``model``
    came from the ONNX cache or a loaded backbone)."""
    return {
        "embedkit_version": __version__,
        **model.provenance.to_metadata(),
        "normalize": normalize,
        "torch_version": model.versions.get("torch_version"),
        "timm_version": model.versions.get("timm_version"),
    }


def extract(
    sources: Sequence[str | os.PathLike[str]],
    store: str | os.PathLike[str],
    *,
    model: str = DEFAULT_MODEL,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    normalize: bool = False,
    commit_every: int = DEFAULT_COMMIT_EVERY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_progress: Callable[[int, int], None] | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    engine: Engine | str | None = None,
    address: str | None = None,
    started: float | None = None,
    verbose: bool = False,
) -> ExtractSummary:
    """Embed every image under ``sources`` into the store at ``store``, incrementally.

    Args:
        sources: folders (recursive), image files, or .txt/.csv lists of paths.
        store: the store directory (created if missing).
        model: a preset, any timm model name, or a fine-tune folder (``finetune --out``; the
            store then records the fine-tuned weights, their classes and their base).
        weights: a weights file (safetensors or a state-dict .pth); see ``load_backbone``.
        random_init: random weights on purpose; recorded in the store.
        batch_size: images per forward pass (default ``cores.default_batch_size`` for the
            device, runtime and model threads: 8 for torch on CPU, 8 per thread for ONNX
            Runtime, re-chosen with the thread split; on CUDA, probed: doubled from 32 while
            it fits the free memory and gets faster).
        workers: decode processes (0 decodes in-process). Default on CPU, when ``threads`` is
            not given either: one per usable core to start, then re-chosen with the model
            threads after the first batches from measured decode and model times
            (``cores.balanced_split``); on CUDA: usable cores - 1.
            ``ExtractSummary.workers/threads/split/batch_size`` say what ran.
        device: ``auto``, ``cpu`` or ``cuda``.
        normalize: store L2-normalised vectors (default: raw pooled features, which keeps the
            ImageNet head usable; search normalises on its own).
        commit_every: rows per committed part; a kill loses at most this many rows of work.
        max_pixels: images declaring more pixels are refused as decompression bombs.
        on_progress: called as ``on_progress(done, total)`` after every chunk of files
            (the CLI passes its progress bar; the library draws nothing).
        runtime: ``torch``, ``onnx`` (ONNX Runtime, CPU) or ``auto`` (ONNX Runtime on CPU
            when installed and its export matches torch, else torch). Vectors of either
            runtime are interchangeable within one store.
        threads: model threads (default: measured with ``workers`` as above; usable cores -
            decode workers, at least 1, when ``workers`` is given).
        engine: who decodes and runs the model: ``local`` (default: decode workers and the
            model on this machine), ``ray`` (Ray Data: decode tasks and model actors on a
            cluster; needs ``embedkit[ray]``), or an ``Engine`` object.
        address: Ray cluster address for ``engine="ray"`` (default: start or join a local one).
        started: ``time.time()`` at which the wait began (the CLI passes its process start);
            ``ExtractSummary.wall_s`` counts from there. Default: when this call began.
        verbose: ``engine="ray"``: show Ray's INFO/warning lines (default: to a log file).

    The model is found in the verified ONNX cache without importing torch or timm when it can
    be (``embedder.cached_embedder``), else loaded; when there is nothing to embed in an
    existing store of the same model, it is not loaded at all.

    Returns:
        An ``ExtractSummary``.
    """
    if not sources:
        raise InvalidArgumentError(
            "no sources given; pass folders, image files or a .txt/.csv list"
        )
    if batch_size is not None and batch_size < 1:
        raise InvalidArgumentError(f"batch size must be >= 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise InvalidArgumentError(f"workers must be >= 0, got {workers}")
    if commit_every < 1:
        raise InvalidArgumentError(f"commit_every must be >= 1, got {commit_every}")
    if isinstance(engine, str) and engine not in ENGINES:
        raise InvalidArgumentError(f"unknown engine {engine!r}; use one of {'|'.join(ENGINES)}")
    if engine == "ray":
        from .ray import require_ray

        require_ray()  # before any work: a clear message when the extra is missing
    ref = resolve_model(model, weights, random_init)  # the name and file stores record
    model, weights = ref.name, ref.weights
    t0 = time.perf_counter()
    wall_from = started if started is not None else time.time()
    sources = [os.path.expanduser(os.fspath(src)) for src in sources]  # "~/Pictures" from Python
    store = os.path.expanduser(os.fspath(store))
    skipped: Counter[str] = Counter()
    found, scan_failures = find_images(sources, skipped=skipped)
    # Compared with stored roots and paths, so in their stored form (``store.storable``).
    walked_roots = {storable(os.path.abspath(os.fspath(s))) for s in sources if os.path.isdir(s)}
    skipped_dirs = [
        storable(os.path.join(f.root, f.path))
        for f in scan_failures
        if f.reason in ("unreadable_dir", "symlink_loop")
    ]
    local = engine in (None, "local")
    request = _Request(
        model, weights, random_init, device, runtime if local else "torch", normalize
    )
    emb = cached_embedder(
        model, weights=weights, random_init=random_init, device=device, runtime=request.runtime
    )
    stored_md = None
    if emb is None:
        stored_md = _metadata_if_nothing_to_do(store, request, found, walked_roots, skipped_dirs)
    run = partial(
        _extract, found, scan_failures, walked_roots, skipped_dirs, store, request,
        batch_size=batch_size, workers=workers, threads=threads, normalize=normalize,
        commit_every=commit_every, max_pixels=max_pixels, on_progress=on_progress,
        engine=engine, address=address, verbose=verbose,
    )  # fmt: skip
    try:
        summary = run(emb, stored_md)
    except _NeedModel:  # files changed between the look without the model and the locked plan
        summary = run(None, None)
    summary.wall_s = time.time() - wall_from if started is not None else time.perf_counter() - t0
    summary.found, summary.skipped = len(found), skipped
    return summary


@dataclass(frozen=True)
class _Request:
    """The model ``extract`` was asked for."""

    model: str
    weights: str | os.PathLike[str] | None
    random_init: bool
    device: str
    runtime: str
    normalize: bool


class _NeedModel(Exception):
    """Raised inside the locked plan when work turned up for a run that loaded no model."""


def _metadata_if_nothing_to_do(
    store: str,
    request: _Request,
    found: list[FoundFile],
    walked_roots: set[str],
    skipped_dirs: list[str],
) -> dict[str, Any] | None:
    """The store's own metadata when it was made with the requested model and no file needs
    embedding (an unchanged rerun): then no model is loaded at all. None otherwise."""
    manifest = read_manifest(store)
    if manifest is None:
        return None
    md = manifest["metadata"]
    if (
        md.get("model") != request.model
        or bool(md.get("random_init")) != request.random_init
        or bool(md.get("normalize")) != request.normalize
    ):
        return None  # maybe a mismatch: the model is loaded and the writer says what differs
    source = str(md.get("weights_source", ""))
    if request.weights is not None:
        if source != f"file:{os.path.abspath(os.fspath(request.weights))}":
            return None
    elif not request.random_init and source.startswith("file:"):
        return None  # made with a file, asked for the default source: let the model decide
    committed = live_rows(_read_parts(Path(store), manifest, False))
    plan = plan_run(found, walked_roots, skipped_dirs, committed)
    return dict(md) if not plan.todo else None


def _load(request: _Request) -> Embedder:
    """Load the torch backbone (and check or export its ONNX graph later, in make_forward)."""
    from ..models.backbone import load_backbone

    backbone = load_backbone(
        request.model,
        weights=request.weights,
        random_init=request.random_init,
        device=request.device,
    )
    return Embedder.from_backbone(backbone)


def _extract(
    found: list[FoundFile],
    scan_failures: list[Any],
    walked_roots: set[str],
    skipped_dirs: list[str],
    store: str,
    request: _Request,
    emb: Embedder | None,
    stored_md: dict[str, Any] | None,
    *,
    batch_size: int | None,
    workers: int | None,
    threads: int | None,
    normalize: bool,
    commit_every: int,
    max_pixels: int,
    on_progress: Callable[[int, int], None] | None,
    engine: Engine | str | None,
    address: str | None,
    verbose: bool = False,
) -> ExtractSummary:
    summary = ExtractSummary(store=os.fspath(store))
    local = engine in (None, "local")
    if stored_md is not None:
        metadata = stored_md
        with StoreWriter(store, metadata) as writer:
            # Nothing to embed was expected: planning needs no vectors (the fast path).
            committed = writer.committed_rows(vectors=False)
            plan = plan_run(found, walked_roots, skipped_dirs, committed)
            if plan.todo:
                raise _NeedModel
            summary.unchanged = plan.unchanged
            record_deleted_and_failed(writer, plan, scan_failures, summary)
            writer.commit()
            summary.rows = count_ok(writer)
        return summary
    if emb is None:
        emb = _load(request)
    # Balanced runs start decode-heavy (a worker per core, one model thread: the split that
    # wins when decoding is the bottleneck, and costs nothing when it is not, because idle
    # workers wait on a full window) and re-choose after the first batches.
    balance = local and workers is None and threads is None and emb.device_type == "cpu"
    if workers is not None:
        nworkers = workers
    else:
        nworkers = usable_cores() if balance else default_workers()
    if engine == "ray":
        from .ray import RayEngine

        # The driver keeps its backbone for the store metadata and head; actors load their own.
        engine = RayEngine(
            request.model,
            weights=None if request.weights is None else os.fspath(request.weights),
            random_init=request.random_init,
            batch_size=batch_size,
            address=address,
            max_pixels=max_pixels,
            preprocess=emb.preprocess,
            weights_sha256=emb.weights_sha256,
            verbose=verbose,
        )
    thread_plan = plan_threads(nworkers, threads)
    if emb.backbone is not None:
        from ..models.runtime import make_forward

        forward: Any = make_forward(emb.backbone, request.runtime, thread_plan.intra_op)
    else:  # from the ONNX cache: already checked against torch when it was recorded
        forward = emb.runner
        forward.set_threads(thread_plan.intra_op)
    if batch_size:
        bs = batch_size
    elif emb.device_type == "cuda" and local:
        bs = probe_cuda_batch_size(forward.forward, emb.preprocess.size)
    else:
        bs = default_batch_size(emb.device_type, forward.runtime, forward.threads)
    metadata = {
        **store_metadata(emb, normalize),
        **forward.metadata(),
        "runtimes": [forward.runtime],
    }

    with StoreWriter(store, metadata) as writer:
        if emb.head is not None:
            writer.save_head(*emb.head)
        # Planning reads no vectors: a run that adds photos to a large store reuses none, and
        # reading them all cost ~5 GB of reads and RAM per million 1280-d rows.
        committed = writer.committed_rows(vectors=False)
        plan = plan_run(found, walked_roots, skipped_dirs, committed)
        summary.unchanged = plan.unchanged
        # Content hashes already stored, for renamed, copied or touched files; their vectors
        # are read on the first reuse (StoredVectors).
        ok = committed.filter(pc.equal(committed["status"], STATUS_OK))
        known = {h: n for n, h in enumerate(ok["content_hash"].to_pylist()) if h}

        record_deleted_and_failed(writer, plan, scan_failures, summary)

        known_meta = {c: ok[c].to_pylist() for c in ("width", "height", "n_frames")}
        stored = StoredVectors(writer, committed)
        rows = Rows(writer, normalize, commit_every, summary, stored, known, known_meta)
        rows.prints = PrintSink(store, emb.preprocess.draft_size)
        # Byte-identical files of this run have the same size: only files whose size occurs
        # more than once can be copies, and only their vectors are kept for reuse.
        sizes = Counter(st.st_size for _, st in plan.todo)
        rows.copy_sizes = {size for size, count in sizes.items() if count > 1}
        tasks = [(n, f.abspath) for n, (f, _) in enumerate(plan.todo)]
        runner: Engine
        if local:
            runner = LocalEngine(
                forward,
                bs,
                nworkers,
                max_pixels,
                balance_cores=thread_plan.cores if balance else None,
                batch_for_threads=(
                    None
                    if batch_size
                    else partial(default_batch_size, emb.device_type, forward.runtime)
                ),
            )
        else:
            assert engine is not None and not isinstance(engine, str)  # "ray" became RayEngine
            runner = engine
        t_embed = time.perf_counter()
        try:
            done = 0
            chunks = runner.run(tasks, frozenset(known))
            try:
                for chunk in chunks:
                    rows.take(chunk, [plan.todo[k] for k in chunk.keys])
                    done += len(chunk.keys)
                    if on_progress is not None:
                        on_progress(done, len(tasks))
            finally:
                # On Ctrl-C or SIGTERM, stop the engine's workers now: a suspended generator
                # is only closed when collected, and the traceback keeps it alive.
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        finally:
            # Also on Ctrl-C and SIGTERM: what was embedded is committed, so the rerun skips it.
            writer.commit()
            rows.flush_prints()
            summary.embed_s = time.perf_counter() - t_embed
            if isinstance(runner, LocalEngine):
                summary.workers, summary.threads = runner.workers, forward.threads
                summary.split = (
                    "measured" if runner.balanced else "initial" if balance else thread_plan.source
                )
                summary.batch_size = runner.batch_size
        summary.rows = count_ok(writer)
        merge_segments(Path(store), rows.prints.key, partial(_live_hashes, writer))
    return summary


def _live_hashes(writer: StoreWriter) -> list[str | None]:
    live = writer.committed_rows(vectors=False)
    return live.filter(pc.equal(live["status"], STATUS_OK))["content_hash"].to_pylist()
