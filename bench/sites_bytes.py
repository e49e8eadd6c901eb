"""Bytes on the inter-site link per commit (docs/sites.md): how much a small write to a big
session costs between the sites.

    python bench/sites_bytes.py --blob 20000 --writes 200

Two sites of 3 real servers each (tests/sites.py, MAN); one session made at site A holding
a value of `--blob` bytes, then `--writes` writes of its counter (`GET /count`, a few bytes
each) through A's proxy. Measured: the bytes site A's servers sent on their connections to
site B's inter-site listeners (the kernel's `bytes_sent` of each socket, `ss -ti`), before
and after the writes; the heartbeats of the same seconds are in the figure too (about 12
bytes per 0.5 s per link). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import Client  # noqa: E402
from tests.sites import TwoSites, sent_to  # noqa: E402


def run(blob: int, writes: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        sites = TwoSites(Path(tmp), mode="man", n=3)
        try:
            sites.start()
            c = Client(sites.a.proxy_url)
            status, body = c.get(f"/set?key=blob&value={'x' * blob}")
            assert status == 200, body
            ports = list(sites.site_ports[b] for b in sites.b.servers)
            time.sleep(1.0)
            before, t0 = sent_to(ports), time.monotonic()
            for n in range(1, writes + 1):
                status, body = c.get("/count")
                assert status == 200 and body["counter"] == n, body
            seconds = time.monotonic() - t0
            after = sent_to(ports)
            return {"blob_bytes": blob, "writes": writes, "seconds": round(seconds, 2),
                    "bytes_sent_to_site_b": after - before,
                    "bytes_per_commit": round((after - before) / writes, 1)}
        finally:
            sites.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blob", type=int, default=20000)
    ap.add_argument("--writes", type=int, default=200)
    args = ap.parse_args()
    print(json.dumps(run(args.blob, args.writes)))


if __name__ == "__main__":
    main()
