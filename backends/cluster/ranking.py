"""Choosing a session's secondary by rank (the replication-group table of the seeds).

| rank | in the primary's preferred secondary group | on a different machine |
|  1   | yes                                         | yes                    |
|  2   | yes                                         | no                     |
|  3   | no                                          | yes                    |
|  4   | no                                          | no                     |

Ties go to the server holding fewest of this primary's replicas, then to the id order.
A witness (`witness = true`) is never a candidate: it votes, it holds no sessions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tandem.config import ServerConfig

__all__ = ["rank", "choose_secondary"]


def rank(primary: ServerConfig, candidate: ServerConfig) -> int:
    preferred = bool(primary.preferred_secondary_group) and (
        candidate.group == primary.preferred_secondary_group
    )
    other_machine = candidate.machine != primary.machine
    if preferred:
        return 1 if other_machine else 2
    return 3 if other_machine else 4


def choose_secondary(primary: ServerConfig, candidates: Iterable[ServerConfig],
                     load: Mapping[str, int]) -> ServerConfig | None:
    """The best live candidate for `primary`'s replicas, or None when there is none."""
    best: ServerConfig | None = None
    best_key: tuple[int, int, str] | None = None
    for c in candidates:
        if c.id == primary.id or c.witness:
            continue
        key = (rank(primary, c), load.get(c.id, 0), c.id)
        if best_key is None or key < best_key:
            best, best_key = c, key
    return best
