"""Views, ballots and the wire form of both: the values the view consensus agrees on.

A view is `(number, members)` with, for each member, the *incarnation* (the random id a
server process picks at start) that may act for it. View 1 lists every configured server
with no incarnation bound ("" — whichever process runs the server); the cluster's first
view change binds each member to the process then running it, and every later change keeps,
removes, adds or re-binds members. Only the bound incarnation of a member votes, grants
leases or holds one: a process that restarted forgot its promises, so it is a new voter
that has to be admitted by a view change (see `backends.cluster.quorum`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolViolation

__all__ = ["RHO", "Ballot", "Out", "View", "ViewChanged", "ballot_from_wire", "majority"]

# Clock rate error budget: every clock runs within 1 % of real time (docs/consistency.md).
RHO = 0.01

# (round, index of the proposer in the cluster file, proposer incarnation): compared as a
# tuple. The incarnation makes ballots unique across restarts: a restarted proposer may
# reuse a round its previous process used, never the same ballot.
Ballot = tuple[int, int, str]

# A message to send: (destination server id, JSON-able dict whose "op" starts v_ or l_).
Out = tuple[str, dict[str, Any]]


def majority(size: int) -> int:
    """Votes that make a majority of `size` members (2 of 2, 2 of 3, 3 of 4, 3 of 5)."""
    return size // 2 + 1


@dataclass(frozen=True, slots=True)
class View:
    """A decided (or proposed) membership: members sorted by id, incarnations aligned."""

    number: int
    members: tuple[str, ...]
    incarnations: tuple[str, ...]  # "" = not bound (view 1 only): any process of that server

    def __post_init__(self) -> None:
        if self.number < 1:
            raise ValueError(f"view number {self.number} < 1")
        if list(self.members) != sorted(set(self.members)):
            raise ValueError(f"members {self.members!r} not sorted and unique")
        if len(self.incarnations) != len(self.members):
            raise ValueError("one incarnation per member")

    @classmethod
    def first(cls, servers: Iterable[str]) -> View:
        """View 1: every configured server, none bound yet."""
        members = tuple(sorted(set(servers)))
        return cls(1, members, ("",) * len(members))

    @classmethod
    def of(cls, number: int, bindings: Mapping[str, str]) -> View:
        members = tuple(sorted(bindings))
        return cls(number, members, tuple(bindings[m] for m in members))

    def bindings(self) -> dict[str, str]:
        return dict(zip(self.members, self.incarnations, strict=True))

    def incarnation_of(self, member: str) -> str | None:
        """The incarnation bound for `member` ("" if not bound), None if not a member."""
        for m, inc in zip(self.members, self.incarnations, strict=True):
            if m == member:
                return inc
        return None

    def binds(self, member: str, incarnation: str) -> bool:
        """May this process (member, incarnation) act as a member of this view?"""
        bound = self.incarnation_of(member)
        return bound is not None and bound in ("", incarnation)

    @property
    def bound(self) -> bool:
        """Every member bound to an incarnation (true of every view after the first)."""
        return all(self.incarnations)

    @property
    def votes_needed(self) -> int:
        """Accepts from this view's members that decide the next view.

        A majority once members are bound. Through an unbound view (view 1) every member
        must accept: a process that restarted before the first view change cannot know it
        voted, and only unanimity guarantees that two deciding sets share a member that did
        not restart (see `backends.cluster.quorum`).
        """
        return majority(len(self.members)) if self.bound else len(self.members)

    def successor(self, bindings: Mapping[str, str]) -> View:
        return View.of(self.number + 1, bindings)

    def to_wire(self) -> dict[str, Any]:
        return {"n": self.number, "m": list(self.members), "i": list(self.incarnations)}

    @classmethod
    def from_wire(cls, data: object, *, peer: str) -> View:
        """Parse a view from a peer's message; a malformed one is a `ProtocolViolation`."""
        try:
            assert isinstance(data, dict)
            number, members, incs = data["n"], data["m"], data["i"]
            assert isinstance(number, int) and isinstance(members, list)
            assert isinstance(incs, list)
            assert all(isinstance(x, str) for x in members + incs)
            return cls(number, tuple(members), tuple(incs))
        except (AssertionError, KeyError, ValueError, TypeError) as exc:
            raise ProtocolViolation(f"malformed view {data!r}", peer=peer) from exc


def ballot_from_wire(data: object, *, peer: str) -> Ballot:
    if (isinstance(data, list) and len(data) == 3 and isinstance(data[0], int)
            and isinstance(data[1], int) and isinstance(data[2], str)):
        return (data[0], data[1], data[2])
    raise ProtocolViolation(f"malformed ballot {data!r}", peer=peer)


@dataclass(frozen=True, slots=True)
class ViewChanged:
    """This server adopted `new` (decided) in place of `old`: fence, promote, re-protect."""

    old: View
    new: View

    @property
    def removed(self) -> tuple[str, ...]:
        """Servers no longer members: fence them, promote the replicas whose primary they were."""
        return tuple(m for m in self.old.members if self.new.incarnation_of(m) is None)

    @property
    def joined(self) -> tuple[str, ...]:
        return tuple(m for m in self.new.members if self.old.incarnation_of(m) is None)

    @property
    def restarted(self) -> tuple[str, ...]:
        """Members now bound to another process than before: that server lost its memory."""
        out = []
        for m, inc in zip(self.new.members, self.new.incarnations, strict=True):
            old = self.old.incarnation_of(m)
            if old and old != inc:
                out.append(m)
        return tuple(out)
