"""Active health probes: `GET /__tandem/health` on every backend each
`proxy.health_interval_s` (0: off). `health_fall` failures in a row take a backend DOWN,
`health_rise` successes in a row bring it back. Passive marks live in the router; a
passing probe clears one (the backend serves again), unless the answer says the backend
is draining (tandem's health JSON: `"state": "draining"`) — it still answers 2xx then, but
declines new requests with 503.

The proxy otherwise learns the cluster's view only from responses to requests. So that a
restarted server does not stay out of the view until traffic comes, a round of probes in
which every server that answered reports the same view (`"view"`: its hash) puts the
servers out of the proxy's view that answered back in it: each server's view lists itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
from types import TracebackType

import aiohttp
import structlog

from .router import Backend, Router

__all__ = ["HealthProber", "HEALTH_PATH", "Probe", "Answer"]

log = structlog.get_logger("tandem.proxy")

HEALTH_PATH = "/__tandem/health"
_MAX_PROBE_BYTES = 65536  # of a health answer read


class Probe(enum.Enum):
    OK = "ok"  # 2xx: healthy and serving
    DRAINING = "draining"  # 2xx, but the backend says it is draining: healthy, not serving
    FAILED = "failed"  # no 2xx answer within the timeout


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """One probe's verdict and the cluster view the server reported, if it did."""

    probe: Probe
    view: str | None = None


class HealthProber:
    """Probes every backend of the table periodically (an async context manager: one
    HTTP client session for its lifetime)."""

    def __init__(self, router: Router, *, interval_s: float, rise: int, fall: int,
                 timeout_s: float) -> None:
        # configuration
        self._router = router
        self._interval_s = interval_s
        self._rise = rise
        self._fall = fall
        self._timeout_s = timeout_s
        # lifetime of one enter/exit
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # completed probe rounds

    async def __aenter__(self) -> HealthProber:
        if self._interval_s > 0:
            # A fresh connection per probe (as a client would make): a server that stops
            # accepting fails its probe, and no stale keep-alive connection fails one.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                headers={"User-Agent": "tandem-proxy-health"},
                cookie_jar=aiohttp.DummyCookieJar())
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        # Stop the probe loop, then close the client session it used.
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _run(self) -> None:
        while True:
            backends = self._router.backends
            answers = await asyncio.gather(*(self.check(b) for b in backends))
            for b, answer in zip(backends, answers, strict=True):
                self.record(b, answer.probe)
            self._rejoin(dict(zip(backends, answers, strict=True)))
            self.rounds += 1
            await asyncio.sleep(self._interval_s)

    def record(self, b: Backend, result: Probe) -> None:
        """Count one probe result; change the backend's health after rise/fall in a row."""
        if result is not Probe.FAILED:
            b.probe_failures = 0
            b.probe_successes += 1
            self._router.set_says_draining(b, result is Probe.DRAINING)
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

    def _rejoin(self, answers: dict[Backend, Answer]) -> None:
        """Put answering servers back in the proxy's view when every server that answered
        reports one same view (see the module docstring)."""
        views = {a.view for a in answers.values() if a.probe is not Probe.FAILED}
        if len(views) != 1 or None in views:
            return  # nobody answered, a server that does not report its view, or no agreement
        for b, a in answers.items():
            if a.probe is Probe.OK and not b.in_view:
                self._router.rejoined(b)
                log.info("backend_rejoined", backend=b.id, view=a.view, by="health_probe")

    async def check(self, b: Backend) -> Answer:
        """One probe: OK when the backend answers 2xx within the timeout (DRAINING when the
        answer says so), else FAILED."""
        session = self._session
        if session is None:
            raise RuntimeError("HealthProber.check outside `async with` (or probes are off)")
        try:
            async with session.get(f"http://{b.address}{HEALTH_PATH}") as resp:
                if not 200 <= resp.status < 300:
                    return Answer(Probe.FAILED)
                body = await _read_capped(resp.content, _MAX_PROBE_BYTES)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return Answer(Probe.FAILED)
        state, view = _read_health(body)
        return Answer(Probe.DRAINING if state == "draining" else Probe.OK, view)


async def _read_capped(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to `limit` bytes (more is not read: the answer is then not JSON)."""
    out = bytearray()
    while len(out) < limit:
        chunk = await content.read(limit - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _read_health(body: bytes) -> tuple[str | None, str | None]:
    """(`state`, `view`) of tandem's health JSON; None for what is missing or not JSON."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    state, view = data.get("state"), data.get("view")
    return (state if isinstance(state, str) else None,
            view if isinstance(view, str) else None)
