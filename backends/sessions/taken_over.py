"""The sessions taken over from a peer thought gone, to tell that peer when it is back.

A server that promoted a peer's replicas (a view ended it) or took sessions from an owner it
could not reach keeps, per peer, each session's id and its new epoch; when the peer comes
back it is sent them (`supersede`) and drops its own stale records. After a kill -9 with a
million sessions that is a million entries: two flat arrays rather than a dict per session
(16 bytes each instead of ~40, and no dict doubling in the middle of a promotion — a resize
of a dict of 700,000 entries holds the event loop for ~35 ms).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping

__all__ = ["TakenOver"]


class TakenOver:
    """Session ids and the epochs we took them over with, in the order taken (a session
    taken twice: its later epoch counts)."""

    __slots__ = ("_sids", "_epochs")

    def __init__(self) -> None:
        self._sids: list[str] = []
        self._epochs = array("q")

    def add(self, sid: str, epoch: int) -> None:
        self._sids.append(sid)
        self._epochs.append(epoch)

    def update(self, taken: Mapping[str, int]) -> None:
        for sid, epoch in taken.items():
            self.add(sid, epoch)

    def as_dict(self) -> dict[str, int]:
        """sid -> epoch, what a `supersede` message carries."""
        return dict(zip(self._sids, self._epochs, strict=True))

    def parts(self, size: int, upto: int | None = None) -> Iterator[dict[str, int]]:
        """`as_dict` of the first `upto` (all) in parts of at most `size` sessions, in the
        order taken (a session taken twice may appear in two parts: the later one, with
        the later epoch, is applied last)."""
        end = len(self._sids) if upto is None else upto
        for start in range(0, end, size):
            stop = min(start + size, end)
            yield dict(zip(self._sids[start:stop], self._epochs[start:stop], strict=True))

    def drop(self, n: int) -> None:
        """Forget the first `n` (told to the peer). The lists stay the same objects: made
        at start-up, the cycle collector's young runs never walk their million items."""
        del self._sids[:n]
        del self._epochs[:n]

    def __len__(self) -> int:
        return len(self._sids)
