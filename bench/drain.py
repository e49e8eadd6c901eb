"""A drain (SIGTERM) of a server holding N sessions: how long it takes, and what it holds.

Three real servers (tests/cluster.py, the layout of bench/memory.py: every secondary of s1
on s2), N sessions made on s1 by wrk, then SIGTERM to s1: it hands every primary over and
exits. Printed: the time to exit, the sessions on s2 and s3 after, what s1 did not hand
over, and s1's `drained`, `loop_held` (holds over 50 ms) and `gc_full_run` lines.

    python bench/drain.py --sessions 300000
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.memory import SERVERS, _wrk_fill  # noqa: E402
from tests.cluster import Cluster  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=100_000)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tandem-drain-"))
    cluster = Cluster(tmp, servers=[dict(s) for s in SERVERS], log_level="INFO",
                      session={"max_inactive_s": 3600})
    try:
        cluster.start(proxy=False)
        cluster.wait_formed()
        _wrk_fill(cluster, args.sessions, threads=2, conns=16)
        print("sessions on s1:", cluster.health("s1")["primaries"], flush=True)
        time.sleep(2)
        started = time.monotonic()
        proc = cluster.servers["s1"]["proc"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=900)
        print(f"s1 exited after {time.monotonic() - started:.1f} s", flush=True)
        for sid in ("s2", "s3"):
            health = cluster.health(sid)
            print(f"{sid}: primaries {health['primaries']}, replicas {health['replicas']}")
    finally:
        text = (tmp / "s1.log").read_text()
        print(text.count("session_not_handed_over"), "sessions not handed over")
        for line in text.splitlines():
            if any(word in line for word in ('"drained"', "loop_held", "gc_full_run",
                                             '"fenced"')):
                print(line[:220])
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
