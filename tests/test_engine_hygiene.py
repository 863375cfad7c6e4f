"""Nothing stalls, wedges or grows: a run watched again, a blocked subscriber, answers after close, waiters that
gave up, REST clients of services no longer watched."""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import pytest

from tinkex_recovery import EngineClosed, EventKind, FakeClock, RecoveryEngine, RecoveryPolicy, RunState
from tinkex_recovery.simulated import SimulatedTinker

from .conftest import ENGINE_POLICY
from .helpers import WAIT, EventLog, run_with_checkpoints


def _engine_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("tinkex-recovery-")]


class RecordingStatus:
    """The simulator's status source, recording which runs were read; ``hold`` blocks reads until released."""

    def __init__(self, sim: SimulatedTinker, *, hold: bool = False) -> None:
        self.sim = sim
        self.cond = threading.Condition()
        self.read: list[str] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()

    def get_training_run(self, run_id: str) -> Any:
        with self.cond:
            self.read.append(run_id)
            self.cond.notify_all()
        assert self.gate.wait(WAIT)
        return self.sim.get_training_run(run_id)

    def list_checkpoints(self, run_id: str) -> Any:
        return self.sim.list_checkpoints(run_id)

    def wait_read(self, run_id: str) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: run_id in self.read, WAIT), f"{run_id} never read: {self.read}"


def test_a_run_watched_again_while_its_old_recovery_runs_recovers_after_it(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    entered, go = threading.Event(), threading.Event()

    def hold(path: str) -> None:
        entered.set()
        assert go.wait(WAIT)

    sim.on_restore(hold)
    engine = make_engine(attempt_timeout=600.0)
    old = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    assert old.check_now()
    assert entered.wait(WAIT)
    old.unwatch()  # its loop left mid-restore; the restore goes on, unwatched
    again = engine.watch(client.model_id, sim)
    assert again.check_now()  # a recovery is due: it waits for the old one, it is not refused for good
    sim.on_restore(None)
    go.set()
    recovery = again.wait_for_recovery(timeout=WAIT)
    assert recovery.old_run_id == client.model_id and again.state is RunState.WATCHING
    assert again.run_id == recovery.new_run_id and len(sim.restore_calls) == 2
    assert engine.watched_runs == [recovery.new_run_id]
    again.request_recovery()  # and the lineage goes on recovering as any other
    assert again.wait_for_recovery(timeout=WAIT).old_run_id == recovery.new_run_id


def test_a_blocked_subscriber_never_stalls_polls(sim: SimulatedTinker, clock: FakeClock) -> None:
    a, b = run_with_checkpoints(sim), run_with_checkpoints(sim)
    status = RecordingStatus(sim)
    released = threading.Event()
    engine = RecoveryEngine(RecoveryPolicy(**ENGINE_POLICY), status=status, poll_concurrency=1, clock=clock)
    engine.subscribe(lambda event: released.wait(WAIT) if event.kind is EventKind.DETECTED else None)
    with engine:
        ha, hb = engine.watch(a.model_id, sim), engine.watch(b.model_id, sim)
        sim.corrupt(a.model_id)
        first = ha.check_soon()  # its `detected` event blocks the subscriber, and so the notifier
        status.wait_read(a.model_id)
        second = hb.check_soon()  # the one poll worker is free: it polls at once
        status.wait_read(b.model_id)
        assert not first.done()  # its answer comes after its events, which wait for the subscriber
        released.set()
        assert first.result(timeout=WAIT) is True and second.result(timeout=WAIT) is False
        ha.wait_for_recovery(timeout=WAIT)


def test_a_check_whose_poll_ends_after_close_raises_engine_closed(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = run_with_checkpoints(sim)
    status = RecordingStatus(sim, hold=True)
    engine = RecoveryEngine(RecoveryPolicy(**ENGINE_POLICY), status=status, clock=clock).start()
    handle = engine.watch(client.model_id, sim)
    checked = handle.check_soon()
    status.wait_read(client.model_id)
    engine.close(timeout=0.05)  # the poll is still blocked in its read
    status.gate.set()
    with pytest.raises(EngineClosed):
        checked.result(timeout=WAIT)


def test_a_cancelled_waiter_does_not_break_close(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    engine = RecoveryEngine(RecoveryPolicy(**ENGINE_POLICY), clock=clock).start()
    handle = engine.watch(client.model_id, sim)
    waiting = handle.when_ready()
    assert waiting.cancel()
    kept = handle.when_ready()
    engine.close()  # wakes the waiters: the cancelled one is passed over, not set
    assert kept.done() and waiting.cancelled() and not _engine_threads()


def test_waiters_that_gave_up_are_not_kept(sim: SimulatedTinker, make_engine: Any) -> None:
    client = sim.create_lora_training_client(base_model="m")
    handle = make_engine().watch(client.model_id, sim)
    live = handle.when_ready()
    gone = []
    for _ in range(2_000):
        waiter = handle.when_ready()
        waiter.cancel()  # what asyncio.wait_for does to the wrapped future when its wait times out
        gone.append(weakref.ref(waiter))
        del waiter
    gc.collect()
    assert sum(ref() is not None for ref in gone) <= 32
    handle.request_recovery()  # no checkpoint: exhausted; the live waiter is woken
    assert live.result(timeout=WAIT) is None


class OwnRestService:
    """A service whose REST client is made on demand and records whether it is open."""

    def __init__(self, sim: SimulatedTinker, opened: list[object]) -> None:
        self._sim = sim
        self._opened = opened

    def create_training_client_from_state(self, *args: Any, **kwargs: Any) -> Any:
        return self._sim.create_training_client_from_state(*args, **kwargs)

    def create_training_client_from_state_with_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        return self._sim.create_training_client_from_state_with_optimizer(*args, **kwargs)

    def create_rest_client(self) -> Any:
        rest = self._sim.create_rest_client()
        opened = self._opened
        opened.append(rest)

        class Closing:
            get_training_run, list_checkpoints = rest.get_training_run, rest.list_checkpoints

            def close(self) -> None:
                opened.remove(rest)

        return Closing()


def test_rest_clients_are_closed_with_the_last_run_that_reads_through_them(
    sim: SimulatedTinker, make_engine: Any
) -> None:
    engine = make_engine()
    opened: list[object] = []
    run = sim.create_lora_training_client(base_model="m").model_id
    for _ in range(1_000):  # a long-lived engine, a new service each time
        handle = engine.watch(run, OwnRestService(sim, opened))
        assert len(opened) == 1
        handle.unwatch()
        assert opened == []
    shared = OwnRestService(sim, opened)
    other = sim.create_lora_training_client(base_model="m").model_id
    first, second = engine.watch(run, shared), engine.watch(other, shared)
    assert len(opened) == 1  # one client per service
    first.unwatch()
    assert len(opened) == 1 and not second.check_now()  # the other run still reads through it
    second.unwatch()
    assert opened == []


def test_a_rest_client_outlives_its_run_while_a_recovery_reads_through_it(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    entered, go = threading.Event(), threading.Event()
    sim.on_restore(lambda path: (entered.set(), go.wait(WAIT)))
    opened: list[object] = []
    engine = make_engine(attempt_timeout=600.0)
    handle = engine.watch(client.model_id, OwnRestService(sim, opened))
    sim.corrupt(client.model_id)
    assert handle.check_now() and entered.wait(WAIT)
    handle.unwatch()
    assert len(opened) == 1  # the recovery under way still reads the run
    go.set()
    events.wait_for(EventKind.COMPLETED)
    assert not opened  # released before the `completed` event
