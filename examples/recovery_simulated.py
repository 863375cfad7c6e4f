"""Offline demo: a simulated Tinker run is corrupted and recovered from its latest checkpoint.

Run with `make demo`. It seeds two checkpoints, corrupts the run, makes the first restore fail (a passing
503), and prints the timeline of recovery events with timings, ending with the recovered run id.
"""

from __future__ import annotations

import sys
import time

from tinkex_recovery import RecoveryEngine, RecoveryEvent, RecoveryPolicy, TinkerRest
from tinkex_recovery.simulated import SimulatedTinker, serve

T0 = time.monotonic()
API_KEY = "tml-simulated-demo-key"  # the loopback server's key: never printed or logged


def show(event: RecoveryEvent) -> None:
    details = []
    if event.attempt:
        details.append(f"attempt {event.attempt}")
    if event.checkpoint:
        details.append(f"checkpoint {event.checkpoint.rsplit('/', 1)[-1]}")
    if event.new_run_id:
        details.append(f"new run {event.new_run_id}")
    if event.error:
        details.append(event.error)
    print(f"  {time.monotonic() - T0:7.3f}s  {event.kind.value:<20} {', '.join(details)}")


def main() -> int:
    sim = SimulatedTinker()
    client = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    for step in range(20):
        client.forward_backward([step], "cross_entropy").result()
        client.optim_step().result()
        if (step + 1) % 10 == 0:
            path = client.save_state(f"{step + 1:04d}", user_metadata={"step": str(step + 1)}).result().path
            print(f"seeded checkpoint {path}")

    policy = RecoveryPolicy(enabled=True, poll_interval=0.2, backoff=0.1, max_backoff=0.4, attempt_timeout=5)
    # The engine polls over real HTTP, exactly as against the real service: TinkerRest -> loopback server.
    with (
        serve(sim, api_key=API_KEY) as server,
        TinkerRest(base_url=server.base_url, api_key=API_KEY) as rest,
        RecoveryEngine(policy, status=rest) as engine,
    ):
        engine.subscribe(show)
        handle = engine.watch(client.model_id, sim, metadata={"experiment": "demo"})
        print(f"watching run {client.model_id} (poll every {policy.poll_interval}s)")
        sim.fail_restores(1)  # the first restore hits a passing outage and is retried with backoff
        sim.corrupt(client.model_id)
        print("run marked corrupted on the server; timeline:")
        try:
            recovery = handle.wait_for_recovery(timeout=10)
        except Exception as exc:
            print(f"recovery failed: {exc}")
            return 1

    trained = sim.lineage(recovery.new_run_id)
    print(
        f"recovered in {recovery.seconds:.3f}s after {recovery.attempts} attempt(s) "
        f"from {recovery.checkpoint.tinker_path}\n"
        f"new run holds {len(trained)} trained steps (resume at step {recovery.checkpoint.user_metadata['step']})\n"
        f"recovered run id: {recovery.new_run_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
