"""Which member of a duplicate group to keep: one documented rule, chosen by name.

Pure: it looks at the members' recorded resolution, file size and mtime, never at files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from .groups import DuplicateMember

KeepRule = Literal["best", "resolution", "size", "oldest", "newest"]
KEEP_RULES: tuple[str, ...] = get_args(KeepRule)
DEFAULT_KEEP: KeepRule = "best"

# What each rule prefers, most important first; ties fall through to the next key and, at the
# very end, to the earliest stored member (the group's first), so the choice is deterministic.
KEEP_RULE_HELP = {
    "best": "largest resolution, then largest file, then oldest",
    "resolution": "largest resolution (width x height), then largest file",
    "size": "largest file, then largest resolution",
    "oldest": "oldest modification time, then largest resolution",
    "newest": "newest modification time, then largest resolution",
}


def _pixels(m: DuplicateMember) -> int:
    return (m.width or 0) * (m.height or 0)


def _size(m: DuplicateMember) -> int:
    return m.size or 0


def _age(m: DuplicateMember) -> int:
    # Older first: a smaller mtime sorts as "larger" (more preferred) when negated.
    return -(m.mtime_ns if m.mtime_ns is not None else 2**63)


def _newness(m: DuplicateMember) -> int:
    return m.mtime_ns if m.mtime_ns is not None else -(2**63)


_KEYS: dict[str, Callable[[DuplicateMember], tuple[Any, ...]]] = {
    "best": lambda m: (_pixels(m), _size(m), _age(m)),
    "resolution": lambda m: (_pixels(m), _size(m)),
    "size": lambda m: (_size(m), _pixels(m)),
    "oldest": lambda m: (_age(m), _pixels(m)),
    "newest": lambda m: (_newness(m), _pixels(m)),
}


def check_keep_rule(rule: str) -> KeepRule:
    """``rule`` if it is one of ``KEEP_RULES``; an error listing them otherwise."""
    if rule not in KEEP_RULES:
        raise InvalidArgumentError(
            f"unknown keep rule {rule!r}; choose one of: "
            + "; ".join(f"{r} ({KEEP_RULE_HELP[r]})" for r in KEEP_RULES)
        )
    return rule  # type: ignore[return-value]


def choose_keeper(members: Sequence[DuplicateMember], rule: str = DEFAULT_KEEP) -> int:
    """Index in ``members`` of the one to keep under ``rule``."""
    key = _KEYS[check_keep_rule(rule)]
    # max() returns the first of equal maxima: the earliest stored member wins ties.
    return max(range(len(members)), key=lambda i: key(members[i]))
