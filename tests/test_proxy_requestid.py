"""X-Tandem-Request-Id: one per client request, the same on every retry and failover."""

from __future__ import annotations

import re

from proxy.requestid import RequestIds
from tests.proxy_support import RawBackend, RawClient, proxy_env, read_request, token

_ID = re.compile(r"[A-Za-z0-9_-]{16}")


async def test_every_client_request_gets_a_new_id():
    async with proxy_env("s1") as env:
        for _ in range(3):
            assert (await env.get("/id"))[0] == 200  # the fast lane (one request a read)
        client = await RawClient.open(env.port)
        await client.send(b"GET /id HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
                          b"GET /id HTTP/1.1\r\nHost: x\r\n\r\n")  # the general path
        for _ in range(2):
            assert (await client.response()).status == 200
        await client.close()
        ids = env.backends["s1"].request_ids
        assert len(ids) == 5 and len(set(ids)) == 5
        assert all(i is not None and _ID.fullmatch(i) for i in ids), ids


async def test_a_client_cannot_choose_the_id():
    async with proxy_env("s1") as env:
        _, _, _ = await env.get("/id", headers={"X-Tandem-Request-Id": "A" * 16})
        (seen,) = env.backends["s1"].request_ids
        assert seen is not None and seen != "A" * 16 and _ID.fullmatch(seen)


async def test_the_same_id_on_a_failover_after_503():
    async with proxy_env("s1", "s2") as env:
        env.backends["s1"].unavailable = True
        cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
        async with env.http.post(env.url + "/echo", data=b"x", headers=cookie) as resp:
            assert resp.status == 200 and resp.headers["X-Server"] == "s2"
        assert env.backends["s1"].request_ids == env.backends["s2"].request_ids
        assert env.backends["s1"].request_ids[0] is not None


async def test_the_same_id_on_a_retry_after_a_reset():
    seen: list[bytes] = []

    async def dropper(reader, writer):
        head, _ = await read_request(reader)
        seen.append(head)
        writer.transport.abort()

    backend = await RawBackend(dropper).start()
    try:
        async with proxy_env("s2", extra={"s1": backend.port}) as env:
            cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
            assert (await env.get("/id", headers=cookie))[:2] == (200, "s2")
            assert (await env.get("/id", headers=cookie))[:2] == (200, "s2")
        first = [line.split(b": ", 1)[1].decode() for h in seen for line in h.split(b"\r\n")
                 if line.lower().startswith(b"x-tandem-request-id:")]
        assert first == env.backends["s2"].request_ids  # s1 saw each one first
        assert len(set(first)) == 2
    finally:
        await backend.stop()


def test_ids_are_unique_and_url_safe_across_a_counter_roll():
    ids = RequestIds()
    prefix = ids.prefix
    got = [ids.next() for _ in range(10_000)]  # (the high part moves on twice)
    assert len(set(got)) == 10_000
    assert all(_ID.fullmatch(i.decode()) and i.startswith(prefix) for i in got)
    assert [int(i[8:], 16) for i in got] == list(range(10_000))
    ids.count_from(0xFFFFFFFE)  # the last values of a prefix, then a roll
    assert ids.next() == prefix + b"fffffffe"
    last = ids.next()
    assert last == prefix + b"ffffffff"
    rolled = ids.next()
    assert not rolled.startswith(prefix) and rolled.endswith(b"00000000")
    assert _ID.fullmatch(rolled.decode())
