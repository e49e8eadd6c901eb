"""Network partitions between processes on one machine, all on loopback, for tests and bench.

Every process that takes part runs under a uid of its own (`reserve_uids`, `run_as`), and a
dedicated nftables table drops the packets between the pairs of processes that are cut:

    with reserve_uids(["a", "b"]) as lease:
        start process a as lease.uids["a"] listening on 9001, b on 9002 (`run_as`)
        with Partition({"a": Endpoint(lease.uids["a"], (9001,)),
                        "b": Endpoint(lease.uids["b"], (9002,))}) as net:
            net.cut("a", "b")     # nothing passes between a and b, either way
            net.heal("a", "b")

Which packets belong to a cut link. On loopback the address tells nothing, so a connection
is named by who dialled it and to which listening port: the dialler's first packet (its
SYN, sent by a socket its process owns) writes the dialler's uid into the connection's
conntrack mark; a listening port names its process (`Endpoint.ports`). Cutting a and b adds
`(uid a, port of b)` and `(uid b, port of a)` to a set, and a packet is dropped when its
connection's (mark, listening port) is in the set — the listening port is the destination
port of the dialler's packets and the source port of the other side's. This drops both
directions of new and established connections, whichever socket sends the packet: a
process's own socket, a closed socket still sending its FIN, or the kernel answering with
an RST — a real partition lets no "connection closed" through either. A second rule drops
on the sending socket's uid and destination port alone, for a packet conntrack has no
entry for. Traffic of other uids (the test itself, the load generator: root) and of other
ports is not touched.

Dropping in the `output` hook is silent, as a partition is: a dialler's SYN is
retransmitted until its connect times out, data is retransmitted and arrives after a heal
(TCP's backoff, up to tens of seconds after a long cut).

Clean-up: the table (`tandem_test_<pid>_<n>`: the n-th `Partition` of the process, so two
open at once keep their own rules) is deleted when the `Partition` closes, at
interpreter exit (atexit) and — for a run killed earlier — by the next `Partition`, which
deletes every `tandem_test_*` table whose process is gone. The uids are numeric (no passwd
entry needed) from `UID_BASE`, reserved by a lock file held for the lease's lifetime, so
concurrent runs on one machine never share one.

Needs root (nftables and setpriv) and the `nft` command (`apt-get install nftables`);
`unavailable_reason()` says why not, for a `pytest.skip`.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "Endpoint",
    "NetfaultError",
    "Partition",
    "UidLease",
    "cluster_endpoints",
    "reserve_uids",
    "run_as",
    "unavailable_reason",
]

TABLE_PREFIX = "tandem_test_"
_TABLE_NUMBERS = itertools.count(1)
UID_BASE = 64100   # numeric uids for the processes, UID_BASE .. UID_BASE + UID_SLOTS - 1
UID_SLOTS = 100
_NFT_TIMEOUT_S = 10.0


class NetfaultError(RuntimeError):
    """An nft command failed, or a name or uid is not known; the message has nft's stderr."""


def unavailable_reason() -> str | None:
    """Why partitions cannot be made here (for `pytest.skip`), or None when they can."""
    if os.geteuid() != 0:
        return "network partitions need root (nftables rules, processes under other uids)"
    if shutil.which("nft") is None:
        return "nft is not installed (apt-get install -y nftables)"
    if shutil.which("setpriv") is None:
        return "setpriv is not installed (util-linux)"
    return None


def run_as(uid: int) -> list[str]:
    """The command prefix that runs a program under `uid` (and gid `uid`, no other groups).

    The process keeps CAP_DAC_READ_SEARCH (inheritable and ambient, so it survives the
    exec): it can read the checkout and a virtualenv that only root may read (CI's is in a
    0700 temporary directory; pyenv's Python lives under /root) — and write only where its
    uid may, so open its log files before the exec. Signals from root still reach it.
    """
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]


# --- uids -------------------------------------------------------------------------------

class UidLease:
    """Numeric uids reserved for this process's runs: `uids[name]`; released on `close()`."""

    def __init__(self, uids: dict[str, int], locks: list[IO[bytes]]) -> None:
        self.uids = uids
        self._locks = locks

    def close(self) -> None:
        for f in self._locks:
            f.close()  # releases the flock
        self._locks = []

    def __enter__(self) -> UidLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _uids_running() -> set[int]:
    out = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith("Uid:"):
                    out.add(int(line.split()[1]))
                    break
    return out


