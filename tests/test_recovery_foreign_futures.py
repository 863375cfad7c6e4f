"""A service whose restore returns a future of its own make (only ``result(timeout)``: neither a
``concurrent.futures.Future`` nor the SDK's ``APIFuture``) is recovered like any other, and abandoned at
``attempt_timeout`` like any other when its future never completes."""

from __future__ import annotations

import threading
from typing import Any

from tinkex_recovery import EventKind, FakeClock
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT, EventLog, run_with_checkpoints


class ForeignFuture:
    """A future-like that answers ``result(timeout)`` only; not ready for its first ``not_ready`` asks."""

    def __init__(self, inner: Any, not_ready: int) -> None:
        self._inner = inner
        self._not_ready = not_ready
        self.asked = 0
        self._lock = threading.Lock()

    def result(self, timeout: float | None = None) -> Any:
        with self._lock:
            self.asked += 1
            if self.asked <= self._not_ready:
                raise TimeoutError
        return self._inner.result(timeout)


class ForeignFutureService:
    """The simulator's restores, each handed back in a :class:`ForeignFuture`."""

    def __init__(self, sim: SimulatedTinker, not_ready: int) -> None:
        self.sim = sim
        self.not_ready = not_ready
        self.futures: list[ForeignFuture] = []

    def _wrap(self, inner: Any) -> ForeignFuture:
        future = ForeignFuture(inner, self.not_ready)
        self.futures.append(future)
        return future

    def create_training_client_from_state(self, path: str, user_metadata: Any = None) -> ForeignFuture:
        return self._wrap(self.sim.create_training_client_from_state(path, user_metadata=user_metadata))

    def create_training_client_from_state_with_optimizer(self, path: str, user_metadata: Any = None) -> ForeignFuture:
        return self._wrap(self.sim.create_training_client_from_state_with_optimizer(path, user_metadata=user_metadata))

    def create_rest_client(self) -> Any:
        return self.sim.create_rest_client()


def test_a_restore_answered_by_a_future_of_another_make_is_collected_once_it_is_ready(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    service = ForeignFutureService(sim, not_ready=2)
    engine = make_engine()
    handle = engine.watch(client.model_id, service)
    sim.corrupt(client.model_id)
    engine.poll_once()
    recovery = handle.wait_for_recovery(WAIT)
    assert recovery.new_run_id in sim.run_ids and recovery.new_run_id != client.model_id
    assert recovery.client.model_id == recovery.new_run_id
    assert len(service.futures) == 1 and service.futures[0].asked == 3  # asked again until it was ready
    assert events.kinds().count("failed") == 0


def test_a_future_of_another_make_that_never_completes_is_abandoned_at_the_attempt_timeout(
    sim: SimulatedTinker, make_engine: Any, events: EventLog, clock: FakeClock
) -> None:
    client = run_with_checkpoints(sim)
    service = ForeignFutureService(sim, not_ready=10**9)
    engine = make_engine(attempt_timeout=30.0, max_attempts=1)
    handle = engine.watch(client.model_id, service)
    sim.corrupt(client.model_id)
    engine.poll_once()
    events.wait_for(EventKind.CHECKPOINT_SELECTED)
    clock.advance(30.0)
    events.wait_for(EventKind.EXHAUSTED)
    assert "within attempt_timeout=30.0s" in str(events.of(EventKind.FAILED)[0].error)
    assert len(handle.recoveries) == 0 and len(service.futures) == 1
    engine.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("tinkex-recovery-attempt")]
