"""The proxy's data path against HAProxy, nginx and direct access, side by side.

    python bench/proxy_compare.py --runs 7 --duration 5 --baseline eb4e872

Starts on loopback, all at once: a backend (`bench/backend_fast.py`: one uvloop + httptools
process listening as two servers, s1 and s2, answering `ok`), and in front of it tandem's
proxy (`python -m proxy.cli proxy --config F`), HAProxy (`cookie SRV insert`,
`option redispatch`, nbthread 1) and nginx (`hash $cookie_JSESSIONID consistent`,
worker_processes 1, upstream keep-alive). `direct` is wrk straight at s1. Every request
carries `Cookie: JSESSIONID=<signed token for s1>; SRV=s1`, so tandem verifies a route
token and HAProxy routes by its cookie on every request.

wrk (1 thread, keep-alive) drives each contender for `--duration` seconds; per run:
requests/s, p50/p99 latency, and CPU-µs per request of the proxy (utime+stime from
/proc/PID/stat over the run, divided by the requests wrk completed; nginx: master and
worker) and of the backend. After a warm-up each, the measured runs take turns (run 1 of
every contender, then run 2 ..., the order rotated each run), so a change in the machine's
load hits all alike; the report gives medians and, per run, the ratio to HAProxy.

Scenarios: `light` (the backend answers at once: the proxy's own cost shows) and `heavy`
(the backend burns `--burn-us` CPU-µs per request: the backend is the bottleneck and a
proxy should cost it no throughput). Placements: `shared` (no pinning) and `pinned` (every
proxy on CPU 1, the backend and wrk on CPU 0). Every process stays in this script's session,
so in one autogroup, whose CPU share the script raises (`/proc/self/autogroup`, as root).
`--baseline REV` adds `tandem-REV`: the proxy of an earlier commit (from `git archive`),
measured in the same runs. `--vary`: no two requests or responses alike (wrk asks for
`/?n=<counter>`, the backend adds a counting `X-Seq` field), as real traffic is: no proxy
can reuse what it learnt of the previous message's bytes. See bench/README.md.
"""


from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.procstat import descendants, proc_stats  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
SECRET = "bench-proxy-secret"
CHART = ROOT / "bench" / "proxy-comparison.png"
# --vary: every request asks for another URL
_VARY_LUA = """
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/?n=" .. n)
end
"""


# --- processes --------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def tree(root: int) -> list[int]:
    """`root` and its descendants (nginx: the master and its worker)."""
    return descendants(proc_stats(), root)


def switches(pids: list[int]) -> int:
    """Involuntary context switches of `pids` so far (preempted while runnable)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("nonvoluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) of `pids`, in clock ticks."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # (a throw-away certificate)
    return ctx


def wait_http(port: int, proc: subprocess.Popen[bytes], log: Path, cookie: str, *,
              tls: bool = False) -> None:
    """Until a GET through `port` answers 200 `ok` (raises with the log if it never does)."""
    deadline = time.monotonic() + 20
    request = (f"GET /ready HTTP/1.1\r\nHost: bench\r\nCookie: {cookie}\r\n"
               "Connection: close\r\n\r\n").encode()
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                    (_client_tls().wrap_socket(raw) if tls else raw) as s:
                s.sendall(request)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            if data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok"):
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{log.name} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


class Contender:
    """One way to reach the backend: a port, and the processes to charge for it."""

    def __init__(self, name: str, port: int, proc: subprocess.Popen[bytes] | None, *,
                 tls: bool = False) -> None:
        self.name = name
        self.port = port
        self.tls = tls  # clients speak HTTPS to it
        self.proc = proc
        self.pids: list[int] = []

    def settle(self) -> None:
        self.pids = tree(self.proc.pid) if self.proc is not None else []


def _pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child (and what it forks) to `cpus`; None: no pinning."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@contextmanager
def spawn(args: list[str], log: Path, *, cwd: Path = ROOT, stop: signal.Signals = signal.SIGTERM,
          cpus: set[int] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        env = dict(os.environ, TANDEM_LOG_LEVEL="WARNING")
        env.pop("TANDEM_SECRETS", None)
        # (same session as this script: one autogroup, whose share --nice raises)
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_pinned(cpus))
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(stop)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def tandem_config(tmp: Path, port: int, admin: int, backends: list[int],
                  extra: tuple[str, ...] = ()) -> Path:
    path = tmp / "cluster.toml"
    lines = ["[cluster]", f'secrets = ["{SECRET}"]', "", "[proxy]",
             f'listen = "127.0.0.1:{port}"', f'admin = "127.0.0.1:{admin}"', *extra]
    # (replication addresses are required by the file, never used by the proxy)
    for i, (bport, rport) in enumerate(zip(backends, free_ports(len(backends)), strict=True),
                                       start=1):
        lines += ["", "[[servers]]", f'id = "s{i}"', f'http = "127.0.0.1:{bport}"',
                  f'replication = "127.0.0.1:{rport}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def self_signed(tmp: Path) -> tuple[Path, Path, Path]:
    """A throw-away EC P-256 certificate for 127.0.0.1: (cert, key, both in one PEM)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    crt_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    paths = tmp / "bench.crt", tmp / "bench.key", tmp / "bench.pem"
    for path, data in zip(paths, (crt_pem, key_pem, crt_pem + key_pem), strict=True):
        path.write_bytes(data)
    return paths


