"""The status page: one state per backend, since when, a legend, auto-refresh — on a real
router, a real proxy, and a real cluster that loses a server and gets it back."""

from __future__ import annotations

import html
import time
import urllib.request
from pathlib import Path

from proxy.status import LEGEND, Status, StatusBoard
from tests.cluster import Client, Cluster, get_json
from tests.proxy_support import closed_port, metric_value, proxy_env, token
from tests.test_proxy_router import Clock, make_router


class Wall:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __call__(self) -> float:
        return 1_000_000.0 + self.clock.now  # epoch seconds, moving with the clock


# --- the state and its date, on a real router -----------------------------------------------


def test_one_state_by_precedence_and_the_time_it_last_changed():
    router, clock = make_router(2, max_skip_s=10.0)
    board = StatusBoard(router, clock=clock, wall=Wall(clock))
    s1 = router.get("s1")
    assert board.report(s1).status is Status.SERVING and board.report(s1).since == 1_000_100.0

    clock.now = 105.0
    router.mark_bad(s1)
    report = board.report(s1)
    assert (report.status, report.since) == (Status.SKIPPED, 1_000_105.0)
    assert report.detail.startswith("answered 503: retried at ")  # (no error was counted)
    # everything wrong at once: the operator's state wins, then the probes
    s1.in_view = False
    router.set_healthy(s1, False)
    clock.now = 106.0
    router.set_admin_state("s1", "down")
    assert (board.report(s1).status, board.report(s1).since) == (Status.DOWN_ADMIN, 1_000_106.0)
    clock.now = 107.0
    router.set_admin_state("s1", "up")  # (an operator's up clears the bad mark)
    assert (board.report(s1).status, board.report(s1).since) == (Status.FAILING, 1_000_107.0)
    clock.now = 108.0
    router.set_healthy(s1, True)
    report = board.report(s1)
    assert (report.status, report.since) == (Status.OUT_OF_VIEW, 1_000_108.0)
    clock.now = 109.0
    router.rejoined(s1)
    assert (board.report(s1).status, board.report(s1).since) == (Status.SERVING, 1_000_109.0)
    # a change that does not change the state keeps its date
    clock.now = 110.0
    router.set_says_draining(s1, False)
    router.seen_alive(s1)
    assert board.report(s1).since == 1_000_109.0


def test_a_bad_mark_that_runs_out_is_dated_when_it_ran_out_not_when_seen():
    router, clock = make_router(2, max_skip_s=10.0)
    board = StatusBoard(router, clock=clock, wall=Wall(clock))
    s1 = router.get("s1")
    s1.connect_errors += 1  # (what the exchange counts before it marks)
    router.mark_bad(s1)  # at 100: skipped until 110
    assert board.report(s1).detail.startswith("connect errors: retried at ")
    clock.now = 125.0  # nobody looked at 110
    assert (board.report(s1).status, board.report(s1).since) == (Status.SERVING, 1_000_110.0)
    router.mark_bad(s1)  # at 125, until 135
    clock.now = 140.0  # ran out at 135, unseen; then an operator drains it at 140
    router.set_admin_state("s1", "draining")
    assert (board.report(s1).status, board.report(s1).since) == (Status.DRAINING, 1_000_140.0)
    router.set_admin_state("s1", "up")
    assert (board.report(s1).status, board.report(s1).since) == (Status.SERVING, 1_000_140.0)
    # a mark renewed while it holds keeps the date of the first
    clock.now = 150.0
    router.mark_bad(s1)
    clock.now = 155.0
    router.mark_bad(s1)
    assert (board.report(s1).status, board.report(s1).since) == (Status.SKIPPED, 1_000_150.0)


# --- through the admin listener of a real proxy -----------------------------------------