def reserve_uids(names: Iterable[str]) -> UidLease:
    """A distinct free uid for each name: its lock file is held until the lease closes, and
    no process runs under it (an orphan of a killed run keeps its uid out of use)."""
    lock_dir = Path(tempfile.gettempdir()) / "tandem-netfault-uids"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    busy = _uids_running()
    uids: dict[str, int] = {}
    locks: list[IO[bytes]] = []
    f: IO[bytes]
    candidates = iter(range(UID_BASE, UID_BASE + UID_SLOTS))
    try:
        for name in names:
            for uid in candidates:
                if uid in busy:
                    continue
                f = open(lock_dir / f"{uid}.lock", "wb")  # noqa: SIM115 - held by the lease
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    continue
                locks.append(f)
                uids[name] = uid
                break
            else:
                raise NetfaultError(f"no free uid in {UID_BASE}..{UID_BASE + UID_SLOTS - 1}")
    except BaseException:
        for f in locks:
            f.close()
        raise
    return UidLease(uids, locks)


# --- the partition ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Endpoint:
    """One process: the uid it runs under and the ports it listens on (its side of a link)."""

    uid: int
    ports: tuple[int, ...]


def cluster_endpoints(config_path: Path, uids: Mapping[str, int]) -> dict[str, Endpoint]:
    """Endpoints of a tandem cluster file's processes named in `uids`: a server listens on
    its `http`, `replication` (and `site_replication`) ports, the proxy (name "proxy") on
    `listen` and `admin`."""
    conf: dict[str, Any] = tomllib.loads(config_path.read_text())

    def port(addr: str) -> int:
        return int(addr.rsplit(":", 1)[1])

    ports: dict[str, tuple[int, ...]] = {
        s["id"]: (port(s["http"]), port(s["replication"]),
                  *((port(s["site_replication"]),) if "site_replication" in s else ()))
        for s in conf["servers"]}
    proxy = conf.get("proxy", {})
    ports["proxy"] = tuple(port(proxy[k]) for k in ("listen", "admin") if k in proxy)
    return {name: Endpoint(uid, ports[name]) for name, uid in uids.items()}


