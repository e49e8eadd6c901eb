"""Servers joining and leaving a running cluster (docs/deployment.md, "Joining and leaving").

A server not in the running servers' cluster file starts with a file of its own that lists
it (and some or all of the running ones); its handshake announces where it is, the server
it dialled admits it and tells the others, the view binds it, and the proxy learns it from
the view. Real processes on loopback; 127.0.0.4 stands for the new server's host.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from tests.cluster import Client, Cluster, free_ports, get_json


def join(cluster: Cluster, sid: str, *, seeds: list[str] | None = None,
         secret: str = "test-secret", host: str = "127.0.0.4",
         advertise_replication: str | None = None) -> None:
    """Start `sid` with a cluster file of its own: the running cluster's settings, the
    servers named in `seeds` (all of them by default), and itself."""
    text = cluster.config_path.read_text().replace('["test-secret"]', f'["{secret}"]')
    head, _, _ = text.partition("\n[[servers]]")
    blocks = ["[[servers]]" + b for b in text.split("\n[[servers]]")[1:]]
    kept = [b for b in blocks if seeds is None or any(f'id = "{s}"' in b for s in seeds)]
    http, repl = free_ports(2)
    own = f'[[servers]]\nid = "{sid}"\nhttp = "{host}:{http}"\n'
    if advertise_replication:  # (announced, but not where it listens)
        own += (f'replication = "{advertise_replication}"\n'
                f'replication_bind = "{host}:{repl}"\n')
    else:
        own += f'replication = "{host}:{repl}"\n'
    path = cluster.tmp / f"cluster-{sid}.toml"
    path.write_text("\n".join([head, *kept, own]))
    proc = cluster._spawn(sid, ["backend", "--config", str(path), "--server", sid,
                                "--app", cluster.app, "--interface", cluster.interface])
    cluster.servers[sid] = {"id": sid, "http": http, "host": host, "proc": proc}


def members(cluster: Cluster, sid: str) -> list[str]:
    return sorted(cluster.health(sid)["members"])


def proxy_backends(cluster: Cluster) -> dict[str, Any]:
    status = get_json(f"http://127.0.0.1:{cluster.admin_port}/__tandem/status?format=json")
    return {b["id"]: b for b in status["backends"]}


def wait_until(ok: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_a_new_server_joins_the_view_the_proxy_routes_to_it_and_its_sessions_fail_over(
        make_cluster: Any) -> None:
    cluster = make_cluster(n=3).start()
    join(cluster, "s4")
    cluster.wait_health("s4")
    cluster.wait_formed()  # every one of the four sees the others, one view, leases held
    assert members(cluster, "s1") == ["s1", "s2", "s3", "s4"]
    admitted = cluster.wait_event("s1", "server_admitted")
    assert admitted and admitted[0]["server"] == "s4"
    # the proxy learns it from the view and gives it new sessions
    # (a backend's answer carries the view when the proxy's is older)
    wait_until(lambda: Client(cluster.proxy_url).get("/count")[0] == 200
               and "s4" in proxy_backends(cluster), "the proxy learns s4")
    on_s4 = None
    for _ in range(40):
        c = Client(cluster.proxy_url)
        status, body = c.get("/count")
        assert status == 200
        if c.route[1] == "s4":
            on_s4 = c
            break
    assert on_s4 is not None, "no new session was placed on the joined server"
    on_s4.get("/count")
    secondary = on_s4.route[2]
    assert secondary in ("s1", "s2", "s3")
    cluster.kill("s4")  # kill -9 of the joined server: its sessions go on at their secondary
    status, body = on_s4.get("/count")
    assert status == 200 and body["counter"] == 3
    assert on_s4.route[1] == secondary


def test_a_server_announced_to_one_seed_is_learned_by_all_and_leaves_with_its_sessions(
        make_cluster: Any) -> None:
    cluster = make_cluster(n=3).start()
    join(cluster, "s4", seeds=["s1"])  # its file knows only s1 (and itself)
    cluster.wait_health("s4")
    cluster.wait_formed()  # s2 and s3 learned it from s1, and s4 learned them
    assert members(cluster, "s3") == ["s1", "s2", "s3", "s4"]
    assert cluster.health("s4")["peers"] == {"s1": "alive", "s2": "alive", "s3": "alive"}
    # a session whose primary is s4 (straight at it), then s4 leaves (SIGTERM: drain)
    c = Client(cluster.url("s4"))
    for i in range(3):
        assert c.get("/count")[1]["counter"] == i + 1
    new_home = c.route[2]
    cluster.kill("s4", signal.SIGTERM)
    cluster.wait_formed(alive=["s1", "s2", "s3"])
    assert members(cluster, "s1") == ["s1", "s2", "s3"]
    wait_until(lambda: all("s4" not in cluster.health(s)["peers"] for s in ("s1", "s2", "s3")),
               "the servers forget the joined server that left")
    status, body = c.get("/count", base=cluster.url(new_home))
    assert status == 200 and body["counter"] == 4  # handed over before it left


def test_a_join_without_the_cluster_secret_or_with_a_taken_address_is_refused(
        make_cluster: Any) -> None:
    cluster = make_cluster(n=3).start(proxy=False)
    join(cluster, "s4", secret="not-the-secret")
    s1_repl = cluster.config_path.read_text().split('replication = "')[1].split('"')[0]
    join(cluster, "s5", seeds=["s2"], advertise_replication=s1_repl, host="127.0.0.5")

    def reasons(sid: str) -> str:
        return " ".join(str(e.get("reason")) for e in cluster.events(sid)
                        if e.get("event") == "peer_refused")

    # (each process needs a few seconds to start on a loaded machine: wait for the refusals)
    wait_until(lambda: "wrong cluster secret" in reasons("s1"), "s1 refuses s4")
    wait_until(lambda: "address already used by s1" in reasons("s2"), "s2 refuses s5")
    assert "join refused" in reasons("s2")
    time.sleep(1.5)  # a few heartbeats more: nothing admitted meanwhile either
    for sid in ("s1", "s2", "s3"):
        assert members(cluster, sid) == ["s1", "s2", "s3"]
        assert not [e for e in cluster.events(sid) if e.get("event") == "server_admitted"]
