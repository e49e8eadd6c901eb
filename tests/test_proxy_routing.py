"""Affinity and failover through a real proxy to real backends on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct

from structlog.testing import capture_logs

from tests.proxy_support import (
    RawBackend,
    RawClient,
    closed_port,
    metric_value,
    proxy_env,
    read_request,
    token,
)


async def test_cookie_routes_to_the_primary():
    async with proxy_env("s1", "s2", "s3") as env:
        for primary in ("s1", "s2", "s3", "s2"):
            cookie = {"Cookie": f"other=1; JSESSIONID={token(primary, 's1')}"}
            status, body, headers = await env.get("/id", headers=cookie)
            assert (status, body) == (200, primary)


async def test_path_parameter_and_query_parameter_route_when_url_rewriting():
    async with proxy_env("s1", "s2", "s3") as env:
        status, body, _ = await env.get(f"/id;jsessionid={token('s3', 's1')}?a=1")
        assert (status, body) == (200, "s3")
        status, body, _ = await env.get(f"/id?a=1&jsessionid={token('s2', 's1')}")
        assert (status, body) == (200, "s2")
        # the cookie comes first
        status, body, _ = await env.get(f"/id;jsessionid={token('s3')}",
                                        headers={"Cookie": f"JSESSIONID={token('s1')}"})
        assert (status, body) == (200, "s1")


async def test_url_tokens_are_ignored_without_url_rewriting():
    async with proxy_env("s1", "s2", "s3", session="url_rewriting = false") as env:
        seen = set()
        for _ in range(6):
            _, body, _ = await env.get(f"/id;jsessionid={token('s3')}")
            seen.add(body)
        assert seen == {"s1", "s2", "s3"}  # round-robin: the token was not read


async def test_new_sessions_round_robin_over_every_backend():
    async with proxy_env("s1", "s2", "s3") as env:
        bodies = [(await env.get("/id"))[1] for _ in range(6)]
        assert sorted(bodies) == ["s1", "s1", "s2", "s2", "s3", "s3"]
        assert bodies[:3] == bodies[3:]


async def test_tampered_token_is_routed_as_new_and_counted():
    async with proxy_env("s1", "s2") as env:
        good = token("s1", "s2", sid="A" * 32)
        tampered = good.replace("!s1!", "!s2!")
        with capture_logs() as logs:
            statuses = [(await env.get("/id", headers={"Cookie": f"JSESSIONID={tampered}"}))[0]
                        for _ in range(3)]
            await env.get("/id?jsessionid=garbage")
        assert statuses == [200, 200, 200]
        assert metric_value(await env.metrics(), "tandem_proxy_bad_tokens_total") == 4
        bad = [e for e in logs if e["event"] == "bad_token"]
        assert len(bad) == 4
        assert bad[0]["sid"] == "AAAAAAAA" and bad[0]["where"] == "cookie"
        assert all(good not in repr(e) and tampered not in repr(e) for e in logs)


async def test_connect_refused_fails_over_to_the_secondary_and_marks_the_primary_bad():
    dead = closed_port()
    async with proxy_env("s2", "s3", extra={"s1": dead}, max_skip_s=0.5) as env:
        cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
        with capture_logs() as logs:
            assert (await env.get("/id", headers=cookie))[:2] == (200, "s2")
            assert (await env.get("/id", headers=cookie))[:2] == (200, "s2")
        failovers = [e for e in logs if e["event"] == "failover"]
        assert len(failovers) == 1  # the second request skipped s1: it is marked bad
        assert failovers[0]["from_"] == "s1" and failovers[0]["to"] == "s2"
        assert failovers[0]["cause"] == "connect" and failovers[0]["sid"] == "SSSSSSSS"
        s1 = env.backend_status(await env.status(), "s1")
        assert s1["bad"] and s1["connect_errors"] == 1
        # new sessions skip it too
        assert {(await env.get("/id"))[1] for _ in range(4)} == {"s2", "s3"}
        await asyncio.sleep(0.6)  # max_skip_s is over: s1 is tried again
        assert (await env.get("/id", headers=cookie))[:2] == (200, "s2")
        text = await env.metrics()
        assert metric_value(text, "tandem_proxy_failovers_total", cause="connect") == 2
        assert metric_value(text, "tandem_proxy_upstream_connect_errors_total",
                            backend="s1") == 2


async def test_503_from_the_primary_fails_over_and_marks_it_bad():
    async with proxy_env("s1", "s2") as env:
        env.backends["s1"].unavailable = True
        cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
        async with env.http.post(env.url + "/echo", data=b"body", headers=cookie) as resp:
            assert resp.status == 200  # server-initiated failover: POST too
            assert await resp.read() == b"body" and resp.headers["X-Server"] == "s2"
        assert env.backends["s1"].hits["503"] == 1
        assert env.backend_status(await env.status(), "s1")["bad"]
        assert (await env.get("/id", headers=cookie))[1] == "s2"
        assert env.backends["s1"].hits["503"] == 1  # skipped while marked bad
        assert metric_value(await env.metrics(), "tandem_proxy_failovers_total",
                            cause="503") == 1


async def test_503_from_the_last_candidate_is_relayed():
    async with proxy_env("s1", "s2") as env:
        for b in env.backends.values():
            b.unavailable = True
        status, body, _ = await env.get("/id", headers={"Cookie": f"JSESSIONID={token('s1')}"})
        assert (status, body) == (503, "s2 unavailable")


def _dropper(backend: RawBackend):
    """Reads a request, then closes the connection without a response."""

    async def handler(reader, writer):
        while True:
            head, body = await read_request(reader)
            backend.requests.append(head + body)
            writer.transport.abort()
            return

    return handler


async def _raw(handler_factory):
    backend = RawBackend(lambda r, w: None)  # type: ignore[arg-type,return-value]
    backend.handler = handler_factory(backend)
    return await backend.start()


async def test_reset_after_send_retries_get_but_not_post():
    dropper = await _raw(_dropper)
    try:
        async with proxy_env("s2", extra={"s1": dropper.port}) as env:
            cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
            status, body, _ = await env.get("/id", headers=cookie)
            assert (status, body) == (200, "s2")
            assert len(dropper.requests) == 1
            async with env.http.post(env.url + "/id", data=b"payload",
                                     headers=cookie) as resp:
                assert resp.status == 502
                assert "bad gateway" in await resp.text()
            assert len(dropper.requests) == 2
            assert env.backends["s2"].hits["/id"] == 1  # the POST never reached s2
            text = await env.metrics()
            assert metric_value(text, "tandem_proxy_retries_total") == 1
            assert metric_value(text, "tandem_proxy_failovers_total", cause="reset") == 1
            assert not env.backend_status(await env.status(), "s1")["bad"]
    finally:
        await dropper.stop()


async def test_retry_none_answers_502_and_retry_all_retries_post():
    dropper = await _raw(_dropper)
    try:
        cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
        async with proxy_env("s2", extra={"s1": dropper.port}, retry="none") as env:
            assert (await env.get("/id", headers=cookie))[0] == 502
        async with proxy_env("s2", extra={"s1": dropper.port}, retry="all") as env:
            async with env.http.post(env.url + "/echo", data=b"payload",
                                     headers=cookie) as resp:
                assert resp.status == 200
                assert await resp.read() == b"payload"
                assert resp.headers["X-Server"] == "s2"
    finally:
        await dropper.stop()


async def test_large_body_is_not_replayed():
    dropper = await _raw(_dropper)
    try:
        async with proxy_env("s2", extra={"s1": dropper.port}, retry="all",
                             retry_body_max_bytes=1024) as env:
            cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
            async with env.http.put(env.url + "/echo", data=b"x" * 4096,
                                    headers=cookie) as resp:
                assert resp.status == 502
            async with env.http.put(env.url + "/echo", data=b"x" * 1000,
                                    headers=cookie) as resp:
                assert resp.status == 200 and len(await resp.read()) == 1000
    finally:
        await dropper.stop()


async def test_io_timeout_fails_over_and_marks_the_backend_bad():
    async with proxy_env("s1", "s2", io_timeout_s=0.3) as env:
        cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
        env.backends["s2"].hits.clear()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # /slow sleeps on both: s1 times out, s2 too, so the GET ends in 502
        status, _, _ = await env.get("/slow?s=1", headers=cookie)
        assert status == 502
        assert 0.5 < loop.time() - t0 < 1.5
        snap = await env.status()
        assert env.backend_status(snap, "s1")["bad"] and env.backend_status(snap, "s2")["bad"]
        assert snap["failovers"] == {"timeout": 1}


async def test_io_timeout_then_the_secondary_answers():
    slow = await _raw(lambda be: _sleeper(be, 3.0))
    try:
        async with proxy_env("s2", extra={"s1": slow.port}, io_timeout_s=0.3) as env:
            cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
            status, body, _ = await env.get("/id", headers=cookie)
            assert (status, body) == (200, "s2")
            assert env.backend_status(await env.status(), "s1")["bad"]
            assert metric_value(await env.metrics(), "tandem_proxy_upstream_io_errors_total",
                                backend="s1") == 1
    finally:
        await slow.stop()


def _sleeper(backend: RawBackend, seconds: float):
    async def handler(reader, writer):
        head, body = await read_request(reader)
        backend.requests.append(head)
        await asyncio.sleep(seconds)

    return handler


async def test_no_backend_left_is_a_503_with_retry_after():
    async with proxy_env(extra={"s1": closed_port(), "s2": closed_port()},
                         max_skip_s=3) as env:
        status, body, headers = await env.get("/id")
        assert status == 503
        assert headers["Retry-After"] == "3"
        assert "no backend" in body
        # all are bad now: they are all tried again (and still refuse)
        status, _, _ = await env.get("/id")
        assert status == 503
        snap = await env.status()
        assert all(b["connect_errors"] == 2 for b in snap["backends"])
        assert snap["no_backend"] == 2


async def test_stale_keep_alive_connection_is_retried_on_a_fresh_one():
    # Answers the first request of each connection, then closes on the second one
    # without a word: what a backend whose keep-alive timer fired looks like.
    async def handler(reader, writer):
        head, _ = await read_request(reader)
        stale.requests.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)
        writer.transport.abort()

    stale = RawBackend(handler)
    await stale.start()
    try:
        async with proxy_env(extra={"s1": stale.port}) as env:
            assert (await env.get("/a"))[:2] == (200, "ok")
            assert (await env.get("/b"))[:2] == (200, "ok")  # stale pooled conn, fresh retry
            async with env.http.post(env.url + "/c", data=b"x") as resp:
                assert resp.status == 502  # POST on a stale connection: not retried
            async with env.http.post(env.url + "/d", data=b"x") as resp:
                assert resp.status == 200  # fresh connection: first request on it
            assert stale.connections == 3
            text = await env.metrics()
            assert metric_value(text, "tandem_proxy_stale_retries_total") == 1
            assert not env.backend_status(await env.status(), "s1")["bad"]
    finally:
        await stale.stop()


async def test_keep_alive_connections_are_reused():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        try:
            for _ in range(5):
                await client.send(b"GET /id HTTP/1.1\r\nHost: x\r\n\r\n")
                resp = await client.response()
                assert (resp.status, resp.body) == (200, b"s1")
        finally:
            await client.close()
        snap = await env.status()
        assert env.backend_status(snap, "s1")["idle_connections"] == 1


# --- bad marks: cleared when the backend is seen alive, tried last before giving up ----------


async def test_a_new_cluster_view_listing_a_bad_backend_clears_its_mark():
    async with proxy_env("s1", "s2", max_skip_s=30) as env:
        s1, s2 = env.backends["s1"], env.backends["s2"]
        s1.unavailable = True  # a drain's 503: s1 is marked bad for 30 s
        cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
        assert (await env.get("/id", headers=cookie))[:2] == (200, "s2")
        assert env.backend_status(await env.status(), "s1")["bad"]
        s1.unavailable = False  # back (restarted, rejoined)...
        s2.view = ("v2", f"v2; s1=127.0.0.1:{s1.port}, s2=127.0.0.1:{s2.port}")
        # ...and the cluster says so on the next response the proxy sees
        await env.get("/id", headers={"Cookie": f"JSESSIONID={token('s2', 's1')}"})
        snap = await env.status()
        assert snap["view"] == "v2" and not env.backend_status(snap, "s1")["bad"]
        assert (await env.get("/id", headers=cookie))[:2] == (200, "s1")  # before 30 s


async def test_a_passing_health_probe_clears_a_bad_mark_unless_it_says_draining():
    async with proxy_env("s1", "s2", max_skip_s=30, health_interval_s=0.05) as env:
        s1 = env.backends["s1"]
        s1.unavailable = True
        s1.health_state = "draining"  # health answers 200 while draining
        cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
        assert (await env.get("/id", headers=cookie))[:2] == (200, "s2")
        probes = s1.hits["/__tandem/health"]
        while s1.hits["/__tandem/health"] < probes + 3:
            await asyncio.sleep(0.02)
        assert env.backend_status(await env.status(), "s1")["bad"]  # still draining
        s1.unavailable = False
        s1.health_state = "up"
        probes = s1.hits["/__tandem/health"]
        while s1.hits["/__tandem/health"] < probes + 2:
            await asyncio.sleep(0.02)
        assert not env.backend_status(await env.status(), "s1")["bad"]
        assert (await env.get("/id", headers=cookie))[:2] == (200, "s1")


async def test_when_the_last_usable_candidate_answers_503_the_marked_ones_are_tried():
    async with proxy_env("s1", "s2", max_skip_s=30) as env:
        s1, s2 = env.backends["s1"], env.backends["s2"]
        cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
        s1.unavailable = True
        assert (await env.get("/id", headers=cookie))[:2] == (200, "s2")  # s1 marked bad
        s1.unavailable = False  # s1 is back, still marked; now s2 drains
        s2.unavailable = True
        with capture_logs() as logs:
            status, body, _ = await env.get("/id", headers=cookie)
        assert (status, body) == (200, "s1")  # not s2's 503
        failovers = [e for e in logs if e["event"] == "failover"]
        assert [(e["from_"], e["to"], e["cause"]) for e in failovers] == [("s2", "s1", "503")]
        snap = await env.status()  # s1 answered: its mark is gone; s2's is new
        assert not env.backend_status(snap, "s1")["bad"] and env.backend_status(snap, "s2")["bad"]
        s1.unavailable = True
        status, body, _ = await env.get("/id", headers=cookie)
        assert (status, body) == (503, "s2 unavailable")  # both declined: the last is relayed
        assert s1.hits["503"] == 2 and s2.hits["503"] == 2
        # every backend marked bad: all are tried again, new sessions too
        s1.unavailable = False
        assert (await env.get("/id"))[:2] == (200, "s1")


# --- a pooled connection that dies under a request ---------------------------------------


def _answers_once_then_dies(backend: RawBackend):
    """Answers the first request of its first connection, stops listening, then reads the
    next request on that connection and closes it without a word: what a backend killed
    between two requests of a keep-alive connection looks like."""

    async def handler(reader, writer):
        head, _ = await read_request(reader)
        backend.requests.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        assert backend._server is not None
        backend._server.close()  # new connections are refused from now on
        head, body = await read_request(reader)
        backend.requests.append(head + body)
        writer.transport.abort()

    return handler


async def test_a_reused_connection_dying_after_the_write_is_an_after_send_retry():
    dying = await _raw(_answers_once_then_dies)
    try:
        async with proxy_env("s2", extra={"s1": dying.port}) as env:
            cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
            assert (await env.get("/a", headers=cookie))[:2] == (200, "ok")
            with capture_logs() as logs:
                status, body, _ = await env.get("/b", headers=cookie)
            assert (status, body) == (200, "s2")
            assert len(dying.requests) == 2  # /b reached s1: it may have been acted on
            retry = [e for e in logs if e["event"] == "retry"]
            assert [(e["backend"], e["cause"], e["reused"]) for e in retry] == [
                ("s1", "reset", True)]
            failovers = [e for e in logs if e["event"] == "failover"]
            assert [(e["from_"], e["to"], e["cause"], e["after_send"]) for e in failovers] == [
                ("s1", "s2", "reset", True)]
            text = await env.metrics()
            assert metric_value(text, "tandem_proxy_retries_total") == 1
            assert metric_value(text, "tandem_proxy_failovers_total", cause="reset") == 1
            assert metric_value(text, "tandem_proxy_failovers_total", cause="connect") == 0
            assert metric_value(text, "tandem_proxy_stale_retries_total") == 1
            s1 = env.backend_status(await env.status(), "s1")
            assert s1["bad"] and s1["connect_errors"] == 1  # the fresh connection failed
    finally:
        await dying.stop()


async def test_a_post_on_a_reused_connection_that_dies_after_the_write_is_not_retried():
    dying = await _raw(_answers_once_then_dies)
    try:
        async with proxy_env("s2", extra={"s1": dying.port}) as env:
            cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
            assert (await env.get("/a", headers=cookie))[:2] == (200, "ok")
            async with env.http.post(env.url + "/echo", data=b"once", headers=cookie) as resp:
                assert resp.status == 502
            assert env.backends["s2"].hits["/echo"] == 0
            text = await env.metrics()
            assert metric_value(text, "tandem_proxy_retries_total") == 0
            assert metric_value(text, "tandem_proxy_stale_retries_total") == 0
    finally:
        await dying.stop()


async def test_a_pooled_connection_reset_before_the_write_is_retried_as_unwritten():
    # A plain socket as the backend, so that it can reset the pooled connection at a
    # chosen moment: right after the client's request reached the proxy's socket and
    # before the proxy's loop ran. The proxy sees the request first (the kernel reports
    # ready sockets in order), writes it to the dead connection, and that write fails
    # at once: no byte of the request left, so it goes again, whatever the method.
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    received: list[bytes] = []

    async def serve_one() -> socket.socket:
        conn, _ = await loop.sock_accept(listener)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"once"):
            data += await loop.sock_recv(conn, 65536)
        received.append(data)
        await loop.sock_sendall(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return conn

    try:
        async with proxy_env(extra={"s1": listener.getsockname()[1]}) as env:
            client = await RawClient.open(env.port)
            request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nonce"
            await client.send(request)
            first = await serve_one()
            assert (await client.response()).status == 200
            await asyncio.sleep(0.05)  # the upstream connection is back in the pool
            with capture_logs() as logs:
                client.writer.write(request)  # reaches the proxy's socket now...
                first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
                first.close()  # ...then the pooled connection is reset
                second = await serve_one()
                resp = await client.response()
            assert (resp.status, resp.body) == (200, b"ok")
            second.close()
            await client.close()
            assert len(received) == 2  # the POST reached the backend once each time
            retry = [e for e in logs if e["event"] == "retry"]
            assert [(e["cause"], e["reused"]) for e in retry] == [("unwritten", True)]
            text = await env.metrics()
            assert metric_value(text, "tandem_proxy_stale_retries_total") == 1
            assert metric_value(text, "tandem_proxy_retries_total") == 0  # never written
    finally:
        listener.close()
