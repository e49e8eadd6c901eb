"""The admin listener: status page, metrics, state changes; active health probes."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.proxy_support import closed_port, metric_value, proxy_env, token


async def test_status_json_and_html():
    async with proxy_env("s1", "s2") as env:
        for _ in range(3):
            await env.get("/id")
        snap = await env.status()
        assert snap["requests"]["total"] == 3 and snap["requests"]["2xx"] == 3
        assert [b["id"] for b in snap["backends"]] == ["s1", "s2"]
        assert sum(b["routed"] for b in snap["backends"]) == 3
        assert all(b["state"] == "up" and not b["bad"] for b in snap["backends"])
        async with env.http.get(env.admin_url + "/__tandem/status",
                                headers={"Accept": "application/json"}) as resp:
            assert resp.content_type == "application/json"
            assert (await resp.json())["backends"][0]["id"] == "s1"
        async with env.http.get(env.admin_url + "/__tandem/status") as resp:
            assert resp.content_type == "text/html"
            page = await resp.text()
        assert "<table>" in page and "<td>s1</td>" in page and "<td>s2</td>" in page


async def test_metrics_text_exposition():
    async with proxy_env("s1", extra={"s2": closed_port()}) as env:
        await env.get("/id", headers={"Cookie": f"JSESSIONID={token('s2', 's1')}"})
        await env.get("/status/404")
        await env.get("/id", headers={"Cookie": "JSESSIONID=forged"})
        async with env.http.get(env.admin_url + "/__tandem/metrics") as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
        assert "# TYPE tandem_proxy_requests_total counter" in text
        assert "# TYPE tandem_proxy_upstream_latency_seconds histogram" in text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert {"tandem_proxy_requests", "tandem_proxy_failovers", "tandem_proxy_retries",
                "tandem_proxy_bad_tokens", "tandem_proxy_upstream_connect_errors",
                "tandem_proxy_upstream_io_errors", "tandem_proxy_backend_state",
                "tandem_proxy_upstream_latency_seconds"} <= set(families)
        assert metric_value(text, "tandem_proxy_requests_total", **{"class": "2xx"}) == 2
        assert metric_value(text, "tandem_proxy_requests_total", **{"class": "4xx"}) == 1
        assert metric_value(text, "tandem_proxy_failovers_total", cause="connect") == 1
        assert metric_value(text, "tandem_proxy_bad_tokens_total") == 1
        assert metric_value(text, "tandem_proxy_upstream_connect_errors_total",
                            backend="s2") == 1
        assert metric_value(text, "tandem_proxy_backend_state", backend="s1", state="up") == 1
        assert metric_value(text, "tandem_proxy_upstream_latency_seconds_count",
                            backend="s1") == 3
        assert metric_value(text, "tandem_proxy_upstream_latency_seconds_bucket",
                            backend="s1", le="+Inf") == 3


async def test_draining_stops_new_sessions_but_keeps_existing_ones():
    async with proxy_env("s1", "s2", "s3") as env:
        url = env.admin_url + "/__tandem/backends/s1/state"
        async with env.http.post(url, data="draining") as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "draining"
        new = [(await env.get("/id"))[1] for _ in range(6)]
        assert "s1" not in new
        cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
        assert [(await env.get("/id", headers=cookie))[1] for _ in range(3)] == ["s1"] * 3
        snap = await env.status()
        assert env.backend_status(snap, "s1")["state"] == "draining"
        async with env.http.post(url, data="down") as resp:
            assert resp.status == 200
        assert (await env.get("/id", headers=cookie))[1] == "s2"  # down: sessions move
        async with env.http.post(url, json={"state": "up"}) as resp:
            assert resp.status == 200
        assert "s1" in {(await env.get("/id"))[1] for _ in range(3)}
        async with env.http.post(url, data="sideways") as resp:
            assert resp.status == 400 and "up, draining, down" in await resp.text()
        async with env.http.post(env.admin_url + "/__tandem/backends/s9/state",
                                 data="up") as resp:
            assert resp.status == 404


async def test_active_health_probes_take_a_backend_down_and_back_up():
    async with proxy_env("s1", "s2", health_interval_s=0.05, health_rise=2,
                         health_fall=2) as env:
        s1 = env.backends["s1"]

        async def state() -> str:
            return str(env.backend_status(await env.status(), "s1")["state"])

        async def wait_for(want: str) -> None:
            async with asyncio.timeout(3):
                while await state() != want:
                    await asyncio.sleep(0.02)

        await asyncio.sleep(0.2)
        assert s1.hits["/__tandem/health"] >= 2 and await state() == "up"
        s1.health_status = 500
        await wait_for("down")
        info = env.backend_status(await env.status(), "s1")
        assert info["state_summary"] == "failing (probe)"
        assert info["state_detail"].endswith("probes failed in a row")
        cookie = {"Cookie": f"JSESSIONID={token('s1', 's2')}"}
        assert (await env.get("/id", headers=cookie))[1] == "s2"
        assert metric_value(await env.metrics(), "tandem_proxy_backend_state",
                            backend="s1", state="down") == 1
        s1.health_status = 200
        await wait_for("up")
        assert env.backend_status(await env.status(), "s1")["state_summary"] == "serving"
        assert (await env.get("/id", headers=cookie))[1] == "s1"
