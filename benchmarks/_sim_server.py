"""Serve a SimulatedTinker over loopback HTTP in its own process, so the server does not share a GIL with
the client being measured.

Usage: ``python benchmarks/_sim_server.py --runs N --latency SECONDS --api-key KEY``. Prints one line,
``READY <base_url>``, then serves until its stdin closes. Run ids are ``bench:train:0``, ... in creation
order. A line ``corrupt <run_id>`` on stdin marks that run corrupted and is answered ``OK``.
"""

from __future__ import annotations

import argparse
import sys

from tinkex_recovery.simulated import SimulatedTinker, serve

SESSION = "bench"  # run ids are "bench:train:0", "bench:train:1", ...


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args()
    sim = SimulatedTinker(session_id=SESSION)
    for _ in range(args.runs):
        sim.create_lora_training_client(base_model="bench/model")
    with serve(sim, api_key=args.api_key) as server:
        server.latency = args.latency
        print(f"READY {server.base_url}", flush=True)
        for line in sys.stdin:
            parts = line.split()
            if parts[:1] == ["corrupt"]:
                sim.corrupt(parts[1])
                print("OK", flush=True)


if __name__ == "__main__":
    main()
