"""The ASGI lifespan protocol, run at start and stop when the application speaks it.

The application's HTTP and WebSocket traffic is served by `backends.http`; requests get a
shallow copy of the state the application filled in at start-up (`scope["state"]`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from .asgi import ASGIApp, Message

__all__ = ["Lifespan", "acknowledge_lifespan"]


class Lifespan:
    """Runs the ASGI lifespan protocol, if the application supports it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._events: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.supported = True
        self.state: dict[str, Any] = {}  # what the application keeps for its requests

    async def startup(self) -> None:
        async def receive() -> Message:
            return await self._queue.get()

        async def send(message: Message) -> None:
            await self._events.put(message)

        async def run() -> None:
            try:
                await self.app({"type": "lifespan", "asgi": {"version": "3.0"},
                                "state": self.state}, receive, send)
            except Exception:
                self.supported = False  # apps without lifespan raise on the scope: fine
            await self._events.put({"type": "lifespan.gone"})

        self._task = asyncio.create_task(run(), name="asgi-lifespan")
        await self._queue.put({"type": "lifespan.startup"})
        event = await self._events.get()
        if event["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"application start-up failed: {event.get('message', '')}")
        if event["type"] == "lifespan.gone":
            self.supported = False

    async def shutdown(self) -> None:
        if self._task is None:
            return
        if self.supported and not self._task.done():
            await self._queue.put({"type": "lifespan.shutdown"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._events.get(), 10)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def acknowledge_lifespan(receive: Any, send: Any) -> None:
    """The lifespan side of an ASGI app with nothing to start or stop: every event is
    acknowledged as complete, until shutdown."""
    while True:
        msg = await receive()
        await send({"type": msg["type"] + ".complete"})
        if msg["type"] == "lifespan.shutdown":
            return
