"""Active health probes (proxy.health, an aiohttp client): timeouts, answers, view rejoin."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from proxy.health import HealthProber
from proxy.server import ProxyServer
from tests.proxy_support import AppBackend, Env, RawBackend, make_config, proxy_env, token


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


async def test_a_server_that_accepts_but_never_answers_fails_its_probes_in_time():
    heads: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        await asyncio.sleep(3600)

    hung = await RawBackend(silent).start()
    try:
        async with proxy_env("s1", extra={"s2": hung.port}, health_interval_s=0.05,
                             health_fall=2, io_timeout_s=0.3) as env:
            async def s2_down() -> bool:
                return env.backend_status(await env.status(), "s2")["state"] == "down"

            await wait_until(s2_down, timeout=3.0)  # two probes of 0.3 s each, and slack
            s2 = env.backend_status(await env.status(), "s2")
            assert s2["state_summary"] == "failing (probe)" and s2["probe_failures"] >= 2
            head = heads[0].decode("latin-1")
            assert head.startswith("GET /__tandem/health HTTP/1.1\r\n")
            assert "user-agent: tandem-proxy-health" in head.lower()
            assert env.backend_status(await env.status(), "s1")["state_summary"] == "serving"
    finally:
        await hung.stop()


async def test_any_2xx_answer_passes_and_only_a_draining_one_says_draining():
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b"not json " * 20000  # 180 KB: more than a probe reads
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n" if answers % 2 else
                     b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    answers = 0
    plain = await RawBackend(answer).start()
    try:
        async with proxy_env("s1", extra={"s2": plain.port}, health_interval_s=0.05,
                             health_fall=1) as env:
            s1 = env.backends["s1"]
            s1.health_state = "draining"

            async def s1_draining() -> bool:
                return env.backend_status(await env.status(), "s1")["says_draining"]

            await wait_until(s1_draining)
            for _ in range(6):
                answers += 1
                await asyncio.sleep(0.06)
            snap = await env.status()
            s1_info, s2_info = (env.backend_status(snap, i) for i in ("s1", "s2"))
            assert (s1_info["state_summary"], s1_info["state"]) == ("draining", "up")
            assert s1_info["state_detail"] == "the server says it is draining"
            assert s2_info["state_summary"] == "serving" and s2_info["probe_failures"] == 0
            assert plain.connections >= 4  # a fresh connection per probe
            s1.health_state = "up"

            async def s1_serving() -> bool:
                info = env.backend_status(await env.status(), "s1")
                return info["state_summary"] == "serving" and not info["says_draining"]

            await wait_until(s1_serving)
    finally:
        await plain.stop()


async def test_the_prober_stops_probing_and_closes_its_client_when_it_exits():
    async with proxy_env("s1") as env:  # (probes off in this proxy)
        s1 = env.backends["s1"]
        router = env.proxy.ctx.router if env.proxy.ctx is not None else None
        assert router is not None
        async with HealthProber(router, interval_s=0.02, rise=1, fall=1,
                                timeout_s=1.0) as prober:
            async with asyncio.timeout(3):
                while prober.rounds < 3:
                    await asyncio.sleep(0.01)
        seen = s1.hits["/__tandem/health"]
        assert seen >= 3
        await asyncio.sleep(0.1)
        assert s1.hits["/__tandem/health"] == seen
        # probes off (interval 0): nothing runs, nothing to close
        async with HealthProber(router, interval_s=0, rise=1, fall=1, timeout_s=1.0):
            await asyncio.sleep(0.05)
        assert s1.hits["/__tandem/health"] == seen


# --- the view, learned from the probes ----------------------------------------------------


class ViewBackend(AppBackend):
    """An AppBackend whose health answer reports a cluster view hash, as tandem's does."""

    def __init__(self, server_id: str) -> None:
        super().__init__(server_id)
        self.health_view: str | None = None

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return self._done(request, web.json_response(
            {"server": self.id, "state": self.health_state, "view": self.health_view},
            status=self.health_status))


@contextlib.asynccontextmanager
async def view_env(*ids: str, **proxy: Any) -> AsyncIterator[Env]:
    backends: dict[str, AppBackend] = {sid: await ViewBackend(sid).start() for sid in ids}
    cfg = make_config({sid: b.port for sid, b in backends.items()}, **proxy)
    try:
        async with ProxyServer(cfg, drain_timeout_s=1.0) as srv, \
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            yield Env(backends, srv, http)
    finally:
        for b in backends.values():
            await b.stop()


async def test_a_server_out_of_the_view_rejoins_when_the_probes_agree_on_a_view():
    async with view_env("s1", "s2", "s3", health_interval_s=0.05, max_skip_s=60) as env:
        s1, s2, s3 = (env.backends[i] for i in ("s1", "s2", "s3"))
        assert isinstance(s1, ViewBackend) and isinstance(s2, ViewBackend)
        assert isinstance(s3, ViewBackend)
        # The cluster lost s1 (which still answers, alone in its own view): the proxy
        # learns it from a response.
        s1.health_view, s2.health_view, s3.health_view = "v1", "v2", "v2"
        s2.view = ("v2", f"v2; s2=127.0.0.1:{s2.port}, s3=127.0.0.1:{s3.port}")
        await env.get("/id", headers={"Cookie": f"JSESSIONID={token('s2')}"})
        snap = await env.status()
        assert snap["view"] == "v2" and not env.backend_status(snap, "s1")["in_view"]
        # the views differ: s1 stays out
        await asyncio.sleep(0.3)
        info = env.backend_status(await env.status(), "s1")
        assert (info["in_view"], info["state_summary"]) == (False, "not in cluster view")
        # servers that report no view (not tandem's) give no agreement either
        s1.health_view = s2.health_view = s3.health_view = None
        await asyncio.sleep(0.3)
        assert not env.backend_status(await env.status(), "s1")["in_view"]
        # all three agree on a view (which lists s1: every server's view lists itself)
        requests = (await env.status())["requests"]["total"]
        s1.health_view = s2.health_view = s3.health_view = "v3"

        async def s1_serving() -> bool:
            return env.backend_status(await env.status(), "s1")["state_summary"] == "serving"

        await wait_until(s1_serving, timeout=3.0)
        snap = await env.status()
        assert env.backend_status(snap, "s1")["in_view"]
        assert snap["requests"]["total"] == requests  # no client request did it
        assert snap["view"] == "v2"  # the full view still comes with the next response
