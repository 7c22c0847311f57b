"""``RayEngine``: the extraction engine on a Ray cluster, built on Ray Data.

The driver (the process running ``extract``) keeps the plan, the store and its manifest; Ray
only turns ``(key, path)`` tasks into decoded results and vectors:

1. the task list becomes a dataset of blocks (``files_per_block`` files each);
2. decoding + resize/crop runs as stateless CPU map tasks (``decode.decode_file``, the very
   function the local engine's workers run), pixels travel as uint8 bytes;
3. the model runs in an actor pool (``map_batches(Embedder, concurrency=N)``): one backbone load
   per actor, one GPU per actor when the cluster has GPUs, CPU actors otherwise;
4. results stream back to the driver (``iter_batches``) as ``Chunk``s, which ``extract`` commits
   through the same ``StoreWriter``, so the store is the local engine's format by construction.

Byte-identical files of one run are embedded once, as locally (``copies``): the decode tasks
claim each content hash from one ``Claims`` actor, a copy leaves decoding as a "reuse" result
without pixels, and the driver yields it after the chunk that carries its original's vector.

Failures: a bad file is a ``failed`` row with its reason, as locally (``decode_file`` never
raises). A worker or actor that dies is retried by Ray (Ray Data restarts pool actors and
retries their tasks; tasks are retried on system failures). A block that still fails is
dropped for that pass; its files are retried one per block, and a file that fails again is
recorded as ``decode_crash`` (a transient reason: the next run retries it). The driver yields
each key at most once, so nothing is duplicated; a killed driver loses only uncommitted rows
and the rerun's plan skips what was committed.

Ray is optional: it is imported only inside this module's functions, and ``require_ray``
raises an ``InvalidArgumentError`` saying how to install it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import InvalidArgumentError, WeightsMismatchError
from ..images.decode import DEFAULT_MAX_PIXELS
from ..models.preprocess import Preprocess
from . import pool as decode
from .copies import Claims, RunCopies, as_copy
from .pool import Chunk, Decoded
from .ray_cluster import connect, default_log_file, quiet, say
from .ray_fit import PoolPlan, alive_nodes, check_readable, fit, plan_pool
from .ray_fit import resource_wait_s as _resource_wait_s
from .ray_watch import describe_free, no_auto_init, stall_s, watched

# Files per block: big enough to amortise a task's scheduling (~ms) against its decoding
# (~10-400 ms per file), small enough that a retried block redoes little work and that even a
# few thousand files spread over every worker.
DEFAULT_FILES_PER_BLOCK = 64
# Forward batch per actor when the caller does not say (same defaults as the local engine).
CPU_BATCH, GPU_BATCH = 16, 64
# Retries of a decode task / model batch whose worker died (OOM killer, a codec segfault).
DECODE_RETRIES = 2

_RESULT_SCHEMA = pa.schema(
    [
        ("key", pa.int64()),
        ("status", pa.string()),
        ("content_hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_frames", pa.int32()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("pixels", pa.binary()),  # uint8 (H, W, 3) bytes when ok, empty otherwise
    ]
)


def require_ray() -> Any:
    """Import Ray, or raise an ``InvalidArgumentError`` that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs Ray Data, not only Ray core
    except ImportError:
        raise InvalidArgumentError(
            "the ray engine needs Ray Data; install it with `pip install 'embedkit[ray]'` "
            "or use --engine local"
        ) from None
    return ray


def _on_driver_node(ray: Any) -> dict[str, Any]:
    """Actor options that place it on the driver's node: a worker node killed mid-run must not
    take the run's claims with it (the run goes on without that node; without the driver's
    node it is over anyway). Soft when the driver's node is unknown (a Ray client)."""
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
    except Exception:
        return {}


