"""A raw byte tunnel between a client and a backend after a 101 Switching Protocols
(WebSocket and other upgrades), with flow control both ways.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import ClientProtocol
    from .upstream import UpstreamProtocol

__all__ = ["Tunnel"]


class Tunnel:
    """Copies bytes both ways; either side closing closes the other once flushed."""

    __slots__ = ("client", "upstream", "closed")

    def __init__(self, client: ClientProtocol, upstream: UpstreamProtocol) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False

    def from_client(self, data: bytes) -> None:
        transport = self.upstream.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.client.write(data)

    # The backend's write buffer is full: stop reading from the client, and back.
    def pause_client(self) -> None:
        self.client.pause_reading_upstream()

    def resume_client(self) -> None:
        self.client.resume_reading_upstream()

    # The client's write buffer is full: stop reading from the backend, and back.
    def pause_upstream(self) -> None:
        self.upstream.pause_reading()

    def resume_upstream(self) -> None:
        self.upstream.resume_reading()

    def client_lost(self) -> None:
        if not self.closed:
            self.closed = True
            self.upstream.close()

    def upstream_lost(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close()
