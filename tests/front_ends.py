"""Real HAProxy and nginx in front of a test cluster, configured only by `tandem export`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster import ROOT, Cluster, free_ports

ENGINES = ("haproxy", "nginx")


def have(engine: str) -> bool:
    return shutil.which(engine) is not None or Path(f"/usr/sbin/{engine}").exists()


def binary(engine: str) -> str:
    return shutil.which(engine) or f"/usr/sbin/{engine}"


def tandem(*args: str) -> subprocess.CompletedProcess[str]:
    """`tandem ARGS` from this tree."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


class FrontEnd:
    """HAProxy or nginx running a configuration `tandem export` wrote for `cluster`."""

    def __init__(self, engine: str, cluster: Cluster, where: Path, *,
                 config: Path | None = None) -> None:
        self.engine = engine
        self.where = where
        where.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.listen = f"127.0.0.1:{self.port}"
        self.socket = where / "haproxy.sock"
        self.config = config or cluster.config_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = open(where / f"{engine}.log", "ab")  # noqa: SIM115 - closed in close()

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def export(self) -> None:
        if self.engine == "haproxy":
            done = tandem("export", "haproxy", "--config", str(self.config), "--complete",
                          "--listen", self.listen, "--socket", str(self.socket),
                          "-o", str(self.where / "haproxy.cfg"))
        else:
            done = tandem("export", "nginx", "--config", str(self.config), "--complete",
                          "--listen", self.listen, "--prefix", str(self.where),
                          "-o", str(self.where))
        assert done.returncode == 0, done.stderr

    def start(self) -> FrontEnd:
        self.export()
        if self.engine == "haproxy":
            args = [binary("haproxy"), "-db", "-f", str(self.where / "haproxy.cfg")]
        else:
            args = [binary("nginx"), "-c", str(self.where / "nginx.conf"), "-p",
                    str(self.where), "-e", str(self.where / "error.log"), "-g", "daemon off;"]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.engine} did not start:\n{self.log()}") from None
                time.sleep(0.05)
        return self

    def reload_command(self) -> str:
        return (f"{binary('nginx')} -c {self.where / 'nginx.conf'} -p {self.where} "
                f"-e {self.where / 'error.log'} -s reload")

    def log(self) -> str:
        text = (self.where / f"{self.engine}.log").read_text(errors="replace")
        err = self.where / "error.log"
        if err.exists():
            text += err.read_text(errors="replace")
        return text[-4000:]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
