"""Active health probes: `GET /__tandem/health` on every backend each
`proxy.health_interval_s` (0: off). `health_fall` failures in a row take a backend DOWN,
`health_rise` successes in a row bring it back. Passive marks live in the router; a
passing probe clears one (the backend serves again), unless the answer says the backend
is draining (tandem's health JSON: `"state": "draining"`) — it still answers 2xx then, but
declines new requests with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
from types import TracebackType

import structlog

from .router import Backend, Router

__all__ = ["HealthProber", "HEALTH_PATH", "Probe"]

log = structlog.get_logger("tandem.proxy")

HEALTH_PATH = "/__tandem/health"
_MAX_PROBE_BYTES = 65536  # of a health answer read


class Probe(enum.Enum):
    OK = "ok"  # 2xx: healthy and serving
    DRAINING = "draining"  # 2xx, but the backend says it is draining: healthy, not serving
    FAILED = "failed"  # no 2xx answer within the timeout


class HealthProber:
    """Probes every backend of the table periodically (an async context manager)."""

    def __init__(self, router: Router, *, interval_s: float, rise: int, fall: int,
                 timeout_s: float) -> None:
        self._router = router
        self._interval_s = interval_s
        self._rise = rise
        self._fall = fall
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # completed probe rounds

    async def __aenter__(self) -> HealthProber:
        if self._interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            backends = self._router.backends
            results = await asyncio.gather(*(self.check(b) for b in backends))
            for b, result in zip(backends, results, strict=True):
                self.record(b, result)
            self.rounds += 1
            await asyncio.sleep(self._interval_s)

    def record(self, b: Backend, result: Probe) -> None:
        """Count one probe result; change the backend's health after rise/fall in a row."""
        if result is not Probe.FAILED:
            b.probe_failures = 0
            b.probe_successes += 1
            if result is Probe.OK and self._router.is_bad(b):
                self._router.seen_alive(b)
                log.info("backend_serving", backend=b.id, by="health_probe")
            if not b.healthy and b.probe_successes >= self._rise:
                self._router.set_healthy(b, True)
                log.info("backend_healthy", backend=b.id, state=b.state.value)
        else:
            b.probe_successes = 0
            b.probe_failures += 1
            if b.healthy and b.probe_failures >= self._fall:
                self._router.set_healthy(b, False)
                log.warning("backend_unhealthy", backend=b.id, state=b.state.value,
                            failures=b.probe_failures)

    async def check(self, b: Backend) -> Probe:
        """One probe: OK when the backend answers 2xx within the timeout (DRAINING when the
        answer says so), else FAILED."""
        address = b.address
        request = (f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: {address}\r\n"
                   "User-Agent: tandem-proxy-health\r\nConnection: close\r\n\r\n").encode()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_connection(address.host, address.port)
                writer.write(request)
                line = await reader.readline()
                parts = line.split(None, 2)
                if not (len(parts) >= 2 and parts[0].startswith(b"HTTP/1.")
                        and parts[1].isdigit() and 200 <= int(parts[1]) < 300):
                    return Probe.FAILED
                rest = b""
                while len(rest) < _MAX_PROBE_BYTES:  # until the backend closes
                    chunk = await reader.read(_MAX_PROBE_BYTES)
                    if not chunk:
                        break
                    rest += chunk
            return Probe.DRAINING if _says_draining(rest) else Probe.OK
        except (OSError, TimeoutError, ValueError):
            return Probe.FAILED
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


def _says_draining(rest: bytes) -> bool:
    """Does a health answer's body (after its status line) report `"state": "draining"`?"""
    _, sep, body = rest.partition(b"\r\n\r\n")
    if not sep or b"draining" not in body:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("state") == "draining"
