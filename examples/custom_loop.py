"""Offline demo: a plain training loop under `recovery_guard` survives its run being corrupted twice.

Run with `python examples/custom_loop.py`. The loop trains 100 steps on the simulated Tinker, saving every
20. The server marks the run corrupted twice: once between forward_backward and optim_step, once right
after a step (the next call fails). Each time, the failing step triggers an immediate poll, the guard waits
for the new run, swaps in its client and rewinds the loop to the checkpoint's step. It prints, per recovery,
the steps trained again and the time to recover (the first recovery retries a restore that hits a passing
503), then checks that every step was trained exactly once.
"""

from __future__ import annotations

import sys
import time

from tinkex_recovery import RecoveryPolicy, recovery_guard
from tinkex_recovery.simulated import SimulatedTinker

NUM_STEPS = 100
SAVE_EVERY = 20
# (step, moment): where the server marks the run corrupted; each happens once.
CORRUPT_AT = {(47, "mid"), (73, "after")}


def make_batch(index: int) -> list[int]:
    return [index]  # the simulated service records which items each run was trained on


def main() -> int:
    service = SimulatedTinker()
    training_client = service.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    run_id = training_client.model_id
    # A long poll interval on purpose: the failing calls are what make recovery immediate.
    policy = RecoveryPolicy(enabled=True, poll_interval=60, backoff=0.05, max_backoff=0.2)
    pending = set(CORRUPT_AT)

    def maybe_corrupt(index: int, moment: str, current_run: str) -> None:
        if (index, moment) in pending:
            pending.discard((index, moment))
            print(f"  step {index}: the server marks run {current_run} corrupted")
            service.corrupt(current_run)
            if index == 47:
                service.fail_restores(1)  # and the first restore attempt hits a passing 503: retried after backoff

    started = time.monotonic()
    loss = float("nan")
    with recovery_guard(run_id, service, policy=policy, client=training_client) as guard:
        for step in guard.steps(range(0, NUM_STEPS)):
            with step:
                batch = make_batch(step.index)
                guard.client.forward_backward(batch, "cross_entropy").result()
                maybe_corrupt(step.index, "mid", guard.run_id)
                guard.client.optim_step({"learning_rate": 1e-4}).result()
                loss = 1.0 / (step.index + 2)
                if (step.index + 1) % SAVE_EVERY == 0:
                    guard.save_state(f"step-{step.index + 1:06d}", step=step.index + 1, metrics={"loss": loss})
                maybe_corrupt(step.index, "after", guard.run_id)
    elapsed = time.monotonic() - started

    for r in guard.recoveries:
        checkpoint = r.checkpoint.tinker_path.rsplit("/", 1)[-1]
        print(
            f"recovery {r.number}: run {r.old_run_id} -> {r.new_run_id} from {checkpoint} "
            f"after {r.attempts} attempt(s), resumed at step {r.resumed_at}, steps lost: {r.steps_lost}, "
            f"time to recover: {r.seconds:.3f}s (loop waited {r.waited:.3f}s)"
        )
    ok = service.lineage(guard.run_id) == list(range(NUM_STEPS))
    print(f"finished {NUM_STEPS} steps in {elapsed:.2f}s on run {guard.run_id}; every step trained exactly once: {ok}")
    return 0 if ok and len(guard.recoveries) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
