"""`tandem up` with the embedded default cluster, as the README tells a newcomer to run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tandem.config import default_config_path, load
from tests.cluster import ROOT


def _get(url: str) -> tuple[int, str, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode(), dict(resp.headers)


def _pids_of(server: str) -> list[int]:
    """Backends of *this* `tandem up` (the embedded config), not other clusters' on the box."""
    out = subprocess.run(["pgrep", "-f", f"backend --config {default_config_path()} "
                                         f"--server {server} "],
                         capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_tandem_up_serves_the_demo_survives_a_kill_and_stops_cleanly(tmp_path: Path):
    cfg = load(default_config_path())
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "proxy.cli", "up"], cwd=tmp_path,
                          stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    base = f"http://{cfg.proxy.listen}"
    try:
        # only what *this* `tandem up` serves counts: wait for its announcement first
        deadline = time.monotonic() + 30
        while "tandem is up: http://127.0.0.1:8080/" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        status, page, _ = _get(base + "/")
        assert status == 200 and "tandem demo" in page

        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        # the demo's links carry the token for cookie-less clients; the opener keeps cookies
        for _ in range(3):
            opener.open(base + "/inc", timeout=5).read()
        info = json.loads(opener.open(base + "/api", timeout=5).read())
        assert info["count"] == 3 and info["secondary"] not in (None, "NONE")
        for pid in _pids_of(info["primary"]):
            os.kill(pid, signal.SIGKILL)
        opener.open(base + "/inc", timeout=5).read()
        after = json.loads(opener.open(base + "/api", timeout=5).read())
        assert after["count"] == 4 and after["server"] == info["secondary"]
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=30)
        finally:
            log.close()
    text = (tmp_path / "up.log").read_text()
    assert code == 0, text
    assert not any(_pids_of(s.id) for s in cfg.servers)
    # the killed server was restarted; Ctrl-C: one line per process, the proxy first
    assert f"tandem: {info['primary']} exited (killed by SIGKILL); restarting it" in text
    assert [line.split(" (")[0] for line in text.strip().splitlines()[-4:]] == [
        "tandem: proxy stopped", "tandem: s1 stopped", "tandem: s2 stopped",
        "tandem: s3 stopped"], text


@pytest.mark.timeout(120)
def test_the_wheel_embeds_the_default_cluster_and_the_demo(tmp_path: Path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tandem_proxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tandem/default.toml" in names
    assert "backends/demo/__init__.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
