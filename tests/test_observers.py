"""The process-wide observer registry every engine reports to: what an observer hears from an engine nobody
subscribed to, and that an observer that raises never stops an engine."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tinkex_recovery import EventKind, FakeClock, RecoveryEngine, RecoveryEvent, RecoveryPolicy
from tinkex_recovery._integration import RecoveryObserver, add_observer, report_steps_lost, watched_run_count
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import EventLog, run_with_checkpoints

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0)


class Recorder(RecoveryObserver):
    def __init__(self) -> None:
        self.events: list[RecoveryEvent] = []
        self.polls: list[bool] = []
        self.lost: list[tuple[int, str]] = []

    def on_event(self, event: RecoveryEvent) -> None:
        self.events.append(event)

    def on_poll(self, ok: bool) -> None:
        self.polls.append(ok)

    def on_steps_lost(self, steps: int, integration: str) -> None:
        self.lost.append((steps, integration))


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    observer = Recorder()
    remove = add_observer(observer)
    yield observer
    remove()


def test_an_observer_hears_every_engine_without_subscribing(
    recorder: Recorder, sim: SimulatedTinker, clock: FakeClock, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    other = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    before = watched_run_count()
    with RecoveryEngine(POLICY, clock=clock) as engine, RecoveryEngine(POLICY, clock=clock) as second:
        engine.subscribe(events)
        handle = engine.watch(client.model_id, sim)
        second.watch(other.model_id, sim)
        assert watched_run_count() == before + 2
        sim.fail_polls(1)
        engine.poll_once()  # fails
        sim.corrupt(client.model_id)
        engine.poll_once()  # answers: corrupted
        handle.wait_for_recovery(timeout=10)
        events.wait_for(EventKind.COMPLETED)
        second.poll_once()  # answers: healthy
        handle.unwatch()
        assert watched_run_count() == before + 1
    assert watched_run_count() == before  # closed engines watch nothing
    assert recorder.polls == [False, True, True]
    assert [e.kind for e in recorder.events] == [e.kind for e in events.events]


def test_steps_lost_reach_every_observer(recorder: Recorder) -> None:
    report_steps_lost(3, "guard")
    assert recorder.lost == [(3, "guard")]


def test_a_raising_observer_is_logged_and_skipped(
    recorder: Recorder, sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(RecoveryObserver):
        def on_poll(self, ok: bool) -> None:
            raise RuntimeError("observer bug")

    remove = add_observer(Broken())
    try:
        client = run_with_checkpoints(sim)
        with caplog.at_level(logging.ERROR, "tinkex_recovery"), RecoveryEngine(POLICY, clock=clock) as engine:
            engine.watch(client.model_id, sim)
            engine.poll_once()
    finally:
        remove()
    assert recorder.polls == [True]  # the observer after the broken one still heard the poll
    assert "raised in on_poll; ignored" in caplog.text


def test_only_observers_register() -> None:
    with pytest.raises(TypeError, match="RecoveryObserver"):
        add_observer(object())  # type: ignore[arg-type]
