"""RunCopies: a copy is yielded only after the chunk with its original's vector."""

from __future__ import annotations

import numpy as np

from embedkit.extraction.copies import Claims, RunCopies
from embedkit.extraction.pool import Chunk, Decoded


def _ok(digest: str) -> Decoded:
    return Decoded("ok", digest, np.zeros((2, 2, 3), np.uint8), 2, 2, 1)


def test_claims_first_wins_and_a_retried_claim_keeps_it():
    c = Claims()
    assert c.claim([(1, "h"), (2, "h"), (3, "g")]) == [1, 1, 3]
    assert c.claim([(2, "h"), (1, "h")]) == [1, 1]  # a retried task claims again


def test_copy_marked_elsewhere_waits_for_its_original():
    copies = RunCopies()
    known = frozenset({"stored"})
    marked = Chunk(
        [5, 6, 7],
        [Decoded("reuse", "h", None, 2, 2, 1), Decoded("reuse", "stored"), _ok("g")],
        np.ones((1, 4), np.float32),
    )
    kept = copies.hold_marked(marked, known)
    assert kept.keys == [6, 7] and kept.vectors is not None and len(kept.vectors) == 1
    assert list(copies.after(kept)) == []  # the original of 5 has not come yet
    original = Chunk([1], [_ok("h")], np.ones((1, 4), np.float32))
    (released,) = copies.after(original)
    assert released.keys == [5] and released.results[0].status == "reuse"
    assert copies.orphans() == []


def test_copy_whose_original_never_comes_is_an_orphan():
    copies = RunCopies()
    assert not copies.is_copy(1, _ok("h"))
    assert copies.is_copy(2, _ok("h"))
    assert list(copies.after(Chunk([3], [_ok("g")], np.ones((1, 4), np.float32)))) == []
    assert copies.orphans() == [2]
    assert copies.orphans() == []