def haproxy_config(tmp: Path, port: int, backends: list[int], *,
                   tls: Path | None = None, l7: bool = False) -> Path:
    """`tls`: a PEM of certificate and key: HTTPS on the frontend (TLS 1.2 at least).
    `l7`: HAProxy's L7 retries on, with the `retry-on` of tandem's exported rules (a 503
    and, for idempotent requests, a failure after sending go to another server)."""
    path = tmp / ("haproxy-tls.cfg" if tls else "haproxy-l7.cfg" if l7 else "haproxy.cfg")
    retries = ("    retries 3\n    retry-on conn-failure empty-response response-timeout 503\n"
               if l7 else "")
    bind = (f"bind 127.0.0.1:{port} ssl crt {tls} alpn http/1.1 ssl-min-ver TLSv1.2" if tls
            else f"bind 127.0.0.1:{port}")
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p} cookie s{i}"
                        for i, p in enumerate(backends, start=1))
    path.write_text(f"""global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    option forwardfor
    option redispatch
    retries 2
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 20s

frontend bench
    {bind}
    http-request set-header X-Forwarded-Proto {"https" if tls else "http"}
    default_backend app

backend app
    balance roundrobin
    cookie SRV insert indirect nocache
{retries}{servers}
""")
    return path


def nginx_config(tmp: Path, port: int, backends: list[int]) -> Path:
    path = tmp / "nginx.conf"
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    path.write_text(f"""daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    upstream app {{
        hash $cookie_JSESSIONID consistent;
{servers}
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_next_upstream error timeout http_503;
        }}
    }}
}}
""")
    return path


def _export(engine: str, cluster: Path, out: Path, *extra: str) -> None:
    """`tandem export ENGINE` from this tree: the fragment(s), into `out`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "export", engine, "--config",
                           str(cluster), "-o", str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tandem export {engine} failed: {done.stderr.strip()}")


def haproxy_tandem_config(tmp: Path, port: int, cluster: Path, *extra: str) -> Path:
    """The plain HAProxy's global, defaults and frontend around the backends that
    `tandem export haproxy` wrote (it routes by the JSESSIONID token, not SRV)."""
    fragment = tmp / f"tandem-haproxy-{port}.cfg"
    _export("haproxy", cluster, fragment, *extra)
    text = fragment.read_text()
    # the frontend lines the fragment's header asks for
    use = ["    " + line.lstrip("# ") for line in text.splitlines()
           if line.lstrip("# ").startswith(("use_backend ", "default_backend "))]
    path = tmp / f"haproxy-tandem-{port}.cfg"
    path.write_text(f"""global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 20s

