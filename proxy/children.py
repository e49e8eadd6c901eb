"""The processes `tandem up` runs — each server and the proxy — with their channels
(`tandem.supervision`): what each said, its state, and how often it exited of itself.
"""

from __future__ import annotations

import enum
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence

from tandem.supervision import ParentEnd, spawn

__all__ = ["ChildState", "Child", "describe_exit"]


class ChildState(enum.Enum):
    STARTING = "starting"  # spawned; has not said `ready` yet
    READY = "ready"        # said every listener of it is bound and serving
    STOPPING = "stopping"  # asked to stop or to drain: its exit is expected
    EXITED = "exited"      # its exit was seen


def describe_exit(code: int) -> str:
    """`exit status 1`, `killed by SIGKILL`."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Child:
    """One process of the cluster and its channel; `spawn` again to restart it."""

    def __init__(self, *, name: str, cmd: Sequence[str], env: Mapping[str, str]) -> None:
        # configuration
        self.name = name
        self.cmd = list(cmd)
        self.env = dict(env)
        # per process (set anew by each spawn)
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: ParentEnd | None = None
        self.state = ChildState.EXITED
        self.started_at = 0.0
        self.failure: str | None = None  # the line it gave for a failed start
        self.summary: str | None = None  # what it said when it stopped
        self.addresses: list[str] = []  # where it listens, as it said when ready
        self.answers: set[str] = set()  # to the whole-cluster stop's steps: stopping, left
        self.spawns = 0
        # over the supervisor's life: when it exited of itself (the restart bound)
        self.exits: deque[float] = deque()

    def spawn(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.proc, self.channel = spawn(self.cmd, self.env)
        self.state = ChildState.STARTING
        self.started_at = time.monotonic()
        self.failure = self.summary = None
        self.answers = set()
        self.spawns += 1

    def read(self) -> None:
        """Take in what it said since the last call."""
        if self.channel is None:
            return
        for word, rest in self.channel.messages():
            if word == "ready" and self.state is ChildState.STARTING:
                self.state = ChildState.READY
                self.addresses = rest.split()
            elif word == "failed":
                self.failure = rest
            elif word == "stopped":
                self.summary = rest
            elif word in ("stopping", "left"):
                self.answers.add(word)

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def exited_within(self, window_s: float) -> int:
        """Record an exit of its own now; how many there were in the last `window_s`."""
        now = time.monotonic()
        self.exits.append(now)
        while self.exits and self.exits[0] < now - window_s:
            self.exits.popleft()
        return len(self.exits)

    # --- stopping -----------------------------------------------------------------------

    def tell(self, word: str) -> bool:
        """A step of the whole cluster's stop (`stopping`, `leave`); False if it cannot
        hear it (exited, or its channel is gone)."""
        if self.proc is None or self.proc.poll() is not None or self.channel is None:
            return False
        return self.channel.tell(word)

    def stop(self, *, hand_over: bool) -> None:
        """`hand_over`: SIGTERM (it drains and leaves the cluster alone); otherwise the
        whole cluster stops (the channel's `stop`; SIGTERM if the channel is gone)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.state = ChildState.STOPPING
        if hand_over or self.channel is None or not self.channel.tell("stop"):
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        """Until it exited (True), or `timeout` seconds passed (False)."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        self.read()  # its last words (`stopped ...`) are in the channel still
        self.state = ChildState.EXITED
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.state = ChildState.EXITED

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
