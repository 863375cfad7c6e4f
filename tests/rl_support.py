"""The RL loops the RL tests drive, on the simulated Tinker in memory or on the real SDK over loopback HTTP.

Each trained datum is ``(step index, first sampled token)``, and a sample's first token is the number of optimizer
steps of the weights it came from, so the final run's lineage shows both guarantees at once: the step indices are
``0..steps-1`` in order (every step trained once) and each token is within ``max_steps_off_policy`` below its
step and never above it (on-policy). Corruptions are scheduled by ``(step index, recoveries so far)``, so each one
fires once even when a recovery makes the loop run that step again:

- ``"sampling"``: while the step's sample is in flight (held by the simulator, then released);
- ``"between"``: after the step sampled, before it trains;
- ``"mid"``: between ``forward_backward`` and ``optim_step``;
- ``"after"``: after the step (the next step's first call fails);
- ``"in_flight"`` (async loop only): while every rollout worker has a sample in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinkex_recovery import RecoveryPolicy, recovery_guard
from tinkex_recovery.integrations import RecoveryGuard, WeightsVersion
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT

#: Rollouts dropped in a row after which the async loop's trainer gives up (it would wait forever).
STARVED = 500
SYNC_POINTS = ("sampling", "between", "mid", "after")
ASYNC_POINTS = ("in_flight", "between", "mid", "after")


@dataclass
class Net:
    """Where a loop runs: the simulator (for corruptions and books), the service and the client's conventions."""

    sim: SimulatedTinker
    service: Any
    datum: Callable[[int, int], Any]  #: the datum trained at step k on a sample whose first token is t
    prompt: Callable[[int], Any]  #: the prompt of worker (or step) i
    params: Any = None  #: sampling params
    adam: Any = None  #: optim_step's argument
    policy: RecoveryPolicy = field(
        default_factory=lambda: RecoveryPolicy(
            enabled=True,
            poll_interval=3600,
            backoff=0,
            max_backoff=0,
            attempt_timeout=30,
            max_no_progress=None,
            max_recoveries=None,
        )
    )
    clock: Any = None


def _corrupt(net: Net, guard: RecoveryGuard) -> None:
    net.sim.corrupt(guard.run_id)


def sync_rl_loop(
    net: Net, client: Any, schedule: dict[tuple[int, int], str], *, steps: int, every: int
) -> RecoveryGuard:
    """The cookbook's sync RL loop: each step makes a sampler of the current weights, samples, trains on it."""
    with recovery_guard(client.model_id, net.service, policy=net.policy, client=client, clock=net.clock) as guard:
        for step in guard.steps(range(steps)):
            with step:
                point = schedule.pop((step.index, len(guard.recoveries)), None)
                sampler = guard.client.save_weights_and_get_sampling_client().result()
                if point == "sampling":
                    net.sim.hold_samples(1)
                    received = net.sim.sample_count
                    pending = sampler.sample(net.prompt(step.index), 1, net.params)
                    assert net.sim.wait_for_samples(received + 1, WAIT)
                    _corrupt(net, guard)
                    net.sim.release_samples()
                    response = pending.result()
                else:
                    response = sampler.sample(net.prompt(step.index), 1, net.params).result()
                token = int(response.sequences[0].tokens[0])
                if point == "between":
                    _corrupt(net, guard)
                guard.client.forward_backward([net.datum(step.index, token)], "cross_entropy").result()
                if point == "mid":
                    _corrupt(net, guard)
                guard.client.optim_step(net.adam).result()
                if (step.index + 1) % every == 0:
                    guard.save_state(f"step-{step.index + 1:04d}")
                if point == "after":
                    _corrupt(net, guard)
    return guard


@dataclass(frozen=True)
class Rollout:
    """A group of samples, tagged with the version of the weights its sampler was published with."""

    version: WeightsVersion
    tokens: tuple[int, ...] = ()
    error: BaseException | None = None


@dataclass
class AsyncReport:
    guard: RecoveryGuard
    dropped: int  #: rollouts not trained: off the lineage or too stale
    trained_versions: list[WeightsVersion]


