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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .._version import __version__
from ..defaults import DEFAULT_COMMIT_EVERY, DEFAULT_MODEL
from ..errors import InvalidArgumentError
from ..images.decode import DEFAULT_MAX_PIXELS
from ..images.sources import SKIP_KINDS, FoundFile, find_images
from ..models.embedder import Embedder, cached_embedder
from ..store.read import (
    STATUS_DELETED,
    STATUS_FAILED,
    STATUS_OK,
    _read_parts,
    l2_normalize,
    live_rows,
    read_manifest,
    row_id,
    storable,
    vectors_of,
)
from ..store.writer import StoreWriter
from .cores import (
    default_batch_size,
    default_workers,
    plan_threads,
    probe_cuda_batch_size,
    usable_cores,
)
from .local import Chunk, Engine, LocalEngine
from .pool import Decoded

# Failures worth retrying on a rerun even when the file did not change: they depend on the
# environment (permissions, a crashing worker, a file that vanished mid-run), not the bytes.
ENGINES = ("local", "ray")

TRANSIENT_REASONS = frozenset({"permission_denied", "decode_crash", "not_found"})


@dataclass
class ExtractSummary:
    """What one ``extract`` run did."""

    store: str
    embedded: int = 0
    reused: int = 0  # vectors copied from a file with the same content (rename, copy, touch)
    unchanged: int = 0
    deleted: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    rows: int = 0  # live embedded rows in the store after the run
    # The whole run, model loading included; from process start when ``started`` is given
    # (the CLI passes its own start, so that imports count too: the time the user waited).
    wall_s: float = 0.0
    embed_s: float = 0.0  # decoding + forward + commits only
    # How the cores were split (local engine): decode workers, model threads, and whether the
    # split came from this run's timings ("measured"), was the starting split of a run too short
    # to measure ("initial"), the static policy ("policy": --workers given) or --threads.
    workers: int | None = None
    threads: int | None = None
    split: str | None = None
    batch_size: int | None = None
    # What the sources held: image files found, and files of walked folders not taken, by
    # kind (``images.sources.skip_kind``: hidden, raw, heic, avif, other).
    found: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def warnings(self) -> list[str]:
        """Lines worth a user's attention: the sources held no image to take."""
        if self.found or self.n_failed:
            return []
        if not self.skipped:
            return ["no image files found: the sources hold no files"]
        kinds = ", ".join(
            f"{n} {SKIP_KINDS[k]}" for k, n in sorted(self.skipped.items(), key=lambda kv: -kv[1])
        )
        total = sum(self.skipped.values())
        return [f"no image files found; skipped {total} file(s): {kinds}"]

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.embed_s if self.embed_s > 0 else 0.0

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "embedded": self.embedded,
            "reused": self.reused,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "failed": dict(self.failed),
            "rows": self.rows,
            "wall_s": round(self.wall_s, 3),
            "embed_s": round(self.embed_s, 3),
            "images_per_s": round(self.images_per_s, 2),
            "workers": self.workers,
            "threads": self.threads,
            "split": self.split,
            "batch_size": self.batch_size,
            "found": self.found,
            "skipped": dict(self.skipped),
        }


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


@dataclass
class _Plan:
    todo: list[tuple[FoundFile, os.stat_result]]
    unchanged: int
    deleted_ids: list[int]
    deleted_keys: list[tuple[str, str]]
    failed_stat: list[tuple[FoundFile, str, str]]


