"""votequorum-like quorum arithmetic (pure functions).

* expected votes: configured, or the sum of every node's votes;
* quorum: a strict majority of expected votes, ``expected // 2 + 1``;
* ``two_node``: with exactly two one-vote nodes, quorum is 1 (either node
  alone is quorate) and ``wait_for_all`` is implied, so a node that boots
  alone does not take over until it has seen its peer once;
* ``wait_for_all``: the cluster is not quorate for the first time until all
  configured nodes were members of one view at the same time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class QuorumInfo:
    """Quorum state of one view."""

    quorate: bool
    votes: int          #: votes of the view's members
    expected: int       #: expected votes
    quorum: int         #: votes needed
    wait_for_all: bool  #: still waiting to see all nodes at once


def expected_votes(votes: Mapping[int, int], configured: int = 0) -> int:
    """Expected votes: ``configured`` if set, else the sum of all nodes' votes."""
    return configured or sum(votes.values())


def quorum_needed(expected: int, two_node: bool = False) -> int:
    """Votes needed for quorum."""
    if two_node:
        return 1
    return expected // 2 + 1


def compute(votes: Mapping[int, int], members: Iterable[int], *, configured_expected: int = 0,
            two_node: bool = False, wait_for_all: bool = False,
            all_seen: bool = True) -> QuorumInfo:
    """Quorum of a view with ``members``; ``all_seen``: all nodes were seen together once."""
    members = set(members)
    have = sum(votes.get(n, 0) for n in members)
    expected = expected_votes(votes, configured_expected)
    need = quorum_needed(expected, two_node)
    waiting = (wait_for_all or two_node) and not all_seen
    return QuorumInfo(quorate=have >= need and not waiting, votes=have, expected=expected,
                      quorum=need, wait_for_all=waiting)
