"""Mutual TLS between two sites (docs/sites.md, "Trust"): each site has its own CA (made by
`tandem certs`), its file names the other site's CA (`sites[].tls_ca`), and the inter-site
channel is TLS with both certificates checked — besides both sites' secrets in the HMAC
handshake. Real processes of two 3-server sites with their proxies.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import ROOT, Client
from tests.sites import TwoSites, write_then_kill
from tests.test_tls import TLS_KEYS, certs


def tls_sites(tmp: Path, *, trust: dict[str, str] | None = None) -> TwoSites:
    """Two sites, each with a CA of its own; `trust[site]`: the CA file (relative to that
    site's directory) its file names for the other site (default: the other site's CA)."""
    sites = TwoSites(tmp, mode="man")
    for name in ("a", "b"):  # (before the TLS keys: the file loads without them)
        c = sites.clusters[name]
        certs(c.config_path, c.tmp / "certs")
    for name, other in (("a", "b"), ("b", "a")):
        c = sites.clusters[name]
        ca = (trust or {}).get(name, f"../{other}/certs/ca.crt")
        keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in TLS_KEYS.items())
        text = c.config_path.read_text().replace("[cluster]\n", "[cluster]\n" + keys, 1)
        text = text.replace(f'[[sites]]\nname = "{other}"\n',
                            f'[[sites]]\nname = "{other}"\ntls_ca = "{ca}"\n', 1)
        c.config_path.write_text(text)
    return sites


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[TwoSites]]:
    made: list[TwoSites] = []
    yield made
    for s in made:
        s.close()


def site_port(sites: TwoSites, sid: str) -> int:
    return sites.site_ports[sid]


def test_man_over_mutual_tls_between_the_sites(made: list[TwoSites], tmp_path: Path) -> None:
    sites = tls_sites(tmp_path)
    made.append(sites)
    sites.start()
    assert sites.a.health("a1")["tls"] is not None
    # the site listener speaks TLS: a plaintext dialler gets no challenge, and is refused
    with socket.create_connection(("127.0.0.1", site_port(sites, "b1")), timeout=5) as raw:
        raw.sendall(b"\x00\x00\x00\x10{\"op\": \"hello\"}")
        raw.settimeout(5.0)
        assert raw.recv(100) == b""
    refused = sites.b.wait_event("b1", "tls_handshake_failed")
    assert refused and refused[0]["side"] == "accept"
    # the links between the sites came up over TLS (each side checked the other's CA)
    deadline = time.monotonic() + 20
    while not all(v == "alive" for v in sites.b.health("b1")["sites"]["links"].values()):
        assert time.monotonic() < deadline, sites.b.health("b1")["sites"]
        time.sleep(0.2)
    clients = [Client(sites.a.proxy_url) for _ in range(5)]
    for c in clients:
        assert c.get("/count")[0] == 200
    acked, _ = write_then_kill(sites, clients, 2.0)
    for i, c in enumerate(clients):
        status, body = c.get("/count", base=sites.b.proxy_url)
        # every acknowledged write is in B's copy (the first write, then len(acked[i]) more)
        assert status == 200 and body["counter"] == len(acked[i]) + 2, body
    # an operator's command over TLS, with this site's own certificate: B answers it
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "site-down", "--config",
                           str(sites.b.config_path), "--site", "a"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("declared down") == 3, done.stdout


def test_a_site_whose_ca_is_not_the_one_trusted_is_refused(made: list[TwoSites],
                                                           tmp_path: Path) -> None:
    # B's file names, for site A, a CA that signed none of A's servers
    sites = tls_sites(tmp_path, trust={"b": "../other/ca.crt"})
    made.append(sites)
    other = tmp_path / "other"
    other.mkdir()
    throwaway = other / "b.toml"  # (B's file without TLS keys: `tandem certs` reads it)
    throwaway.write_text("\n".join(line for line in sites.b.config_path.read_text()
                                   .splitlines() if not line.startswith("tls_")))
    certs(throwaway, other)
    sites.start()
    refused: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while not refused:
        assert time.monotonic() < deadline, "no refused handshake at B"
        refused = [e for b in sites.b.servers for e in sites.b.events(b)
                   if e.get("event") == "tls_handshake_failed"]
        time.sleep(0.2)
    assert {e["side"] for e in refused} <= {"accept", "dial"}
    time.sleep(2)  # several rounds of dialling both ways: still no link between the sites
    for b in sites.b.servers:
        assert not any(v in ("alive", "draining")
                       for v in sites.b.health(b)["sites"]["links"].values())
