"""Long walks over the store in slices of the event loop.

A server holding a million sessions cannot look at them all in one go: the loop would answer
nothing for a quarter of a second. `chunks` hands the items over a few hundred at a time and,
once a slice has run `SLICE_S`, lets the loop run what waits before it goes on. The caller's
own work on each chunk counts in the slice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from itertools import islice
from typing import TypeVar

__all__ = ["SLICE_S", "CHUNK", "chunks"]

T = TypeVar("T")

# Seconds of the event loop one slice may hold (the rule: a hold under 50 ms; a slice may
# end with a resize of a store shard, under a millisecond at a million sessions)
SLICE_S = 0.01
CHUNK = 256  # items between two looks at the clock


async def chunks(items: Iterable[T], *, slice_s: float = SLICE_S) -> AsyncIterator[list[T]]:
    """`items` in lists of `CHUNK`, yielding the loop whenever a slice has run `slice_s`.

    `items` is walked across awaits: a list, or `Shards.walk()`/`walk_values()` (a shard
    copied as it is reached), never a dict's live view. What a chunk names may have changed
    or gone while the loop ran other work: callers look again.
    """
    it = iter(items)
    deadline = time.monotonic() + slice_s
    while chunk := list(islice(it, CHUNK)):
        yield chunk
        if time.monotonic() > deadline:
            await asyncio.sleep(0)
            deadline = time.monotonic() + slice_s