def _nft(script: str | None = None, *args: str) -> str:
    cmd = ["nft", *args] if script is None else ["nft", "-f", "-"]
    try:
        done = subprocess.run(cmd, input=script, capture_output=True, text=True,
                              timeout=_NFT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetfaultError(f"{' '.join(cmd)}: {exc}") from exc
    if done.returncode != 0:
        raise NetfaultError(f"{' '.join(cmd)} failed ({done.returncode}): "
                            f"{done.stderr.strip()}\n{script or ''}")
    return done.stdout


def delete_stale_tables() -> list[str]:
    """Delete the tables of runs whose process is gone (killed before their clean-up)."""
    deleted = []
    for line in _nft(None, "list", "tables").splitlines():
        m = re.fullmatch(r"table inet (" + TABLE_PREFIX + r"(\d+)(?:_\d+)?)", line.strip())
        if m is None:
            continue
        try:
            os.kill(int(m.group(2)), 0)
            continue  # its run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(NetfaultError):  # another run may delete it at the same time
            _nft(None, "delete", "table", "inet", m.group(1))
            deleted.append(m.group(1))
    return deleted


class Partition:
    """Cuts and heals links between named processes (an nftables table of its own).

    A context manager: the table exists from `__enter__` until `close()`; connections a
    member dials after that are cut-able (an older one only once its dialler sends again).
    Each call changes the rules in one nft transaction.
    """

    def __init__(self, members: Mapping[str, Endpoint], *, table: str | None = None) -> None:
        self.members = dict(members)
        # one table per Partition: two open at once in one process keep their own rules
        self.table = table or f"{TABLE_PREFIX}{os.getpid()}_{next(_TABLE_NUMBERS)}"
        self._cut: set[frozenset[str]] = set()  # the links cut now
        self._open = False

    # --- lifetime ---

    def __enter__(self) -> Partition:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise NetfaultError(reason)
        delete_stale_tables()
        with contextlib.suppress(NetfaultError):  # ours, from a pid reused by the kernel
            _nft(None, "delete", "table", "inet", self.table)
        uids = sorted({m.uid for m in self.members.values()})
        dialler = ", ".join(f"{u} : {u}" for u in uids)
        _nft(f"""
table inet {self.table} {{
  # uid of a member -> the conntrack mark its connections carry (the uid itself)
  map dialler {{ type uid : mark; {f"elements = {{ {dialler} }}" if uids else ""} }}
  # (dialler's uid, listening port) of the connections that must not pass
  set cut_conn {{ type mark . inet_service; }}
  # the same pairs for the sending socket, for packets without a conntrack entry
  set cut_send {{ type uid . inet_service; }}
  chain output {{
    type filter hook output priority filter; policy accept;
    ct direction original ct mark set meta skuid map @dialler
    ct direction original ct mark . th dport @cut_conn counter drop
    ct direction reply ct mark . th sport @cut_conn counter drop
    meta skuid . th dport @cut_send counter drop
  }}
}}
""")
        self._open = True
        atexit.register(self.close)

    def close(self) -> None:
        """Delete the table (every link heals at once); safe to call twice."""
        if not self._open:
            return
        self._open = False
        self._cut.clear()
        atexit.unregister(self.close)
        _nft(None, "delete", "table", "inet", self.table)

    # --- links ---

    def _elements(self, a: str, b: str) -> list[str]:
        try:
            ea, eb = self.members[a], self.members[b]
        except KeyError as exc:
            raise NetfaultError(f"unknown process {exc.args[0]!r}; known: "
                                f"{sorted(self.members)}") from exc
        if a == b:
            raise NetfaultError(f"cannot cut {a!r} from itself")
        return ([f"{ea.uid} . {p}" for p in eb.ports]
                + [f"{eb.uid} . {p}" for p in ea.ports])

    def _change(self, verb: str, links: list[tuple[str, str]]) -> None:
        if not self._open:
            raise NetfaultError("the partition is not open (use it as a context manager)")
        elements = [e for a, b in links for e in self._elements(a, b)]
        if not elements:
            return
        joined = ", ".join(elements)
        _nft("".join(f"{verb} element inet {self.table} {s} {{ {joined} }}\n"
                     for s in ("cut_conn", "cut_send")))

    def cut(self, *pairs: tuple[str, str] | str) -> None:
        """Cut a link: `cut("s1", "s2")`, or several at once: `cut(("s1", "s2"), ("s1", "s3"))`."""
        links = _pairs(pairs)
        new = [(a, b) for a, b in links if frozenset((a, b)) not in self._cut]
        self._change("add", new)
        self._cut.update(frozenset(p) for p in new)

    def heal(self, *pairs: tuple[str, str] | str) -> None:
        """Restore links cut before (a link that is not cut is left alone)."""
        links = _pairs(pairs)
        old = [(a, b) for a, b in links if frozenset((a, b)) in self._cut]
        self._change("delete", old)
        self._cut.difference_update(frozenset(p) for p in old)

    def isolate(self, name: str, *, from_: Iterable[str]) -> None:
        """Cut `name` from each of `from_` (one transaction)."""
        self.cut(*((name, other) for other in from_))

    def rejoin(self, name: str, *, from_: Iterable[str]) -> None:
        """Heal what `isolate(name, from_=...)` cut."""
        self.heal(*((name, other) for other in from_))

    def cut_proxy(self, name: str, *, proxy: str = "proxy") -> None:
        """Cut the proxy from one server (the server's peers still reach it)."""
        self.cut(name, proxy)

    def heal_proxy(self, name: str, *, proxy: str = "proxy") -> None:
        self.heal(name, proxy)

    def heal_all(self) -> None:
        self.heal(*(tuple(sorted(p)) for p in self._cut))  # type: ignore[arg-type]

    @property
    def cuts(self) -> set[frozenset[str]]:
        """The links cut now."""
        return set(self._cut)

    def dropped(self) -> dict[str, int]:
        """Packets dropped so far by each rule (`conn_original`, `conn_reply`, `send`)."""
        out: dict[str, int] = {}
        if not self._open:
            return out
        names = iter(("conn_original", "conn_reply", "send"))
        data = json.loads(_nft(None, "-j", "list", "chain", "inet", self.table, "output"))
        for item in data.get("nftables", []):
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    out[next(names)] = int(expr["counter"]["packets"])
        return out


def _pairs(pairs: tuple[tuple[str, str] | str, ...]) -> list[tuple[str, str]]:
    if len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
        return [(str(pairs[0]), str(pairs[1]))]
    out = []
    for p in pairs:
        if isinstance(p, str) or len(p) != 2:
            raise NetfaultError(f"a link is two names, got {p!r}")
        out.append((p[0], p[1]))
    return out
