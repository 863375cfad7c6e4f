"""Shutdown during an in-flight recovery: every thread gone within a second, nothing fires afterwards.

The restore in flight is a future that has not completed when the threads are counted (it completes only after,
or never): a test that released it first could not see a thread left waiting on it.
"""

from __future__ import annotations

import threading
import time

import pytest

from tinkex_recovery import EventKind, FakeClock, RecoveryEngine, RecoveryPolicy
from tinkex_recovery.simulated import SimulatedTinker

from ..helpers import EventLog, run_with_checkpoints


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tinkex-recovery")]


@pytest.mark.parametrize("stage", ["backoff", "restore"])
def test_close_during_a_recovery_stops_every_thread_within_a_second(
    sim: SimulatedTinker, clock: FakeClock, events: EventLog, stage: str
) -> None:
    callbacks: list[object] = []
    client = run_with_checkpoints(sim)
    if stage == "backoff":
        sim.fail_restores(1)  # the recovery waits out its backoff when the engine closes
    policy = RecoveryPolicy(enabled=True, on_recovery=callbacks.append, on_failure=callbacks.append)
    engine = RecoveryEngine(policy, clock=clock)
    engine.subscribe(events)
    engine.start()
    engine.watch(client.model_id, sim)
    if stage == "restore":
        sim.hang_restores(1, then="succeed", future=True)  # in flight, pending until release()
    sim.corrupt(client.model_id)
    engine.poll_once()
    events.wait_for(EventKind.FAILED if stage == "backoff" else EventKind.CHECKPOINT_SELECTED)
    started = time.monotonic()
    engine.close(timeout=1.0)
    seen = len(events.events)
    alive = [t.name for t in engine_threads() if (t.join(1.0), t.is_alive())[1]]  # the restore still pending
    assert not alive and time.monotonic() - started < 2.5
    sim.release()  # the restore completes after close: nothing may act on it
    assert len(events.events) == seen and callbacks == []


@pytest.mark.lightning
def test_an_exception_in_training_step_during_a_recovery_stops_every_thread(
    tmp_path: object, sim: SimulatedTinker, clock: FakeClock
) -> None:
    from ..test_lightning import RemoteModule, TinkexRecovery, loader, make_trainer

    def lose_run_then_fail(module: RemoteModule) -> None:
        # The restore is in flight when the step fails, and completes only after fit has ended.
        sim.hang_restores(1, then="succeed", future=True)
        sim.corrupt(module.training_client.model_id)
        assert module.cb is not None and module.cb.handle is not None and module.cb.handle.check_now()
        for _ in range(500):
            if sim.restore_calls:
                break
            threading.Event().wait(0.01)
        assert sim.restore_calls
        raise RuntimeError("a bug in the step, while a recovery is in flight")

    module = RemoteModule(sim, mid={2: lose_run_then_fail})  # after the checkpoint at step 2
    cb = TinkexRecovery(clock=clock, retry_failed_step=False)
    module.cb = cb
    trainer = make_trainer(tmp_path, cb)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="a bug in the step"):
        trainer.fit(module, loader(4))
    alive = [t.name for t in engine_threads() if (t.join(1.0), t.is_alive())[1]]  # the restore still pending
    assert not alive and time.monotonic() - started < 5
    sim.release()
    assert cb.lineage == ()  # the recovery finished after close: nothing was swapped in or recorded
