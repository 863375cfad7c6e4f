"""The engine's non-blocking face for callers that must not block (an event loop): ``RunHandle.when_ready()``,
``RunHandle.check_soon()`` and a status source per watched run (``watch(status=...)``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tinkex_recovery import (
    EngineClosed,
    FakeClock,
    RecoveryEngine,
    RecoveryExhausted,
    RecoveryPolicy,
)
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT, run_with_checkpoints

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, max_attempts=1)


@pytest.fixture
def engine(clock: FakeClock) -> Iterator[RecoveryEngine]:
    with RecoveryEngine(POLICY, clock=clock) as engine:
        yield engine


def test_when_ready_is_done_only_once_a_recovery_can_be_collected(sim: SimulatedTinker, engine: RecoveryEngine) -> None:
    client = run_with_checkpoints(sim)
    handle = engine.watch(client.model_id, sim)
    ready = handle.when_ready()
    assert not ready.done()
    with pytest.raises(TimeoutError):
        handle.wait_for_recovery(timeout=0)
    sim.corrupt(client.model_id)
    assert handle.check_now()
    ready.result(timeout=WAIT)  # woken by the engine, with no thread of the caller's waiting
    recovery = handle.wait_for_recovery(timeout=0)
    assert recovery.old_run_id == client.model_id
    assert not handle.when_ready().done()  # collected: nothing more to wait for


def test_when_ready_is_done_at_once_when_a_recovery_waits_and_survives_a_cancelled_waiter(
    sim: SimulatedTinker, engine: RecoveryEngine
) -> None:
    client = run_with_checkpoints(sim)
    handle = engine.watch(client.model_id, sim)
    abandoned = handle.when_ready()
    assert abandoned.cancel()  # a waiter that gave up: the engine must not trip over its future
    sim.corrupt(client.model_id)
    handle.check_now()
    handle.wait_for_recovery(timeout=WAIT)  # the engine announced it past the cancelled future
    sim.corrupt(handle.run_id)
    handle.check_now()
    late = handle.when_ready()
    late.result(timeout=WAIT)
    assert handle.wait_for_recovery(timeout=0).number == 2


def test_when_ready_wakes_on_exhaustion_and_on_close(sim: SimulatedTinker, clock: FakeClock) -> None:
    with RecoveryEngine(POLICY, clock=clock) as engine:
        client = sim.create_lora_training_client(base_model="m")  # no checkpoint: nothing to restore
        handle = engine.watch(client.model_id, sim)
        ready = handle.when_ready()
        sim.corrupt(client.model_id)
        handle.check_now()
        ready.result(timeout=WAIT)
        with pytest.raises(RecoveryExhausted):
            handle.wait_for_recovery(timeout=0)
    with RecoveryEngine(POLICY, clock=clock) as engine:
        healthy = sim.create_lora_training_client(base_model="m")
        ready = engine.watch(healthy.model_id, sim).when_ready()
        engine.close()
        ready.result(timeout=0)  # done by close() itself
        assert engine.watched_runs == [healthy.model_id]


def test_check_soon_polls_on_an_engine_thread_and_answers_like_check_now(
    sim: SimulatedTinker, engine: RecoveryEngine
) -> None:
    client = run_with_checkpoints(sim)
    polled_on: list[str] = []

    class Status:
        def get_training_run(self, run_id: str) -> Any:
            polled_on.append(threading.current_thread().name)
            return sim.get_training_run(run_id)

        def list_checkpoints(self, run_id: str) -> Any:
            return sim.list_checkpoints(run_id)

    handle = engine.watch(client.model_id, sim, status=Status())
    assert handle.check_soon().result(timeout=WAIT) is False
    sim.corrupt(client.model_id)
    assert handle.check_soon().result(timeout=WAIT) is True
    assert len(polled_on) == 2  # the run's own status source, on a poll worker (never the caller's thread)
    assert all(name.startswith("tinkex-recovery-poll-") for name in polled_on)
    handle.wait_for_recovery(timeout=WAIT)
    assert sim.poll_count == 2  # nothing read the run through any other source


def test_check_soon_on_a_closed_engine_raises(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    engine = RecoveryEngine(POLICY, clock=clock).start()
    handle = engine.watch(client.model_id, sim)
    engine.close()
    with pytest.raises(EngineClosed):
        handle.check_soon()


def test_watch_refuses_a_status_source_without_the_methods(sim: SimulatedTinker, engine: RecoveryEngine) -> None:
    client = sim.create_lora_training_client(base_model="m")
    with pytest.raises(TypeError, match="get_training_run"):
        engine.watch(client.model_id, sim, status=object())


def test_on_unsettled_is_told_on_the_polling_thread_before_any_event_is_delivered(
    sim: SimulatedTinker, engine: RecoveryEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop that reads ``settled`` only when told: the poll worker that finds the run lost tells it at once,
    while the events (delivered on the notifier, after any slow subscriber) are held back."""
    client = run_with_checkpoints(sim)
    told: list[tuple[str, bool]] = []
    handle: Any = None

    def on_unsettled() -> None:
        told.append((threading.current_thread().name, handle.settled))

    handle = engine.watch(client.model_id, sim, on_unsettled=on_unsettled)
    detected, release = threading.Event(), threading.Event()

    def hold(event: Any) -> None:  # a subscriber slow on "detected": every later delivery waits behind it
        if event.kind.value == "detected":
            detected.set()
            release.wait(WAIT)

    engine.subscribe(hold)
    sim.corrupt(client.model_id)
    checked = handle.check_soon()
    try:
        assert detected.wait(WAIT)
        assert len(told) == 1 and told[0][0].startswith("tinkex-recovery-poll-") and told[0][1] is False
        assert not checked.done()  # the poll's answer waits behind the event: only on_unsettled has been told
    finally:
        release.set()
    assert checked.result(timeout=WAIT) is True
    handle.wait_for_recovery(timeout=WAIT)
    assert handle.settled and len(told) == 1  # a recovery taken in tells nothing: it is the loop's own doing

    sim.corrupt(handle.run_id)
    sim.fail_restores(5, status_code=400)  # every checkpoint rejected: the lineage gives up
    handle.check_now()
    with pytest.raises(RecoveryExhausted):
        handle.wait_for_recovery(timeout=WAIT)
    assert [settled for _, settled in told] == [False, False, False]  # recovering, recovering, exhausted

    healthy = engine.watch(sim.create_lora_training_client(base_model="m").model_id, sim, on_unsettled=on_unsettled)
    handle = healthy
    healthy.unwatch()
    assert len(told) == 4 and told[-1][1] is False  # unwatched: not settled either


def test_a_raising_on_unsettled_is_logged_and_the_recovery_goes_on(
    sim: SimulatedTinker, engine: RecoveryEngine, caplog: pytest.LogCaptureFixture
) -> None:
    client = run_with_checkpoints(sim)

    def broken() -> None:
        raise RuntimeError("boom")

    handle = engine.watch(client.model_id, sim, on_unsettled=broken)
    sim.corrupt(client.model_id)
    with caplog.at_level("ERROR", logger="tinkex_recovery"):
        assert handle.check_now()
    assert handle.wait_for_recovery(timeout=WAIT).old_run_id == client.model_id
    assert "on_unsettled callback raised; ignored" in caplog.text
    with pytest.raises(TypeError, match="on_unsettled must be callable, got int"):
        engine.watch("other:train:0", sim, on_unsettled=3)  # type: ignore[arg-type]