def _plan(
    found: list[FoundFile], walked_roots: set[str], skipped_dirs: list[str], committed: pa.Table
) -> _Plan:
    existing: dict[int, tuple[int | None, int | None, str, str | None]] = {}
    if committed.num_rows:
        for i, s, m, st, r in zip(
            committed["id"].to_pylist(),
            committed["size"].to_pylist(),
            committed["mtime_ns"].to_pylist(),
            committed["status"].to_pylist(),
            committed["reason"].to_pylist(),
            strict=True,
        ):
            existing[i] = (s, m, st, r)
    todo: list[tuple[FoundFile, os.stat_result]] = []
    failed_stat: list[tuple[FoundFile, str, str]] = []
    unchanged = 0
    seen: set[int] = set()
    for f in found:
        fid = row_id(f.root, f.path)
        seen.add(fid)
        try:
            st = os.stat(f.abspath)
        except PermissionError:
            failed_stat.append((f, "permission_denied", "cannot stat"))
            continue
        except OSError as exc:
            failed_stat.append((f, "not_found", str(exc.strerror)))
            continue
        old = existing.get(fid)
        if (
            old is not None
            and old[0] == st.st_size
            and old[1] == st.st_mtime_ns
            and not (old[2] == STATUS_FAILED and old[3] in TRANSIENT_REASONS)
        ):
            unchanged += 1
            continue
        todo.append((f, st))
    deleted_ids, deleted_keys = [], []
    if committed.num_rows:
        for i, root, path in zip(
            committed["id"].to_pylist(),
            committed["root"].to_pylist(),
            committed["path"].to_pylist(),
            strict=True,
        ):
            if i in seen or root not in walked_roots:
                continue
            full = os.path.join(root, path)
            if any(full.startswith(d + os.sep) for d in skipped_dirs):
                continue  # under a folder we could not read this time: keep it
            deleted_ids.append(i)
            deleted_keys.append((root, path))
    return _Plan(todo, unchanged, deleted_ids, deleted_keys, failed_stat)


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
) -> ExtractSummary:
    """Embed every image under ``sources`` into the store at ``store``, incrementally.

    Args:
        sources: folders (recursive), image files, or .txt/.csv lists of paths.
        store: the store directory (created if missing).
        model: a preset or any timm model name.
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
    try:
        summary = _extract(
            found, scan_failures, walked_roots, skipped_dirs, store, request, emb, stored_md,
            batch_size=batch_size, workers=workers, threads=threads, normalize=normalize,
            commit_every=commit_every, max_pixels=max_pixels, on_progress=on_progress,
            engine=engine, address=address,
        )  # fmt: skip
    except _NeedModel:  # files changed between the look without the model and the locked plan
        summary = _extract(
            found, scan_failures, walked_roots, skipped_dirs, store, request, None, None,
            batch_size=batch_size, workers=workers, threads=threads, normalize=normalize,
            commit_every=commit_every, max_pixels=max_pixels, on_progress=on_progress,
            engine=engine, address=address,
        )  # fmt: skip
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
    plan = _plan(found, walked_roots, skipped_dirs, committed)
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
) -> ExtractSummary:
    summary = ExtractSummary(store=os.fspath(store))
    local = engine in (None, "local")
    if stored_md is not None:
        metadata = stored_md
        with StoreWriter(store, metadata) as writer:
            committed = writer.committed_rows()
            plan = _plan(found, walked_roots, skipped_dirs, committed)
            if plan.todo:
                raise _NeedModel
            summary.unchanged = plan.unchanged
            _record_deleted_and_failed(writer, plan, scan_failures, summary)
            writer.commit()
            summary.rows = _count_ok(writer)
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
        committed = writer.committed_rows()
        plan = _plan(found, walked_roots, skipped_dirs, committed)
        summary.unchanged = plan.unchanged
        # Vectors by content hash, for renamed, copied or touched files.
        ok = committed.filter(pc.equal(committed["status"], STATUS_OK))
        known_vectors = vectors_of(ok, emb.dim)
        known = {h: n for n, h in enumerate(ok["content_hash"].to_pylist()) if h}

        _record_deleted_and_failed(writer, plan, scan_failures, summary)

        known_meta = {c: ok[c].to_pylist() for c in ("width", "height", "n_frames")}
        rows = _Rows(writer, normalize, commit_every, summary, known_vectors, known, known_meta)
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
            summary.embed_s = time.perf_counter() - t_embed
            if isinstance(runner, LocalEngine):
                summary.workers, summary.threads = runner.workers, forward.threads
                summary.split = (
                    "measured" if runner.balanced else "initial" if balance else thread_plan.source
                )
                summary.batch_size = runner.batch_size
        summary.rows = _count_ok(writer)
    return summary


def _record_deleted_and_failed(
    writer: StoreWriter, plan: _Plan, scan_failures: list[Any], summary: ExtractSummary
) -> None:
    """Tombstones for deleted files and rows for files that failed before decoding."""
    if plan.deleted_ids:
        writer.add(
            ids=plan.deleted_ids,
            roots=[k[0] for k in plan.deleted_keys],
            paths=[k[1] for k in plan.deleted_keys],
            status=[STATUS_DELETED] * len(plan.deleted_ids),
        )
        summary.deleted = len(plan.deleted_ids)
    failures = [(f.root, f.path, f.reason, f.detail) for f in scan_failures]
    failures += [(f.root, f.path, r, d) for f, r, d in plan.failed_stat]
    if failures:
        writer.add(
            ids=[row_id(r, p) for r, p, _, _ in failures],
            roots=[x[0] for x in failures],
            paths=[x[1] for x in failures],
            status=[STATUS_FAILED] * len(failures),
            reason=[x[2] for x in failures],
            detail=[x[3] for x in failures],
        )
        summary.failed.update(x[2] for x in failures)


def _count_ok(writer: StoreWriter) -> int:
    live = writer.committed_rows()
    live = live.filter(pc.not_equal(live["status"], STATUS_DELETED))
    return int(pc.sum(pc.equal(live["status"], STATUS_OK)).as_py() or 0)


class _Rows:
    """Turns engine chunks into store rows, and commits every ``commit_every`` rows."""

    def __init__(
        self,
        writer: StoreWriter,
        normalize: bool,
        commit_every: int,
        summary: ExtractSummary,
        known_vectors: np.ndarray,
        known: dict[str, int],
        known_meta: dict[str, list[Any]],
    ) -> None:
        self.writer, self.normalize = writer, normalize
        self.commit_every, self.summary = commit_every, summary
        self.known_vectors, self.known, self.known_meta = known_vectors, known, known_meta
        # Files of this run that may have byte-identical copies in it (their size is shared),
        # and the stored vectors of those embedded so far, by content hash.
        self.copy_sizes: set[int] = set()
        self.run_vectors: dict[str, np.ndarray] = {}

    def take(self, chunk: Chunk, files: list[tuple[FoundFile, os.stat_result]]) -> None:
        ok = [i for i, r in enumerate(chunk.results) if r.status == "ok"]
        if ok:
            assert chunk.vectors is not None and len(chunk.vectors) == len(ok)
            vectors = l2_normalize(chunk.vectors) if self.normalize else chunk.vectors
            self._add([files[i] for i in ok], [chunk.results[i] for i in ok], STATUS_OK, vectors)
            self.summary.embedded += len(ok)
            for n, i in enumerate(ok):
                digest = chunk.results[i].content_hash
                if files[i][1].st_size in self.copy_sizes and digest is not None:
                    self.run_vectors.setdefault(digest, vectors[n : n + 1].copy())
        for i, r in enumerate(chunk.results):
            if r.status == "reuse":
                assert r.content_hash is not None
                if r.content_hash in self.known:  # stored before this run
                    src = self.known[r.content_hash]
                    w, h, nf = (self.known_meta[c][src] for c in ("width", "height", "n_frames"))
                    vector = self.known_vectors[src : src + 1]
                else:  # a copy of a file embedded earlier in this run (the engine said so)
                    w, h, nf = r.width, r.height, r.n_frames
                    vector = self.run_vectors[r.content_hash]
                self._add(
                    [files[i]],
                    [Decoded("ok", r.content_hash, None, w, h, nf, detail=r.detail)],
                    STATUS_OK,
                    vector,
                )
                self.summary.reused += 1
            elif r.status == "failed":
                self._add([files[i]], [r], STATUS_FAILED, None)
                self.summary.failed[r.reason or "decode_error"] += 1
        if self.writer.pending >= self.commit_every:
            self.writer.commit()

    def _add(
        self,
        files: list[tuple[FoundFile, os.stat_result]],
        results: list[Decoded],
        status: str,
        vectors: np.ndarray | None,
    ) -> None:
        self.writer.add(
            ids=[row_id(f.root, f.path) for f, _ in files],
            roots=[f.root for f, _ in files],
            paths=[f.path for f, _ in files],
            content_hash=[r.content_hash for r in results],
            size=[st.st_size for _, st in files],
            mtime_ns=[st.st_mtime_ns for _, st in files],
            width=[r.width for r in results],
            height=[r.height for r in results],
            n_frames=[r.n_frames for r in results],
            status=[status] * len(files),
            reason=[r.reason for r in results],
            detail=[r.detail for r in results],
            embedding=vectors,
        )
