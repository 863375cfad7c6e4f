"""Safety budgets and observe mode (issue "Safety budgets and observe mode").

No lineage recovers forever: ``max_recoveries`` within a sliding ``recovery_window``, and ``max_no_progress``
restored runs in a row that die before saving a newer checkpoint, each end the lineage ``exhausted`` with its
own reason; a restarted process counts the recoveries of the one before it (they are in the runs'
user_metadata). Observe mode detects and selects as recover mode would and never restores. Time is a
FakeClock, advanced by the tests; polls are driven by ``poll_once()``; nothing sleeps.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tinkex_recovery import (
    BUDGET_KEYS,
    LINEAGE_KEYS,
    Checkpoint,
    EventKind,
    ExhaustedReason,
    FakeClock,
    Recovery,
    RecoveryEngine,
    RecoveryExhausted,
    RecoveryPolicy,
    RecoveryRefused,
    RunHandle,
    RunState,
    recovery_guard,
)
from tinkex_recovery._recovery import checkpoint_step
from tinkex_recovery.simulated import SimulatedRequestFailedError, SimulatedTinker

from .helpers import WAIT, EventLog, run_with_checkpoints, train

POLICY = RecoveryPolicy(enabled=True, jitter=0.0, backoff=0.0, max_backoff=0.0, poll_interval=3600)


def name(path: str) -> str:
    return path.rsplit("/", 1)[1]


@pytest.fixture
def make_engine(make_engine: Callable[..., RecoveryEngine]) -> Callable[..., RecoveryEngine]:
    """conftest's engines, retrying at once: the budgets, not the backoff, are under test."""
    return functools.partial(make_engine, backoff=0.0, max_backoff=0.0)


def lose(sim: SimulatedTinker, engine: RecoveryEngine, handle: RunHandle) -> Recovery:
    """Corrupt the lineage's current run, poll, and return the recovery (raises RecoveryExhausted)."""
    sim.corrupt(handle.run_id)
    engine.poll_once()
    return handle.wait_for_recovery(WAIT)


def save(recovery: Recovery, step: int) -> None:
    """The recovered run trains one step and saves a checkpoint of its own: progress."""
    train(recovery.client, [step])
    recovery.client.save_state(f"r{step:04d}", user_metadata={"step": str(step + 1)}).result()


# -- max_recoveries within recovery_window ------------------------------------------------------------------
@pytest.mark.parametrize("third_at", [20.0, 99.999, 100.0, 150.0], ids=["inside", "just-inside", "slid-out", "later"])
def test_the_budget_refuses_the_recovery_past_it_and_allows_one_again_once_the_window_has_slid(
    sim: SimulatedTinker, make_engine: Any, clock: FakeClock, events: EventLog, third_at: float
) -> None:
    allowed = third_at >= 100.0  # recoveries at t=0 and t=10; the one at t=0 leaves the window at t=100
    failures: list[RecoveryExhausted] = []
    engine = make_engine(max_recoveries=2, recovery_window=100.0, on_failure=failures.append)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)
    save(lose(sim, engine, handle), 10)  # t=0
    clock.advance(10.0)
    save(lose(sim, engine, handle), 11)  # t=10
    clock.advance(third_at - 10.0)
    if allowed:  # the recovery at t=0 has left the window: one in it, one more allowed
        lose(sim, engine, handle)
        assert len(sim.restore_calls) == 3 and handle.state is RunState.WATCHING
        return
    with pytest.raises(RecoveryExhausted) as info:
        lose(sim, engine, handle)
    assert len(sim.restore_calls) == 2  # refused before any restore call
    assert info.value.reason is ExhaustedReason.BUDGET and "(budget)" in str(info.value)
    assert "max_recoveries=2" in str(info.value) and info.value.attempts == 0
    assert isinstance(info.value.__cause__, RecoveryRefused)
    (event,) = events.wait_for(EventKind.EXHAUSTED)
    assert event.reason == "budget" and event.run_id == handle.run_id
    events.wait_until(lambda: len(failures) == 1)
    assert failures[0].reason is ExhaustedReason.BUDGET
    assert handle.state is RunState.EXHAUSTED