def _decode_block(
    batch: pa.Table,
    preprocess: Preprocess,
    max_pixels: int,
    known: frozenset[str],
    claims: Any = None,
) -> pa.Table:
    """Ray map task: decode every file of a block (never raises for a bad file).

    With ``claims`` (a ``copies.Claims`` actor), a file whose content hash another file of the
    run claimed first becomes a "reuse" result without pixels: the model never sees it.
    """
    # decode_file skips files whose content hash is already stored ("reuse").
    decode._KNOWN_HASHES = known
    keys = batch["key"].to_pylist()
    # Ray's result rows carry no fingerprints: duplicates decodes the files instead.
    paths = batch["path"].to_pylist()
    results = [decode.decode_file(p, preprocess, max_pixels, pixelprint=False) for p in paths]
    ok = [(i, r.content_hash) for i, r in enumerate(results) if r.status == "ok" and r.content_hash]
    if claims is not None and ok:
        import ray

        try:
            owners = ray.get(claims.claim.remote([(keys[i], digest) for i, digest in ok]))
        except Exception:  # the claims actor is gone (its node died): embed every file here
            owners = [keys[i] for i, _ in ok]
        for (i, _), owner in zip(ok, owners, strict=True):
            if owner != keys[i]:
                results[i] = as_copy(results[i])
    cols: dict[str, list[Any]] = {name: [] for name in _RESULT_SCHEMA.names}
    for key, r in zip(keys, results, strict=True):
        cols["key"].append(key)
        for name in ("status", "content_hash", "width", "height", "n_frames", "reason", "detail"):
            cols[name].append(getattr(r, name))
        cols["pixels"].append(r.pixels.tobytes() if r.pixels is not None else b"")
    return pa.Table.from_pydict(cols, schema=_RESULT_SCHEMA)


class Embedder:
    """Ray actor: loads the backbone once, embeds the ``ok`` rows of each batch it is given."""

    def __init__(
        self,
        model: str,
        weights: str | None,
        random_init: bool,
        seed: int,
        weights_sha256: str | None,
        device: str,
    ) -> None:
        from ..models.backbone import load_backbone

        self.backbone = load_backbone(
            model, weights=weights, random_init=random_init, device=device, seed=seed
        )
        if weights_sha256 is not None and self.backbone.weights_sha256 != weights_sha256:
            # A node with a different weights file would silently write other vectors.
            raise WeightsMismatchError(
                f"a Ray worker loaded {model} weights with sha256 {self.backbone.weights_sha256}, "
                f"the driver {weights_sha256}; give every node the same weights file"
            )
        self.h, self.w = self.backbone.preprocess.size

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        status = batch["status"].to_pylist()
        ok = [i for i, s in enumerate(status) if s == "ok"]
        dim = self.backbone.dim
        emb: list[bytes] = [b""] * len(status)
        if ok:
            raw = batch["pixels"].to_pylist()
            pixels = np.stack(
                [np.frombuffer(raw[i], np.uint8).reshape(self.h, self.w, 3) for i in ok]
            )
            vectors = self.backbone.forward(torch.from_numpy(pixels))
            assert vectors.shape == (len(ok), dim)
            for row, i in enumerate(ok):
                emb[i] = vectors[row].tobytes()
        return batch.drop_columns(["pixels"]).append_column("embedding", pa.array(emb, pa.binary()))


