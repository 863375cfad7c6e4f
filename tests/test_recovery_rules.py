"""One restore path: every restore follows the policy's rules, wherever it starts (issue "One restore path").

A poll, a failing step and a guard resuming at entry all go through the engine's one recovery job: the same
fallback, the same retries, the same record of rejected checkpoints, the same containment of abandoned
attempts, the same blame for each kind of failure. Time is a FakeClock; nothing sleeps.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from pytest_mock import MockerFixture

from tinkex_recovery import (
    EngineNotStarted,
    EventKind,
    ExhaustedReason,
    FakeClock,
    NoRestorableCheckpoint,
    RecoveryEngine,
    RecoveryExhausted,
    RecoveryPolicy,
    RunState,
    recovery_guard,
)
from tinkex_recovery._recovery import RecoveryJob
from tinkex_recovery.simulated import SimulatedAPIError, SimulatedRequestFailedError, SimulatedTinker

from .helpers import WAIT, EventLog, run_with_checkpoints, train

POLICY = RecoveryPolicy(enabled=True, jitter=0.0, backoff=5.0, max_backoff=60.0, poll_interval=3600)


def name(path: str) -> str:
    return path.rsplit("/", 1)[1]


def restored_names(sim: SimulatedTinker) -> list[str]:
    return [name(call[0]) for call in sim.restore_calls]


def advance_when_waited(clock: FakeClock, seconds: float) -> threading.Thread:
    """Advance ``clock`` by ``seconds`` once something waits that long on it (a backoff), from another thread:
    the caller is blocked (e.g. in a guard's entry) while the engine waits."""

    def run() -> None:
        for _ in range(int(WAIT / 0.01)):
            if seconds in clock.waits:
                clock.advance(seconds)
                return
            threading.Event().wait(0.01)

    thread = threading.Thread(target=run, name="test-advance")
    thread.start()
    return thread


# -- the guard's resume at entry is the engine's recovery -------------------------------------------------
def test_resume_at_entry_retries_a_503_with_the_policys_backoff(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = run_with_checkpoints(sim, steps=4, every=2)
    sim.fail_restores(1, status_code=503)
    advancing = advance_when_waited(clock, 5.0)
    with recovery_guard(client.model_id, sim, policy=POLICY, clock=clock) as guard:
        assert guard.start_step == 4 and guard.run_id != client.model_id
    advancing.join(WAIT)
    assert restored_names(sim) == ["0004", "0004"]  # the same checkpoint, retried
    assert 5.0 in clock.waits  # after the policy's backoff


def test_a_checkpoint_rejected_at_entry_stays_rejected_for_the_watch_that_follows(
    sim: SimulatedTinker, clock: FakeClock
) -> None:
    client = sim.create_lora_training_client(base_model="m")
    for i, loss in enumerate(["0.5", "0.1", "0.3"], start=1):  # "best" ranks b2, b3, b1
        train(client, [i - 1])
        client.save_state(f"b{i}", user_metadata={"step": str(i), "loss": loss}).result()
    sim.break_checkpoint(f"tinker://{client.model_id}/weights/b2")  # the server rejects the best one
    policy = POLICY.replace(checkpoint_strategy="best")
    with recovery_guard(client.model_id, sim, policy=policy, clock=clock) as guard:
        assert guard.resumed_from is not None and name(guard.resumed_from.tinker_path) == "b3"
        for step in guard.steps(range(guard.start_step or 0, 5)):
            with step:
                if step.index == 4 and not guard.recoveries:
                    sim.corrupt(guard.run_id)
                train(guard.client, [step.index])
    assert restored_names(sim) == ["b2", "b3", "b3"]  # b2 never again, in the loop either
    assert sim.lineage(guard.run_id) == [0, 1, 2, 3, 4]


# -- attempt_timeout contains what it abandons -------------------------------------------------------------
# A restore answering late (blocking, or a future) is contained: see the fault matrix's attempt_timeout rows.
def test_close_leaves_no_thread_waiting_on_a_restore_future_that_never_completes(
    sim: SimulatedTinker, clock: FakeClock, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    sim.hang_restores(1, future=True)  # pending until release(), which this test calls only at the end
    engine = RecoveryEngine(POLICY, clock=clock).start()
    engine.subscribe(events)
    engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    events.wait_for(EventKind.CHECKPOINT_SELECTED)
    engine.close(timeout=WAIT)
    assert [t.name for t in threading.enumerate() if t.name.startswith("tinkex-recovery")] == []


# -- who is to blame -----------------------------------------------------------------------------------------
def test_401_fails_the_recovery_and_rejects_no_checkpoint(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    sim.fail_restores(1, status_code=401)
    engine = make_engine(fallback_depth=2, max_attempts=3)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    with pytest.raises(RecoveryExhausted) as info:
        handle.wait_for_recovery(WAIT)
    assert info.value.reason is ExhaustedReason.FATAL and info.value.attempts == 1
    assert isinstance(info.value.__cause__, SimulatedAPIError) and info.value.__cause__.status_code == 401
    assert restored_names(sim) == ["0004"] and handle._lineage.rejected == set()
    assert events.of(EventKind.CHECKPOINT_SKIPPED) == []


@pytest.mark.parametrize("status", [400, 403, 404])
def test_400_403_and_404_on_a_restore_are_the_checkpoints_and_fall_back(
    sim: SimulatedTinker, make_engine: Any, status: int
) -> None:
    client = run_with_checkpoints(sim, steps=6, every=2)
    sim.break_checkpoint(f"tinker://{client.model_id}/weights/0006", status_code=status)
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    assert handle.wait_for_recovery(WAIT).checkpoint.tinker_path.endswith("/0004")
    assert restored_names(sim) == ["0006", "0004"]


@pytest.mark.parametrize("error", [TypeError("unexpected keyword argument 'x'"), AttributeError("no attribute 'y'")])
def test_a_programming_error_from_the_service_fails_at_once_naming_it(
    sim: SimulatedTinker, make_engine: Any, error: Exception
) -> None:
    client = run_with_checkpoints(sim)

    class Broken:
        calls = 0

        def create_training_client_from_state(self, path: str) -> Any:
            raise AssertionError("not this one")

        def create_training_client_from_state_with_optimizer(self, path: str) -> Any:
            Broken.calls += 1
            raise error

        def create_rest_client(self) -> Any:
            return sim.create_rest_client()

    engine = make_engine(max_attempts=5)
    handle = engine.watch(client.model_id, Broken())
    sim.corrupt(client.model_id)
    engine.poll_once()
    with pytest.raises(RecoveryExhausted, match=type(error).__name__) as info:
        handle.wait_for_recovery(WAIT)
    assert Broken.calls == 1 and info.value.reason is ExhaustedReason.FATAL and info.value.__cause__ is error


@pytest.mark.parametrize(
    ("max_attempts", "fallback_depth", "calls", "reason"),
    [(2, 5, 2, ExhaustedReason.ATTEMPTS), (10, 1, 2, ExhaustedReason.CHECKPOINTS), (3, 2, 3, "either")],
)
def test_max_attempts_and_fallback_depth_whichever_comes_first(  # noqa: PLR0917 (parametrized)
    sim: SimulatedTinker, make_engine: Any, max_attempts: int, fallback_depth: int, calls: int, reason: Any
) -> None:
    client = run_with_checkpoints(sim, steps=12, every=2)
    for step in range(2, 13, 2):
        sim.break_checkpoint(f"tinker://{client.model_id}/weights/{step:04d}")
    engine = make_engine(max_attempts=max_attempts, fallback_depth=fallback_depth)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    with pytest.raises(RecoveryExhausted) as info:
        handle.wait_for_recovery(WAIT)
    assert len(sim.restore_calls) == calls
    assert reason == "either" or info.value.reason is reason


def test_exhaustion_chains_the_last_error_with_its_traceback_and_passes_the_reason_on(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    failures: list[RecoveryExhausted] = []
    client = run_with_checkpoints(sim)
    sim.fail_restores(5)
    engine = make_engine(max_attempts=2, backoff=0.0, max_backoff=0.0, on_failure=failures.append)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    with pytest.raises(RecoveryExhausted) as info:
        handle.wait_for_recovery(WAIT)
    error = info.value
    assert error.reason is ExhaustedReason.ATTEMPTS and "(attempts)" in str(error)
    assert isinstance(error.__cause__, SimulatedAPIError) and error.__cause__.__traceback__ is not None
    assert failures == [error]
    assert events.wait_for(EventKind.EXHAUSTED)[0].reason == "attempts"


# -- nothing disappears ---------------------------------------------------------------------------------------
def test_a_steps_own_error_suppressed_on_a_lost_run_is_logged_and_kept(
    sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tinkex_recovery")
    client = run_with_checkpoints(sim, steps=2, every=2)
    bug = KeyError("a bug in the step")
    with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
        for step in guard.steps(range(2, 4)):
            with step:
                if not guard.recoveries:
                    sim.corrupt(guard.run_id)  # lost, and the step fails for a reason of its own
                    raise bug
                train(guard.client, [step.index])
    (recovery,) = guard.recoveries
    assert recovery.cause is bug
    (record,) = [r for r in caplog.records if "step 2 failed" in r.getMessage()]  # one line, naming the error
    assert record.levelno == logging.INFO and "KeyError: 'a bug in the step'" in record.getMessage()
    (traceback,) = [r for r in caplog.records if r.exc_info is not None and "step 2" in r.getMessage()]
    assert traceback.exc_info is not None and traceback.exc_info[1] is bug and traceback.levelno == logging.DEBUG


# -- engine bookkeeping ----------------------------------------------------------------------------------------
def test_a_run_watched_again_after_an_unwatch_during_its_recovery_stays_watched(
    sim: SimulatedTinker, make_engine: Any, events: EventLog, clock: FakeClock
) -> None:
    client = run_with_checkpoints(sim)
    sim.fail_restores(1)
    engine = make_engine()
    old = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    events.wait_for(EventKind.FAILED)  # the recovery waits out its backoff
    old.unwatch()
    other = sim.create_lora_training_client(base_model="m")
    renewed = engine.watch(other.model_id, sim)
    again = engine.watch(client.model_id, sim)  # the same run id, watched anew
    clock.advance(5.0)
    events.wait_for(EventKind.COMPLETED)
    assert set(engine.watched_runs) == {client.model_id, other.model_id}
    assert again.state is RunState.WATCHING and renewed.state is RunState.WATCHING


def test_a_failing_outcome_handler_ends_that_recovery_and_the_others_go_on(
    sim: SimulatedTinker, make_engine: Any, mocker: MockerFixture
) -> None:
    broken, healthy = run_with_checkpoints(sim), run_with_checkpoints(sim)
    real = RecoveryJob.on_outcome

    def on_outcome(self: RecoveryJob, outcome: Any) -> float | None:
        if self.run_id == broken.model_id:
            raise RuntimeError("a bug while handling an outcome")
        return real(self, outcome)

    mocker.patch.object(RecoveryJob, "on_outcome", on_outcome)
    engine = make_engine(max_concurrent=2)
    handles = [engine.watch(c.model_id, sim) for c in (broken, healthy)]
    sim.corrupt(broken.model_id)
    sim.corrupt(healthy.model_id)
    engine.poll_once()
    with pytest.raises(RecoveryExhausted) as info:
        handles[0].wait_for_recovery(WAIT)
    assert info.value.reason is ExhaustedReason.INTERNAL and isinstance(info.value.__cause__, RuntimeError)
    assert handles[1].wait_for_recovery(WAIT).old_run_id == healthy.model_id


def test_a_blocked_subscriber_stalls_no_restore_and_no_deadline(
    sim: SimulatedTinker, clock: FakeClock, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    sim.hang_restores(1, then="succeed", future=True)
    gate = threading.Event()
    engine = RecoveryEngine(POLICY.replace(attempt_timeout=20.0), clock=clock).start()
    try:
        engine.subscribe(lambda e: gate.wait(WAIT) if e.kind is EventKind.DETECTED else None)
        engine.subscribe(events)
        handle = engine.watch(client.model_id, sim)
        sim.corrupt(client.model_id)
        engine._poll_cycle()  # the public poll_once() would wait for the blocked subscriber
        for _ in range(int(WAIT / 0.01)):  # the restore is made while the subscriber is still blocked
            if sim.restore_calls:
                break
            threading.Event().wait(0.01)
        clock.advance(20.0)  # its deadline passes: abandoned
        advance_when_waited(clock, 5.0).join(WAIT)  # the backoff: the retry runs, and waits for the call sent
        for _ in range(int(WAIT / 0.01)):
            if engine._executor.running == 1:
                break
            threading.Event().wait(0.01)
        sim.release()  # the outstanding call answers: the waiting attempt adopts its run
        for _ in range(int(WAIT / 0.01)):
            if not engine._executor.pending(client.model_id):
                break
            threading.Event().wait(0.01)
        assert len(sim.restore_calls) == 1 and events.events == []  # nothing delivered yet: all done meanwhile
        gate.set()
        assert handle.wait_for_recovery(WAIT).attempts == 2
    finally:
        gate.set()
        engine.close()


def test_close_closes_the_rest_clients_the_engine_made(
    sim: SimulatedTinker, clock: FakeClock, mocker: MockerFixture
) -> None:
    rest = sim.create_rest_client()
    close = mocker.Mock()
    rest.close = close  # type: ignore[attr-defined]
    mocker.patch.object(sim, "create_rest_client", return_value=rest)
    client = run_with_checkpoints(sim)
    given = mocker.Mock(wraps=sim.create_rest_client())
    with RecoveryEngine(POLICY, clock=clock) as engine:
        engine.watch(client.model_id, sim)
    close.assert_called_once_with()
    with RecoveryEngine(POLICY, status=given, clock=clock) as engine:  # a status source given is the caller's
        engine.watch(client.model_id, sim)
    given.close.assert_not_called()


def test_poll_once_and_check_now_before_start_raise(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = run_with_checkpoints(sim)
    engine = RecoveryEngine(POLICY, clock=clock)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    with pytest.raises(EngineNotStarted):
        engine.poll_once()
    with pytest.raises(EngineNotStarted):
        handle.check_now()
    engine.close()


def test_a_pinned_checkpoint_that_cannot_be_restored_is_no_restorable_checkpoint(
    sim: SimulatedTinker, make_engine: Any
) -> None:
    client = run_with_checkpoints(sim)
    pinned = f"tinker://{client.model_id}/weights/0002"
    sim.break_checkpoint(pinned)
    engine = make_engine(checkpoint_strategy=pinned)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    with pytest.raises(RecoveryExhausted) as info:
        handle.wait_for_recovery(WAIT)
    assert info.value.reason is ExhaustedReason.CHECKPOINTS
    assert isinstance(info.value.__cause__, (NoRestorableCheckpoint, SimulatedAPIError, SimulatedRequestFailedError))
