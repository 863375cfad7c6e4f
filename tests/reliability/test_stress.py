"""Stress and soak: many runs, many corruptions, injected failures; nothing lost, nothing recovered twice."""

from __future__ import annotations

import gc
import random
import threading
import tracemalloc
from collections import Counter

from tinkex_recovery import EventKind, FakeClock, RecoveryEngine, RecoveryPolicy
from tinkex_recovery.simulated import SimulatedTinker

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
    with RecoveryEngine(policy, max_concurrent=4, clock=clock) as engine:
        engine.subscribe(events)
        handles = {run_id: engine.watch(run_id, sim) for run_id in runs}
        for run_id in corrupted:
            sim.corrupt(run_id)
        # Several overlapping poll cycles see the same corrupted runs while their recoveries are under way.
        pollers = [threading.Thread(target=engine.poll_once) for _ in range(3)]
        for t in pollers:
            t.start()
        for t in pollers:
            t.join(WAIT)
        events.wait_for(EventKind.COMPLETED, count=200, timeout=60)
        peak_threads = threading.active_count()
        assert engine._executor.peak_running <= 4

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


def test_soak_random_faults_memory_threads_and_queues_stay_flat() -> None:
    rng = random.Random(1234)
    clock = FakeClock()
    sim = SimulatedTinker(clock=clock)
    runs = seeded_runs(sim, 40)
    events = EventLog()
    policy = RecoveryPolicy(enabled=True, backoff=0.0, max_backoff=0.0, max_attempts=5)
    with RecoveryEngine(policy, max_concurrent=2, poll_concurrency=4, clock=clock) as engine:
        engine.subscribe(events)
        handles = [engine.watch(r, sim) for r in runs]
        samples: list[tuple[int, int]] = []
        tracemalloc.start()
        try:
            for cycle in range(300):
                if rng.random() < 0.3:
                    sim.fail_polls(rng.randint(1, 5))
                if rng.random() < 0.1:
                    handle = rng.choice(handles)
                    sim.corrupt(handle.run_id)
                    if rng.random() < 0.5:
                        sim.fail_restores(1, from_run=handle.run_id)
                engine.poll_once()
                # Let the recoveries started by this cycle finish before the next, so counts are comparable.
                events.wait_until(lambda: engine._executor.running == 0 and not engine._executor._ready)
                if cycle % 50 == 49:
                    gc.collect()
                    samples.append((tracemalloc.get_traced_memory()[0], threading.active_count()))
        finally:
            tracemalloc.stop()
        assert len(engine.watched_runs) == 40  # one current run per lineage, however many recoveries
        assert not engine._executor._delayed and not engine._executor._ready
    first_mem, first_threads = samples[0]
    for mem, threads in samples[1:]:
        assert threads == first_threads
        # Growth would be the events the test itself records, not the engine: allow that, nothing more.
        assert mem - first_mem < 2_000_000
    assert Counter(e.kind for e in events.events)[EventKind.EXHAUSTED] == 0
