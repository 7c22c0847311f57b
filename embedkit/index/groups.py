"""Duplicate groups as results (``DuplicateMember``, ``DuplicateGroup``) and how accepted pairs
become groups without chaining (``star_groups``). Used by ``index.duplicates`` (stores and
vectors) and ``index.file_duplicates`` (folders, by pixels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .keep import choose_keeper


@dataclass(frozen=True)
class DuplicateMember:
    """One image of a group.

    Attributes:
        id: store id.
        path: absolute path, or None for bare arrays.
        score: this member's best cosine similarity to any other member of the group (its
            closest copy, not an arbitrary leader): at least the threshold for a member that
            joined by similarity, 1.0 for a byte-identical copy.
        exact: another member of the group has the same content hash (a byte-identical copy).
        identical_to: ids of the other members with the same content hash, ascending.
        closest: id of the member that ``score`` is measured against.
        width, height, size, mtime_ns: as recorded in the store (None for bare arrays).
        keep: the suggested keeper of its group (see ``index.keep``); the others are the
            copies ``--to-remove`` lists.
        evidence: what put this member in its group: ``identical`` (same content hash),
            ``pixels`` (pHash/correlation confirmed), ``embedding`` (cosine above the
            threshold, pixels not confirming or unreadable), or ``centre`` (the member the
            others are linked to).
        linked_to: id of the member whose pair with this one was accepted (None: centre).
        why: the evidence in words, with the numbers (``duplicates --explain``).
    """

    id: int
    path: str | None
    score: float
    exact: bool
    identical_to: tuple[int, ...] = ()
    closest: int | None = None
    width: int | None = None
    height: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    keep: bool = False
    evidence: str = "embedding"
    linked_to: int | None = None
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["identical_to"] = list(self.identical_to)
        return d


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of each other; the first member is the representative (the
    earliest stored) and the rest follow by decreasing best similarity."""

    members: tuple[DuplicateMember, ...]

    @property
    def keeper(self) -> DuplicateMember:
        """The member to keep: the one marked ``keep``, else the first."""
        return next((m for m in self.members if m.keep), self.members[0])

    @property
    def to_remove(self) -> tuple[DuplicateMember, ...]:
        """Every member but the keeper."""
        keeper = self.keeper
        return tuple(m for m in self.members if m is not keeper)

    @property
    def identical_pairs(self) -> int:
        """Pairs of members with the same content hash (a sub-group of m copies is m(m-1)/2)."""
        return sum(len(m.identical_to) for m in self.members) // 2

    @property
    def identical_copies(self) -> int:
        """Members that could go because a byte-identical copy stays: per sub-group of m
        identical files, m - 1."""
        seen: set[int] = set()
        copies = 0
        for m in self.members:
            if m.identical_to and m.id not in seen:
                seen.update(m.identical_to)
                seen.add(m.id)
                copies += len(m.identical_to)
        return copies

    def to_dict(self) -> dict[str, Any]:
        return {"keeper": self.keeper.id, "members": [m.to_dict() for m in self.members]}

    def with_keeper(
        self, rule: str, meta: dict[int, tuple[Any, ...]] | None = None
    ) -> DuplicateGroup:
        """This group with recorded file facts filled in (``meta``: id -> (width, height, size,
        mtime_ns)) and the keeper chosen by ``rule``."""
        members = [
            dataclasses.replace(m, **dict(zip(META, meta[m.id], strict=True)))
            if meta is not None and m.id in meta
            else m
            for m in self.members
        ]
        pick = choose_keeper(members, rule)
        members = [dataclasses.replace(m, keep=i == pick) for i, m in enumerate(members)]
        return DuplicateGroup(tuple(members))


META = ("width", "height", "size", "mtime_ns")  # the recorded file facts `with_keeper` fills in


@dataclass(frozen=True)
class Edges:
    """Accepted pairs (row a, row b) with their evidence, one entry per unordered pair."""

    a: list[int]
    b: list[int]
    cosine: list[float]
    evidence: list[str]  # identical / pixels / embedding
    why: list[str]


_RANK = {"identical": 2, "pixels": 1, "embedding": 0}


def star_groups(n: int, edges: Edges) -> list[tuple[list[int], dict[int, int]]]:
    """Groups without chaining: greedy star clustering over the accepted edges.

    The row with the most accepted edges (ties: more identical/pixel evidence, then the
    earliest row) becomes a centre and takes its unassigned direct neighbours; repeat. A row
    left with edges only to members of other groups joins the group of its best such
    neighbour (so every member is at most two accepted edges from its centre, never a chain
    across the collection). Returns (rows, row -> the row it is linked to) per group.
    """
    adj: dict[int, dict[int, int]] = {}
    for e, (a, b) in enumerate(zip(edges.a, edges.b, strict=True)):
        adj.setdefault(a, {})[b] = e
        adj.setdefault(b, {})[a] = e

    def strength(r: int) -> tuple[int, int, int]:
        return (len(adj[r]), sum(_RANK[edges.evidence[e]] for e in adj[r].values()), -r)

    group_of: dict[int, int] = {}
    groups: list[tuple[list[int], dict[int, int]]] = []
    for centre in sorted(adj, key=strength, reverse=True):
        if centre in group_of:
            continue
        members = [r for r in adj[centre] if r not in group_of]
        if not members:
            continue
        g = len(groups)
        groups.append(([centre, *members], {m: centre for m in members}))
        for r in (centre, *members):
            group_of[r] = g
    for r in sorted(adj):
        if r in group_of:
            continue
        best = max(
            adj[r],
            key=lambda o: (_RANK[edges.evidence[adj[r][o]]], edges.cosine[adj[r][o]]),
        )
        g = group_of[best]
        groups[g][0].append(r)
        groups[g][1][r] = best
        group_of[r] = g
    return groups
