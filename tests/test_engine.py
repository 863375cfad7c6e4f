"""RecoveryEngine against the in-memory SimulatedTinker: Tinkex's test checklist, and what Tinkex leaves untested.

Polls are driven by ``engine.poll_once()`` / ``handle.check_now()`` and time by a FakeClock: nothing sleeps.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from tinkex_recovery import (
    BUDGET_KEYS,
    LINEAGE_KEYS,
    EngineClosed,
    EngineState,
    EventKind,
    FakeClock,
    RecoveryDisabled,
    RecoveryEngine,
    RecoveryExhausted,
    RecoveryPolicy,
    RunState,
    TrainingRun,
)
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT, EventLog, run_with_checkpoints, train


# -- Tinkex's checklist -------------------------------------------------------------------------------------
def test_corrupted_run_polled_once_is_detected_and_restored_from_last_checkpoint_with_optimizer(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim, steps=4, every=2)
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    recovery = handle.wait_for_recovery(WAIT)

    assert events.of(EventKind.DETECTED)[0].run_id == client.model_id
    last = f"tinker://{client.model_id}/weights/0004"
    assert sim.restore_calls[0][:2] == (last, True)  # the with-optimizer constructor, from last_checkpoint
    created = events.of(EventKind.CLIENT_CREATED)[0]
    assert created.checkpoint == last and created.new_run_id == recovery.new_run_id
    completed = events.of(EventKind.COMPLETED)[0]
    assert completed.run_id == client.model_id and completed.new_run_id == recovery.new_run_id
    assert events.kinds() == ["detected", "started", "checkpoint_selected", "client_created", "completed"]
    assert sim.lineage(recovery.new_run_id) == [0, 1, 2, 3]


def test_a_handle_is_settled_only_while_nothing_awaits_its_caller(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    during: list[bool] = []
    engine.subscribe(lambda e: during.append(handle.settled) if e.kind is EventKind.STARTED else None)
    assert handle.settled
    sim.corrupt(client.model_id)
    engine.poll_once()
    events.wait_for(EventKind.COMPLETED)
    assert during == [False]  # recovering
    assert handle.state is RunState.WATCHING and not handle.settled  # finished, not yet returned
    handle.wait_for_recovery(WAIT)
    assert handle.settled


def test_the_new_run_keeps_being_watched(sim: SimulatedTinker, make_engine: Any) -> None:
    client = run_with_checkpoints(sim)
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    recovery = handle.wait_for_recovery(WAIT)
    assert engine.watched_runs == [recovery.new_run_id] == [handle.run_id]
    assert handle.client is recovery.client and handle.state is RunState.WATCHING


def test_a_healthy_run_is_not_recovered_and_stays_watched(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    engine = make_engine()
    engine.watch(client.model_id, sim)
    for _ in range(3):
        engine.poll_once()
    assert events.kinds() == [] and engine.watched_runs == [client.model_id] and sim.restore_calls == []


def test_a_disabled_policy_refuses_to_watch(sim: SimulatedTinker, clock: FakeClock) -> None:
    with RecoveryEngine(RecoveryPolicy(enabled=False), clock=clock) as engine, pytest.raises(RecoveryDisabled):
        engine.watch("run-1", sim)


def test_on_recovery_gets_the_recovery(sim: SimulatedTinker, make_engine: Any) -> None:
    seen: list[Any] = []
    client = run_with_checkpoints(sim)
    engine = make_engine(on_recovery=seen.append)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    recovery = handle.wait_for_recovery(WAIT)
    assert seen == [recovery] and recovery.old_run_id == client.model_id and recovery.number == 1


def test_restore_optimizer_false_uses_the_weights_only_constructor(sim: SimulatedTinker, make_engine: Any) -> None:
    client = run_with_checkpoints(sim)
    engine = make_engine(restore_optimizer=False)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    handle.wait_for_recovery(WAIT)
    assert [call[1] for call in sim.restore_calls] == [False]


def test_failures_are_retried_with_backoff_then_exhausted_calls_on_failure(
    sim: SimulatedTinker, make_engine: Any, clock: FakeClock, events: EventLog
) -> None:
    failures: list[RecoveryExhausted] = []
    client = run_with_checkpoints(sim)
    sim.fail_restores(5)
    engine = make_engine(max_attempts=2, on_failure=failures.append)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    events.wait_for(EventKind.FAILED)
    clock.advance(5.0)
    events.wait_for(EventKind.EXHAUSTED)
    with pytest.raises(RecoveryExhausted) as info:
        handle.wait_for_recovery(WAIT)
    assert info.value.run_id == client.model_id and info.value.attempts == 2 and "503" in str(info.value.last_error)
    assert failures == [info.value] or (failures and failures[0].attempts == 2)
    assert 5.0 in clock.waits  # the first retry waited `backoff` seconds (jitter 0)
    assert [e.will_retry for e in events.of(EventKind.FAILED)] == [True, False]
    assert handle.state is RunState.EXHAUSTED and len(sim.restore_calls) == 2


# -- what Tinkex leaves untested ------------------------------------------------------------------------------
def test_a_failed_poll_is_a_poll_error_never_a_recovery(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    engine = make_engine()
    engine.watch(client.model_id, sim)
    sim.fail_polls(1)
    engine.poll_once()
    assert events.kinds() == ["poll_error"] and "503" in str(events.events[0].error)
    assert engine.watched_runs == [client.model_id] and sim.restore_calls == []


def test_consecutive_poll_failures_degrade_once_and_never_recover(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    engine = make_engine(degraded_after=3)
    engine.watch(client.model_id, sim)
    sim.fail_polls(5)
    for _ in range(5):
        engine.poll_once()
    assert events.kinds() == ["poll_error"] * 3 + ["poll_degraded"] + ["poll_error"] * 2
    engine.poll_once()  # the service answers again: the count resets
    sim.fail_polls(2)
    engine.poll_once()
    engine.poll_once()
    assert events.kinds().count("poll_degraded") == 1 and sim.restore_calls == []


def test_a_second_detection_while_recovering_is_refused(
    sim: SimulatedTinker, make_engine: Any, events: EventLog, clock: FakeClock
) -> None:
    client = run_with_checkpoints(sim)
    sim.hang_restores(1)
    engine = make_engine(attempt_timeout=30.0)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    events.wait_for(EventKind.CHECKPOINT_SELECTED)
    engine.poll_once()
    assert handle.check_now()  # a recovery is under way: no second one
    assert events.kinds().count("detected") == 1
    sim.release()  # the hung restore fails (504, transient) and is retried after the backoff
    events.wait_for(EventKind.FAILED)
    clock.advance(5.0)
    handle.wait_for_recovery(WAIT)
    assert events.kinds().count("detected") == 1 and len(sim.restore_calls) == 2


@pytest.mark.parametrize(("mode", "expected"), [("min", "0006"), ("max", "0002")])
def test_best_checkpoint_by_metric(sim: SimulatedTinker, make_engine: Any, mode: str, expected: str) -> None:
    client = run_with_checkpoints(sim, steps=8, every=2)  # loss = 1/step: lowest at 0008
    client.save_state("0008", overwrite=True, user_metadata={"step": "8", "loss": "0.2"}).result()
    engine = make_engine(checkpoint_strategy="best", best_metric="loss", best_mode=mode)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    assert handle.wait_for_recovery(WAIT).checkpoint.path.name == expected


def test_best_falls_back_to_latest_when_no_checkpoint_has_the_metric(
    sim: SimulatedTinker, make_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = run_with_checkpoints(sim, steps=4, every=2)
    engine = make_engine(checkpoint_strategy="best", best_metric="accuracy")
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    assert handle.wait_for_recovery(WAIT).checkpoint.path.name == "0004"
    assert "no checkpoint has a numeric 'accuracy'" in caplog.text


def test_a_specific_path(sim: SimulatedTinker, make_engine: Any) -> None:
    client = run_with_checkpoints(sim, steps=6, every=2)
    engine = make_engine(checkpoint_strategy=f"tinker://{client.model_id}/weights/0002")
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    recovery = handle.wait_for_recovery(WAIT)
    assert recovery.checkpoint.path.name == "0002" and recovery.checkpoint.user_metadata == {"step": "2", "loss": "0.5"}
    assert sim.lineage(recovery.new_run_id) == [0, 1]


def test_a_specific_path_of_another_run_is_refused_at_watch(sim: SimulatedTinker, make_engine: Any) -> None:
    engine = make_engine(checkpoint_strategy="tinker://other-run/weights/0002")
    with pytest.raises(ValueError, match="belongs to run other-run"):
        engine.watch("my-run", sim)


def test_no_checkpoint_at_all_is_exhausted_without_a_restore_call(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = sim.create_lora_training_client(base_model="m")
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    with pytest.raises(RecoveryExhausted, match="no restorable checkpoint"):
        handle.wait_for_recovery(WAIT)
    assert sim.restore_calls == [] and events.kinds()[-1] == "exhausted"


class StaleStatus:
    """Reports the run corrupted without a last_checkpoint the first time; the refetch has it."""

    def __init__(self, sim: SimulatedTinker) -> None:
        self.sim = sim
        self.calls = 0

    def get_training_run(self, run_id: str) -> TrainingRun:
        self.calls += 1
        run = self.sim.get_training_run(run_id)
        return run.model_copy(update={"last_checkpoint": None}) if self.calls == 1 else run

    def list_checkpoints(self, run_id: str) -> Any:
        raise AssertionError("the refetched last_checkpoint is enough")


def test_a_missing_last_checkpoint_is_refetched(sim: SimulatedTinker, make_engine: Any) -> None:
    client = run_with_checkpoints(sim)
    status = StaleStatus(sim)
    engine = make_engine(status=status)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    assert handle.wait_for_recovery(WAIT).checkpoint.path.name == "0004" and status.calls == 2


def test_max_concurrent_bounds_recoveries(sim: SimulatedTinker, make_engine: Any) -> None:
    clients = [run_with_checkpoints(sim) for _ in range(4)]
    engine = make_engine(max_concurrent=2)
    handles = [engine.watch(c.model_id, sim) for c in clients]
    for c in clients:
        sim.corrupt(c.model_id)
    engine.poll_once()
    for h in handles:
        h.wait_for_recovery(WAIT)
    assert engine._executor.peak_running <= 2 and len(sim.restore_calls) == 4


def test_the_new_run_gets_the_old_runs_metadata_and_lineage_keys(sim: SimulatedTinker, make_engine: Any) -> None:
    client = sim.create_lora_training_client(base_model="m", user_metadata={"wandb": "run-42"})
    train(client, [0, 1])
    path = client.save_state("0002").result().path
    engine = make_engine()
    handle = engine.watch(client.model_id, sim, metadata={"team": "rl"})
    sim.corrupt(client.model_id)
    engine.poll_once()
    recovery = handle.wait_for_recovery(WAIT)
    metadata = sim.get_training_run(recovery.new_run_id).user_metadata
    assert metadata == {
        "wandb": "run-42",
        "team": "rl",
        LINEAGE_KEYS[0]: client.model_id,
        LINEAGE_KEYS[1]: path,
        LINEAGE_KEYS[2]: "1",
        LINEAGE_KEYS[3]: metadata[LINEAGE_KEYS[3]],  # the recovery's id: see the next test
        LINEAGE_KEYS[4]: "2026-01-01T00:00:00.000000Z",  # when the restore call was sent (the FakeClock's time)
        BUDGET_KEYS[0]: "2026-01-01T00:00:00.000000Z",  # the FakeClock's wall time of this recovery
        BUDGET_KEYS[1]: "0",
    }


def test_each_recovery_stamps_an_id_of_its_own_on_every_run_it_makes(sim: SimulatedTinker, make_engine: Any) -> None:
    client = run_with_checkpoints(sim, steps=2, every=2)
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    ids = []
    for _ in range(3):
        sim.corrupt(handle.run_id)
        engine.poll_once()
        recovery = handle.wait_for_recovery(WAIT)
        ids.append((sim.get_training_run(recovery.new_run_id).user_metadata or {})[LINEAGE_KEYS[3]])
    assert len(set(ids)) == 3 and all(len(i) == 32 for i in ids)


# -- the fallback chain ---------------------------------------------------------------------------------------
def test_a_rejected_checkpoint_falls_back_to_the_next_older_at_once(
    sim: SimulatedTinker, make_engine: Any, events: EventLog, clock: FakeClock
) -> None:
    client = run_with_checkpoints(sim, steps=6, every=2)
    sim.break_checkpoint(f"tinker://{client.model_id}/weights/0006")
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    recovery = handle.wait_for_recovery(WAIT)
    assert [TinkerName(c[0]) for c in sim.restore_calls] == ["0006", "0004"]
    assert recovery.checkpoint.path.name == "0004" and sim.lineage(recovery.new_run_id) == [0, 1, 2, 3]
    assert 5.0 not in clock.waits  # no backoff for a rejected checkpoint


def TinkerName(path: str) -> str:  # noqa: N802 - reads like a constructor in assertions
    return path.rsplit("/", 1)[-1]


def test_a_rejected_checkpoint_is_never_tried_again_for_the_lineage(sim: SimulatedTinker, make_engine: Any) -> None:
    client = run_with_checkpoints(sim, steps=6, every=2)
    sim.break_checkpoint(f"tinker://{client.model_id}/weights/0006")
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    first = handle.wait_for_recovery(WAIT)
    sim.corrupt(first.new_run_id)  # the recovered run is lost before it saved anything
    engine.poll_once()
    second = handle.wait_for_recovery(WAIT)
    assert [TinkerName(c[0]) for c in sim.restore_calls] == ["0006", "0004", "0004"]
    assert second.checkpoint.path.name == "0004" and sim.lineage(second.new_run_id) == [0, 1, 2, 3]


def test_expired_and_sampler_checkpoints_are_skipped_before_any_restore_call(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim, steps=6, every=2)
    sim.expire_checkpoint(f"tinker://{client.model_id}/weights/0006")
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    assert handle.wait_for_recovery(WAIT).checkpoint.path.name == "0004"
    skipped = events.of(EventKind.CHECKPOINT_SKIPPED)
    assert len(skipped) == 1 and "expired" in str(skipped[0].error)
    assert [TinkerName(c[0]) for c in sim.restore_calls] == ["0004"]


class SamplerLatestStatus(StaleStatus):
    def get_training_run(self, run_id: str) -> TrainingRun:
        run = self.sim.get_training_run(run_id)
        assert run.last_checkpoint is not None
        sampler = run.last_checkpoint.model_copy(
            update={"checkpoint_type": "sampler", "tinker_path": f"tinker://{run_id}/sampler_weights/9999"}
        )
        return run.model_copy(update={"last_checkpoint": sampler})

    def list_checkpoints(self, run_id: str) -> Any:
        return self.sim.list_checkpoints(run_id)


def test_a_sampler_checkpoint_is_skipped(sim: SimulatedTinker, make_engine: Any, events: EventLog) -> None:
    client = run_with_checkpoints(sim)
    engine = make_engine(status=SamplerLatestStatus(sim))
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    assert handle.wait_for_recovery(WAIT).checkpoint.path.name == "0004"
    assert "not a training checkpoint" in str(events.of(EventKind.CHECKPOINT_SKIPPED)[0].error)


def test_a_transient_failure_retries_the_same_checkpoint(
    sim: SimulatedTinker, make_engine: Any, events: EventLog, clock: FakeClock
) -> None:
    client = run_with_checkpoints(sim)
    sim.fail_restores(1, status_code=429)
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    events.wait_for(EventKind.FAILED)
    clock.advance(5.0)
    assert handle.wait_for_recovery(WAIT).checkpoint.path.name == "0004"
    assert [TinkerName(c[0]) for c in sim.restore_calls] == ["0004", "0004"]


def test_all_checkpoints_broken_ends_exhausted_within_the_depth(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim, steps=10, every=2)
    for n in range(2, 12, 2):
        sim.break_checkpoint(f"tinker://{client.model_id}/weights/{n:04d}")
    engine = make_engine(max_attempts=10, fallback_depth=2)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    with pytest.raises(RecoveryExhausted):
        handle.wait_for_recovery(WAIT)
    assert [TinkerName(c[0]) for c in sim.restore_calls] == ["0010", "0008", "0006"]


def test_a_recovered_run_lost_before_its_first_checkpoint_restores_from_the_inherited_one(
    sim: SimulatedTinker, make_engine: Any
) -> None:
    client = run_with_checkpoints(sim, steps=4, every=2)
    engine = make_engine()
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    first = handle.wait_for_recovery(WAIT)
    sim.corrupt(first.new_run_id)
    engine.poll_once()
    second = handle.wait_for_recovery(WAIT)
    assert second.old_run_id == first.new_run_id and second.number == 2
    assert second.checkpoint.tinker_path == first.checkpoint.tinker_path
    assert sim.lineage(second.new_run_id) == [0, 1, 2, 3]


# -- robustness of callbacks, lifecycle, bad input -------------------------------------------------------------
def test_a_raising_subscriber_or_callback_is_logged_and_ignored(
    sim: SimulatedTinker, make_engine: Any, events: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(_: object) -> None:
        raise RuntimeError("subscriber bug")

    client = run_with_checkpoints(sim)
    engine = make_engine(on_recovery=boom)
    engine.subscribe(boom)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    with caplog.at_level(logging.ERROR, logger="tinkex_recovery"):
        engine.poll_once()
        handle.wait_for_recovery(WAIT)
    assert events.kinds()[-1] == "completed"
    assert "on_recovery callback raised" in caplog.text and "subscriber bug" in caplog.text


def test_lifecycle_single_use_and_idempotent_close(sim: SimulatedTinker, clock: FakeClock) -> None:
    engine = RecoveryEngine(RecoveryPolicy(enabled=True), clock=clock)
    assert engine.state is EngineState.UNOPENED
    with engine:
        assert engine.state is EngineState.OPENED
        with pytest.raises(RuntimeError, match="single-use"), engine:
            pass
    assert engine.state is EngineState.CLOSED
    engine.close()
    with pytest.raises(EngineClosed):
        engine.watch("run-1", sim)
    with pytest.raises(EngineClosed):
        engine.start()


def test_no_callback_after_close(sim: SimulatedTinker, clock: FakeClock, events: EventLog) -> None:
    calls: list[object] = []
    client = run_with_checkpoints(sim)
    sim.hang_restores(1)
    engine = RecoveryEngine(
        RecoveryPolicy(enabled=True, on_failure=calls.append, on_recovery=calls.append), clock=clock
    )
    engine.subscribe(events)
    with engine:
        handle = engine.watch(client.model_id, sim)
        sim.corrupt(client.model_id)
        engine.poll_once()
        events.wait_for(EventKind.CHECKPOINT_SELECTED)
    count = len(events.events)
    sim.release()  # the hung restore now returns, after close
    for t in threading.enumerate():
        if t.name.startswith("tinkex-recovery"):
            t.join(WAIT)
    assert len(events.events) == count and calls == []
    with pytest.raises(EngineClosed):
        handle.wait_for_recovery(0.1)


@pytest.mark.parametrize("run_id", ["", " ", "a/b", "run 1", "run\n", "\trun", None, 42])
def test_bad_run_ids_are_refused_where_passed(sim: SimulatedTinker, make_engine: Any, run_id: Any) -> None:
    with pytest.raises(ValueError, match="invalid run id"):
        make_engine().watch(run_id, sim)


def test_bad_service_status_and_metadata_are_refused_where_passed(
    sim: SimulatedTinker, make_engine: Any, clock: FakeClock
) -> None:
    engine = make_engine()
    with pytest.raises(TypeError, match="lacks the method"):
        engine.watch("run-1", object())
    with pytest.raises(TypeError, match="lacks the method"):
        RecoveryEngine(RecoveryPolicy(enabled=True), status=object(), clock=clock)
    with pytest.raises(TypeError, match="create_rest_client"):
        engine.watch("run-1", RestlessService())
    with pytest.raises(TypeError, match="str to str"):
        engine.watch("run-1", sim, metadata={"step": 3})
    engine.watch("run-1", sim)
    with pytest.raises(ValueError, match="already watched"):
        engine.watch("run-1", sim)
    with pytest.raises(TypeError, match="RecoveryPolicy"):
        RecoveryEngine({"enabled": True})  # type: ignore[arg-type]


class RestlessService:
    def create_training_client_from_state(self, path: str) -> Any: ...
    def create_training_client_from_state_with_optimizer(self, path: str) -> Any: ...


class PlainService:
    """Returns clients directly (no futures) and takes no user_metadata: still enough."""

    def __init__(self, sim: SimulatedTinker) -> None:
        self.sim = sim

    def create_training_client_from_state(self, path: str) -> Any:
        return self.sim.create_training_client_from_state(path).result()

    def create_training_client_from_state_with_optimizer(self, path: str) -> Any:
        return self.sim.create_training_client_from_state_with_optimizer(path).result()


def test_plain_values_and_services_without_user_metadata_work(sim: SimulatedTinker, make_engine: Any) -> None:
    client = run_with_checkpoints(sim)
    engine = make_engine(status=sim)  # the sim's own methods return values, not futures
    handle = engine.watch(client.model_id, PlainService(sim))
    sim.corrupt(client.model_id)
    engine.poll_once()
    recovery = handle.wait_for_recovery(WAIT)
    assert sim.restore_calls[-1][2] is None and recovery.new_run_id in sim.run_ids


# -- the poller ------------------------------------------------------------------------------------------------
class CountingStatus:
    """The sim's REST client, counting polls so a test can wait for a poll cycle to have happened."""

    def __init__(self, sim: SimulatedTinker) -> None:
        self.sim = sim
        self.cond = threading.Condition()
        self.polls = 0

    def get_training_run(self, run_id: str) -> TrainingRun:
        run = self.sim.get_training_run(run_id)
        with self.cond:
            self.polls += 1
            self.cond.notify_all()
        return run

    def list_checkpoints(self, run_id: str) -> Any:
        return self.sim.list_checkpoints(run_id)

    def wait_polls(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.polls >= n, WAIT), f"{self.polls} polls, wanted {n}"


