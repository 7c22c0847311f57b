"""Turning an engine's chunks into store rows: vectors, reuses (renamed, copied or touched
files, and byte-identical copies within the run), failures, tombstones; commits every
``commit_every`` rows."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import StoreError
from ..images.sources import FoundFile
from ..store.pixels import PrintSink
from ..store.read import (
    PART_COLUMN,
    ROW_COLUMN,
    STATUS_DELETED,
    STATUS_FAILED,
    STATUS_OK,
    l2_normalize,
    row_id,
)
from ..store.writer import StoreWriter
from .local import Chunk
from .plan import Plan
from .pool import Decoded
from .summary import ExtractSummary


def record_deleted_and_failed(
    writer: StoreWriter, plan: Plan, scan_failures: list[Any], summary: ExtractSummary
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


def count_ok(writer: StoreWriter) -> int:
    live = writer.committed_rows(vectors=False)  # a count: the vectors are not needed
    live = live.filter(pc.not_equal(live["status"], STATUS_DELETED))
    return int(pc.sum(pc.equal(live["status"], STATUS_OK)).as_py() or 0)


class StoredVectors:
    """The committed vector of a content hash known when the run was planned, read from its
    part file on first use: a run that reuses nothing (photos added to a large store) reads
    no stored vector.

    Args:
        writer: the run's writer; its compactions keep superseded parts until it closes, so a
            row planned from stays readable (a renamed file's old row is tombstoned and may be
            compacted away before the new path asks for its vector).
        committed: ``writer.committed_rows(vectors=False)`` at planning time (it carries each
            row's part and row number).
    """

    def __init__(self, writer: StoreWriter, committed: pa.Table) -> None:
        writer.keep_superseded_parts = True
        ok = committed.filter(pc.equal(committed["status"], STATUS_OK))
        self._path, self._dim = writer.path, writer.dim
        self._files = [p["file"] for p in (writer.manifest or {}).get("parts", [])]
        self._where: dict[str, tuple[int, int]] = {}
        if ok.num_rows:  # (a new store's empty table has no part/row columns)
            part, row = ok[PART_COLUMN].to_numpy(), ok[ROW_COLUMN].to_numpy()
            for n, h in enumerate(ok["content_hash"].to_pylist()):
                if h:
                    self._where[h] = (int(part[n]), int(row[n]))
        self._columns: dict[int, pa.ChunkedArray] = {}

    @property
    def parts_read(self) -> int:
        """How many part files were read for their vectors (0 when nothing was reused)."""
        return len(self._columns)

    def get(self, content_hash: str) -> np.ndarray:
        """(1, D) float32: the stored vector of ``content_hash``."""
        part, row = self._where[content_hash]
        if part not in self._columns:
            file = self._path / self._files[part]
            try:
                self._columns[part] = pq.read_table(file, columns=["embedding"])["embedding"]
            except (OSError, pa.ArrowException) as exc:
                raise StoreError(f"cannot read part {file}: {exc}; the store is damaged") from None
        flat = self._columns[part].take(pa.array([row])).combine_chunks().flatten()
        return flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(1, self._dim)


class Rows:
    """Turns engine chunks into store rows, and commits every ``commit_every`` rows."""

    def __init__(
        self,
        writer: StoreWriter,
        normalize: bool,
        commit_every: int,
        summary: ExtractSummary,
        stored: StoredVectors,
        known: dict[str, int],
        known_meta: dict[str, list[Any]],
    ) -> None:
        self.writer, self.normalize = writer, normalize
        self.commit_every, self.summary = commit_every, summary
        self.stored, self.known, self.known_meta = stored, known, known_meta
        # Files of this run that may have byte-identical copies in it (their size is shared),
        # and the stored vectors of those embedded so far, by content hash.
        self.copy_sizes: set[int] = set()
        self.run_vectors: dict[str, np.ndarray] = {}
        # Pixel fingerprints of the decoded files, written as a segment at each commit.
        self.prints: PrintSink | None = None

    def take(self, chunk: Chunk, files: list[tuple[FoundFile, os.stat_result]]) -> None:
        ok = [i for i, r in enumerate(chunk.results) if r.status == "ok"]
        if ok:
            assert chunk.vectors is not None and len(chunk.vectors) == len(ok)
            vectors = l2_normalize(chunk.vectors) if self.normalize else chunk.vectors
            self._add([files[i] for i in ok], [chunk.results[i] for i in ok], STATUS_OK, vectors)
            self.summary.embedded += len(ok)
            if self.prints is not None:
                for i in ok:
                    self.prints.add(chunk.results[i].content_hash, chunk.results[i].views)
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
                    vector = self.stored.get(r.content_hash)
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
            self.flush_prints()

    def flush_prints(self) -> None:
        if self.prints is not None:
            self.prints.flush()

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
