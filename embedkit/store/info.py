"""``info``: what a store holds and how it was made, as a plain dict."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from .read import MANIFEST, PARTS_DIR, STATUS_FAILED, open_store, read_manifest


def store_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a store: row counts, failures by reason, model and provenance.

    Keys: rows, failed, failed_by_reason, dim, model, weights_source, weights_sha256,
    random_init, finetune (None, or the fine-tune's dir, classes, base_model,
    base_weights_source, base_weights_sha256), normalize, preprocess, runtime, runtimes,
    precision, version, parts, bytes, created, updated, versions.
    """
    store = open_store(path, vectors=False)  # counts and metadata: no vectors needed
    md = store.metadata
    failed = store.table.filter(pc.equal(store.table["status"], STATUS_FAILED))
    manifest = read_manifest(path) or {}
    p = Path(path)
    size = sum(f.stat().st_size for f in (p / PARTS_DIR).glob("*.parquet"))
    size += (p / MANIFEST).stat().st_size
    return {
        "store": str(p),
        "rows": len(store),
        "failed": failed.num_rows,
        "failed_by_reason": dict(Counter(failed["reason"].to_pylist())),
        "dim": store.dim,
        "model": md.get("model"),
        "weights_source": md.get("weights_source"),
        "weights_sha256": md.get("weights_sha256"),
        "random_init": bool(md.get("random_init")),
        "finetune": md.get("finetune"),
        "normalize": bool(md.get("normalize")),
        "preprocess": md.get("preprocess"),
        "runtime": md.get("runtime"),
        "runtimes": md.get("runtimes") or [md.get("runtime")],
        "precision": md.get("precision"),  # of the last run: fp32, or bf16/fp16 autocast on CUDA
        "version": store.version,
        "parts": len(manifest.get("parts", [])),
        "bytes": size,
        "created": md.get("created"),
        "updated": md.get("updated"),
        "versions": {k: md.get(k) for k in ("embedkit_version", "torch_version", "timm_version")},
    }


def store_failures(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The store's failed files: ``{id, path (absolute), root, reason, detail, size}`` each,
    in commit order. What ``embedkit info --failed`` prints."""
    store = open_store(path, vectors=False)
    failed = store.table.filter(pc.equal(store.table["status"], STATUS_FAILED))
    cols = {c: failed[c].to_pylist() for c in ("id", "root", "path", "reason", "detail", "size")}
    return [
        {
            "id": cols["id"][i],
            "path": os.path.join(cols["root"][i], cols["path"][i]),
            "root": cols["root"][i],
            "reason": cols["reason"][i],
            "detail": cols["detail"][i],
            "size": cols["size"][i],
        }
        for i in range(failed.num_rows)
    ]