def test_one_poller_polls_every_run_each_interval(sim: SimulatedTinker, clock: FakeClock) -> None:
    clients = [run_with_checkpoints(sim) for _ in range(3)]
    status = CountingStatus(sim)
    engine = RecoveryEngine(RecoveryPolicy(enabled=True, poll_interval=30.0), status=status, clock=clock)
    handles = [engine.watch(c.model_id, sim) for c in clients]
    with engine:
        assert [t.name for t in threading.enumerate()].count("tinkex-recovery-poller") == 1
        clock.advance(30.0)  # the first tick polls all three
        status.wait_polls(3)
        sim.corrupt(clients[1].model_id)
        clock.advance(30.0)  # the next tick polls all three again
        handles[1].wait_for_recovery(WAIT)
        assert status.polls >= 4
        assert [h.recoveries == () for h in handles] == [True, False, True]


class GatedStatus:
    """Blocks every poll until the test opens the gate; records how many run at once."""

    def __init__(self, sim: SimulatedTinker) -> None:
        self.sim = sim
        self.cond = threading.Condition()
        self.open = False
        self.active = 0
        self.peak = 0

    def get_training_run(self, run_id: str) -> TrainingRun:
        with self.cond:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.open, WAIT)
            self.active -= 1
        return self.sim.get_training_run(run_id)

    def list_checkpoints(self, run_id: str) -> Any:
        return self.sim.list_checkpoints(run_id)


