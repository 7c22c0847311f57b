"""Byte-identical files within one run: the first file of each content hash is embedded, the
others reuse its vector (``reuse`` results, which ``rows.Rows`` stores with that vector).

Both engines go through this module. The local engine claims each hash as decoded files come
back from its workers (``RunCopies.is_copy``). The Ray engine claims them on the cluster, in
its decode tasks, through one ``Claims`` actor per run, so that a copy never reaches a model
actor; its driver then holds the copies the cluster marked (``RunCopies.hold_marked``). Either
way a copy's chunk is yielded only after the chunk that carries its original's vector, which
is the order ``Rows`` needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from .pool import Chunk, Decoded


class Claims:
    """The first claim of a content hash wins: it names the file embedded for that hash."""

    def __init__(self) -> None:
        self._first: dict[str, int] = {}

    def claim(self, pairs: Sequence[tuple[int, str]]) -> list[int]:
        """The key of the file embedded for each ``(key, content_hash)``: the key itself for the
        first file of a hash (also when that file claims again, e.g. a retried Ray task), else
        the first file's key (this file is a copy)."""
        return [self._first.setdefault(digest, key) for key, digest in pairs]


def as_copy(r: Decoded) -> Decoded:
    """A decoded copy of a file embedded in this run, as a "reuse" result (no pixels)."""
    return replace(r, status="reuse", pixels=None, seconds=0.0)


class RunCopies:
    """Holds the copies of a run until the chunk with their original's vector was yielded."""

    def __init__(self) -> None:
        self.claims = Claims()
        self._delivered: set[str] = set()  # hashes whose vector is in a yielded chunk
        self._held: list[tuple[int, Decoded]] = []

    def is_copy(self, key: int, r: Decoded) -> bool:
        """Claim the content hash of the ``ok`` result ``r`` for ``key``. True when the file is a
        copy of an earlier file of the run: it is then held, and must not be embedded."""
        if r.status != "ok" or r.content_hash is None:
            return False
        if self.claims.claim([(key, r.content_hash)])[0] == key:
            return False
        self._held.append((key, as_copy(r)))
        return True

    def hold_marked(self, chunk: Chunk, known: frozenset[str]) -> Chunk:
        """``chunk`` without the copies an earlier stage marked (``reuse`` results whose hash
        is not among the ``known`` stored ones); those are held."""
        keep = [
            i for i, r in enumerate(chunk.results) if r.status != "reuse" or r.content_hash in known
        ]
        if len(keep) == len(chunk.keys):
            return chunk
        kept = set(keep)
        self._held += [
            (k, r)
            for i, (k, r) in enumerate(zip(chunk.keys, chunk.results, strict=True))
            if i not in kept
        ]
        return Chunk([chunk.keys[i] for i in keep], [chunk.results[i] for i in keep], chunk.vectors)

    def after(self, chunk: Chunk) -> Iterator[Chunk]:
        """Call when ``chunk`` was yielded: yields one chunk of the held copies whose originals'
        vectors have now been yielded (``ready``)."""
        self._delivered.update(
            r.content_hash for r in chunk.results if r.status == "ok" and r.content_hash
        )
        return self.ready()

    def ready(self) -> Iterator[Chunk]:
        """Yields one chunk of the held copies whose originals' vectors were yielded."""
        ready = [(k, r) for k, r in self._held if r.content_hash in self._delivered]
        if ready:
            self._held = [(k, r) for k, r in self._held if r.content_hash not in self._delivered]
            yield Chunk([k for k, _ in ready], [r for _, r in ready], None)

    def orphans(self) -> list[int]:
        """Keys of the held copies whose original never delivered a vector (on a cluster, it
        can fail after claiming its hash: a model actor lost twice over); forgotten here, the
        engine must embed them itself."""
        keys = [k for k, _ in self._held]
        self._held = []
        return keys