async def test_the_admin_listener_shows_one_state_and_its_legend():
    async with proxy_env("s1", "s2", extra={"s3": closed_port()}, max_skip_s=30) as env:
        started = time.time()
        snap = await env.status()
        assert {b["state_summary"] for b in snap["backends"]} == {"serving"}
        # s3 refuses connections: a session there fails over, s3 is skipped
        await env.get("/id", headers={"Cookie": f"JSESSIONID={token('s3', 's1')}"})
        s3 = env.backend_status(await env.status(), "s3")
        assert s3["state_summary"] == "skipped" and s3["bad"]
        assert s3["state_detail"].startswith("connect errors: retried at ")
        assert started - 1 <= s3["since"] <= time.time() and s3["since_s_ago"] < 5
        url = env.admin_url + "/__tandem/backends/s1/state"
        for body, want in (("draining", "draining"), ("down", "down (admin)"),
                           ("up", "serving")):
            async with env.http.post(url, data=body) as resp:
                info = await resp.json()
            assert info["state_summary"] == want and info["since_s_ago"] < 1
        assert info["since"] >= s3["since"]
        async with env.http.get(env.admin_url + "/__tandem/status") as resp:
            assert resp.headers["Cache-Control"] == "no-store"
            page = await resp.text()
        assert '<meta http-equiv="refresh" content="5">' in page
        assert '<span class="st skipped" title=' in page and "connect errors: retried at" in page
        assert "s ago" in page
        for status, meaning, todo in LEGEND:  # every state, what it means, what to do
            assert f">{status.value}</span>" in page
            assert html.escape(meaning) in page and html.escape(todo) in page
        assert metric_value(await env.metrics(), "tandem_proxy_backend_state",
                            backend="s1", state="up") == 1


# --- a real cluster: kill -9 a server, start it again, send nothing ----------------------


def status_of(cluster: Cluster, sid: str) -> dict[str, object]:
    snap = get_json(f"http://127.0.0.1:{cluster.admin_port}/__tandem/status?format=json")
    return next(b for b in snap["backends"] if b["id"] == sid) | {
        "requests": snap["requests"]["total"]}


def page(cluster: Cluster) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.admin_port}/__tandem/status",
                                timeout=2.0) as resp:
        return str(resp.read().decode())


def wait_state(cluster: Cluster, sid: str, want: str, timeout: float,
               seen: list[str]) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        info = status_of(cluster, sid)
        if not seen or seen[-1] != info["state_summary"]:
            seen.append(str(info["state_summary"]))
        if info["state_summary"] == want:
            return info
        assert time.monotonic() < deadline, f"{sid} never {want!r}; seen {seen}"
        time.sleep(0.05)


def test_a_killed_and_restarted_server_goes_failing_then_serving_without_traffic(
        tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, n=3, proxy={"health_interval_s": 0.2, "health_fall": 2,
                                            "health_rise": 2, "max_skip_s": 60.0})
    cluster.start()
    try:
        # a session whose primary is s1
        client = Client(cluster.proxy_url)
        for _ in range(12):
            client = Client(cluster.proxy_url)
            assert client.get("/count")[0] == 200
            if client.route[1] == "s1":
                break
        assert client.route[1] == "s1"
        cluster.kill("s1")  # SIGKILL
        # its next request, at once (before the probes see s1 down), fails over: the proxy
        # marks s1 bad and learns the view without it from the response
        assert client.get("/count")[0] == 200
        cluster.wait_formed(alive=["s2", "s3"])
        seen: list[str] = []
        failing = wait_state(cluster, "s1", "failing (probe)", 10.0, seen)
        assert failing["in_view"] is False and failing["bad"] is True
        assert '<span class="st failing" title=' in page(cluster)
        views = metric_value(_metrics(cluster), "tandem_proxy_views_applied_total")

        cluster.start_server("s1")  # no client request from here on
        serving = wait_state(cluster, "s1", "serving", 20.0, seen)
        assert serving["in_view"] is True and serving["bad"] is False
        assert serving["healthy"] is True
        assert serving["requests"] == failing["requests"]  # no traffic did it
        assert metric_value(_metrics(cluster), "tandem_proxy_views_applied_total") == views
        assert float(str(serving["since"])) > float(str(failing["since"]))
        assert seen[-1] == "serving" and "failing (probe)" in seen
        assert "skipped" not in seen[seen.index("failing (probe)"):]
        text = page(cluster)
        assert '<span class="st serving" title=' in text and '"st failing" title' not in text
        events = [e["event"] for e in cluster.events("proxy")]
        assert "backend_rejoined" in events and "backend_healthy" in events
    finally:
        cluster.close()


def _metrics(cluster: Cluster) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.admin_port}/__tandem/metrics",
                                timeout=2.0) as resp:
        return str(resp.read().decode())