frontend bench
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-Proto http
{chr(10).join(use)}

{text}""")
    return path


def nginx_tandem_config(tmp: Path, port: int, cluster: Path) -> Path:
    """The plain nginx's settings around the two fragments of `tandem export nginx`."""
    _export("nginx", cluster, tmp)
    path = tmp / "nginx-tandem.conf"
    path.write_text(f"""daemon off;
master_process on;
worker_processes 1;
pcre_jit on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    include {tmp}/tandem-http.conf;
    server {{
        listen 127.0.0.1:{port};
        include {tmp}/tandem-server.conf;
    }}
}}
""")
    return path


def baseline_tree(rev: str, tmp: Path) -> Path:
    """The repository at `rev`, unpacked (the working tree and .git are left alone); a
    directory is taken as it is."""
    if Path(rev).is_dir():
        return Path(rev).resolve()
    where = tmp / f"tree-{rev}"
    where.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


# --- load -------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(c: Contender, backend: list[int], cookie: str, *, duration: float,
            connections: int, cpus: set[int] | None,
            script: Path | None = None) -> dict[str, Any]:
    charged = c.pids
    before_p, before_b, t0 = cpu_ticks(charged), cpu_ticks(backend), time.monotonic()
    before_s = switches(charged)
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections),
                          "-d", f"{max(1, round(duration))}s", "--latency",
                          "-H", f"Cookie: {cookie}",
                          *(["-s", str(script)] if script else []),
                          f"{'https' if c.tls else 'http'}://127.0.0.1:{c.port}/"],
                         capture_output=True, text=True, check=True,
                         preexec_fn=_pinned(cpus)).stdout
    elapsed = time.monotonic() - t0
    after_p, after_b = cpu_ticks(charged), cpu_ticks(backend)
    preempted = switches(charged) - before_s
    user_p, sys_p = after_p[0] - before_p[0], after_p[1] - before_p[1]
    used_b = sum(after_b) - sum(before_b)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not total or not int(total.group(1)):
        raise RuntimeError(f"wrk completed no request through {c.name}:\n{out}")
    requests = int(total.group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {
        "rps": float(rps.group(1)) if rps else requests / elapsed,
        "requests": requests,
        "p50_ms": _ms(lat["50"]),
        "p99_ms": _ms(lat["99"]),
        "proxy_cpu_us": (user_p + sys_p) / TICKS * 1e6 / requests if charged else None,
        "proxy_user_us": user_p / TICKS * 1e6 / requests if charged else None,
        "proxy_sys_us": sys_p / TICKS * 1e6 / requests if charged else None,
        "proxy_preempted_per_req": preempted / requests if charged else None,
        "backend_cpu_us": used_b / TICKS * 1e6 / requests,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": sock.group(1) if sock else "",
    }


# --- one scenario -----------------------------------------------------------------------------


def scenario(name: str, pinned: bool, args: argparse.Namespace,
             tmp: Path) -> dict[str, Any]:
    from tandem.token import Route, TokenCodec

    where = tmp / f"{name}-{'pinned' if pinned else 'shared'}"
    where.mkdir()
    token = TokenCodec([SECRET]).encode(Route("B" * 32, "s1", "s2"))
    cookie = f"JSESSIONID={token}; SRV=s1"
    burn = args.burn_us if name == "heavy" else 0.0
    script = None
    if args.vary:
        script = where / "vary.lua"
        script.write_text(_VARY_LUA)
    # pinned: every proxy on CPU 1; the backend and wrk on CPU 0 (the same for all).
    proxy_cpus, load_cpus = ({1}, {0}) if pinned else (None, None)
    label = f"{name}, {'pinned' if pinned else 'shared'}"
    (b1, b2, p_t, a_t, p_h, p_n, p_o, a_o, p_hx, p_nx, a_x, p_hc,
     p_t2, a_t2, p_ts, a_ts, p_hs, p_hl) = free_ports(18)
    backends = [b1, b2]
    contenders: list[Contender] = []
    tandem_admins: dict[str, int] = {}
    python = args.tandem_python or sys.executable

    def tandem(label: str, port: int, admin: int, sub: Path, cwd: Path,
               extra: tuple[str, ...] = ()) -> None:
        tls = any(line.startswith("tls_cert") for line in extra)
        cfg = tandem_config(sub, port, admin, backends, extra)
        proc = stack.enter_context(spawn(
            [python, "-m", "proxy.cli", "proxy", "--config", str(cfg)], sub / "tandem.log",
            cwd=cwd, stop=signal.SIGINT, cpus=proxy_cpus))
        wait_http(port, proc, sub / "tandem.log", cookie, tls=tls)
        contenders.append(Contender(label, port, proc, tls=tls))
        tandem_admins[label] = admin

    with ExitStack() as stack:
        be = stack.enter_context(spawn(
            [sys.executable, str(ROOT / "bench" / "backend_fast.py"), "--port", str(b1),
             "--port", str(b2), "--burn-us", str(burn), *(["--vary"] if args.vary else []),
             # (the exported configurations check /__tandem/health)
             *(["--health"] if any("-tandem" in name for name in args.only) else [])],
            where / "backend.log", cpus=load_cpus))
        wait_http(b1, be, where / "backend.log", cookie)
        wanted = set(args.only)
        if "direct" in wanted:
            contenders.append(Contender("direct", b1, None))
        if "tandem" in wanted:
            tandem("tandem", p_t, a_t, where, ROOT)
        if "tandem-2w" in wanted:  # (its workers: children of the parent, charged with it)
            sub = where / "workers"
            sub.mkdir()
            tandem("tandem-2w", p_t2, a_t2, sub, ROOT, ("workers = 2",))
        if wanted & {"tandem-tls", "haproxy-tls"}:
            crt, key, pem = self_signed(where)
        if "tandem-tls" in wanted:
            sub = where / "tls"
            sub.mkdir()
            tandem("tandem-tls", p_ts, a_ts, sub, ROOT,
                   (f'tls_cert = "{crt}"', f'tls_key = "{key}"'))
        if "haproxy-tls" in wanted:
            cfg = haproxy_config(where, p_hs, backends, tls=pem)
            proc = stack.enter_context(spawn(["haproxy", "-db", "-f", str(cfg)],
                                             where / "haproxy-tls.log", cpus=proxy_cpus))
            wait_http(p_hs, proc, where / "haproxy-tls.log", cookie, tls=True)
            contenders.append(Contender("haproxy-tls", p_hs, proc, tls=True))
        if args.baseline:
            sub = where / "baseline"
            sub.mkdir()
            tandem(f"tandem-{Path(args.baseline).name}", p_o, a_o, sub, args.baseline_tree)
        if "haproxy" in wanted:
            cfg = haproxy_config(where, p_h, backends)
            proc = stack.enter_context(spawn(["haproxy", "-db", "-f", str(cfg)],
                                             where / "haproxy.log", cpus=proxy_cpus))
            wait_http(p_h, proc, where / "haproxy.log", cookie)
            contenders.append(Contender("haproxy", p_h, proc))
        if "haproxy-l7" in wanted:
            cfg = haproxy_config(where, p_hl, backends, l7=True)
            proc = stack.enter_context(spawn(["haproxy", "-db", "-f", str(cfg)],
                                             where / "haproxy-l7.log", cpus=proxy_cpus))
            wait_http(p_hl, proc, where / "haproxy-l7.log", cookie)
            contenders.append(Contender("haproxy-l7", p_hl, proc))
        if "nginx" in wanted:
            cfg = nginx_config(where, p_n, backends)
            proc = stack.enter_context(spawn(["nginx", "-c", str(cfg), "-p", str(where),
                                              "-e", str(where / "nginx-error.log")],
                                             where / "nginx.log", cpus=proxy_cpus))
            wait_http(p_n, proc, where / "nginx.log", cookie)
            contenders.append(Contender("nginx", p_n, proc))
        if wanted & {"haproxy-tandem", "haproxy-tandem-connect", "nginx-tandem"}:
            sub = where / "export"
            sub.mkdir()
            cluster = tandem_config(sub, p_t, a_x, backends)
        if "haproxy-tandem" in wanted:
            cfg = haproxy_tandem_config(sub, p_hx, cluster)
            proc = stack.enter_context(spawn(["haproxy", "-db", "-f", str(cfg)],
                                             sub / "haproxy.log", cpus=proxy_cpus))
            wait_http(p_hx, proc, sub / "haproxy.log", cookie)
            contenders.append(Contender("haproxy-tandem", p_hx, proc))
        if "haproxy-tandem-connect" in wanted:
            cfg = haproxy_tandem_config(sub, p_hc, cluster, "--connect-retries-only")
            proc = stack.enter_context(spawn(["haproxy", "-db", "-f", str(cfg)],
                                             sub / "haproxy-connect.log", cpus=proxy_cpus))
            wait_http(p_hc, proc, sub / "haproxy-connect.log", cookie)
            contenders.append(Contender("haproxy-tandem-connect", p_hc, proc))
        if "nginx-tandem" in wanted:
            cfg = nginx_tandem_config(sub, p_nx, cluster)
            proc = stack.enter_context(spawn(["nginx", "-c", str(cfg), "-p", str(sub),
                                              "-e", str(sub / "nginx-error.log")],
                                             sub / "nginx.log", cpus=proxy_cpus))
            wait_http(p_nx, proc, sub / "nginx.log", cookie)
            contenders.append(Contender("nginx-tandem", p_nx, proc))
        for c in contenders:
            c.settle()
        backend_pids = [be.pid]
        print(f"[{label}] backend burn {burn:g} µs; contenders: "
              + ", ".join(f"{c.name} ({len(c.pids)} process{'es' if len(c.pids) > 1 else ''})"
                          for c in contenders), flush=True)
        for c in contenders:  # warm-up: pools filled, code paths hot; not measured
            run_wrk(c, backend_pids, cookie, duration=args.warmup,
                    connections=args.connections, cpus=load_cpus, script=script)
        runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
        for i in range(args.runs):
            k = i % len(contenders)
            for c in contenders[k:] + contenders[:k]:
                r = run_wrk(c, backend_pids, cookie, duration=args.duration,
                            connections=args.connections, cpus=load_cpus, script=script)
                runs[c.name].append(r)
                cpu = ("     -" if r["proxy_cpu_us"] is None else
                       f"{r['proxy_cpu_us']:6.1f} ({r['proxy_user_us']:.0f}+"
                       f"{r['proxy_sys_us']:.0f})")
                print(f"  [{label}] run {i + 1} {c.name:18s} {r['rps']:8.0f} req/s "
                      f"p50 {r['p50_ms']:6.2f} ms p99 {r['p99_ms']:6.2f} ms "
                      f"proxy {cpu} µs/req backend {r['backend_cpu_us']:6.1f} µs/req"
                      + (f" non-2xx {r['non_2xx']}" if r["non_2xx"] else ""), flush=True)
        checks = {label: tandem_check(port) for label, port in tandem_admins.items()}
    return {"scenario": name, "burn_us": burn, "pinned": pinned, "vary": args.vary,
            "runs": runs,
            "tandem_checks": checks, "summary": summarize(runs)}


def tandem_check(admin_port: int) -> dict[str, float]:
    """From tandem's metrics: were tokens verified (none bad) and every request sent to s1?"""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/__tandem/metrics",
                                timeout=5) as resp:
        text = resp.read().decode()
    want = {"bad_tokens": "tandem_proxy_bad_tokens_total ",
            "to_s1": 'tandem_proxy_backend_requests_total{backend="s1"} ',
            "to_s2": 'tandem_proxy_backend_requests_total{backend="s2"} '}
    out = {}
    for key, prefix in want.items():
        for line in text.splitlines():
            if line.startswith(prefix):
                out[key] = float(line[len(prefix):])
    return out


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    def med(values: list[float | None]) -> float | None:
        vs = [v for v in values if v is not None]
        return statistics.median(vs) if vs else None

    out: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        out[name] = {
            "rps": med([r["rps"] for r in rs]),
            "rps_range": (min(r["rps"] for r in rs), max(r["rps"] for r in rs)),
            "p50_ms": med([r["p50_ms"] for r in rs]),
            "p99_ms": med([r["p99_ms"] for r in rs]),
            "proxy_cpu_us": med([r["proxy_cpu_us"] for r in rs]),
            "proxy_cpu_range": ((min(r["proxy_cpu_us"] for r in rs),
                                 max(r["proxy_cpu_us"] for r in rs))
                                if rs[0]["proxy_cpu_us"] is not None else None),
            "proxy_user_us": med([r["proxy_user_us"] for r in rs]),
            "proxy_sys_us": med([r["proxy_sys_us"] for r in rs]),
            "proxy_preempted_per_req": med([r["proxy_preempted_per_req"] for r in rs]),
            "backend_cpu_us": med([r["backend_cpu_us"] for r in rs]),
            "non_2xx": sum(r["non_2xx"] for r in rs),
        }
    # Paired within each run: the ratio of this run's figures, then the median of those.
    # An exported configuration against the same engine configured plainly (paired).
    for name, rs in runs.items():
        engine = name.split("-tandem")[0]
        if engine != name and engine in runs:
            pairs = list(zip(rs, runs[engine], strict=True))
            out[name]["cpu_vs_plain"] = med(
                [a["proxy_cpu_us"] / b["proxy_cpu_us"] for a, b in pairs])
            out[name]["rps_vs_plain"] = med([a["rps"] / b["rps"] for a, b in pairs])
    # HAProxy's exported rules against plain HAProxy with the same L7 retries on: what
    # tandem's routing adds, apart from what HAProxy charges any configuration for them
    if "haproxy-tandem" in runs and "haproxy-l7" in runs:
        pairs = list(zip(runs["haproxy-tandem"], runs["haproxy-l7"], strict=True))
        out["haproxy-tandem"]["cpu_vs_l7"] = med(
            [a["proxy_cpu_us"] / b["proxy_cpu_us"] for a, b in pairs])
    for ref in ("haproxy", "direct"):
        if ref not in runs:
            continue
        for name, rs in runs.items():
            pairs = list(zip(rs, runs[ref], strict=True))
            out[name][f"rps_vs_{ref}"] = med([a["rps"] / b["rps"] for a, b in pairs])
            if ref == "haproxy" and rs[0]["proxy_cpu_us"] is not None:
                out[name]["cpu_vs_haproxy"] = med(
                    [a["proxy_cpu_us"] / b["proxy_cpu_us"] for a, b in pairs])
    return out


