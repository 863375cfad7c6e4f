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

from tinkex_recovery import RESUME_KEY, FakeClock, RecoveryPolicy, recovery_guard
from tinkex_recovery.integrations import RecoveryGuard
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


class Recovered:
    """Counts recoveries (as the policy's ``on_recovery``, on the engine's notifier thread); ``poll`` lets the poller
    find a loss: it advances the clock one interval and waits until that loss is recovered."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.cond = threading.Condition()
        self.count = 0

    def __call__(self, _: object) -> None:
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def poll(self) -> None:
        with self.cond:
            seen = self.count
            self.clock.advance(INTERVAL)  # the poller finds it; no training call fails first
            assert self.cond.wait_for(lambda: self.count > seen, WAIT)


class RecoveredAsync:
    """:class:`Recovered` for a coroutine: the wait is awaited. Make it inside the running event loop."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.loop = asyncio.get_running_loop()
        self.cond = asyncio.Condition()
        self.count = 0

    def __call__(self, _: object) -> None:
        asyncio.run_coroutine_threadsafe(self._count(), self.loop)

    async def _count(self) -> None:
        async with self.cond:
            self.count += 1
            self.cond.notify_all()

    async def poll(self) -> None:
        async with self.cond:
            seen = self.count
            self.clock.advance(INTERVAL)
            await asyncio.wait_for(self.cond.wait_for(lambda: self.count > seen), WAIT)


def run(schedule: dict[int, str], doomed: set[int]) -> tuple[list[int], list[int], int]:
    """The guarded loop under ``schedule`` ({execution number: phase}); returns the final run's lineage,
    the step indices in the order they ran, and the number of recoveries."""
    clock = FakeClock()
    sim = SimulatedTinker(clock=clock)
    recovered = Recovered(clock)
    policy = POLICY.replace(on_recovery=recovered)
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
                        recovered.poll()
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
        recovered = RecoveredAsync(clock)
        policy = POLICY.replace(on_recovery=recovered)
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
                        await recovered.poll()
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


# -- bare saves: the loop never says a step; the guard's ledger knows it ------------------------------------------
BARE_STEPS = 60
BARE_EVERY = 5
#: where in a step the run is lost: before its calls, between forward_backward and optim_step, just before or just
#: after its save (the save step's eval ``forward`` after the save then fails), after the step, or after the step
#: with the loss found by the poller (between steps)
BARE_PHASES = ("before", "mid", "before_save", "after_save", "after", "poll")


