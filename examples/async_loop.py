"""Offline demo: an asyncio training loop shaped like tinker-cookbook's supervised one survives its run being
corrupted twice.

Run with `python examples/async_loop.py`. Like the cookbook's `supervised/train.py`, it is an `async def main()`
run by `asyncio.run`, submits each batch's `forward_backward` and `optim_step` before finishing the previous
batch (`submit_ahead=1`, so requests are always in flight), and keeps a checkpoint manager that holds its own
reference to the training client. On the simulated Tinker the server marks the run corrupted twice, each time
right after a batch's requests were sent (and the first restore attempt hits a passing 503, retried after a
backoff). The failure shows when the loop awaits those requests; the guard
polls at once, awaits the new run (the event loop runs on: a heartbeat task keeps ticking), swaps the client
into `guard.client` and, through `on_swap`, into the checkpoint manager, and rewinds to the checkpoint's step (the
manager saves with a bare `save_state(name)`, as the cookbook does: the guard records the step each save holds).
The first step after each recovery (`step.resumed`) drops the futures of the lost run. It prints each
recovery, then checks that every batch was trained exactly once.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from tinkex_recovery import RecoveryPolicy, recovery_guard
from tinkex_recovery.simulated import SimulatedTinker

NUM_BATCHES = 60
SAVE_EVERY = 10
SUBMIT_AHEAD = 1
# (batch, run number): the server marks the run corrupted right after that batch's requests went out on it.
CORRUPT_AT = {(27, 0), (44, 1)}


@dataclass
class CheckpointManager:
    """A stand-in for tinker-cookbook's: it keeps its own reference to the training client and saves with a
    plain ``save_state(name)``, no step: given ``guard.client``, the guard sees the save and records its step."""

    training_client: Any
    saved: int = 0

    async def save(self, name: str) -> str:
        self.saved += 1
        return str((await (await self.training_client.save_state_async(name))).path)


async def heartbeat(ticks: list[float]) -> None:
    """Another task on the same event loop (in an RL loop: sampling); it must never stall."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(0.005)
        ticks.append(loop.time() - before - 0.005)


async def main() -> int:
    service = SimulatedTinker()
    training_client = await service.create_lora_training_client_async(base_model="Qwen/Qwen3-8B")
    manager = CheckpointManager(None)
    # A long poll interval on purpose: the failing calls are what make recovery immediate.
    policy = RecoveryPolicy(enabled=True, poll_interval=60, backoff=0.05, max_backoff=0.2)
    lags: list[float] = []
    beat = asyncio.create_task(heartbeat(lags))

    def keep_current(new_client: Any) -> None:
        manager.training_client = new_client  # whatever holds the client is handed the new one

    started = time.monotonic()
    in_flight: deque[tuple[int, Any, Any]] = deque()
    async with recovery_guard(
        training_client.model_id, service, policy=policy, client=training_client, on_swap=keep_current
    ) as guard:
        manager.training_client = guard.client  # the guard's client, so that the manager's saves are seen
        async for step in guard.steps(range(0, NUM_BATCHES)):
            async with step:
                if step.resumed:  # a new run: the futures still in flight belong to the lost one
                    print(f"  batch {step.index}: resumed on run {guard.run_id}; {len(in_flight)} future(s) dropped")
                    in_flight.clear()
                batch = [step.index]  # the simulated service records which items each run was trained on
                fwd = await guard.client.forward_backward_async(batch, "cross_entropy")
                opt = await guard.client.optim_step_async({"learning_rate": 1e-4})
                in_flight.append((step.index, fwd, opt))
                if (step.index, len(guard.recoveries)) in CORRUPT_AT:
                    print(f"  batch {step.index}: the server marks run {guard.run_id} corrupted")
                    service.corrupt(guard.run_id)
                    if not guard.recoveries:
                        service.fail_restores(1)  # and the first restore hits a passing 503: retried after backoff
                if (step.index + 1) % SAVE_EVERY == 0:
                    # Submitted after batch k's requests, it holds batches up to k: the guard records k + 1.
                    await manager.save(f"{step.index + 1:06d}")
                # Finish the batch SUBMIT_AHEAD back (all of them at the end).
                while len(in_flight) > SUBMIT_AHEAD or (step.index == NUM_BATCHES - 1 and in_flight):
                    _, done_fwd, done_opt = in_flight.popleft()
                    await done_fwd.result_async()
                    await done_opt.result_async()
    elapsed = time.monotonic() - started
    beat.cancel()

    for r in guard.recoveries:
        checkpoint = r.checkpoint.tinker_path.rsplit("/", 1)[-1]
        print(
            f"recovery {r.number}: run {r.old_run_id} -> {r.new_run_id} from {checkpoint}, "
            f"resumed at batch {r.resumed_at}, batches trained again: {r.steps_lost}, "
            f"time to recover: {r.seconds:.3f}s"
        )
    ok = service.lineage(guard.run_id) == list(range(NUM_BATCHES))
    current = manager.training_client is guard.client
    print(f"the checkpoint manager holds the current client: {current}")
    print(f"heartbeat: {len(lags)} ticks, the worst {max(lags, default=0.0) * 1e3:.1f} ms late")
    print(
        f"finished {NUM_BATCHES} batches in {elapsed:.2f}s on run {guard.run_id}; "
        f"every batch trained exactly once: {ok}"
    )
    return 0 if ok and current and len(guard.recoveries) == 2 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
