"""Stress and soak: many runs, many corruptions, injected failures; nothing lost, nothing recovered twice.

What happened is counted on the simulated Tinker's books, not from the engine's own counters: each run it holds
records, in its user_metadata, the run it was restored from; and a gated service counts the restore calls in
flight at once, as a server sees them.
"""

from __future__ import annotations

import gc
import random
import threading
import tracemalloc
from collections import Counter
from collections.abc import Collection, Mapping
from typing import Any

from tinkex_recovery import EventKind, FakeClock, RecoveryEngine, RecoveryPolicy
from tinkex_recovery.simulated import SimulatedRestClient, SimulatedTinker, SimulatedTrainingClient

from ..helpers import WAIT, EventLog


def seeded_runs(sim: SimulatedTinker, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        client = sim.create_lora_training_client(base_model="m")
        client.forward_backward([0]).result()
        client.optim_step().result()
        client.save_state("0001", user_metadata={"step": "1"}).result()
        ids.append(client.model_id)
    return ids


FROM_RUN = "tinkex_recovery.recovered_from_run"


def new_runs_per_old_run(sim: SimulatedTinker, seeded: Collection[str]) -> Counter[str]:
    """For every run the server created beyond ``seeded``: the run it was restored from, counted. A new run that
    names none counts under ``"<none>"``, so it cannot go unnoticed."""
    fresh = [run_id for run_id in sim.run_ids if run_id not in seeded]
    return Counter((sim.get_training_run(run_id).user_metadata or {}).get(FROM_RUN, "<none>") for run_id in fresh)


class GatedService:
    """The simulated Tinker as the engine's service, as a server that counts the restore calls in flight at once.

    The gate starts shut: restore calls wait inside until :meth:`open_when_full` (called once every corruption was
    detected, so an engine that starts more than ``limit`` has had every chance to). From then on a call waits
    until exactly ``limit`` calls are in flight, or every recovery not yet done (of ``recoveries`` expected) is:
    a correct engine keeps its ``max_concurrent`` slots full and goes through at once. A call that waits ``WAIT``
    seconds opens the gate for good and marks the service ``stalled``. Leaving ``with service:`` opens it too, so
    a broken engine's calls never outlive the test.
    """

    def __init__(self, sim: SimulatedTinker, *, limit: int, recoveries: int) -> None:
        self._sim = sim
        self._limit = limit
        self._recoveries = recoveries
        self._cond = threading.Condition()
        self._in_flight = 0
        self._restored = 0
        self._shut = True
        self._open = False
        self.stalled = False
        self.peak_in_flight = 0

    def create_training_client_from_state(
        self, path: str, user_metadata: Mapping[str, str] | None = None
    ) -> SimulatedTrainingClient:
        return self._restore(self._sim.create_training_client_from_state, path, user_metadata)

    def create_training_client_from_state_with_optimizer(
        self, path: str, user_metadata: Mapping[str, str] | None = None
    ) -> SimulatedTrainingClient:
        return self._restore(self._sim.create_training_client_from_state_with_optimizer, path, user_metadata)

    def create_rest_client(self) -> SimulatedRestClient:
        return self._sim.create_rest_client()

    def __enter__(self) -> GatedService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def open_when_full(self) -> None:
        """Wait until ``limit`` calls are in flight, then let them through."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._in_flight >= self._limit, WAIT):
                self.stalled = self._open = True
            self._shut = False
            self._cond.notify_all()

    def _full(self) -> bool:
        if self._open:
            return True
        return not self._shut and self._in_flight == min(self._limit, self._recoveries - self._restored)

    def _restore(self, method: Any, path: str, user_metadata: Mapping[str, str] | None) -> SimulatedTrainingClient:
        with self._cond:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            self._cond.notify_all()
            if not self._cond.wait_for(self._full, WAIT):
                self.stalled = self._open = True
                self._cond.notify_all()
        client: SimulatedTrainingClient | None = None
        try:
            client = method(path, user_metadata=user_metadata).result()
            return client
        finally:
            with self._cond:
                self._in_flight -= 1
                self._restored += client is not None
                self._cond.notify_all()


def test_1000_runs_200_corrupted_each_recovered_exactly_once() -> None:
    clock = FakeClock()
    sim = SimulatedTinker(clock=clock)
    runs = seeded_runs(sim, 1000)
    rng = random.Random(7)
    corrupted = set(rng.sample(runs, 200))
    flaky = rng.sample(sorted(corrupted), 50)
    for run_id in flaky:
        sim.fail_restores(2, status_code=503, from_run=run_id)  # two passing outages each
    events = EventLog()
    baseline_threads = threading.active_count()
    policy = RecoveryPolicy(enabled=True, backoff=0.0, max_backoff=0.0, max_attempts=3)
    service = GatedService(sim, limit=4, recoveries=len(corrupted))
    with RecoveryEngine(policy, max_concurrent=4, clock=clock) as engine, service:
        engine.subscribe(events)
        handles = {run_id: engine.watch(run_id, service) for run_id in runs}
        for run_id in corrupted:
            sim.corrupt(run_id)
        # Several overlapping poll cycles see the same corrupted runs while their recoveries are under way.
        pollers = [threading.Thread(target=engine.poll_once) for _ in range(3)]
        for t in pollers:
            t.start()
        for t in pollers:
            t.join(WAIT)
        service.open_when_full()
        events.wait_for(EventKind.COMPLETED, count=200, timeout=60)
        peak_threads = threading.active_count()

    # On the server: every corrupted run has exactly one new run, no healthy run has any, no run is nameless.
    assert new_runs_per_old_run(sim, runs) == Counter(dict.fromkeys(corrupted, 1))
    assert service.peak_in_flight == 4 and not service.stalled  # max_concurrent, filled, as the service saw it
    assert peak_threads - baseline_threads <= 1 + 16 + 1 + 4  # poller, poll workers, dispatcher, attempts
    per_old_run = Counter(e.run_id for e in events.of(EventKind.COMPLETED))
    assert set(per_old_run) == corrupted and set(per_old_run.values()) == {1}
    assert len(sim.run_ids) == 1000 + 200  # no duplicate new run for any old run
    restored_from = Counter(path.split("/")[2] for path, _, _ in sim.restore_calls)
    assert set(restored_from) == corrupted  # no healthy run touched
    assert sum(restored_from.values()) == 200 + 2 * 50
    for run_id in runs:
        assert (handles[run_id].run_id == run_id) == (run_id not in corrupted)
    # No event lost: every attempt is accounted for.
    kinds = Counter(e.kind for e in events.events)
    assert kinds[EventKind.DETECTED] == 200
    assert kinds[EventKind.STARTED] == kinds[EventKind.CHECKPOINT_SELECTED] == 300
    assert kinds[EventKind.FAILED] == 100 and kinds[EventKind.CLIENT_CREATED] == 200
    assert kinds[EventKind.EXHAUSTED] == 0 and kinds[EventKind.POLL_ERROR] == 0


def settle(engine: RecoveryEngine, clock: FakeClock) -> None:
    """Let the recoveries started so far finish, taking their retries' backoff on the clock."""
    executor = engine._executor
    for _ in range(int(WAIT / 0.005)):
        with executor._cond:
            running, ready, delayed = len(executor._running), len(executor._ready), len(executor._delayed)
        if not running and not ready and not delayed:
            return
        if delayed and not running and not ready:
            clock.advance(1.0)  # only retries waiting out their backoff remain: let them run
        threading.Event().wait(0.005)
    raise AssertionError("the executor did not settle")


def test_soak_random_faults_memory_threads_and_queues_stay_flat() -> None:
    rng = random.Random(1234)
    clock = FakeClock()
    sim = SimulatedTinker(clock=clock)
    runs = seeded_runs(sim, 40)
    events = EventLog()
    policy = RecoveryPolicy(enabled=True, backoff=1.0, max_backoff=1.0, jitter=0.0, max_attempts=5)
    with RecoveryEngine(policy, max_concurrent=2, poll_concurrency=4, clock=clock) as engine:
        engine.subscribe(events)
        executor = engine._executor

        handles = [engine.watch(r, sim) for r in runs]
        corrupted: set[str] = set()
        samples: list[tuple[int, int]] = []
        tracemalloc.start()
        try:
            for cycle in range(300):
                if rng.random() < 0.3:
                    sim.fail_polls(rng.randint(1, 5))
                if rng.random() < 0.1:
                    handle = rng.choice(handles)
                    sim.corrupt(handle.run_id)
                    corrupted.add(handle.run_id)
                    if rng.random() < 0.5:
                        sim.fail_restores(1, from_run=handle.run_id)
                engine.poll_once()
                settle(
                    engine, clock
                )  # the recoveries started by this cycle finish before the next, so counts are comparable
                if cycle % 50 == 49:
                    gc.collect()
                    samples.append((tracemalloc.get_traced_memory()[0], threading.active_count()))
        finally:
            tracemalloc.stop()
        # A corruption whose polls all failed in the last cycle is found by one more.
        engine.poll_once()
        settle(engine, clock)
        assert not corrupted & {handle.run_id for handle in handles}
        assert len(engine.watched_runs) == 40  # one current run per lineage, however many recoveries
        assert not executor._delayed and not executor._ready
        assert 1.0 in clock.waits  # retries did wait out a backoff: the queue checks above were exercised
    first_mem, first_threads = samples[0]
    for mem, threads in samples[1:]:
        assert threads == first_threads
        # Growth would be the events the test itself records, not the engine: allow that, nothing more.
        assert mem - first_mem < 2_000_000
    assert Counter(e.kind for e in events.events)[EventKind.EXHAUSTED] == 0
    assert corrupted  # the seed corrupts some runs
    assert new_runs_per_old_run(sim, runs) == Counter(dict.fromkeys(corrupted, 1))  # counted on the server
