"""Throwaway Redis and PostgreSQL servers for the persistence tests, and their fixtures.

Each server runs on a free loopback port with its data in a temp directory and is stopped
at teardown. PostgreSQL refuses to run as root: when the tests run as root (CI), initdb and
postgres run as the `postgres` user, in a directory that user owns. A test skips, saying
what to install, only when the binaries cannot be found.

Use from a test module with `pytest_plugins = ["tests.stores"]`.
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, free_ports

__all__ = ["RedisServer", "RedisClusterServers", "Postgres", "with_persistence"]


def _wait(ok: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None,
          log: Path | None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{text}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout}s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- Redis ------------------------------------------------------------------------------------


def redis_binary() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not found (apt-get install redis-server)")
    return exe


class RedisServer:
    """One `redis-server` on loopback, nothing saved to disk unless a test asks for it."""

    def __init__(self, tmp: Path, *, cluster: bool = False) -> None:
        self.exe = redis_binary()
        self.dir = tmp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _cluster_port() if cluster else free_ports(1)[0]
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                str(self.dir), "--save", "", "--appendonly", "no", "--protected-mode", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file",
                     str(self.dir / "nodes.conf")]
        log = self.dir / "redis.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        _wait(lambda: self.command("PING") == "+PONG", f"redis-server :{self.port}",
              self.proc, log)
        return self

    def command(self, *words: str) -> str:
        """One inline command, the first line of the reply ('' when it cannot connect)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.sendall((" ".join(words) + "\r\n").encode())
                return s.recv(65536).decode(errors="replace").split("\r\n", 1)[0]
        except OSError:
            return ""

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (Redis wants <= 55535)."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        socks = []
        try:
            for p in (port, port + 10000):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisClusterServers:
    """Three cluster-enabled Redis nodes joined into one Redis Cluster (no replicas)."""

    def __init__(self, tmp: Path) -> None:
        self.nodes = [RedisServer(tmp / f"node{i}", cluster=True) for i in range(3)]

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{n.port}" for n in self.nodes]

    def start(self) -> RedisClusterServers:
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.skip("redis-cli not found (apt-get install redis-tools)")
        for node in self.nodes:
            node.start()
        subprocess.run([cli, "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)

        def ok() -> bool:
            return all("cluster_state:ok" in _info(n, "CLUSTER INFO") for n in self.nodes)

        _wait(ok, "redis cluster", None, None)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _info(node: RedisServer, command: str) -> str:
    try:
        with socket.create_connection(("127.0.0.1", node.port), timeout=1.0) as s:
            s.sendall((command + "\r\n").encode())
            return s.recv(65536).decode(errors="replace")
    except OSError:
        return ""


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("postgres")
    if exe is not None and shutil.which("initdb"):
        return Path(exe).parent
    pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")


class Postgres:
    """A PostgreSQL server of its own: initdb in a temp directory, trust auth on loopback."""

    def __init__(self) -> None:
        self.bin = postgres_bindir()
        self.user: dict[str, Any] = {}
        if os.geteuid() == 0:  # postgres refuses root: run as the postgres user
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run "
                            "PostgreSQL as")
            self.user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            self._owner = (pw.pw_uid, pw.pw_gid)
        # under /tmp, not pytest's tmp_path: the postgres user must be able to reach it
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
        if self.user:
            os.chown(self.dir, *self._owner)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "tandem",
                        "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
                       check=True, capture_output=True, timeout=60, **self.user)

    def dsn(self, password: str | None = None) -> str:
        auth = f"tandem:{password}" if password else "tandem"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres"

    def start(self) -> Postgres:
        # durability settings off: these tests kill servers, not machines
        args = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=50"]
        out = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self.user:
            os.chown(self.log, *self._owner)
        try:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.dir, **self.user)
        finally:
            os.close(out)
        _wait(self._ready, f"postgres :{self.port}", self.proc, self.log)
        return self

    def _ready(self) -> bool:
        r = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p",
                            str(self.port), "-q"], capture_output=True)
        return r.returncode == 0

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # fast shutdown: clients are disconnected

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- cluster files ----------------------------------------------------------------------------


def with_persistence(cluster: Cluster, **keys: Any) -> Cluster:
    """Add a [persistence] table to a test cluster's file (before it starts)."""
    import json

    lines = ["", "[persistence]", *(f"{k} = {json.dumps(v)}" for k, v in keys.items())]
    with open(cluster.config_path, "a") as f:
        f.write("\n".join(lines) + "\n")
    return cluster


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis shared by the tests of a run (keys are random SIDs: no clashes)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Redis servers of a test's own (for tests that kill them)."""
    made: list[RedisServer] = []

    def factory() -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(made)}")
        made.append(server)
        return server.start()

    yield factory
    for server in made:
        server.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield servers.start()
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL shared by the tests of a run."""
    server = Postgres()
    try:
        yield server.start()
    finally:
        server.destroy()


@pytest.fixture
def make_postgres() -> Iterator[Callable[[], Postgres]]:
    """PostgreSQL servers of a test's own (for tests that stop them)."""
    made: list[Postgres] = []

    def factory() -> Postgres:
        server = Postgres()
        made.append(server)
        return server.start()

    yield factory
    for server in made:
        server.destroy()