def test_recoveries_in_one_instant_each_count(sim: SimulatedTinker, make_engine: Any) -> None:
    engine = make_engine(max_recoveries=3, max_no_progress=None)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)
    for _ in range(3):
        lose(sim, engine, handle)
    with pytest.raises(RecoveryExhausted) as info:
        lose(sim, engine, handle)
    assert info.value.reason is ExhaustedReason.BUDGET and len(sim.restore_calls) == 3


def test_the_budget_holds_with_a_service_that_takes_no_user_metadata(
    sim: SimulatedTinker, make_engine: Any, clock: FakeClock
) -> None:
    """Nothing reaches the runs' user_metadata: the engine's own record of the lineage still counts."""

    class NoMetadata:
        def create_training_client_from_state(self, path: str) -> Any:
            return sim.create_training_client_from_state(path)

        def create_training_client_from_state_with_optimizer(self, path: str) -> Any:
            return sim.create_training_client_from_state_with_optimizer(path)

        def create_rest_client(self) -> Any:
            return sim.create_rest_client()

    engine = make_engine(max_recoveries=2, recovery_window=100.0, max_no_progress=None)
    handle = engine.watch(run_with_checkpoints(sim).model_id, NoMetadata())
    lose(sim, engine, handle)
    clock.advance(10.0)
    lose(sim, engine, handle)
    assert all(meta is None for _, _, meta in sim.restore_calls)
    with pytest.raises(RecoveryExhausted) as info:
        lose(sim, engine, handle)
    assert info.value.reason is ExhaustedReason.BUDGET and len(sim.restore_calls) == 2
    # The no-progress streak too: restored runs that save nothing, counted in the engine's record only.
    engine2 = make_engine(max_recoveries=None, max_no_progress=2)
    handle2 = engine2.watch(run_with_checkpoints(sim).model_id, NoMetadata())
    lose(sim, engine2, handle2)
    lose(sim, engine2, handle2)
    with pytest.raises(RecoveryExhausted) as info:
        lose(sim, engine2, handle2)
    assert info.value.reason is ExhaustedReason.NO_PROGRESS


def test_no_budget_means_no_limit(sim: SimulatedTinker, make_engine: Any) -> None:
    engine = make_engine(max_recoveries=None, max_no_progress=None)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)
    for _ in range(15):  # more than the default 10, all at the same instant
        lose(sim, engine, handle)
    assert len(handle.recoveries) == 15


def test_each_recovered_run_records_the_recoveries_inside_the_window(
    sim: SimulatedTinker, make_engine: Any, clock: FakeClock
) -> None:
    engine = make_engine(max_recoveries=3, recovery_window=100.0)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)
    times = []
    for i, gap in enumerate([0.0, 30.0, 50.0, 40.0]):  # t = 0, 30, 80, 120
        clock.advance(gap)
        recovery = lose(sim, engine, handle)
        save(recovery, 10 + i)
        times.append(sim.get_training_run(recovery.new_run_id).user_metadata or {})
    assert [m[BUDGET_KEYS[0]] for m in times] == [
        "2026-01-01T00:00:00.000000Z",
        "2026-01-01T00:00:00.000000Z 2026-01-01T00:00:30.000000Z",
        "2026-01-01T00:00:00.000000Z 2026-01-01T00:00:30.000000Z 2026-01-01T00:01:20.000000Z",
        "2026-01-01T00:00:30.000000Z 2026-01-01T00:01:20.000000Z 2026-01-01T00:02:00.000000Z",  # t=0 slid out
    ]
    assert [m[BUDGET_KEYS[1]] for m in times] == ["0", "0", "0", "0"]  # every run saved before it was lost


