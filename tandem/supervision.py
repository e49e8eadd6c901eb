"""The channel between `tandem up` and each process it starts: one socket pair per child,
its fd named by TANDEM_SUPERVISOR_FD, one message per line.

child → supervisor: `ready ADDRESS...` (every listener of this process is bound and
serving, there), `failed LINE` (start-up failed; LINE is what a person reads), `stopping`
and `left` (the answers to the words below), `stopped SUMMARY` (its last words).

supervisor → child, when the whole cluster stops, each word to every server, the next
once all answered (or a bound passed):
  `stopping`  stop repairing: a peer that leaves from now on is not a failure (its sessions
              are not taken over), and nothing is handed to peers that stop too;
  `leave`     say goodbye to the peers (the links close, each after a goodbye);
  `stop`      stop (the listeners close last: no peer sees a link drop before its goodbye).
A server that heard `leave` before another heard `stopping` would be repaired after; one
that closed its listener before another said goodbye would be seen failing.
A child whose channel reaches end-of-file has lost its supervisor and stops as for `stop`;
a server started by a `tandem up` of part of the cluster (TANDEM_SUPERVISOR_PART=1: the
other hosts' servers carry on) drains instead, as for SIGTERM (the word `drain`).

Why a channel and not a probe of the address: a probe answers for whatever program holds
the port; only the child can say that *it* listens there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence

__all__ = ["ENV", "PART_ENV", "ChildLink", "child_link", "ParentEnd", "spawn"]

ENV = "TANDEM_SUPERVISOR_FD"
PART_ENV = "TANDEM_SUPERVISOR_PART"

_link: ChildLink | None = None
_looked = False


def child_link() -> ChildLink | None:
    """This process's channel to `tandem up`, or None when it runs on its own."""
    global _link, _looked
    if not _looked:
        _looked = True
        _link = ChildLink.from_env(os.environ)
        os.environ.pop(ENV, None)  # the application's own subprocesses are not children
        os.environ.pop(PART_ENV, None)
    return _link


class ChildLink:
    """The child's end: reports start-up and stop, hears `stop` (or the supervisor's end)."""

    def __init__(self, fd: int, *, part: bool = False) -> None:
        # started with part of the cluster: losing the supervisor is a drain, not a stop
        self.part = part
        os.set_inheritable(fd, False)  # the application's own subprocesses do not hold it
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._buf = b""
        self._watched: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ChildLink | None:
        value = environ.get(ENV)
        if not value or not value.isdigit():
            return None
        fd = int(value)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                return None
        except OSError:  # the variable came without the fd: on its own
            return None
        return cls(fd, part=environ.get(PART_ENV) == "1")

    def ready(self, *addresses: str) -> bool:
        """Every listener is bound and serving (`addresses`: where, as bound)."""
        return self._send(" ".join(("ready", *addresses)))

    def failed(self, line: str) -> bool:
        return self._send(f"failed {line}")

    def stopped(self, summary: str = "") -> bool:
        return self._send(f"stopped {summary}".rstrip())

    def _send(self, text: str) -> bool:
        """False when the supervisor's end is gone (the caller then says it itself)."""
        try:
            self._sock.send((" ".join(text.split()) + "\n").encode())
        except OSError:
            return False
        return True

    def answer(self, word: str) -> bool:
        """`stopping` or `left`: done what the supervisor's word asked."""
        return self._send(word)

    def watch(self, loop: asyncio.AbstractEventLoop, on_word: Callable[[str], None]) -> None:
        """Call `on_word` (in the loop) with each word the supervisor says, and with
        `stop` when its end closes (`drain` for part of the cluster)."""
        def readable() -> None:
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            *lines, self._buf = (self._buf + data).split(b"\n")
            for line in lines:
                on_word(line.decode("ascii", "replace").strip())
            if not data:
                self.unwatch()
                on_word("drain" if self.part else "stop")

        self._watched = loop
        loop.add_reader(self._sock.fileno(), readable)

    def unwatch(self) -> None:
        if self._watched is not None:
            with contextlib.suppress(Exception):
                self._watched.remove_reader(self._sock.fileno())
            self._watched = None


class ParentEnd:
    """The supervisor's end of one child's channel: its messages, line by line."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self._buf = b""
        self.eof = False

    def messages(self) -> list[tuple[str, str]]:
        """What arrived since the last call, as (word, rest) pairs; never blocks."""
        while not self.eof:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.eof = True
                break
            self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        out = []
        for raw in lines:
            word, _, rest = raw.decode("utf-8", "replace").partition(" ")
            out.append((word, rest))
        return out

    def tell(self, word: str) -> bool:
        """Say `stopping`, `leave` or `stop`; False if the child's end is gone."""
        try:
            self._sock.send(word.encode("ascii") + b"\n")
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._sock.close()


def spawn(cmd: Sequence[str], env: Mapping[str, str]) -> tuple[subprocess.Popen[bytes],
                                                                ParentEnd]:
    """Start `cmd` with a channel to it."""
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(list(cmd), env={**env, ENV: str(theirs.fileno())},
                                pass_fds=(theirs.fileno(),))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ParentEnd(ours)
