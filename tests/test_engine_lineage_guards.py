"""What the engine refuses and what it reports about a lineage's polls: a recovery asked for while one is under
way or after the lineage is exhausted, a non-callable ``step_of``, a late poll failure of a run already replaced,
and the log line that tells the operator polls answer again."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from tinkex_recovery import EventKind, RecoveryEngine, RunHandle, RunState
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT, EventLog, run_with_checkpoints


def corrupted(
    sim: SimulatedTinker, make_engine: Any, events: EventLog, until: EventKind, **policy: Any
) -> tuple[RecoveryEngine, RunHandle]:
    """A watched run with checkpoints, corrupted and polled; returns once ``until`` was emitted."""
    client = run_with_checkpoints(sim)
    engine = make_engine(**policy)
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    events.wait_for(until)
    return engine, handle


def test_asking_for_a_recovery_while_one_is_under_way_is_refused_and_starts_no_second_one(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    """``request_recovery()`` on a run being recovered raises, and the one recovery goes on alone."""
    sim.hang_restores(1, then="succeed")
    _, handle = corrupted(sim, make_engine, events, EventKind.CHECKPOINT_SELECTED, attempt_timeout=30.0)
    lost = handle.run_id
    with pytest.raises(RuntimeError, match="recovering"):
        handle.request_recovery()
    sim.release()
    recovery = handle.wait_for_recovery(WAIT)
    assert recovery.old_run_id == lost and len(handle.recoveries) == 1
    assert len(sim.restore_calls) == 1 and events.kinds().count("completed") == 1


def test_asking_for_a_recovery_of_an_exhausted_run_is_refused_and_does_not_revive_it(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    """An exhausted lineage stays exhausted: ``request_recovery()`` raises and calls no restore."""
    sim.fail_restores(5)
    engine, handle = corrupted(sim, make_engine, events, EventKind.EXHAUSTED, max_attempts=1)
    with pytest.raises(RuntimeError, match="exhausted"):
        handle.request_recovery()
    engine.poll_once()
    assert handle.state is RunState.EXHAUSTED and len(sim.restore_calls) == 1
    assert events.kinds().count("detected") == 1


def test_a_step_of_that_cannot_be_called_is_refused_when_the_run_is_watched(
    sim: SimulatedTinker, make_engine: Any
) -> None:
    """``watch(step_of=5)`` fails at once, naming the argument, instead of failing mid-incident."""
    client = run_with_checkpoints(sim)
    engine = make_engine()
    with pytest.raises(TypeError, match="step_of must be callable, got int"):
        engine.watch(client.model_id, sim, step_of=5)
    assert engine.watched_runs == []


class HeldFirstPoll:
    """A status source whose first ``get_training_run`` is held until ``release`` and then fails: a poll of the
    old run that answers after the run was already replaced. Every other call reads the simulator."""

    def __init__(self, sim: SimulatedTinker) -> None:
        self.sim = sim
        self.held = threading.Event()
        self.release = threading.Event()
        self._first = True
        self._lock = threading.Lock()

    def get_training_run(self, run_id: str) -> Any:
        with self._lock:
            first, self._first = self._first, False
        if first:
            self.held.set()
            assert self.release.wait(WAIT)
            raise ConnectionError(f"the poll of {run_id} timed out")
        return self.sim.get_training_run(run_id)

    def list_checkpoints(self, run_id: str) -> Any:
        return self.sim.list_checkpoints(run_id)


def test_a_late_poll_failure_of_the_replaced_run_counts_neither_as_its_error_nor_against_the_new_run(
    sim: SimulatedTinker, make_engine: Any, events: EventLog
) -> None:
    """The degraded warning of the recovered run counts only its own failed polls: a poll of the old run that
    fails after the recovery is not reported, and does not bring the new run's warning one failure closer."""
    client = run_with_checkpoints(sim)
    status = HeldFirstPoll(sim)
    engine = make_engine(degraded_after=2)
    handle = engine.watch(client.model_id, sim, status=status)
    late_poll = threading.Thread(target=engine.poll_once, name="late-poll")
    late_poll.start()
    assert status.held.wait(WAIT)
    sim.corrupt(client.model_id)
    engine.poll_once()  # a second poll sees the corruption; the first is still waiting for its answer
    new_run = handle.wait_for_recovery(WAIT).new_run_id
    status.release.set()  # the first poll of the old run fails now
    late_poll.join(WAIT)
    assert not late_poll.is_alive()
    sim.fail_polls(1)
    engine.poll_once()  # the new run's first failed poll: one, below degraded_after
    assert [e.run_id for e in events.of(EventKind.POLL_ERROR)] == [new_run]
    assert events.of(EventKind.POLL_DEGRADED) == []


@pytest.mark.parametrize("failures", [1, 2, 3])
def test_the_log_says_polls_answer_again_once_the_run_had_been_reported_degraded(
    sim: SimulatedTinker, make_engine: Any, events: EventLog, caplog: pytest.LogCaptureFixture, failures: int
) -> None:
    """The operator who was told polls fail (``poll_degraded``, after ``degraded_after`` failures in a row)
    reads in the log when they answer again; a failure or two below the threshold is not worth the line."""
    logged = failures >= 2  # degraded_after
    client = run_with_checkpoints(sim)
    engine = make_engine(degraded_after=2)
    engine.watch(client.model_id, sim)
    sim.fail_polls(failures)
    for _ in range(failures):
        engine.poll_once()
    assert bool(events.of(EventKind.POLL_DEGRADED)) is logged
    with caplog.at_level(logging.INFO, logger="tinkex_recovery"):
        engine.poll_once()
    lines = [r.getMessage() for r in caplog.records if "polls answer again" in r.getMessage()]
    expected = [f"run {client.model_id}: polls answer again after {failures} failures"] if logged else []
    assert lines == expected
