"""Stopping a component's background tasks; working through many items a few at a time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

__all__ = ["cancel_and_wait", "for_each"]

T = TypeVar("T")


async def cancel_and_wait(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel every task, then wait for each to end (a task's own error still raises:
    only the cancellation is expected)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def for_each(items: Iterable[T], work: Callable[[T], Awaitable[None]], *,
                   at_once: int) -> None:
    """`work` on every item, `at_once` at a time: that many workers, each taking the next
    item from the one iterator (hundreds of thousands of items: not a task each made at
    once, which would hold the loop for seconds and its memory with them)."""
    left = iter(items)

    async def worker() -> None:
        for item in left:
            await work(item)

    await asyncio.gather(*(worker() for _ in range(at_once)))
