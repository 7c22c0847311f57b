"""What one ``extract`` run did: ``ExtractSummary``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..images.sources import SKIP_KINDS


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
