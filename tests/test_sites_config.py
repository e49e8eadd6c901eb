"""The `[[sites]]` section of the cluster file, and the trust between sites' tokens."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tandem.config import ConfigError, load, loads
from tandem.errors import BadSignature, MalformedToken
from tandem.sites import SiteServer, TrustedCodec, rank_remote
from tandem.token import Route, TokenCodec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example-site-a.toml"
SOURCE = "sites.toml"

BASE = """
[cluster]
name = "a"
secrets = ["sa"]
[[servers]]
id = "a1"
http = "127.0.0.1:9001"
replication = "127.0.0.1:7001"
site_replication = "127.0.0.1:6001"
[[sites]]
name = "b"
secrets = ["sb"]
[[sites.servers]]
id = "b1"
http = "127.0.0.1:9101"
site_replication = "127.0.0.1:6101"
"""


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, source=SOURCE, environ={})
    assert info.value.file == SOURCE
    return info.value


def test_example_loads() -> None:
    config = load(EXAMPLE, environ={})
    (site,) = config.sites
    assert site.name == "b" and site.mode == "man" and site.remote_sync
    assert [s.id for s in site.servers] == ["b1", "b2", "b3"]
    assert all(s.site_replication is not None for s in config.servers)


def test_defaults() -> None:
    (site,) = loads(BASE, source=SOURCE, environ={}).sites
    assert (site.mode, site.remote_sync, site.flush_interval_s, site.flush_threshold) == (
        "man", True, 1.0, 100)
    assert "sb" not in repr(site)  # secrets never printed


@pytest.mark.parametrize(("replace", "add", "key"), [
    ("", 'bogus = 1', "sites[0].bogus"),                            # unknown key
    ('mode = "man"', 'mode = "lan"', "sites[0].mode"),               # bad choice
    ("", "flush_interval_s = 0", "sites[0].flush_interval_s"),       # out of range
    ('name = "b"', 'name = "a"', "sites[0].name"),                   # our own name
    ('secrets = ["sb"]', "secrets = []", "sites[0].secrets"),        # no trust
    ('id = "b1"', 'id = "a1"', "sites[0].servers[0].id"),            # id used at A
    ('http = "127.0.0.1:9101"', 'http = "0.0.0.0:9101"', "sites[0].servers[0].http"),
])
def test_bad_site_entries_name_key_value_and_file(replace: str, add: str, key: str) -> None:
    text = BASE.replace("[[sites]]\n", "[[sites]]\nmode = \"man\"\n")
    if replace:
        text = text.replace(replace, add, 1) if replace in text else text
    else:
        text = text.replace('secrets = ["sb"]', f'secrets = ["sb"]\n{add}')
    err = error(text)
    assert err.key == key, str(err)
    assert str(err).startswith(f"{key}: ") and f" in {SOURCE}" in str(err)


def test_servers_need_a_site_replication_address() -> None:
    err = error(BASE.replace('site_replication = "127.0.0.1:6001"\n', ""))
    assert err.key == "servers[0].site_replication"


def test_wan_needs_a_store_here() -> None:
    err = error(BASE.replace('name = "b"', 'name = "b"\nmode = "wan"'))
    assert err.key == "sites[0].mode" and "persistence" in str(err)
    loads(BASE.replace('name = "b"', 'name = "b"\nmode = "wan"') + '\n[session]\n'
          'persistence = "sqlite"\n', source=SOURCE, environ={})


def test_secrets_are_never_shown() -> None:
    err = error(BASE.replace('secrets = ["sb"]', 'secrets = "sb"\nsecret_x = "hunter2"'))
    assert "hunter2" not in str(err)


def test_trusted_codec_honours_a_site_only_for_its_own_servers() -> None:
    (site,) = loads(BASE, source=SOURCE, environ={}).sites
    ours = TrustedCodec(["sa"], [site])
    theirs = TokenCodec(["sb"])
    assert ours.decode(theirs.encode(Route("S" * 32, "b1", None))).primary == "b1"
    assert ours.decode(ours.encode(Route("S" * 32, "a1", None))).primary == "a1"
    with pytest.raises(MalformedToken):  # B's secret, naming a server of A
        ours.decode(theirs.encode(Route("S" * 32, "a1", None)))
    with pytest.raises(BadSignature):  # nobody we trust
        ours.decode(TokenCodec(["other"]).encode(Route("S" * 32, "b1", None)))
    # our secret signs; a trusted site's never does
    assert ours.encode(Route("T" * 32, "a1", None)) == TokenCodec(["sa"]).encode(
        Route("T" * 32, "a1", None))


def test_rank_remote_is_a_stable_spread() -> None:
    from tandem.address import Address
    servers = [SiteServer(f"b{i}", Address("127.0.0.1", 9000 + i),
                          Address("127.0.0.1", 6000 + i)) for i in range(3)]
    firsts = [rank_remote(f"sid{i}", servers)[0].id for i in range(300)]
    assert all(firsts.count(f"b{i}") > 60 for i in range(3))
    assert rank_remote("x", servers) == rank_remote("x", list(reversed(servers)))
    assert re.fullmatch(r"b\d", firsts[0])


def test_tls_between_the_sites_goes_with_the_sites_own_tls() -> None:
    tls = 'tls_ca = "ca.crt"\ntls_cert = "{id}.crt"\ntls_key = "{id}.key"\n'
    err = error(BASE.replace('secrets = ["sa"]\n', 'secrets = ["sa"]\n' + tls))
    assert err.key == "sites[0].tls_ca" and "required" in str(err)
    err = error(BASE.replace('secrets = ["sb"]\n', 'secrets = ["sb"]\ntls_ca = "b-ca.crt"\n'))
    assert err.key == "sites[0].tls_ca" and "without cluster.tls_ca" in str(err)
    both = BASE.replace('secrets = ["sa"]\n', 'secrets = ["sa"]\n' + tls).replace(
        'secrets = ["sb"]\n', 'secrets = ["sb"]\ntls_ca = "b-ca.crt"\n')
    (site,) = loads(both, source=SOURCE, environ={}).sites
    assert site.tls_ca == "b-ca.crt"