class _Rollouts:
    """The rollout side of the async loop: workers sampling groups from the shared sampler into a queue."""

    def __init__(self, net: Net, workers: int, group: int, max_steps_off_policy: int) -> None:
        self.net, self.workers, self.group, self.max_off = net, workers, group, max_steps_off_policy
        self.queue: asyncio.Queue[Rollout] = asyncio.Queue(maxsize=workers)
        self.sampler: tuple[Any, WeightsVersion] | None = None
        self.backlog: list[Rollout] = []
        self.dropped = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def worker(self, i: int) -> None:
        while True:
            assert self.sampler is not None
            sampler, version = self.sampler
            try:
                response = await sampler.sample(self.net.prompt(i), self.group, self.net.params)
                rollout = Rollout(version, tuple(int(s.tokens[0]) for s in response.sequences))
            except Exception as exc:  # a sampler of a lost run, in the simulator's "fail" mode
                rollout = Rollout(version, error=exc)
            await self.queue.put(rollout)

    async def publish(self, guard: RecoveryGuard) -> None:
        version = guard.weights_version()
        self.sampler = (await guard.client.save_weights_and_get_sampling_client(), version)
        if not self.tasks:
            self.tasks = [asyncio.create_task(self.worker(i)) for i in range(self.workers)]

    async def next_group(self, guard: RecoveryGuard, at: int) -> Rollout:
        for _ in range(STARVED):
            rollout = self.backlog.pop(0) if self.backlog else await self.queue.get()
            if rollout.error is not None:
                if rollout.version.run_id != guard.run_id:
                    self.dropped += 1  # a sampler of a run already replaced
                    continue
                raise rollout.error  # judged by the guard: a lost run is recovered
            lag = guard.staleness(rollout.version, at=at)
            if lag is None or lag > self.max_off:
                self.dropped += 1
                continue
            return rollout
        raise AssertionError(f"the trainer starved at step {at}: {STARVED} rollouts in a row were dropped")

    async def hold_every_worker(self) -> None:
        """Let every worker put what it holds and start a sample, which the simulator keeps in flight."""
        sim = self.net.sim
        sim.hold_samples(self.workers)
        received = sim.sample_count
        while not self.queue.empty():
            self.backlog.append(self.queue.get_nowait())
        assert await asyncio.to_thread(sim.wait_for_samples, received + self.workers, WAIT)
        while not self.queue.empty():
            self.backlog.append(self.queue.get_nowait())

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.net.sim.release_samples()


async def async_rl_loop(
    net: Net,
    client: Any,
    schedule: dict[tuple[int, int], str],
    *,
    steps: int,
    every: int,
    workers: int = 3,
    group: int = 2,
    max_steps_off_policy: int = 1,
) -> AsyncReport:
    """tinker-cookbook's async RL shape: rollout workers sample concurrently from one shared sampler the trainer
    republishes after every step; the trainer consumes groups, dropping those more than ``max_steps_off_policy``
    steps stale or off the lineage (``guard.staleness`` is None); after a recovery (``step.resumed``) it
    republishes a sampler of the restored weights before it consumes anything."""
    rollouts = _Rollouts(net, workers, group, max_steps_off_policy)
    trained: list[WeightsVersion] = []
    try:
        async with recovery_guard(
            client.model_id, net.service, policy=net.policy, client=client, clock=net.clock
        ) as guard:
            async for step in guard.steps(range(steps)):
                async with step:
                    if rollouts.sampler is None or step.resumed:
                        await rollouts.publish(guard)  # the first step, or a new run: the restored weights
                    point = schedule.pop((step.index, len(guard.recoveries)), None)
                    if point == "in_flight":
                        await rollouts.hold_every_worker()
                        _corrupt(net, guard)
                        net.sim.release_samples()
                    rollout = await rollouts.next_group(guard, step.index)
                    if point == "between":
                        _corrupt(net, guard)
                    await guard.client.forward_backward([net.datum(step.index, rollout.tokens[0])], "cross_entropy")
                    if point == "mid":
                        _corrupt(net, guard)
                    await guard.client.optim_step(net.adam)
                    trained.append(rollout.version)
                    if (step.index + 1) % every == 0:
                        await guard.save_state_async(f"step-{step.index + 1:04d}")
                    await rollouts.publish(guard)
                    if point == "after":
                        _corrupt(net, guard)
    finally:
        await rollouts.stop()
    return AsyncReport(guard, rollouts.dropped, trained)


def check_exactly_once_and_on_policy(lineage: list[Any], steps: int, max_steps_off_policy: int) -> None:
    """Every step trained once, in order, each on a sample from weights ``k - max_steps_off_policy..k`` steps."""
    assert [k for k, _ in lineage] == list(range(steps)), lineage
    off = [(k, t) for k, t in lineage if not k - max_steps_off_policy <= t <= k]
    assert not off, f"trained off-policy (step, weights' steps): {off}"