# -- max_no_progress -----------------------------------------------------------------------------------------
def test_max_no_progress_stops_a_lineage_whose_restored_runs_die_before_a_newer_checkpoint(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    failures: list[RecoveryExhausted] = []
    engine = make_engine(max_no_progress=3, max_recoveries=None, on_failure=failures.append)
    client = run_with_checkpoints(sim, steps=4, every=2)
    handle = engine.watch(client.model_id, sim)
    for _ in range(3):  # the first run is lost, then restored runs die before saving anything
        train(lose(sim, engine, handle).client, [99])  # they train, but never save
    with pytest.raises(RecoveryExhausted) as info:
        lose(sim, engine, handle)  # the third restored run in a row lost without progress
    error = info.value
    assert [name(c[0]) for c in sim.restore_calls] == ["0004", "0004", "0004"]  # not a fourth time
    assert error.reason is ExhaustedReason.NO_PROGRESS and "(no_progress)" in str(error)
    assert "max_no_progress=3" in str(error) and isinstance(error.__cause__, RecoveryRefused)
    (event,) = events.wait_for(EventKind.EXHAUSTED)
    assert event.reason == "no_progress"
    events.wait_until(lambda: len(failures) == 1)
    assert failures[0].reason is ExhaustedReason.NO_PROGRESS
    streaks = [(sim.get_training_run(r.new_run_id).user_metadata or {})[BUDGET_KEYS[1]] for r in handle.recoveries]
    assert streaks == ["0", "1", "2"]


def test_max_no_progress_does_not_stop_a_lineage_that_makes_progress(sim: SimulatedTinker, make_engine: Any) -> None:
    engine = make_engine(max_no_progress=2, max_recoveries=None)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)
    # Every other restored run saves before it is lost: never two in a row without progress.
    for i in range(12):
        recovery = lose(sim, engine, handle)
        if i % 2 == 0:
            save(recovery, 100 + i)
    assert handle.state is RunState.WATCHING and len(handle.recoveries) == 12
    lose(sim, engine, handle)  # the 12th restored run saved nothing: one in a row
    with pytest.raises(RecoveryExhausted) as info:
        lose(sim, engine, handle)  # nor did the 13th: two in a row end it
    assert info.value.reason is ExhaustedReason.NO_PROGRESS and len(sim.restore_calls) == 13


def test_a_run_reporting_no_last_checkpoint_is_judged_by_its_listing(sim: SimulatedTinker, clock: FakeClock) -> None:
    """A status source whose runs carry no last_checkpoint: progress is read from the run's listing."""

    class NoLastCheckpoint:
        def get_training_run(self, run_id: str) -> Any:
            return sim.get_training_run(run_id).model_copy(update={"last_checkpoint": None})

        def list_checkpoints(self, run_id: str) -> Any:
            return sim.list_checkpoints(run_id)

    policy = POLICY.replace(max_no_progress=1, max_recoveries=None)
    with RecoveryEngine(policy, status=NoLastCheckpoint(), clock=clock, poll_concurrency=1) as engine:
        handle = engine.watch(run_with_checkpoints(sim).model_id, sim)
        for i in range(3):
            save(lose(sim, engine, handle), 10 + i)  # each saved: progress, never stopped
        lose(sim, engine, handle)  # the last saved run is lost; the one restored now saves nothing
        with pytest.raises(RecoveryExhausted) as info:
            lose(sim, engine, handle)
    assert info.value.reason is ExhaustedReason.NO_PROGRESS


# -- a restarted process counts the recoveries of the one before it ------------------------------------------
def first_process(sim: SimulatedTinker, clock: FakeClock, policy: RecoveryPolicy) -> str:
    """A guarded loop recovered at t=0 and t=10 that dies at t=10; returns its last run id."""

    class Crash(Exception):
        pass

    client = sim.create_lora_training_client(base_model="m")
    with pytest.raises(Crash), recovery_guard(client.model_id, sim, policy=policy, client=client, clock=clock) as guard:
        for step in guard.steps(range(100)):
            with step:
                if step.index in (7, 13) and len(guard.recoveries) == (step.index > 7):
                    if step.index == 13:
                        clock.advance(10.0)
                    sim.corrupt(guard.run_id)
                if step.index == 20:
                    raise Crash
                train(guard.client, [step.index])
                if (step.index + 1) % 5 == 0:
                    guard.save_state(f"s{step.index + 1:03d}", step=step.index + 1)
    assert len(guard.recoveries) == 2
    return str(guard.run_id)


