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
