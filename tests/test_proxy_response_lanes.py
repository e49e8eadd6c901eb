"""The response pipeline (proxy/responses.py: repeat, shape, regex + parse) against the
general path: the same bytes reach the client either way; and what each layer relies on."""

from __future__ import annotations

import asyncio

import pytest

from tests.proxy_support import (
    RawBackend,
    RawClient,
    answering,
    answering_always,
    ask,
    proxy_env,
    read_request,
    token,
)


async def test_whole_responses_are_relayed_byte_for_byte_and_others_rewritten():
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-App: 1\r\n\r\nhello",  # relayed as read
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n\r\nhello",
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    ]

    backend = await RawBackend(answering(responses)).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            raw = [r.raw_head + r.raw_body for r in await ask(env.port, len(responses))]
        assert raw[0] == responses[0]
        assert b"keep-alive" not in raw[1].lower() and raw[1].endswith(b"\r\n\r\nhello")
        assert raw[2] == responses[2]
        assert backend.connections == 1
    finally:
        await backend.stop()


async def test_an_invalid_whole_response_is_a_bad_gateway():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBad Header: x\r\n\r\nok")
        await writer.drain()
        await reader.read()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            status, body, _ = await env.get("/")
            assert status == 502 and "invalid response" in body
    finally:
        await backend.stop()


async def test_an_unusual_status_class_is_relayed_and_counted():
    backend = await RawBackend(answering_always(
        b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok")).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            for _ in range(2):
                await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                resp = await client.response()
                assert (resp.status, resp.body) == (600, b"ok")
            await client.close()
            assert (await env.status())["requests"]["total"] == 2
    finally:
        await backend.stop()


async def test_a_response_as_long_as_the_last_one_relayed_whole_is_still_looked_at():
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",  # the same head again
        b"HTTP/1.1 503 OK\r\nContent-Length: 2\r\n\r\nok",  # same size: fails over
    ]

    backend = await RawBackend(answering(responses)).start()
    try:
        async with proxy_env("s2", extra={"s1": backend.port}) as env:
            cookie = f"Cookie: JSESSIONID={token('s1', 's2')}\r\n".encode()
            got = await ask(env.port, 3,
                            b"GET /status/201 HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n")
            assert [(r.status, r.body) for r in got] == [(200, b"ok"), (200, b"ok"),
                                                         (201, b"s2 201")]
    finally:
        await backend.stop()


async def test_an_invalid_response_as_long_as_the_last_one_relayed_whole_is_a_bad_gateway():
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: 1\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App\x01 1\r\n\r\nok",
    ]

    backend = await RawBackend(answering(responses)).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            first, resp = await ask(env.port, 2)
            assert first.body == b"ok"
            assert resp.status == 502 and b"invalid response" in resp.body
    finally:
        await backend.stop()