@pytest.mark.parametrize(("restart_at", "allowed"), [(20.0, False), (100.0, True)])
def test_a_resumed_guard_counts_the_recoveries_of_the_previous_process(
    sim: SimulatedTinker, clock: FakeClock, restart_at: float, allowed: bool
) -> None:
    policy = POLICY.replace(max_recoveries=2, recovery_window=100.0)
    last_run = first_process(sim, clock, policy)
    restores = len(sim.restore_calls)
    clock.advance(restart_at - 10.0)
    if not allowed:
        with pytest.raises(RecoveryExhausted) as info, recovery_guard(last_run, sim, policy=policy, clock=clock):
            pass
        assert info.value.reason is ExhaustedReason.BUDGET
        assert len(sim.restore_calls) == restores  # the resume was refused before any restore call
        return
    with recovery_guard(last_run, sim, policy=policy, clock=clock) as guard:
        assert guard.start_step == 20  # the t=0 recovery has left the window: the resume is the 2nd in it
    meta = sim.get_training_run(guard.run_id).user_metadata or {}
    assert meta[BUDGET_KEYS[0]] == "2026-01-01T00:00:10.000000Z 2026-01-01T00:01:40.000000Z"


def test_a_new_process_restores_a_run_lost_before_its_first_save_from_the_checkpoint_it_came_from(
    sim: SimulatedTinker, make_engine: Any, clock: FakeClock
) -> None:
    client = run_with_checkpoints(sim, steps=6, every=2)
    first = make_engine(max_no_progress=None)
    recovery = lose(sim, first, first.watch(client.model_id, sim))  # R1, from 0006; it never saves
    first.close()
    second = make_engine(max_no_progress=None)  # a new process: it knows the run id and what the server says
    handle = second.watch(recovery.new_run_id, sim)
    again = lose(sim, second, handle)
    assert again.checkpoint.tinker_path == f"tinker://{client.model_id}/weights/0006"
    sim.break_checkpoint(f"tinker://{client.model_id}/weights/0006")
    assert lose(sim, second, handle).checkpoint.tinker_path == f"tinker://{client.model_id}/weights/0004"
    policy = POLICY.replace(max_no_progress=None)
    with recovery_guard(handle.run_id, sim, policy=policy, clock=clock) as guard:  # a resume, the same way
        assert guard.start_step == 4


def test_a_process_crashing_before_each_save_is_stopped_at_entry(sim: SimulatedTinker, clock: FakeClock) -> None:
    """A crash loop: every process resumes, then dies before it saves. The resumes restore the same checkpoint
    and make no progress; after max_no_progress of them in a row the next resume is refused."""
    client = run_with_checkpoints(sim, steps=4, every=2)
    policy = POLICY.replace(max_no_progress=2)
    run_id = client.model_id
    for _ in range(2):  # each resumed run dies before it saves: two recoveries in a row without progress
        with recovery_guard(run_id, sim, policy=policy, clock=clock) as guard:
            assert guard.start_step == 4
            train(guard.client, [4])  # then the process dies, before any save
        run_id = guard.run_id
    with pytest.raises(RecoveryExhausted) as info, recovery_guard(run_id, sim, policy=policy, clock=clock):
        pass
    assert info.value.reason is ExhaustedReason.NO_PROGRESS
    assert [name(c[0]) for c in sim.restore_calls] == ["0004", "0004"]


# -- the property: no window holds more than max_recoveries --------------------------------------------------
WINDOW = 100


