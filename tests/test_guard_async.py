"""recovery_guard in a coroutine (``async with`` / ``async for`` / ``async with step`` / ``save_state_async``),
offline on SimulatedTinker's async surface: the sync guard's semantics, with every wait awaited.

pytest-asyncio is not installed: each test runs its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tinkex_recovery import (
    EngineState,
    ExhaustedReason,
    FakeClock,
    NoRestorableCheckpoint,
    RecoveryEngine,
    RecoveryExhausted,
    RecoveryPolicy,
    SystemClock,
    recovery_guard,
)
from tinkex_recovery.integrations import RecoveryGuard, Step
from tinkex_recovery.simulated import (
    SimulatedAPIError,
    SimulatedAPIFuture,
    SimulatedRequestFailedError,
    SimulatedTinker,
)

from .helpers import WAIT
from .test_guard import POLICY, corrupt_at, guarded_loop

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def guarded_loop_async(
    sim: SimulatedTinker,
    clock: FakeClock | SystemClock,
    *,
    steps: Iterable[int] = range(60),
    every: int = 10,
    hook: Callable[[RecoveryGuard, Step, str], Awaitable[None] | None] | None = None,
    policy: RecoveryPolicy = POLICY,
    service: Any = None,
    log_path: Path | None = None,
    on_swap: Callable[[Any], object] | None = None,
) -> tuple[RecoveryGuard, list[int]]:
    """test_guard.guarded_loop as a coroutine, written as tinker-cookbook writes its steps (two awaits a call)."""
    client = await sim.create_lora_training_client_async(base_model="Qwen/Qwen3-8B")
    ran: list[int] = []

    async def at(guard: RecoveryGuard, step: Step, phase: str) -> None:
        if hook is not None:
            done = hook(guard, step, phase)
            if done is not None:
                await done

    async with recovery_guard(
        client.model_id,
        service or sim,
        policy=policy,
        client=client,
        clock=clock,
        log_path=log_path,
        on_swap=on_swap,
    ) as guard:
        async for step in guard.steps(steps):
            async with step:
                ran.append(step.index)
                await at(guard, step, "before")
                fwd = await guard.client.forward_backward_async([step.index], "cross_entropy")
                await fwd.result_async()
                await at(guard, step, "mid")
                opt = await guard.client.optim_step_async()
                await opt.result_async()
                if (step.index + 1) % every == 0:
                    await guard.save_state_async(
                        f"step-{step.index + 1:06d}", step=step.index + 1, metrics={"loss": 1 / (step.index + 2)}
                    )
                await at(guard, step, "after")
    return guard, ran


def _tinker_threads(*, offload: bool = True) -> list[str]:
    """The library's threads; ``offload=False``: the engines' only (the offload thread ends just after its
    last call, which may be a moment after the caller is handed its result)."""
    names = [t.name for t in threading.enumerate() if t.name.startswith("tinkex-recovery")]
    return names if offload else [n for n in names if n != "tinkex-recovery-offload"]


def _wait_for_no_offload_thread() -> None:
    for t in threading.enumerate():
        if t.name == "tinkex-recovery-offload":
            t.join(WAIT)


# -- the same semantics as the sync guard ------------------------------------------------------------------------
SCHEDULES: dict[str, tuple[Callable[[], Iterable[int]], list[tuple[int, str] | tuple[int, str, int]]]] = {
    "mid-step": (lambda: range(60), [(24, "mid")]),
    "recovered-run-lost-again": (lambda: range(60), [(25, "before"), (23, "mid", 2)]),
    "after-the-last-step": (lambda: range(25), [(24, "after")]),
    "twice": (lambda: range(60), [(13, "before"), (12, "mid", 2)]),
    "generator": (lambda: (i for i in range(40)), [(27, "mid")]),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_an_async_loop_recovers_exactly_as_the_sync_loop_does(clock: FakeClock, name: str) -> None:
    steps, points = SCHEDULES[name]
    sync_sim, async_sim = SimulatedTinker(clock=clock), SimulatedTinker(clock=clock)
    sync_guard, sync_ran = guarded_loop(sync_sim, clock, steps=steps(), hook=corrupt_at(sync_sim, *points))
    async_guard, async_ran = run(
        guarded_loop_async(async_sim, clock, steps=steps(), hook=corrupt_at(async_sim, *points))
    )

    assert async_ran == sync_ran
    last = sync_ran[-1] + 1
    assert async_sim.lineage(async_guard.run_id) == sync_sim.lineage(sync_guard.run_id) == list(range(last))
    assert [(r.resumed_at, r.steps_lost, r.number) for r in async_guard.recoveries] == [
        (r.resumed_at, r.steps_lost, r.number) for r in sync_guard.recoveries
    ]
    assert async_guard.recoveries and async_guard.client.model_id == async_guard.run_id
    _wait_for_no_offload_thread()
    assert _tinker_threads() == []  # nothing left running after the block


def test_the_step_after_a_failure_runs_without_waiting_for_the_poll_interval() -> None:
    """The real clock and an hour-long interval: only the error can have triggered the poll."""
    sim = SimulatedTinker()
    started = time.monotonic()
    guard, ran = run(guarded_loop_async(sim, SystemClock(), hook=corrupt_at(sim, (33, "before"))))
    assert time.monotonic() - started < 3.0
    assert ran[33:35] == [33, 30]
    assert sim.lineage(guard.run_id) == list(range(60))


def test_a_recovery_found_by_the_poller_between_steps_rewinds_an_async_loop(
    sim: SimulatedTinker, clock: FakeClock, mocker: Any
) -> None:
    judged = mocker.spy(RecoveryGuard, "_judge_plan")

    async def main() -> tuple[RecoveryGuard, list[int]]:
        loop = asyncio.get_running_loop()
        recovered = asyncio.Event()
        policy = POLICY.replace(poll_interval=30.0, on_recovery=lambda r: loop.call_soon_threadsafe(recovered.set))

        async def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
            if (step.index, phase) == (14, "after") and not recovered.is_set():
                sim.corrupt(guard.run_id)
                clock.advance(30.0)  # the poller's next tick finds it; no training call fails
                await asyncio.wait_for(recovered.wait(), WAIT)

        return await guarded_loop_async(sim, clock, policy=policy, hook=hook)

    guard, ran = run(main())
    assert ran == [*range(15), *range(10, 60)]
    (rec,) = guard.recoveries
    assert (rec.resumed_at, rec.steps_lost) == (10, 5)
    assert judged.call_count == 0  # no step failed, so none was judged
    assert sim.lineage(guard.run_id) == list(range(60))


def test_an_error_that_is_not_about_corruption_propagates_unchanged(
    sim: SimulatedTinker, clock: FakeClock, mocker: Any
) -> None:
    bug = ValueError("a bug in the user's loop")

    def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
        if (step.index, phase) == (12, "mid"):
            raise bug

    with pytest.raises(ValueError) as info:
        run(guarded_loop_async(sim, clock, hook=hook))
    assert info.value is bug

    async def transient() -> tuple[RecoveryGuard, int]:
        client = sim.create_lora_training_client(base_model="m")
        sim.fail_next_calls(client.model_id, 1)  # a passing 503: the run is healthy
        async with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
            assert guard._handle is not None
            check = mocker.spy(guard._handle, "check_soon")
            with pytest.raises(SimulatedAPIError, match="503"):
                async for step in guard.steps(range(5)):
                    async with step:
                        await guard.client.forward_backward([step.index])
            return guard, check.call_count

    guard, checks = run(transient())
    assert checks == 1  # judged by one poll, run on the engine's poll workers
    assert guard.recoveries == ()


def test_cancelling_the_loop_is_not_judged_and_leaves_nothing_running(sim: SimulatedTinker, clock: FakeClock) -> None:
    entered = []

    async def main() -> None:
        client = sim.create_lora_training_client(base_model="m")
        async with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
            async for step in guard.steps(range(5)):
                async with step:
                    entered.append(step.index)
                    asyncio.current_task().cancel()  # type: ignore[union-attr]
                    await asyncio.sleep(0)  # the cancellation lands here

    with pytest.raises(asyncio.CancelledError):
        run(main())
    assert entered == [0] and sim.poll_count == 0
    _wait_for_no_offload_thread()
    assert _tinker_threads() == []


# -- exhaustion -------------------------------------------------------------------------------------------------
def test_exhaustion_inside_a_step_raises_recovery_exhausted(sim: SimulatedTinker, clock: FakeClock) -> None:
    sim.fail_restores(5)
    with pytest.raises(RecoveryExhausted) as info:
        run(guarded_loop_async(sim, clock, policy=POLICY.replace(max_attempts=2), hook=corrupt_at(sim, (15, "mid"))))
    assert info.value.attempts == 2 and info.value.reason is ExhaustedReason.ATTEMPTS
    assert isinstance(info.value.__cause__, SimulatedAPIError)
    _wait_for_no_offload_thread()
    assert _tinker_threads() == []


def test_exhaustion_found_by_the_poller_makes_the_next_step_raise(sim: SimulatedTinker, clock: FakeClock) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        gave_up = asyncio.Event()
        policy = POLICY.replace(poll_interval=30.0, on_failure=lambda e: loop.call_soon_threadsafe(gave_up.set))

        async def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
            assert step.index <= 5, "a step ran after the recovery gave up"
            if (step.index, phase) == (5, "after"):  # before the first checkpoint: nothing to restore
                sim.corrupt(guard.run_id)
                clock.advance(30.0)
                await asyncio.wait_for(gave_up.wait(), WAIT)

        await guarded_loop_async(sim, clock, policy=policy, hook=hook)

    with pytest.raises(RecoveryExhausted, match="no restorable checkpoint") as info:
        run(main())
    assert isinstance(info.value.__cause__, NoRestorableCheckpoint)


# -- resuming at entry ------------------------------------------------------------------------------------------
def test_a_new_process_resumes_at_entry_without_a_client(sim: SimulatedTinker, clock: FakeClock) -> None:
    first, _ = guarded_loop(sim, clock, steps=range(25))

    async def second() -> RecoveryGuard:
        async with recovery_guard(first.run_id, sim, policy=POLICY, clock=clock) as guard:
            assert guard.start_step == 20 and guard.run_id != first.run_id
            assert guard.resumed_from is not None and guard.resumed_from.tinker_path.endswith("step-000020")
            async for step in guard.steps(range(guard.start_step, 40)):
                async with step:
                    await (await guard.client.forward_backward_async([step.index]))
                    await (await guard.client.optim_step_async())
        return guard

    guard = run(second())
    assert sim.lineage(guard.run_id) == list(range(40))
    assert guard.recoveries == ()  # the resume is not a recovery of the loop
    _wait_for_no_offload_thread()
    assert _tinker_threads() == []


def test_resuming_with_a_disabled_policy_watches_nothing_afterwards(sim: SimulatedTinker, clock: FakeClock) -> None:
    first, _ = guarded_loop(sim, clock, steps=range(10))

    async def second() -> tuple[int | None, int, object]:
        async with recovery_guard(first.run_id, sim, policy=POLICY.replace(enabled=False), clock=clock) as guard:
            return guard.start_step, len(_tinker_threads(offload=False)), guard.engine

    start, threads, engine = run(second())
    assert (start, threads, engine) == (10, 0, None)


# -- lifecycle ---------------------------------------------------------------------------------------------------
def test_the_guard_is_single_use_across_both_faces(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    guard = recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="inside"):
            guard.steps(range(3))
        with pytest.raises(RuntimeError, match="inside"):
            await guard.save_state_async("x", step=1)
        async with guard:
            with pytest.raises(RuntimeError, match="single-use"):
                async with guard:
                    pass
            steps = guard.steps(range(3))
            async for _ in steps:
                break
            with pytest.raises(RuntimeError, match="walked with `async for`"):
                iter(steps)
        with pytest.raises(RuntimeError, match="single-use"):
            async with guard:
                pass

    run(main())
    with pytest.raises(RuntimeError, match="single-use"), guard:
        pass


def test_the_sync_faces_warn_when_they_would_block_an_event_loop(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    client.save_state("s", user_metadata={"step": "0"}).result()

    async def main() -> None:
        with (
            pytest.warns(RuntimeWarning, match="use `async with` in a coroutine"),
            recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock),
        ):
            pass
        async with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
            with pytest.warns(RuntimeWarning, match="use `async for`"):
                iter(guard.steps(range(1)))
            async for step in guard.steps(range(1)):
                if guard.recoveries:
                    continue
                with pytest.warns(RuntimeWarning, match="use `async with step:`"), step:
                    sim.corrupt(guard.run_id)
                    await guard.client.forward_backward([step.index])
            assert len(guard.recoveries) == 1  # blocking, but recovered all the same

    run(main())


def test_save_state_async_records_step_and_metrics_and_the_cookbook_log(
    sim: SimulatedTinker, clock: FakeClock, tmp_path: Path
) -> None:
    async def main() -> tuple[str, str]:
        client = sim.create_lora_training_client(base_model="m")
        async with recovery_guard(
            client.model_id, sim, policy=POLICY, client=client, clock=clock, log_path=tmp_path
        ) as guard:
            first = await guard.save_state_async("000020", step=20, metrics={"loss": 0.25}, ttl_seconds=3600)
            with pytest.raises(ValueError, match="non-negative int"):
                await guard.save_state_async("bad", step=-1)
            return client.model_id, first

    run_id, path = run(main())
    (checkpoint,) = sim.list_checkpoints(run_id).checkpoints
    assert checkpoint.tinker_path == path and checkpoint.user_metadata == {"step": "20", "loss": "0.25"}
    assert checkpoint.expires_at is not None
    lines = (tmp_path / "checkpoints.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"name": "000020", "batch": 20, "loss": 0.25, "state_path": path}]


def test_on_swap_gets_each_new_client_before_the_next_step(sim: SimulatedTinker, clock: FakeClock) -> None:
    """A holder of the client (tinker-cookbook's CheckpointManager keeps its own) is kept current."""

    class Holder:
        def __init__(self, client: Any) -> None:
            self.training_client = client

    holder = Holder(None)
    seen_by_steps: list[str] = []

    def on_swap(client: Any) -> None:
        holder.training_client = client

    corrupt = corrupt_at(sim, (24, "mid"), (43, "after"))

    def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
        if phase == "before":
            seen_by_steps.append(holder.training_client.model_id if holder.training_client else guard.run_id)
            assert holder.training_client is None or holder.training_client is guard.client
        corrupt(guard, step, phase)

    guard, _ = run(guarded_loop_async(sim, clock, hook=hook, on_swap=on_swap))
    first, second = guard.recoveries
    assert holder.training_client is guard.client is second.client
    assert first.client is not second.client
    assert set(seen_by_steps) == {first.old_run_id, first.new_run_id, second.new_run_id}


# -- a pipelined loop: futures in flight (tinker-cookbook's submit_ahead) ----------------------------------------
async def pipelined_loop(
    sim: SimulatedTinker, clock: FakeClock, *, submit_ahead: int, corrupt: set[tuple[int, int]], steps: int = 40
) -> tuple[RecoveryGuard, list[int], list[int]]:
    """Each step submits its requests and finishes the one ``submit_ahead`` steps back; a checkpoint submitted after
    step k's requests holds every step up to k, so it is labelled k + 1. ``corrupt``: (step, nth run) right after
    that step's requests were submitted. Returns the guard, the steps in the order they ran, and the futures
    dropped at each resumed step."""
    client = sim.create_lora_training_client(base_model="m")
    ran: list[int] = []
    dropped: list[int] = []
    in_flight: deque[tuple[int, Any, Any]] = deque()
    async with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
        async for step in guard.steps(range(steps)):
            async with step:
                if step.resumed:  # the run was replaced: what is in flight belongs to the lost run
                    dropped.append(len(in_flight))
                    in_flight.clear()
                ran.append(step.index)
                fwd = guard.client.forward_backward([step.index])
                opt = guard.client.optim_step()
                in_flight.append((step.index, fwd, opt))
                if (step.index, len(guard.recoveries)) in corrupt:
                    sim.corrupt(guard.run_id)
                if (step.index + 1) % 10 == 0:
                    await guard.save_state_async(f"step-{step.index + 1:04d}", step=step.index + 1)
                while len(in_flight) > submit_ahead or (step.index == steps - 1 and in_flight):
                    _, fwd, opt = in_flight.popleft()
                    await fwd
                    await opt
    return guard, ran, dropped


@pytest.mark.parametrize("submit_ahead", [1, 2])
def test_a_pipelined_loop_drops_the_lost_runs_futures_and_trains_each_step_once(
    sim: SimulatedTinker, clock: FakeClock, submit_ahead: int
) -> None:
    guard, ran, dropped = run(pipelined_loop(sim, clock, submit_ahead=submit_ahead, corrupt={(15, 0), (33, 1)}))
    assert sim.lineage(guard.run_id) == list(range(40))
    assert [r.resumed_at for r in guard.recoveries] == [10, 30]
    assert len(dropped) == 2 and all(n >= 1 for n in dropped)  # futures were in flight each time
    # A lost step's futures fail when the loop awaits them, submit_ahead steps later: that step is judged.
    first, second = 15 + 1 + submit_ahead, 33 + 1 + submit_ahead
    assert ran == [*range(first + 1), *range(10, second + 1), *range(30, 40)]


# -- the event loop is never blocked -----------------------------------------------------------------------------
async def ticking_while(work: Awaitable[T], *, release: Callable[[], None], after_ticks: int) -> tuple[T, float, int]:
    """Run ``work`` while a task ticks every 5 ms; after ``after_ticks`` ticks, ``release()`` (what lets the work
    finish). Returns the work's result, the worst lag of a tick in seconds, and the ticks."""
    loop = asyncio.get_running_loop()
    worst, ticks = 0.0, 0
    done = False

    async def ticker() -> None:
        nonlocal worst, ticks
        while not done:
            before = loop.time()
            await asyncio.sleep(0.005)
            worst = max(worst, loop.time() - before - 0.005)
            ticks += 1
            if ticks == after_ticks:
                release()

    task = asyncio.create_task(ticker())
    try:
        result = await work
    finally:
        done = True
        await task
    return result, worst, ticks


def test_the_event_loop_ticks_on_while_a_recovery_is_under_way(sim: SimulatedTinker, clock: FakeClock) -> None:
    """The restore hangs on an engine thread until a task on the event loop has ticked 20 times: the loop gets
    its recovery only if it was never blocked waiting for it (a watchdog ends a blocked run after 5 s)."""
    restoring = threading.Event()
    sim.on_restore(lambda path: restoring.set())

    sim.hang_restores(1, then="succeed")  # the restore call blocks its (engine) thread until release()
    watchdog = threading.Timer(5.0, sim.release)
    watchdog.start()
    try:
        (guard, _), worst, ticks = run(
            ticking_while(
                guarded_loop_async(sim, clock, hook=corrupt_at(sim, (24, "mid"))),
                release=lambda: restoring.is_set() and sim.release(),
                after_ticks=20,
            )
        )
    finally:
        watchdog.cancel()
        watchdog.join()
    assert restoring.is_set() and ticks >= 20
    assert worst < 0.050, f"a 5 ms tick was delayed {worst * 1e3:.1f} ms"
    assert guard.recoveries[0].waited >= 0 and sim.lineage(guard.run_id) == list(range(60))


# -- many loops, one engine --------------------------------------------------------------------------------------
async def many_loops(sim: SimulatedTinker, n: int, samples: list[int]) -> list[tuple[RecoveryGuard, list[int]]]:
    """``n`` guarded loops at once, one event loop, one policy; each run is corrupted once, in mid-step. The
    process's thread count is sampled at every step of every loop."""

    async def one(i: int) -> tuple[RecoveryGuard, list[int]]:
        def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
            samples.append(threading.active_count())
            if (step.index, phase) == (12 + i % 7, "mid") and not guard.recoveries:
                sim.corrupt(guard.run_id)

        return await guarded_loop_async(sim, SystemClock(), steps=range(30), hook=hook)

    return await asyncio.gather(*(one(i) for i in range(n)))


def test_sixteen_async_loops_share_one_engine_and_each_survives_its_corruption_once() -> None:
    sim = SimulatedTinker()
    one: list[int] = []
    sixteen: list[int] = []
    before = threading.active_count()
    run(many_loops(sim, 1, one))
    results = run(many_loops(sim, 16, sixteen))

    for guard, ran in results:
        (rec,) = guard.recoveries
        assert sim.lineage(guard.run_id) == list(range(30))
        assert ran.count(rec.resumed_at) == 2 and len(ran) == 30 + rec.steps_lost + 1
    engines = {id(guard.engine) for guard, _ in results}
    assert len(engines) == 1  # one engine for all 16
    assert results[0][0].engine is not None and results[0][0].engine.state is EngineState.CLOSED
    assert max(sixteen) <= max(one) + 4, (max(one), max(sixteen))
    assert max(one) - before <= 8  # poller, 4 poll workers, dispatcher, notifier, a restore
    _wait_for_no_offload_thread()
    assert _tinker_threads() == []


def test_guards_share_the_engine_of_their_policy_until_the_last_one_leaves(
    sim: SimulatedTinker, clock: FakeClock
) -> None:
    a = sim.create_lora_training_client(base_model="m")
    b = sim.create_lora_training_client(base_model="m")
    c = sim.create_lora_training_client(base_model="m")

    async def main() -> None:
        async with recovery_guard(a.model_id, sim, policy=POLICY, client=a, clock=clock) as outer:
            with pytest.warns(RuntimeWarning):  # a sync guard in the same process (here on the loop's thread)
                inner = recovery_guard(b.model_id, sim, policy=POLICY, client=b, clock=clock)
                inner.__enter__()
            assert inner.engine is outer.engine and outer.engine is not None
            assert sorted(outer.engine.watched_runs) == sorted([a.model_id, b.model_id])
            other = POLICY.replace(max_attempts=7)
            async with recovery_guard(c.model_id, sim, policy=other, client=c, clock=clock) as third:
                assert third.engine is not outer.engine
            assert third.engine is not None and third.engine.state is EngineState.CLOSED
            inner.__exit__(None, None, None)
            assert outer.engine.state is EngineState.OPENED and outer.engine.watched_runs == [a.model_id]
        assert outer.engine is not None and outer.engine.state is EngineState.CLOSED

    run(main())
    _wait_for_no_offload_thread()
    assert _tinker_threads() == []


def test_a_guard_on_a_given_engine_uses_it_and_leaves_it_running(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    with RecoveryEngine(POLICY, clock=clock) as engine:

        async def main() -> RecoveryGuard:
            async with recovery_guard(client.model_id, sim, client=client, engine=engine, clock=clock) as guard:
                assert guard.engine is engine and guard.policy == engine.policy
                assert engine.watched_runs == [client.model_id]
                async for step in guard.steps(range(12)):
                    async with step:
                        await guard.client.forward_backward([step.index])
                        await guard.client.optim_step()
                        if step.index == 9:
                            await guard.save_state_async("ten", step=10)
                        if step.index == 10 and not guard.recoveries:
                            sim.corrupt(guard.run_id)
            return guard

        guard = run(main())
        assert engine.state is EngineState.OPENED and engine.watched_runs == []  # unwatched, never closed
        assert sim.lineage(guard.run_id) == list(range(12))
    with pytest.raises(ValueError, match="differs from the engine"):
        recovery_guard(client.model_id, sim, client=client, engine=engine, policy=POLICY.replace(max_attempts=9))
    with pytest.raises(TypeError, match="RecoveryEngine"):
        recovery_guard(client.model_id, sim, client=client, engine=object())  # type: ignore[arg-type]


def test_no_poll_restore_or_rest_client_call_runs_on_the_event_loops_thread(
    sim: SimulatedTinker, clock: FakeClock
) -> None:
    """Every call that may block (the SDK's are sync-only) runs on another thread: the polls a failing step asks
    for, the restores, the checkpoint listing, making the REST client; resume at entry included."""
    calls: list[tuple[str, str]] = []

    def record(what: str) -> None:
        calls.append((what, threading.current_thread().name))

    class Rest:
        def get_training_run(self, run_id: str) -> Any:
            record("get_training_run")
            return sim.get_training_run(run_id)

        def list_checkpoints(self, run_id: str) -> Any:
            record("list_checkpoints")
            return sim.list_checkpoints(run_id)

    class Service:
        def create_rest_client(self) -> Any:
            record("create_rest_client")
            return Rest()

        def create_training_client_from_state(self, path: str, **kw: Any) -> Any:
            record("restore")
            return sim.create_training_client_from_state(path, **kw)

        def create_training_client_from_state_with_optimizer(self, path: str, **kw: Any) -> Any:
            record("restore")
            return sim.create_training_client_from_state_with_optimizer(path, **kw)

    service = Service()
    loop_thread = threading.current_thread().name  # asyncio.run runs the loop on this thread
    first, _ = run(guarded_loop_async(sim, clock, service=service, hook=corrupt_at(sim, (24, "mid"), (33, "before"))))

    async def restarted() -> None:
        async with recovery_guard(first.run_id, service, policy=POLICY, clock=clock) as guard:
            assert guard.start_step == 60

    run(restarted())
    kinds = {what for what, _ in calls}
    assert {"create_rest_client", "get_training_run", "restore"} <= kinds
    assert [c for c in calls if c[1] == loop_thread] == []


def test_save_state_async_awaits_the_save_without_blocking_the_loop(sim: SimulatedTinker, clock: FakeClock) -> None:
    """The save's future completes only once a task on the loop has ticked 10 times: save_state_async returns only
    if it awaited it (a watchdog completes a blocked one after 5 s, and the lag then fails the test)."""
    client = sim.create_lora_training_client(base_model="m")
    pending: list[SimulatedAPIFuture[Any]] = []
    real_save = client.save_state

    def slow_save(name: str, **kw: Any) -> Any:
        saved = real_save(name, **kw)
        later: SimulatedAPIFuture[Any] = SimulatedAPIFuture()
        pending.append(later)
        later.saved = saved  # type: ignore[attr-defined]
        return later

    def release() -> None:
        for later in pending:
            if not later.done():
                later.set_result(later.saved.result())  # type: ignore[attr-defined]

    client.save_state = slow_save  # type: ignore[method-assign]

    async def save() -> str:
        async with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
            return await guard.save_state_async("000010", step=10)

    watchdog = threading.Timer(5.0, release)
    watchdog.start()
    try:
        path, worst, ticks = run(ticking_while(save(), release=release, after_ticks=10))
    finally:
        watchdog.cancel()
        watchdog.join()
    assert ticks >= 10 and worst < 0.050
    assert path.endswith("/weights/000010")


def test_a_guard_left_during_its_recovery_on_a_shared_engine_never_uses_the_late_run(
    sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Loop A is cancelled while its restore is held on the server; loop B goes on with the same engine. The held
    restore finishes after A left: its run is closed and named, never adopted; B is not disturbed."""

    a = sim.create_lora_training_client(base_model="m")
    a.save_state("ten", user_metadata={"step": "10"}).result()
    b = sim.create_lora_training_client(base_model="m")
    service = sim
    handles: list[Any] = []

    async def loop_a() -> None:
        async with recovery_guard(a.model_id, service, policy=POLICY, client=a, clock=clock) as guard:
            handles.append(guard._handle)
            async for step in guard.steps(range(10, 20)):
                async with step:
                    sim.corrupt(guard.run_id)
                    await guard.client.forward_backward([step.index])

    async def main() -> tuple[RecoveryGuard, bool]:
        restoring = asyncio.Event()
        loop = asyncio.get_running_loop()
        sim.on_restore(lambda path: loop.call_soon_threadsafe(restoring.set))
        async with recovery_guard(b.model_id, service, policy=POLICY, client=b, clock=clock) as guard_b:
            task = asyncio.create_task(loop_a())
            await asyncio.wait_for(restoring.wait(), WAIT)  # A failed; its restore is held on the server
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert guard_b.engine is not None and guard_b.engine.state is EngineState.OPENED
            late = handles[0].when_ready()  # woken after the guard's own discard
            sim.release()
            await asyncio.wrap_future(late)
            async for step in guard_b.steps(range(3)):
                async with step:
                    await guard_b.client.forward_backward([step.index])
                    await guard_b.client.optim_step()
            return guard_b, a.model_id in guard_b.engine.watched_runs

    sim.hang_restores(1, then="succeed")
    guard_b, still_watched = run(main())
    assert not still_watched and guard_b.recoveries == ()
    (late_run,) = [r for r in sim.run_ids if r not in (a.model_id, b.model_id)]
    assert [r.getMessage() for r in caplog.records if "after its guard left" in r.getMessage()] == [
        f"recovery_guard: run {a.model_id} was recovered as {late_run} after its guard left; that run is not used"
    ]
    assert sim.lineage(guard_b.run_id) == [0, 1, 2]


def test_an_async_guard_in_observe_mode_lets_the_failure_through_and_logs_what_it_would_do(
    sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    client = sim.create_lora_training_client(base_model="m")
    client.save_state("0004", user_metadata={"step": "4"}).result()
    raised: list[BaseException] = []

    async def main() -> RecoveryGuard:
        policy = POLICY.replace(mode="observe")
        async with recovery_guard(client.model_id, sim, policy=policy, client=client, clock=clock) as guard:
            async for step in guard.steps(range(4, 10)):
                async with step:
                    if step.index == 6:
                        sim.corrupt(client.model_id)
                    try:
                        await guard.client.forward_backward([step.index])
                    except Exception as exc:
                        raised.append(exc)
                        raise
        return guard

    with pytest.raises(SimulatedRequestFailedError) as info:
        run(main())
    assert info.value is raised[0]  # unchanged: the very exception the step raised
    assert sim.restore_calls == []
    (line,) = [r.getMessage() for r in caplog.records if "observe mode" in r.getMessage()]
    assert "step 6" in line and f"would restore a new run from tinker://{client.model_id}/weights/0004" in line