async def test_responses_that_cannot_be_relayed_whole_take_the_general_path():
    async def handler(reader, writer):
        await read_request(reader)  # the body in a later read than the head
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"world")
        await writer.drain()
        await read_request(reader)  # whole, with fields to drop
        writer.write(b"HTTP/1.1 200 OK\r\nX-Tandem-Secret: 1\r\nProxy-Thing: 2\r\n"
                     b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # whole, nothing to drop: as is
        writer.write(b"HTTP/1.1 200 OK\r\nX-App: 3\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            got = await ask(env.port, 3)
        assert [r.body for r in got] == [b"helloworld", b"ok", b"ok"]
        assert not got[1].has("x-tandem-secret") and not got[1].has("proxy-thing")
        assert got[2].header("x-app") == "3"
        assert backend.connections == 1
    finally:
        await backend.stop()


async def test_responses_shaped_like_the_last_whole_one_are_relayed_as_read_when_they_may_be():
    # Heads that differ from the last one relayed whole only in digits skip the per-field
    # check; what the digits say (status, version, length) is still looked at.
    responses = [
        b"HTTP/1.1 200 OK\r\nX-Seq: 1\r\nContent-Length: 2\r\n\r\nok",  # regex + parse
        b"HTTP/1.1 201 OK\r\nX-Seq: 2\r\nContent-Length: 2\r\n\r\nhi",  # its shape: as read
        b"HTTP/1.1 200 OK\r\nX-Seq: 3\r\nContent-Length: 5\r\n\r\nhello",  # another length
        b"HTTP/1.1 200 OK\r\nX-Seq: 4\r\nContent-Length: 9\r\n\r\nhel",  # not whole yet
        b"HTTP/1.1 204 OK\r\nX-Seq: 5\r\nContent-Length: 0\r\n\r\n",  # no body whatever
        b"HTTP/1.0 200 OK\r\nX-Seq: 6\r\nContent-Length: 2\r\n\r\nok",  # HTTP/1.0: rewritten
    ]

    async def handler(reader, writer):
        for data in responses:
            await read_request(reader)
            writer.write(data)
            await writer.drain()
            if data.endswith(b"hel"):
                await asyncio.sleep(0.05)
                writer.write(b"lo you")  # the rest of that body, in a later read
                await writer.drain()
        await reader.read()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            got = await ask(env.port, len(responses))
        assert [(r.status, r.body) for r in got] == [
            (200, b"ok"), (201, b"hi"), (200, b"hello"), (200, b"hello you"), (204, b""),
            (200, b"ok")]
        assert [r.header("x-seq") for r in got] == ["1", "2", "3", "4", "5", "6"]
        assert backend.connections == 1
    finally:
        await backend.stop()


@pytest.mark.parametrize(("second", "relayed_as_read"), [
    (b"HTTP/1.1 200 OK\r\nX-Seq: 2\r\nContent-Length: 2\r\n\r\nhi", True),
    (b"HTTP/1.0 200 OK\r\nX-Seq: 2\r\nContent-Length: 2\r\n\r\nhi", False),  # rewritten
])
async def test_a_response_shaped_like_the_last_whole_one_is_relayed_as_read_if_http11(
        second, relayed_as_read):
    backend = await RawBackend(answering([
        b"HTTP/1.1 200 OK\r\nX-Seq: 1\r\nContent-Length: 2\r\n\r\nok", second])).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            got = [r.raw_head + r.raw_body for r in await ask(env.port, 2)]
        assert (got[1] == second) == relayed_as_read
        assert got[1].startswith(b"HTTP/1.1 200 ") and got[1].endswith(b"\r\n\r\nhi")
    finally:
        await backend.stop()


async def test_a_same_shaped_response_that_fails_over_or_is_invalid():
    # 503 in the shape of the last whole response: fails over; an HTTP version llhttp
    # refuses, in that shape too: a bad gateway.
    s1 = await RawBackend(answering([
        b"HTTP/1.1 200 OK\r\nX-Seq: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 503 OK\r\nX-Seq: 2\r\nContent-Length: 2\r\n\r\nno",
    ])).start()
    bad = await RawBackend(answering([
        b"HTTP/1.1 200 OK\r\nX-Seq: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.9 200 OK\r\nX-Seq: 2\r\nContent-Length: 2\r\n\r\nok",
    ])).start()
    try:
        async with proxy_env("s2", extra={"s1": s1.port}) as env:
            cookie = f"Cookie: JSESSIONID={token('s1', 's2')}\r\n".encode()
            got = await ask(env.port, 2,
                            b"GET /status/200 HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n")
            assert [(r.status, r.body) for r in got] == [(200, b"ok"), (200, b"s2 200")]
        async with proxy_env(extra={"s1": bad.port}) as env:
            got = await ask(env.port, 2)
            assert [(r.status, b"invalid response" in r.body) for r in got] == [
                (200, False), (502, True)]
    finally:
        await s1.stop()
        await bad.stop()


def test_llhttp_reads_no_digit_of_a_response_head_but_the_version_and_the_length():
    # What relaying a response in the shape of the last whole one with no parse rests on
    # (proxy/responses.py, layer 2): llhttp accepts any digits in a head it accepted —
    # status code, field names and values, Content-Length's (its value frames the body) —
    # but the version's.
    from httptools import HttpParserError, HttpResponseParser

    class Callbacks:
        def __init__(self) -> None:
            self.complete = 0

        def on_message_complete(self) -> None:
            self.complete += 1

    def parse(data: bytes) -> bool:
        cb = Callbacks()
        try:
            HttpResponseParser(cb).feed_data(data)
        except HttpParserError:
            return False
        return cb.complete == 1

    head = b"HTTP/1.1 %s OK\r\nX-%s: %s\r\nContent-Length: %s\r\n\r\n"
    for status in (b"000", b"099", b"200", b"599", b"600", b"999"):
        for name in (b"0", b"99"):
            for value in (b"0", b"1234567890"):
                for length, body in ((b"2", b"ok"), (b"0002", b"ok"), (b"0", b"")):
                    assert parse(head % (status, name, value, length) + body)
    for version in (b"1.0", b"1.1"):  # (what the version's digits say is checked)
        assert parse(b"HTTP/%s 200 OK\r\nContent-Length: 2\r\n\r\nok" % version)
    assert not parse(b"HTTP/1.9 200 OK\r\nContent-Length: 2\r\n\r\nok")