#: Gaps between corruptions: often none (several in one instant), often on the window's edge, else anything.
GAPS = st.one_of(st.just(0), st.sampled_from([WINDOW - 1, WINDOW, WINDOW + 1]), st.integers(0, 2 * WINDOW))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_recoveries=st.integers(1, 4),
    schedule=st.lists(st.tuples(GAPS, st.booleans()), min_size=1, max_size=12),
)
@example(max_recoveries=2, schedule=[(0, False), (0, True), (0, False)])  # one instant, across a restart
@example(max_recoveries=2, schedule=[(0, False), (50, False), (WINDOW - 50, True), (0, False), (49, False)])
def test_no_window_of_recovery_window_seconds_holds_more_than_max_recoveries(
    max_recoveries: int, schedule: list[tuple[int, bool]]
) -> None:
    """Corruptions at any times (integer seconds apart, so the reference model and the engine agree to the
    microsecond), some after a process restart (a new engine watching the newest run); each is recovered
    exactly when fewer than max_recoveries recoveries happened in the window before it."""
    clock = FakeClock()
    sim = SimulatedTinker(clock=clock)
    policy = POLICY.replace(max_recoveries=max_recoveries, recovery_window=float(WINDOW))
    run_id = run_with_checkpoints(sim).model_id
    engine: RecoveryEngine | None = None
    handle: RunHandle | None = None
    recovered_at: list[int] = []  # seconds since the start, as this test saw them happen
    now = 0
    try:
        for i, (gap, restart) in enumerate(schedule):
            clock.advance(gap)
            now += gap
            if engine is None or handle is None or restart:  # a new process: nothing kept but the server's runs
                if engine is not None:
                    engine.close()
                engine = RecoveryEngine(policy, clock=clock, poll_concurrency=1).start()
                handle = engine.watch(run_id, sim)
            allowed = sum(1 for t in recovered_at if now - t < WINDOW) < max_recoveries
            try:
                recovery = lose(sim, engine, handle)
            except RecoveryExhausted as exc:
                assert not allowed, f"refused at t={now} after recoveries at {recovered_at}"
                assert exc.reason is ExhaustedReason.BUDGET
                break
            assert allowed, f"recovered at t={now} after recoveries at {recovered_at}"
            recovered_at.append(now)
            save(recovery, 10 + i)  # the new run makes progress (and has a checkpoint a new process can use)
            run_id = recovery.new_run_id
    finally:
        if engine is not None:
            engine.close()
        sim.release()
    # Counted on the server: every run a restore created, against the times the test saw.
    restored = [r for r in sim.list_training_runs() if LINEAGE_KEYS[0] in (r.user_metadata or {})]
    assert len(restored) == len(sim.restore_calls) == len(recovered_at)
    for start in recovered_at:
        assert sum(1 for t in recovered_at if start <= t < start + WINDOW) <= max_recoveries


# -- observe mode --------------------------------------------------------------------------------------------
def test_observe_mode_reports_what_it_would_restore_once_and_never_restores(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim, steps=6, every=2)
    engine = make_engine(mode="observe")
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    for _ in range(4):  # still corrupted at every poll: reported once
        engine.poll_once()
    (selected,) = events.wait_for(EventKind.CHECKPOINT_SELECTED)
    assert selected.checkpoint == f"tinker://{client.model_id}/weights/0006" and selected.run_id == client.model_id
    assert [e.run_id for e in events.of(EventKind.DETECTED)] == [client.model_id]
    assert sim.restore_calls == [] and len(sim.run_ids) == 1  # no restore call, no new run
    assert handle.observed == client.model_id and handle.state is RunState.WATCHING
    assert handle.observation(WAIT) == selected  # what a recovery would do, for a caller to log
    assert engine.watched_runs == [client.model_id] and handle.recoveries == ()
    assert not any(e.kind in (EventKind.STARTED, EventKind.EXHAUSTED) for e in events.events)