# --- report -----------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    where = ("every proxy pinned to CPU 1, backend and wrk to CPU 0" if result["pinned"]
             else "no CPU pinning")
    lines = [f"Scenario `{result['scenario']}` (backend burns {result['burn_us']:g} CPU-µs per "
             f"request; {where}):", "",
             "| contender | req/s | p50 ms | p99 ms | proxy CPU-µs/req (user+sys) "
             "| CPU vs HAProxy | req/s vs HAProxy | req/s vs direct | CPU vs plain engine "
             "| backend CPU-µs/req |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for name, m in s.items():
        cpu = f(m["proxy_cpu_us"], ".1f")
        if m["proxy_cpu_us"] is not None:
            cpu += f" ({m['proxy_user_us']:.0f}+{m['proxy_sys_us']:.0f})"
        lines.append(
            f"| {name} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {cpu} | "
            f"{f(m.get('cpu_vs_haproxy'), '.2f')} | {f(m.get('rps_vs_haproxy'), '.2f')} | "
            f"{f(m.get('rps_vs_direct'), '.2f')} | {f(m.get('cpu_vs_plain'), '.2f')} | "
            f"{m['backend_cpu_us']:.1f} |")
    if "cpu_vs_l7" in s.get("haproxy-tandem", {}):
        lines += ["", "haproxy-tandem: CPU vs haproxy-l7 (plain HAProxy with the same L7 "
                  f"retries) {s['haproxy-tandem']['cpu_vs_l7']:.2f}"]
    for label, check in result["tandem_checks"].items():
        lines.append("")
        lines.append(f"{label}: bad tokens {check.get('bad_tokens', 0):.0f}, requests routed "
                     f"to s1 {check.get('to_s1', 0):.0f}, to s2 {check.get('to_s2', 0):.0f}")
    return "\n".join(lines)


_COLORS = {"direct": "#999999", "haproxy": "#1f77b4", "nginx": "#2ca02c", "tandem": "#d62728",
           "haproxy-tandem": "#9ecae1", "haproxy-tandem-connect": "#c6dbef",
           "nginx-tandem": "#98df8a"}


def _color(name: str) -> str:
    return _COLORS.get(name, "#ff9896" if name.startswith("tandem-") else "#8c564b")


def chart(results: list[dict[str, Any]], path: Path) -> None:
    """One row per CPU placement: light backend (proxy CPU per request as user+sys, and
    requests/s), heavy backend (requests/s against 0.9 x direct)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({r["pinned"] for r in results})
    fig, axes = plt.subplots(len(rows), 3, figsize=(14, 4.3 * len(rows)), squeeze=False)
    for row, pinned in zip(axes, rows, strict=True):
        by = {r["scenario"]: r for r in results if r["pinned"] == pinned}
        where = "pinned" if pinned else "shared CPUs"
        light, heavy = by.get("light"), by.get("heavy")
        if light is not None:
            _cpu_panel(row[0], light, f"proxy CPU-µs per request, light backend ({where})")
            _rps_panel(row[1], light, f"requests/s, light backend ({where})")
        if heavy is not None:
            _rps_panel(row[2], heavy, f"requests/s, backend burns {heavy['burn_us']:g} µs "
                                      f"({where})", against_direct=True)
        for ax in row:
            if not ax.has_data():
                ax.set_axis_off()
    fig.suptitle("tandem's proxy vs HAProxy vs nginx on loopback (medians of interleaved "
                 "runs; whiskers: min–max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cpu_panel(ax: Any, result: dict[str, Any], title: str) -> None:
    runs = {n: rs for n, rs in result["runs"].items() if rs[0]["proxy_cpu_us"] is not None}
    names = list(runs)
    user = [statistics.median(r["proxy_user_us"] for r in runs[n]) for n in names]
    system = [statistics.median(r["proxy_sys_us"] for r in runs[n]) for n in names]
    total = [statistics.median(r["proxy_cpu_us"] for r in runs[n]) for n in names]
    low = [t - min(r["proxy_cpu_us"] for r in runs[n]) for n, t in zip(names, total, strict=True)]
    high = [max(r["proxy_cpu_us"] for r in runs[n]) - t
            for n, t in zip(names, total, strict=True)]
    colors = [_color(n) for n in names]
    ax.bar(names, user, color=colors, label="user")
    ax.bar(names, system, bottom=user, color=colors, alpha=0.45, hatch="//", label="system")
    ax.errorbar(names, total, yerr=[low, high], fmt="none", ecolor="black", capsize=3, lw=1)
    for i, t in enumerate(total):
        ax.annotate(f"{t:.0f}", (i, t), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    if "haproxy" in runs:
        h = statistics.median(r["proxy_cpu_us"] for r in runs["haproxy"])
        ax.axhline(2 * h, color=_COLORS["haproxy"], ls="--", lw=1, label="2 × HAProxy (bar)")
        ax.axhline(1.2 * h, color=_COLORS["haproxy"], ls=":", lw=1, label="1.2 × HAProxy (goal)")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)


def _rps_panel(ax: Any, result: dict[str, Any], title: str, *,
               against_direct: bool = False) -> None:
    runs = result["runs"]
    names = list(runs)
    meds = [statistics.median(r["rps"] for r in runs[n]) for n in names]
    low = [m - min(r["rps"] for r in runs[n]) for n, m in zip(names, meds, strict=True)]
    high = [max(r["rps"] for r in runs[n]) - m for n, m in zip(names, meds, strict=True)]
    ax.bar(names, meds, color=[_color(n) for n in names], yerr=[low, high], capsize=3)
    for i, m in enumerate(meds):
        ax.annotate(f"{m:.0f}", (i, m), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    if against_direct and "direct" in runs:
        d = statistics.median(r["rps"] for r in runs["direct"])
        ax.axhline(0.9 * d, color="#555555", ls="--", lw=1, label="0.9 × direct (bar)")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds per contender")
    ap.add_argument("--connections", type=int, default=50, help="wrk keep-alive connections")
    ap.add_argument("--scenario", choices=("light", "heavy", "both"), default="both")
    ap.add_argument("--placement", choices=("shared", "pinned", "both"), default="both",
                    help="shared: no CPU pinning; pinned: every proxy on CPU 1, the backend "
                         "and wrk on CPU 0")
    ap.add_argument("--burn-us", type=float, default=200.0,
                    help="CPU-µs the backend spends per request in the heavy scenario")
    ap.add_argument("--vary", action="store_true",
                    help="no two requests or responses alike (see above)")
    ap.add_argument("--only", nargs="*",
                    default=["direct", "tandem", "haproxy", "nginx", "haproxy-tandem",
                             "haproxy-tandem-connect", "nginx-tandem", "haproxy-l7"],
                    choices=["direct", "tandem", "haproxy", "nginx", "haproxy-tandem",
                             "haproxy-tandem-connect", "nginx-tandem", "haproxy-l7",
                             # (not in the default: --only tandem tandem-2w, or
                             # --only haproxy-tls tandem-tls; both over HTTPS with a
                             # throw-away certificate, TLS sessions kept alive by wrk)
                             "tandem-2w", "tandem-tls", "haproxy-tls"])
    ap.add_argument("--baseline", help="also measure tandem's proxy at this git revision "
                                       "(or in this directory)")
    ap.add_argument("--tandem-python", metavar="PATH",
                    help="interpreter for tandem's proxy (default: this one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "proxy",
                    help="directory for results.json and the chart")
    ap.add_argument("--chart", type=Path, default=None,
                    help=f"where to write the PNG (default: OUT/{CHART.name})")
    ap.add_argument("--replot", type=Path, metavar="JSON",
                    help="only redraw the chart from a results.json")
    args = ap.parse_args(argv)
    if args.replot:
        results = json.loads(args.replot.read_text())["scenarios"]
        chart(results, args.chart or args.replot.parent / CHART.name)
        return 0
    missing = [tool for tool in ("wrk", "haproxy", "nginx") if shutil.which(tool) is None]
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install -y haproxy nginx wrk)",
              file=sys.stderr)
        return 2
    if args.placement != "shared" and len(os.sched_getaffinity(0)) < 2:
        print("pinning needs CPUs 0 and 1", file=sys.stderr)
        return 2
    try:  # a larger CPU share for this session's processes (one autogroup) on a shared machine
        with open("/proc/self/autogroup", "w") as f:
            f.write("-10")
    except OSError:
        print("(could not raise this session's CPU share: /proc/self/autogroup)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="tandem-proxy-bench-"))
    if args.baseline:
        args.baseline_tree = baseline_tree(args.baseline, tmp)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"{os.cpu_count()} CPUs, commit {commit}; {args.runs} runs x {args.duration:g} s, "
          f"wrk 1 thread, {args.connections} connections", flush=True)
    scenarios = ["light", "heavy"] if args.scenario == "both" else [args.scenario]
    placements = [False, True] if args.placement == "both" else [args.placement == "pinned"]
    results = []
    try:
        for pinned in placements:
            for name in scenarios:
                results.append(scenario(name, pinned, args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"commit": commit, "argv": sys.argv, "scenarios": results}, indent=1))
    print()
    for r in results:
        print(table(r))
        print()
    chart(results, args.chart or args.out / CHART.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
