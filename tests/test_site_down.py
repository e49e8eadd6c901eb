"""`tandem site-down` (docs/sites.md): an operator declares a silent site down. Two sites of
3 real servers each; site A's servers are stopped (SIGSTOP: silent, not refusing), so the
site-down rule cannot fire; after the command B takes A's sessions over with every
MAN-acknowledged write, and when A is resumed its servers do not serve them any more."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.cluster import wire
from backends.sites.channel import CHANNEL_NAME, OPERATOR, command_mac
from tests.cluster import ROOT, Client
from tests.sites import SECRETS, TwoSites

WRITES = 3


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[TwoSites]:
    s = TwoSites(tmp_path, mode="man")
    try:
        yield s.start()
    finally:
        for sid in s.a.servers:  # (a stopped process must be resumed to be killed cleanly)
            proc = s.a.servers[sid]["proc"]
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        s.close()


def site_down(sites: TwoSites, site: str = "a") -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "site-down", "--config",
                           str(sites.b.config_path), "--site", site], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout + done.stderr


def links_to_a(sites: TwoSites, b: str) -> set[str]:
    return set(sites.b.health(b)["sites"]["links"][a] for a in sites.a.servers)


def test_site_down_takes_a_silent_site_over_and_the_site_does_not_serve_them_after(sites):
    clients = []
    for _ in range(6):
        c = Client(sites.a.proxy_url)
        for n in range(1, WRITES + 1):
            status, body = c.get("/count")
            assert status == 200 and body["counter"] == n, body
        clients.append(c)
    old = [(c.token, c.route[1]) for c in clients]

    # while A answers, the command is refused (it is not down), and changes nothing
    code, out = site_down(sites)
    assert code == 1 and out.count("refused: site a answers here") == 3, out

    for sid in sites.a.servers:
        sites.a.kill(sid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while any(links_to_a(sites, b) & {"alive", "draining"} for b in sites.b.servers):
        assert time.monotonic() < deadline, "B's links to A did not fail"
        time.sleep(0.2)
    # silent, not refusing: B must not take A's sessions over by itself
    status, body = clients[0].get("/peek", base=sites.b.url("b1"))
    assert status == 503, body

    code, out = site_down(sites)
    assert code == 0 and out.count("site a declared down") == 3, out
    code, out = site_down(sites)  # safe to repeat
    assert code == 0 and out.count("declared down already") == 3, out
    for b in sites.b.servers:
        assert sites.b.health(b)["sites"]["down"] == ["a"]
        declared = [e for e in sites.b.events(b) if e.get("event") == "site_down"]
        assert declared and declared[0]["proof"] == "declared by an operator", declared

    # every session continues at B with every acknowledged write (asked at each B server:
    # the copy is found wherever it is at B)
    bs = list(sites.b.servers)
    for i, c in enumerate(clients):
        status, body = c.get("/count", base=sites.b.url(bs[i % 3]))
        assert status == 200 and body["counter"] == WRITES + 1, body
        assert c.route[1].startswith("b")

    # A resumes. It still holds those sessions; it must not serve them beside B — not a
    # write, not a read of the old state — whichever of its servers the old token reaches
    for sid in sites.a.servers:
        sites.a.kill(sid, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while any(links_to_a(sites, b) != {"alive"} for b in sites.b.servers):
        assert time.monotonic() < deadline, "B's links to A did not come back"
        time.sleep(0.2)
    time.sleep(0.5)
    for b in sites.b.servers:
        assert sites.b.health(b)["sites"]["down"] == []  # A answers again: up
    for token, primary in old:
        for a in sites.a.servers:
            for path in ("/peek", "/count"):
                stale = Client(sites.a.url(a))
                stale.token = token
                status, body = stale.get(path)
                assert status != 200 or body["counter"] <= 1, (a, path, body)
        # and through A's proxy (cluster affinity: the old token names A's server)
        stale = Client(sites.a.proxy_url)
        stale.token = token
        status, body = stale.get("/peek")
        assert status != 200 or body["counter"] == 0, (primary, body)
    assert sum(sites.a.health(a)["stats"]["superseded"] for a in sites.a.servers) >= len(
        clients)  # (each one's primary at A let go of it)
    # B's sessions are intact, and still B's
    for c in clients:
        status, body = c.get("/count", base=sites.b.proxy_url)
        assert status == 200 and body["counter"] == WRITES + 2, body
        assert body["server"].startswith("b")


def test_site_down_names_a_site_of_the_file_and_takes_this_sites_secret(sites):
    code, out = site_down(sites, "nowhere")
    assert code == 2 and "no site named 'nowhere'" in out and "[[sites]]: a" in out, out

    # site A's own secret opens B's inter-site channel (B trusts it) but gives no command
    async def command(secret: str) -> dict[str, object]:
        reader, writer = await asyncio.open_connection("127.0.0.1", sites.site_ports["b1"])
        try:
            await wire.dial_handshake(reader, writer, me=OPERATOR, peer="b1",
                                      cluster=CHANNEL_NAME, secrets_=[secret, SECRETS["b"]])
            challenge = await wire.read_frame(reader, peer="b1")
            msg = {"op": "site_down", "site": "a"}
            wire.write_frame(writer, {**msg, "mac": command_mac(secret, "b1",
                                                                challenge["nonce"], msg)})
            return await wire.read_frame(reader, peer="b1")
        finally:
            writer.close()

    reply = asyncio.run(command(SECRETS["a"]))
    assert reply["ok"] is False and "bad credentials" in str(reply["error"]), reply
    assert sites.b.wait_event("b1", "operator_refused")
    assert sites.b.health("b1")["sites"]["down"] == []