def test_nothing_is_observed_outside_observe_mode_or_before_a_corruption(
    sim: SimulatedTinker, make_engine: Any
) -> None:
    client = run_with_checkpoints(sim)
    observing = make_engine(mode="observe").watch(client.model_id, sim)
    assert observing.observed is None and observing.observation(0.0) is None  # healthy: nothing to wait for
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    lose(sim, engine, handle)
    assert handle.observed is None and handle.observation(0.0) is None


def test_observe_mode_reports_a_recovery_the_budget_would_refuse(
    sim: SimulatedTinker, make_engine: Any, clock: FakeClock, events: EventLog
) -> None:
    recovering = make_engine(max_recoveries=1)
    handle = recovering.watch(run_with_checkpoints(sim).model_id, sim)
    recovery = lose(sim, recovering, handle)  # another process recovered the lineage once, at t=0
    save(recovery, 10)
    recovering.close()
    clock.advance(60.0)
    observer = make_engine(mode="observe", max_recoveries=1)
    watched = observer.watch(recovery.new_run_id, sim)
    sim.corrupt(recovery.new_run_id)
    observer.poll_once()
    (failed,) = events.wait_for(EventKind.FAILED)
    assert failed.reason == "budget" and failed.will_retry is False and "max_recoveries=1" in (failed.error or "")
    assert len(sim.restore_calls) == 1 and watched.state is RunState.WATCHING
    assert watched.observation(WAIT) == failed
    assert not events.of(EventKind.EXHAUSTED)


def test_the_guard_in_observe_mode_lets_the_failure_through_and_logs_what_it_would_do(
    sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    client = run_with_checkpoints(sim, steps=4, every=2)
    policy = POLICY.replace(mode="observe")
    raised: list[BaseException] = []
    with (
        caplog.at_level(logging.INFO, logger="tinkex_recovery"),
        pytest.raises(SimulatedRequestFailedError) as info,
        recovery_guard(client.model_id, sim, policy=policy, client=client, clock=clock) as guard,
    ):
        for step in guard.steps(range(4, 10)):
            with step:
                if step.index == 6:
                    sim.corrupt(client.model_id)
                try:
                    train(guard.client, [step.index])
                except Exception as exc:
                    raised.append(exc)
                    raise
    assert info.value is raised[0]  # unchanged: the very exception the step raised
    assert sim.restore_calls == [] and guard.recoveries == ()
    (line,) = [r.getMessage() for r in caplog.records if "observe mode" in r.getMessage()]
    assert "step 6" in line and f"would restore a new run from tinker://{client.model_id}/weights/0004" in line


def test_the_guard_in_observe_mode_refuses_to_resume_at_entry(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = run_with_checkpoints(sim)
    with pytest.raises(ValueError, match="observe"):
        recovery_guard(client.model_id, sim, policy=POLICY.replace(mode="observe"), clock=clock)
    assert sim.restore_calls == []


# -- progress is judged by steps; skewed clocks ---------------------------------------------------------------
# Progress means the restored run saved a checkpoint holding more steps than the one it came from: an eval
# snapshot or a "checkpoint on resume" at the restored step is none. The restored step is stamped on the new run
# (``tinkex_recovery.restored_step``), so a restarted process judges as the one before it did. Recovery times
# ahead of this clock count as now.
def snapshot(recovery: Recovery, name: str, step: int) -> None:
    """The restored run saves a checkpoint recording ``step`` (an eval snapshot when it is the restored step)."""
    recovery.client.save_state(name, user_metadata={"step": str(step)}).result()


def test_snapshots_at_the_restored_step_are_no_progress(sim: SimulatedTinker, make_engine: Any) -> None:
    engine = make_engine(max_no_progress=2)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)  # checkpoints at steps 2 and 4
    first = lose(sim, engine, handle)
    assert first.checkpoint.path.name == "0004"
    snapshot(first, "eval-1", 4)  # an eval snapshot at the step it came from
    second = lose(sim, engine, handle)  # streak 1
    snapshot(second, "resume-2", 4)  # a "checkpoint on resume": the same step again
    with pytest.raises(RecoveryExhausted) as info:
        lose(sim, engine, handle)
    assert info.value.reason is ExhaustedReason.NO_PROGRESS and "more steps" in str(info.value.__cause__)


def test_a_checkpoint_holding_more_steps_is_progress(sim: SimulatedTinker, make_engine: Any) -> None:
    engine = make_engine(max_no_progress=2)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)
    recovery = lose(sim, engine, handle)
    for n in range(3):  # each restored run gets one step further before it is lost
        train(recovery.client, [4 + n])
        snapshot(recovery, f"s{n}", 5 + n)
        recovery = lose(sim, engine, handle)
    assert len(handle.recoveries) == 4


