"""Must show 1: whatever the corruption schedule, every step of a guarded loop is trained exactly once, in a plain
loop and in a coroutine (``async with`` / ``async for`` / ``async with step``, on SimulatedTinker's async surface).

A 200-step loop on the simulated Tinker saves every 10 steps; the run is corrupted at random points of random
steps (before the step's calls, between forward_backward and optim_step, after the step, or after the step
with the corruption found by the background poller), and some recovered runs arrive already corrupted (lost
during the recovery, before saving anything). The end: ``sim.lineage(guard.run_id) == list(range(200))``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tinkex_recovery import FakeClock, RecoveryPolicy, recovery_guard
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT

STEPS = 200
EVERY = 10
PHASES = ("before", "mid", "after", "poll")
INTERVAL = 30.0


class CorruptOnArrival:
    """The simulated service, except that the restores numbered in ``doomed`` hand back a run that is already
    corrupted: it is lost during its recovery, before it could save anything."""

    def __init__(self, sim: SimulatedTinker, doomed: set[int]) -> None:
        self._sim = sim
        self._doomed = doomed
        self.restores = 0

    def create_rest_client(self) -> Any:
        return self._sim.create_rest_client()

    def create_training_client_from_state(self, path: str, **kw: Any) -> Any:
        return self._arrive(self._sim.create_training_client_from_state(path, **kw))

    def create_training_client_from_state_with_optimizer(self, path: str, **kw: Any) -> Any:
        return self._arrive(self._sim.create_training_client_from_state_with_optimizer(path, **kw))

    def _arrive(self, future: Any) -> Any:
        self.restores += 1
        if self.restores in self._doomed:
            self._sim.corrupt(future.result().model_id)
        return future


#: The loops' policy (each run adds its on_recovery). The safety budgets are off: schedules corrupt one lineage
#: many times, on a clock that barely moves, on purpose.
POLICY = RecoveryPolicy(
    enabled=True,
    poll_interval=INTERVAL,
    backoff=0,
    max_backoff=0,
    max_attempts=3,
    max_recoveries=None,
    max_no_progress=None,
)


def run(schedule: dict[int, str], doomed: set[int]) -> tuple[list[int], list[int], int]:
    """The guarded loop under ``schedule`` ({execution number: phase}); returns the final run's lineage,
    the step indices in the order they ran, and the number of recoveries."""
    clock = FakeClock()
    sim = SimulatedTinker(clock=clock)
    recovered = threading.Condition()
    completed = [0]

    def on_recovery(_: object) -> None:
        with recovered:
            completed[0] += 1
            recovered.notify_all()

    policy = POLICY.replace(on_recovery=on_recovery)
    service = CorruptOnArrival(sim, doomed)
    client = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    ran: list[int] = []
    try:
        # The poller's first poll is one interval after start: on this clock, only a "poll" phase makes one.
        with recovery_guard(client.model_id, service, policy=policy, client=client, clock=clock) as guard:
            for step in guard.steps(range(STEPS)):
                with step:
                    phase = schedule.get(len(ran))
                    ran.append(step.index)
                    if phase == "before":
                        sim.corrupt(guard.run_id)
                    guard.client.forward_backward([step.index], "cross_entropy").result()
                    if phase == "mid":
                        sim.corrupt(guard.run_id)
                    guard.client.optim_step().result()
                    if (step.index + 1) % EVERY == 0:
                        guard.save_state(f"step-{step.index + 1:06d}", step=step.index + 1, metrics={"loss": 0.5})
                    if phase in ("after", "poll"):
                        sim.corrupt(guard.run_id)
                    if phase == "poll":
                        with recovered:
                            seen = completed[0]
                            clock.advance(INTERVAL)  # the poller finds it; no training call fails first
                            assert recovered.wait_for(lambda seen=seen: completed[0] > seen, WAIT)
        return sim.lineage(guard.run_id), ran, len(guard.recoveries)
    finally:
        sim.release()


def run_async(schedule: dict[int, str], doomed: set[int]) -> tuple[list[int], list[int], int]:
    """:func:`run`, as a coroutine: the same loop and schedule, every wait awaited."""
    clock = FakeClock()
    sim = SimulatedTinker(clock=clock)
    service = CorruptOnArrival(sim, doomed)
    client = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    ran: list[int] = []

    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        completed = [0]
        recovered = asyncio.Condition()

        async def count() -> None:
            async with recovered:
                completed[0] += 1
                recovered.notify_all()

        def on_recovery(_: object) -> None:  # on the engine's notifier thread
            asyncio.run_coroutine_threadsafe(count(), loop)

        policy = POLICY.replace(on_recovery=on_recovery)
        async with recovery_guard(client.model_id, service, policy=policy, client=client, clock=clock) as guard:
            async for step in guard.steps(range(STEPS)):
                async with step:
                    phase = schedule.get(len(ran))
                    ran.append(step.index)
                    if phase == "before":
                        sim.corrupt(guard.run_id)
                    await (await guard.client.forward_backward_async([step.index], "cross_entropy"))
                    if phase == "mid":
                        sim.corrupt(guard.run_id)
                    await (await guard.client.optim_step_async()).result_async()
                    if (step.index + 1) % EVERY == 0:
                        await guard.save_state_async(
                            f"step-{step.index + 1:06d}", step=step.index + 1, metrics={"loss": 0.5}
                        )
                    if phase in ("after", "poll"):
                        sim.corrupt(guard.run_id)
                    if phase == "poll":
                        async with recovered:
                            seen = completed[0]
                            clock.advance(INTERVAL)  # the poller finds it; no training call fails first
                            await asyncio.wait_for(recovered.wait_for(lambda seen=seen: completed[0] > seen), WAIT)
        return sim.lineage(guard.run_id), len(guard.recoveries)

    try:
        lineage, recoveries = asyncio.run(main())
        return lineage, ran, recoveries
    finally:
        sim.release()


# Execution numbers count every step run, replays included; from 10 on a checkpoint always exists.
schedules = st.dictionaries(st.integers(EVERY, STEPS - 1), st.sampled_from(PHASES), min_size=2, max_size=6)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules, doomed=st.sets(st.integers(1, 6), max_size=2))
# Twice between two checkpoints: step 13 fails, then step 12 of the recovered run (execution 16) before its save.
@example(schedule={13: "before", 16: "mid"}, doomed=set())
# During a recovery: the first recovered run arrives corrupted; the second restores the inherited checkpoint.
@example(schedule={25: "mid", 60: "poll"}, doomed={1})
# At the very end: found by the last poll, resumed at step 200, nothing left to run.
@example(schedule={199: "after", 150: "poll"}, doomed={2})
def test_every_step_is_trained_exactly_once(schedule: dict[int, str], doomed: set[int]) -> None:
    lineage, ran, recoveries = run(schedule, doomed)
    assert lineage == list(range(STEPS))
    assert recoveries >= 1 and ran[-1] == STEPS - 1


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules, doomed=st.sets(st.integers(1, 6), max_size=2))
@example(schedule={13: "before", 16: "mid"}, doomed=set())
@example(schedule={25: "mid", 60: "poll"}, doomed={1})
@example(schedule={199: "after", 150: "poll"}, doomed={2})
def test_every_step_of_an_async_loop_is_trained_exactly_once_and_as_in_the_sync_loop(
    schedule: dict[int, str], doomed: set[int]
) -> None:
    lineage, ran, recoveries = run_async(schedule, doomed)
    assert lineage == list(range(STEPS))
    assert recoveries >= 1 and ran[-1] == STEPS - 1
    assert (ran, recoveries) == run(schedule, doomed)[1:]  # the same steps, in the same order, as the sync guard


def test_twice_between_two_checkpoints_restores_the_same_checkpoint_twice() -> None:
    lineage, ran, recoveries = run({13: "before", 16: "mid"}, set())
    assert ran[:24] == [*range(14), 10, 11, 12, *range(10, 17)]
    assert recoveries == 2 and lineage == list(range(STEPS))


def test_a_run_lost_during_its_recovery_is_recovered_from_the_checkpoint_it_inherited() -> None:
    lineage, ran, recoveries = run({25: "mid"}, {1})
    # Step 25 fails; run 1 arrives corrupted, so step 20 fails on it and run 2 restores step 20 again.
    assert ran[:28] == [*range(26), 20, 20]
    assert recoveries == 2 and lineage == list(range(STEPS))
