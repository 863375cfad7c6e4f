"""Serve a SimulatedTinker over loopback HTTP in its own process, so the server does not share a GIL with
the client being measured.

Usage: ``python benchmarks/_sim_server.py --runs N --latency SECONDS --api-key KEY``. Prints one line,
``READY <base_url>``, then serves until its stdin closes. Run ids are ``_util.run_ids()``.
"""

from __future__ import annotations

import argparse
import sys

from _util import seeded_sim

from tinkex_recovery.simulated import serve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args()
    with serve(seeded_sim(args.runs), api_key=args.api_key) as server:
        server.latency = args.latency
        print(f"READY {server.base_url}", flush=True)
        sys.stdin.read()  # until the benchmark closes it


if __name__ == "__main__":
    main()