def test_runs_are_polled_concurrently_up_to_the_bound(sim: SimulatedTinker, clock: FakeClock) -> None:
    status = GatedStatus(sim)
    clients = [run_with_checkpoints(sim, steps=2) for _ in range(10)]
    engine = RecoveryEngine(RecoveryPolicy(enabled=True), status=status, poll_concurrency=4, clock=clock)
    with engine:
        for c in clients:
            engine.watch(c.model_id, sim)
        poll = threading.Thread(target=engine.poll_once)
        poll.start()
        with status.cond:
            assert status.cond.wait_for(lambda: status.active == 4, WAIT)
            status.open = True
            status.cond.notify_all()
        poll.join(WAIT)
    assert status.peak == 4


def test_threads_do_not_grow_with_the_number_of_runs(sim: SimulatedTinker, clock: FakeClock) -> None:
    def threads_with(n: int) -> int:
        with RecoveryEngine(RecoveryPolicy(enabled=True), status=sim, clock=clock) as engine:
            for i in range(n):
                engine.watch(f"run-{n}-{i}", sim)
            engine.poll_once()
            return threading.active_count()

    assert threads_with(500) == threads_with(5)


def test_a_pinned_path_the_listing_does_not_show_is_still_restored(sim: SimulatedTinker, make_engine: Any) -> None:
    client = run_with_checkpoints(sim, steps=4, every=2)
    pinned = f"tinker://{client.model_id}/weights/0002"
    status = SamplerLatestStatus(sim)
    status.list_checkpoints = lambda run_id: []  # type: ignore[method-assign]
    engine = make_engine(status=status, checkpoint_strategy=pinned)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    recovery = handle.wait_for_recovery(WAIT)
    assert recovery.checkpoint.tinker_path == pinned and recovery.checkpoint.user_metadata is None
    assert sim.lineage(recovery.new_run_id) == [0, 1]