class RayEngine:
    """Decode tasks + an actor pool of models on a Ray cluster (``Engine`` protocol).

    Args:
        model: a preset or timm model name (loaded once per actor).
        weights: a weights file; it must exist at this path on every node.
        random_init: seeded random weights (tests, smoke runs).
        batch_size: images per forward pass (default 64 per GPU actor, 16 per CPU actor).
        address: the Ray cluster (``ray://host:10001`` or ``host:6379``); None connects to
            ``RAY_ADDRESS`` or starts a local Ray. A Ray already initialised here is reused.
        max_pixels: images declaring more pixels are refused as decompression bombs.
        preprocess: the driver backbone's preprocessing (default: load the model here once).
        weights_sha256: the driver backbone's weights digest; actors refuse other weights.
        seed: random-init seed (must match the driver's backbone).
        concurrency: model actors (default: one per GPU, else one per two CPUs).
        files_per_block: files per Ray Data block.
        actor_cpus: CPUs (= torch threads) per CPU actor; one node must have them.
        verbose: let Ray's INFO/warning lines reach the terminal (default: they go to
            ``log_file``).
        log_file: where Ray's log lines go when not verbose (default: ``/tmp/ray/
            embedkit-extract-<pid>.log``).
        resource_wait_s: seconds to wait for nodes that fit the work (an autoscaler adding
            them), with a "waiting for resources" line; default ``EMBEDKIT_RAY_RESOURCE_WAIT_S``
            or 0 (fail at once, naming what was needed and what the nodes have).
        check_locality: before any work, every node opens a sample of the images.
        stall_limit_s: seconds without any result before the run stops with an error (default
            ``EMBEDKIT_RAY_STALL_S`` or 600); a "waiting for results" line every 30 s before.
    """

    def __init__(
        self,
        model: str,
        weights: str | os.PathLike[str] | None = None,
        random_init: bool = False,
        batch_size: int | None = None,
        address: str | None = None,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        preprocess: Preprocess | None = None,
        weights_sha256: str | None = None,
        seed: int = 0,
        concurrency: int | None = None,
        files_per_block: int = DEFAULT_FILES_PER_BLOCK,
        actor_cpus: int = 1,
        verbose: bool = False,
        log_file: str | os.PathLike[str] | None = None,
        resource_wait_s: float | None = None,
        check_locality: bool = True,
        stall_limit_s: float | None = None,
    ) -> None:
        require_ray()
        for name, value in (("batch_size", batch_size), ("concurrency", concurrency)):
            if value is not None and value < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {value}")
        if files_per_block < 1 or actor_cpus < 1:
            raise InvalidArgumentError("files_per_block and actor_cpus must be >= 1")
        self.model, self.random_init, self.seed = model, random_init, seed
        self.weights = os.path.abspath(os.fspath(weights)) if weights is not None else None
        self.batch_size, self.address, self.max_pixels = batch_size, address, max_pixels
        self.preprocess, self.weights_sha256 = preprocess, weights_sha256
        self.concurrency, self.files_per_block = concurrency, files_per_block
        self.actor_cpus = actor_cpus
        self.verbose = verbose
        self.log_file = os.fspath(log_file) if log_file is not None else None
        self.resource_wait_s = _resource_wait_s(resource_wait_s)
        self.check_locality = check_locality
        self.stall_limit_s = stall_s(stall_limit_s)

    def run(
        self, tasks: Sequence[tuple[int, str]], known_hashes: frozenset[str]
    ) -> Iterator[Chunk]:
        """Yield chunks covering every task exactly once."""
        if not tasks:
            return
        ray = require_ray()
        log_file = self.log_file or default_log_file()
        with quiet(self.verbose, log_file):
            conn = connect(ray, self.address, verbose=self.verbose, log_file=log_file)
            try:
                yield from self._run(ray, tasks, known_hashes)
            finally:
                if conn.started:
                    ray.shutdown()

    def _run(
        self, ray: Any, tasks: Sequence[tuple[int, str]], known_hashes: frozenset[str]
    ) -> Iterator[Chunk]:
        pool = self._fit(ray)
        if self.check_locality:
            check_readable(ray, [p for _, p in tasks], alive_nodes(ray))
        preprocess = self.preprocess or self._driver_preprocess()
        seen: set[int] = set()
        copies = RunCopies()
        # One claims actor per run (no CPU: it only answers dict look-ups), so that each content
        # hash is embedded once even when its copies are decoded on different nodes.
        claims = ray.remote(num_cpus=0)(Claims).options(**_on_driver_node(ray)).remote()
        run = partial(
            self._pass,
            ray,
            known=known_hashes,
            preprocess=preprocess,
            seen=seen,
            pool=pool,
            copies=copies,
        )
        try:
            yield from run(tasks, per_block=self.files_per_block, claims=claims)
            missing = [t for t in tasks if t[0] not in seen]
            if missing:  # blocks lost twice over: retry one file per block
                yield from run(missing, per_block=1, claims=claims)
        finally:
            with contextlib.suppress(Exception):
                ray.kill(claims)
        orphans = set(copies.orphans())
        if orphans:  # copies whose original failed after claiming its hash: embed them
            seen -= orphans
            yield from run([t for t in tasks if t[0] in orphans], per_block=1, claims=None)
        for key, _ in tasks:
            if key not in seen:
                seen.add(key)
                yield Chunk(
                    [key],
                    [
                        Decoded(
                            "failed",
                            None,
                            reason="decode_crash",
                            detail=(
                                "a Ray worker died or failed on this file twice; a rerun retries it"
                            ),
                        )
                    ],
                    None,
                )

    def _driver_preprocess(self) -> Preprocess:
        from ..models.backbone import load_backbone

        b = load_backbone(
            self.model,
            weights=self.weights,
            random_init=self.random_init,
            device="cpu",
            seed=self.seed,
        )
        self.weights_sha256 = self.weights_sha256 or b.weights_sha256
        return b.preprocess

    def _fit(self, ray: Any) -> PoolPlan:
        """The actor pool sized from the cluster's nodes (``ray_fit.plan_pool``)."""

        # Half the CPUs run models, the other half decode (the model is the slower stage on
        # CPU: ~18 img/s model-only vs ~7-40 img/s decode per core, benchmarks/RESULTS.md).
        def plan(nodes: Any) -> PoolPlan | str:
            return plan_pool(
                nodes,
                concurrency=self.concurrency,
                actor_cpus=self.actor_cpus,
                batch_size=self.batch_size,
                cpu_batch=CPU_BATCH,
                gpu_batch=GPU_BATCH,
            )

        return fit(ray, plan, self.resource_wait_s, say)

    def _pass(
        self,
        ray: Any,
        tasks: Sequence[tuple[int, str]],
        *,
        known: frozenset[str],
        preprocess: Preprocess,
        seen: set[int],
        per_block: int,
        pool: PoolPlan,
        copies: RunCopies,
        claims: Any,
    ) -> Iterator[Chunk]:
        actors, gpus, bs = pool.actors, pool.gpus_per_actor, pool.batch_size
        ctx = ray.data.DataContext.get_current()
        old_errors = ctx.max_errored_blocks
        # A block that keeps failing is dropped, not fatal: its files get the per-file pass.
        # (Set before the dataset is built: a dataset keeps a copy of the context.)
        ctx.max_errored_blocks = -1
        old_bars = ctx.enable_progress_bars
        ctx.enable_progress_bars = False  # extract draws its own bar
        table = pa.table({"key": [k for k, _ in tasks], "path": [p for _, p in tasks]})
        # One Arrow table per block.
        blocks = [table.slice(i, per_block) for i in range(0, len(tasks), per_block)]
        ds = ray.data.from_arrow(blocks)
        decoded = ds.map_batches(
            _decode_block,
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=1,
            fn_kwargs={
                "preprocess": preprocess,
                "max_pixels": self.max_pixels,
                "known": known,
                "claims": claims,
            },
            # Bounded retries on a dead worker, so a file that kills its decoder cannot loop
            # forever. Also keeps Ray Data from fusing decoding into the model actors (it fuses
            # maps whose remote args match), which would serialise decoding on the GPU hosts.
            max_retries=DECODE_RETRIES,
        )
        embedded = decoded.map_batches(
            Embedder,
            batch_format="pyarrow",
            batch_size=bs,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=pool.cpus_per_actor,
            # Ray Data restarts dead pool actors forever; a batch is retried at most this often.
            max_restarts=-1,
            max_task_retries=DECODE_RETRIES,
            fn_constructor_kwargs={
                "model": self.model,
                "weights": self.weights,
                "random_init": self.random_init,
                "seed": self.seed,
                "weights_sha256": self.weights_sha256,
                "device": "cuda" if gpus else "cpu",
            },
        )
        try:
            batches = embedded.iter_batches(batch_size=None, batch_format="pyarrow")
            for batch in watched(
                batches,
                self.stall_limit_s,
                lambda: describe_free(ray),
                say,
                on_abandon=lambda: no_auto_init(ray),
            ):
                # Copies marked on the cluster wait for the chunk with their original's vector.
                chunk = copies.hold_marked(_to_chunk(batch, seen), known)
                if chunk.keys:
                    yield chunk
                yield from copies.after(chunk)
        finally:
            with contextlib.suppress(Exception):
                ctx.max_errored_blocks = old_errors
                ctx.enable_progress_bars = old_bars


def _to_chunk(batch: pa.Table, seen: set[int]) -> Chunk:
    """Turn one result batch into a Chunk, dropping keys already yielded (a retried block)."""
    keys: list[int] = []
    results: list[Decoded] = []
    vectors: list[np.ndarray] = []
    cols = {name: batch[name].to_pylist() for name in batch.column_names}
    for i, key in enumerate(cols["key"]):
        if key in seen:
            continue
        seen.add(key)
        r = Decoded(
            cols["status"][i],
            cols["content_hash"][i],
            None,
            cols["width"][i],
            cols["height"][i],
            cols["n_frames"][i],
            cols["reason"][i],
            cols["detail"][i],
        )
        keys.append(key)
        results.append(r)
        if r.status == "ok":
            vectors.append(np.frombuffer(cols["embedding"][i], np.float32))
    return Chunk(keys, results, np.stack(vectors) if vectors else None)