class Bare:
    """One guarded loop that saves with a bare ``guard.client.save_state(name)`` every ``BARE_EVERY`` steps: at the
    end of the step (``"end"``) or, as tinker-cookbook does, at the start of the next one (``"start"``). Records what
    each checkpoint holds (the lineage of its run when the save returned), to check each resume against."""

    def __init__(self, schedule: dict[int, str], doomed: set[int], style: str) -> None:
        self.clock = FakeClock()
        self.sim = SimulatedTinker(clock=self.clock)
        self.service = CorruptOnArrival(self.sim, doomed)
        self.client = self.sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
        self.schedule, self.style = schedule, style
        self.ran: list[int] = []
        self.held: dict[str, int] = {}  # tinker path -> steps the checkpoint holds, as the simulator says

    def saves_now(self, index: int, where: str) -> bool:
        if where != self.style:
            return False
        return (index + 1) % BARE_EVERY == 0 if where == "end" else index > 0 and index % BARE_EVERY == 0

    def phase(self, index: int) -> str | None:
        """Where this execution is lost; in a step that saves nothing, "before/after the save" is after the step."""
        phase = self.schedule.get(len(self.ran))
        if phase in ("before_save", "after_save") and not (
            self.saves_now(index, "start") or self.saves_now(index, "end")
        ):
            return "after"
        return phase

    def corrupt_if(self, phase: str | None, *at: str, run_id: str) -> None:
        if phase in at:
            self.sim.corrupt(run_id)

    def saved(self, run_id: str, path: str) -> None:
        self.held[path] = len(self.sim.lineage(run_id))

    def check(self, guard: RecoveryGuard) -> None:
        assert self.sim.lineage(guard.run_id) == list(range(BARE_STEPS))  # every step exactly once
        assert guard.ledger.step == BARE_STEPS  # the step counter is true at the end
        assert guard.ledger.sent == BARE_STEPS - guard.recoveries[-1].resumed_at  # one optim_step a step, on this run
        assert guard.recoveries and self.ran[-1] == BARE_STEPS - 1
        for recovery in guard.recoveries:  # ... and at every resume: the step is what the checkpoint holds
            assert recovery.resumed_at == self.held[recovery.checkpoint.tinker_path]
            assert recovery.checkpoint.user_metadata == {RESUME_KEY: str(recovery.resumed_at)}

    def run(self) -> RecoveryGuard:
        recovered = Recovered(self.clock)
        policy, sim, clock = POLICY.replace(on_recovery=recovered), self.sim, self.clock
        try:
            with recovery_guard(
                self.client.model_id, self.service, policy=policy, client=self.client, clock=clock
            ) as g:
                for step in g.steps(range(BARE_STEPS)):
                    with step:
                        phase = self.phase(step.index)
                        self.ran.append(step.index)
                        self.save_sync(g, step.index, "start", phase)
                        self.corrupt_if(phase, "before", run_id=g.run_id)
                        g.client.forward_backward([step.index], "cross_entropy").result()
                        self.corrupt_if(phase, "mid", run_id=g.run_id)
                        g.client.optim_step().result()
                        self.save_sync(g, step.index, "end", phase)
                        self.corrupt_if(phase, "after", "poll", run_id=g.run_id)
                        if phase == "poll":
                            recovered.poll()
            return g
        finally:
            sim.release()

    def save_sync(self, guard: RecoveryGuard, index: int, where: str, phase: str | None) -> None:
        if not self.saves_now(index, where):
            return
        self.corrupt_if(phase, "before_save", run_id=guard.run_id)
        run_id = guard.run_id
        self.saved(run_id, guard.client.save_state(f"{where}-{index:04d}").result().path)
        self.corrupt_if(phase, "after_save", run_id=run_id)
        guard.client.forward([index], "cross_entropy").result()  # an eval after the save, in the same step

    def run_async(self) -> RecoveryGuard:
        sim, clock = self.sim, self.clock

        async def main() -> RecoveryGuard:
            recovered = RecoveredAsync(clock)
            policy = POLICY.replace(on_recovery=recovered)
            async with recovery_guard(
                self.client.model_id, self.service, policy=policy, client=self.client, clock=clock
            ) as g:
                async for step in g.steps(range(BARE_STEPS)):
                    async with step:
                        phase = self.phase(step.index)
                        self.ran.append(step.index)
                        await self.save_async(g, step.index, "start", phase)
                        self.corrupt_if(phase, "before", run_id=g.run_id)
                        await (await g.client.forward_backward_async([step.index], "cross_entropy"))
                        self.corrupt_if(phase, "mid", run_id=g.run_id)
                        await (await g.client.optim_step_async()).result_async()
                        await self.save_async(g, step.index, "end", phase)
                        self.corrupt_if(phase, "after", "poll", run_id=g.run_id)
                        if phase == "poll":
                            await recovered.poll()
            return g

        try:
            return asyncio.run(main())
        finally:
            sim.release()

    async def save_async(self, guard: RecoveryGuard, index: int, where: str, phase: str | None) -> None:
        if not self.saves_now(index, where):
            return
        self.corrupt_if(phase, "before_save", run_id=guard.run_id)
        run_id = guard.run_id
        if index % 2:  # both ways a coroutine saves: the *_async form, and awaiting the plain call's future
            saved = await (await guard.client.save_state_async(f"{where}-{index:04d}"))
        else:
            saved = await guard.client.save_state(f"{where}-{index:04d}")
        self.saved(run_id, saved.path)
        self.corrupt_if(phase, "after_save", run_id=run_id)
        await (await guard.client.forward_async([index], "cross_entropy"))


# From execution BARE_EVERY + 1 on, a checkpoint exists in either style.
bare_schedules = st.dictionaries(
    st.integers(BARE_EVERY + 1, BARE_STEPS - 1), st.sampled_from(BARE_PHASES), min_size=1, max_size=5
)
BARE_EXAMPLES = [
    # the Why's first bullet: a call after the save in the same step fails; the checkpoint just saved is used
    ({9: "after_save"}, set(), "end"),
    ({10: "after_save"}, set(), "start"),
    ({14: "before_save", 16: "mid"}, set(), "end"),  # the save never happened; then lost again in the replay
    ({59: "after"}, {1}, "start"),  # the last step, its restored run lost on arrival
    ({59: "poll"}, set(), "end"),  # lost after the last step, found by the poller
]


def _with_examples(test: Any) -> Any:
    for schedule, doomed, style in BARE_EXAMPLES:
        test = example(schedule=schedule, doomed=doomed, style=style)(test)
    return test


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=bare_schedules, doomed=st.sets(st.integers(1, 4), max_size=2), style=st.sampled_from(["end", "start"]))
@_with_examples
def test_a_loop_that_saves_bare_trains_every_step_exactly_once(
    schedule: dict[int, str], doomed: set[int], style: str
) -> None:
    bare = Bare(schedule, doomed, style)
    bare.check(bare.run())


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=bare_schedules, doomed=st.sets(st.integers(1, 4), max_size=2), style=st.sampled_from(["end", "start"]))
@_with_examples
def test_an_async_loop_that_saves_bare_trains_every_step_exactly_once(
    schedule: dict[int, str], doomed: set[int], style: str
) -> None:
    bare = Bare(schedule, doomed, style)
    bare.check(bare.run_async())
    sync = Bare(schedule, doomed, style)
    sync.run()
    assert bare.ran == sync.ran  # the same steps, in the same order, as the sync guard