def test_a_restarted_process_judges_progress_by_the_stamped_step(sim: SimulatedTinker, make_engine: Any) -> None:
    first_engine = make_engine(max_no_progress=2)
    handle = first_engine.watch(run_with_checkpoints(sim).model_id, sim)
    first = lose(sim, first_engine, handle)
    metadata = sim.get_training_run(first.new_run_id).user_metadata or {}
    assert metadata[BUDGET_KEYS[2]] == "4"
    snapshot(first, "eval-1", 4)
    second = lose(sim, first_engine, handle)  # streak 1, recorded on the new run
    snapshot(second, "eval-2", 4)
    first_engine.close()
    restarted = make_engine(max_no_progress=2)  # another process: nothing but the run's metadata
    again = restarted.watch(second.new_run_id, sim)
    with pytest.raises(RecoveryExhausted) as info:
        lose(sim, restarted, again)
    assert info.value.reason is ExhaustedReason.NO_PROGRESS


def test_the_step_is_read_from_either_key() -> None:
    def ck(metadata: dict[str, str] | None) -> Checkpoint:
        return Checkpoint(
            checkpoint_id="weights/a",
            checkpoint_type="training",
            time="2026-01-01T00:00:00Z",
            tinker_path="tinker://r/weights/a",
            user_metadata=metadata,
        )

    assert checkpoint_step(ck({"step": "7"})) == 7
    assert checkpoint_step(ck({"tinkex_recovery.step": "8"})) == 8
    assert checkpoint_step(ck({"step": "x", "tinkex_recovery.step": "9"})) == 9
    assert checkpoint_step(ck({"step": "-1"})) is None and checkpoint_step(ck(None)) is None


def test_recovery_times_ahead_of_this_clock_count_as_now(
    sim: SimulatedTinker, make_engine: Any, clock: FakeClock
) -> None:
    """A run recovered by a host whose clock is an hour ahead: its recovery counts as now, so it leaves the
    window recovery_window after now, not an hour later."""
    ahead = (clock.now() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    client = sim.create_lora_training_client(base_model="m", user_metadata={BUDGET_KEYS[0]: ahead})
    train(client, [0, 1])
    client.save_state("0002", user_metadata={"step": "2"}).result()
    engine = make_engine(max_recoveries=2, recovery_window=600.0, max_no_progress=None)
    handle = engine.watch(client.model_id, sim)
    lose(sim, engine, handle)  # t=0: the skewed one and this one are in the window
    clock.advance(601.0)
    lose(sim, engine, handle)  # t=601: both have left the window
    third = lose(sim, engine, handle)  # t=601: one in the window, one more allowed
    assert len(handle.recoveries) == 3 and third.number == 3


def test_without_max_recoveries_the_last_ten_times_are_kept(sim: SimulatedTinker, make_engine: Any) -> None:
    engine = make_engine(max_recoveries=None, max_no_progress=None)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)
    for _ in range(12):
        recovery = lose(sim, engine, handle)
    times = (sim.get_training_run(recovery.new_run_id).user_metadata or {})[BUDGET_KEYS[0]].split()
    assert len(times) == 10
