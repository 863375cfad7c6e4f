"""Offline demo: an asyncio RL loop shaped like tinker-cookbook's async one survives its run being corrupted twice,
once while rollouts are in flight, and stays on-policy.

Run with `python examples/rl_loop.py`. Like the cookbook's `rl/train.py` (`do_async_training`), rollout workers
sample groups concurrently from one shared sampler, which the trainer refreshes after every optimizer step
(`save_weights_and_get_sampling_client()`), and the trainer consumes groups, dropping those sampled from weights
more than `max_steps_off_policy` steps behind. On the simulated Tinker a sample's first token is the number of
optimizer steps of the weights it came from, and each step trains one datum `(step, that token)`, so the run's
lineage shows both promises: every step trained once, each group trained at step k sampled from weights holding
k - max_steps_off_policy..k steps.

After a recovery the loop resumes at the checkpoint's step on a new run. What it must do there (`step.resumed`):
republish the sampler from the restored weights, and drop rollouts the lost run's samplers made from weights ahead
of the checkpoint (its future: `guard.staleness(version, at=step)` is None for them). Every rollout is tagged with
the `guard.weights_version()` of the sampler it came from; `on_swap` keeps the checkpoint manager's client current.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any

from tinkex_recovery import RecoveryPolicy, recovery_guard
from tinkex_recovery.integrations import RecoveryGuard, WeightsVersion
from tinkex_recovery.simulated import SimulatedTinker

NUM_STEPS = 40
SAVE_EVERY = 5
MAX_STEPS_OFF_POLICY = 1
WORKERS = 4
GROUP_SIZE = 2
# (step, recoveries so far) -> where the server marks the run corrupted
CORRUPT = {(17, 0): "while rollouts are in flight", (28, 1): "between sampling and training"}


@dataclass(frozen=True)
class Group:
    version: WeightsVersion  # the weights its sampler was published with
    first_tokens: tuple[int, ...]


@dataclass
class CheckpointManager:
    """A stand-in for tinker-cookbook's: it keeps its own reference to the training client."""

    training_client: Any


class Rollouts:
    """The rollout side: workers sampling groups from the shared sampler into a queue the trainer reads."""

    def __init__(self, service: SimulatedTinker) -> None:
        self.service = service
        self.queue: asyncio.Queue[Group] = asyncio.Queue(maxsize=WORKERS)
        self.sampler: tuple[Any, WeightsVersion] | None = None  # what every worker samples from, and its version
        self.held: list[Group] = []  # groups taken off the queue while rollouts were held in flight
        self.dropped = 0
        self.workers: list[asyncio.Task[None]] = []

    async def worker(self, i: int) -> None:
        while True:
            assert self.sampler is not None
            sampler, version = self.sampler
            response = await sampler.sample([i, i + 1], GROUP_SIZE, {"max_tokens": 8})
            await self.queue.put(Group(version, tuple(seq.tokens[0] for seq in response.sequences)))

    async def publish(self, guard: RecoveryGuard) -> None:
        """Refresh the shared sampler from the current weights (and start the workers the first time)."""
        version = guard.weights_version()  # read where the sampler is made, inside the step
        self.sampler = (await guard.client.save_weights_and_get_sampling_client(), version)
        if not self.workers:
            self.workers = [asyncio.create_task(self.worker(i)) for i in range(WORKERS)]

    async def next_group(self, guard: RecoveryGuard, step: int) -> Group:
        while True:
            group = self.held.pop(0) if self.held else await self.queue.get()
            staleness = guard.staleness(group.version, at=step)
            if staleness is not None and staleness <= MAX_STEPS_OFF_POLICY:
                return group
            self.dropped += 1  # too stale, or sampled from the lost run's future

    async def hold_in_flight(self) -> None:
        """Every worker's next sample stays in flight (until ``service.release_samples()``)."""
        self.service.hold_samples(WORKERS)
        received = self.service.sample_count
        while self.service.sample_count < received + WORKERS:
            while not self.queue.empty():
                self.held.append(self.queue.get_nowait())
            await asyncio.sleep(0)

    async def stop(self) -> None:
        for task in self.workers:
            task.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)


async def main() -> int:
    service = SimulatedTinker()
    training_client = await service.create_lora_training_client_async(base_model="Qwen/Qwen3-8B")
    manager = CheckpointManager(training_client)
    policy = RecoveryPolicy(enabled=True, poll_interval=60, backoff=0.02, max_backoff=0.1)
    rollouts = Rollouts(service)

    def keep_current(new_client: Any) -> None:
        manager.training_client = new_client

    async with recovery_guard(
        training_client.model_id, service, policy=policy, client=training_client, on_swap=keep_current
    ) as guard:
        async for step in guard.steps(range(NUM_STEPS)):
            async with step:
                if step.resumed or rollouts.sampler is None:
                    await rollouts.publish(guard)  # a sampler of the restored weights before anything is consumed
                    if step.resumed:
                        print(f"  step {step.index}: resumed on run {guard.run_id}; sampler republished")
                where = CORRUPT.get((step.index, len(guard.recoveries)))
                if where == "while rollouts are in flight":
                    await rollouts.hold_in_flight()
                    print(
                        f"  step {step.index}: {WORKERS} rollouts in flight; "
                        f"the server marks run {guard.run_id} corrupted"
                    )
                    service.corrupt(guard.run_id)
                    service.release_samples()  # the lost run's snapshot samplers go on serving (the default)
                group = await rollouts.next_group(guard, step.index)
                if where == "between sampling and training":
                    print(f"  step {step.index}: sampled; the server marks run {guard.run_id} corrupted")
                    service.corrupt(guard.run_id)
                await guard.client.forward_backward([(step.index, group.first_tokens[0])], "cross_entropy")
                await guard.client.optim_step({"learning_rate": 1e-5})
                if (step.index + 1) % SAVE_EVERY == 0:
                    await guard.save_state_async(f"{step.index + 1:06d}")
                await rollouts.publish(guard)  # refreshed each step
    await rollouts.stop()
    service.close()
    return report(service, guard, manager, rollouts.dropped)


def report(service: SimulatedTinker, guard: RecoveryGuard, manager: CheckpointManager, dropped: int) -> int:
    for r in guard.recoveries:
        print(
            f"recovery {r.number}: run {r.old_run_id} -> {r.new_run_id}, resumed at step {r.resumed_at}, "
            f"steps trained again: {r.steps_lost}"
        )
    lineage = service.lineage(guard.run_id)
    once = [k for k, _ in lineage] == list(range(NUM_STEPS))
    on_policy = all(k - MAX_STEPS_OFF_POLICY <= weights <= k for k, weights in lineage)
    current = manager.training_client is guard.client
    print(f"groups dropped (stale or from a lost run's future): {dropped}")
    print(f"the checkpoint manager holds the current client: {current}")
    print(f"every optimizer step trained once: {once}")
    bound = f"k-{MAX_STEPS_OFF_POLICY}..k"
    print(f"every group trained at step k was sampled from weights holding {bound} steps: {on_policy}")
    return 0 if once and on_policy and current and len(guard.recoveries) == 2 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
