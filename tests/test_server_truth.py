"""The server is the truth: a recovery that abandons a call never makes a restore call afterwards, and every run
it made and did not adopt is named (an event, a WARNING) from the account's listing, at its end or at close().
Each abandon point (first read, listing, restore) by attempt_timeout, close() and a leaving guard is a row of the
fault matrix (``tests/reliability/test_fault_matrix.py``, over HTTP); these are the cases beside it.

The simulator acts as the real service does: a restore that reached it makes its run, whatever the client does
after (cancelled, timed out, gone).
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any

import pytest

from tinkex_recovery import (
    EventKind,
    ExhaustedReason,
    FakeClock,
    RecoveryEngine,
    RecoveryExhausted,
    RecoveryPolicy,
)
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT, EventLog, Gate, LostAnswers, join_attempt_threads, run_with_checkpoints


def new_runs(sim: SimulatedTinker, old: str) -> list[str]:
    join_attempt_threads()
    return [r for r in sim.run_ids if r != old]


def named(events: EventLog) -> set[str]:
    kinds = (EventKind.CLIENT_DISCARDED, EventKind.RUN_ORPHANED)
    return {str(e.new_run_id) for e in events.events if e.kind in kinds}


# -- the first read ---------------------------------------------------------------------------------------------
def test_a_slow_first_read_is_retried_after_backoff_and_the_abandoned_read_restores_nothing(
    sim: SimulatedTinker, clock: FakeClock, make_engine: Any, events: EventLog
) -> None:
    client = run_with_checkpoints(sim)
    gate = Gate()
    sim.on_read(gate)
    engine = make_engine(attempt_timeout=20.0)
    handle = engine.watch(client.model_id, sim)
    handle.request_recovery()
    assert gate.reached.wait(WAIT)  # the first read of the run is under way and does not answer
    clock.advance(20.0)
    (failed,) = events.wait_for(EventKind.FAILED)
    assert failed.will_retry and "attempt_timeout" in str(failed.error)  # not `internal`: retried under the policy
    clock.advance(5.0)  # backoff=5
    recovery = handle.wait_for_recovery(WAIT)
    gate.open()  # the abandoned read answers now: nothing may follow from it
    assert new_runs(sim, client.model_id) == [recovery.new_run_id]
    assert len(sim.restore_calls) == 1


# -- the restore ------------------------------------------------------------------------------------------------
def test_a_run_whose_answer_was_lost_is_named_from_the_listing_when_the_recovery_ends(
    sim: SimulatedTinker, clock: FakeClock, make_engine: Any, events: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    client = run_with_checkpoints(sim)
    service = LostAnswers(sim)
    engine = make_engine(attempt_timeout=20.0)
    handle = engine.watch(client.model_id, service)
    sim.corrupt(client.model_id)
    with caplog.at_level(logging.WARNING, logger="tinkex_recovery"):
        engine.poll_once()
        assert service.reached.wait(WAIT)
        for n in (1, 2, 3):  # every attempt waits for the one call sent: none sends another
            clock.advance(20.0)
            events.wait_for(EventKind.FAILED, count=n)
            if n < 3:
                events.wait_until(lambda: engine._executor.delayed == 1)
                clock.advance(5.0 * 2 ** (n - 1))
                events.wait_for(EventKind.STARTED, count=n + 1)  # its deadline is set: attempt_timeout from now
        with pytest.raises(RecoveryExhausted, match="has not answered"):
            handle.wait_for_recovery(WAIT)
        (orphaned,) = events.wait_for(EventKind.RUN_ORPHANED)
    (lost,) = new_runs(sim, client.model_id)
    assert len(sim.restore_calls) == 1
    assert orphaned.new_run_id == lost and orphaned.run_id == client.model_id and orphaned.reason == "abandoned"
    assert any(lost in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    service.cancel_all()


@pytest.mark.parametrize("seed", range(12))
def test_a_restore_answering_while_close_runs_is_never_left_unnamed(seed: int) -> None:
    """The race of the issue (3 in 200): the restore answers just as close() runs. Every run made is adopted or
    named; none is both, none is neither."""
    clock = FakeClock()
    sim = SimulatedTinker(clock=clock)
    client = run_with_checkpoints(sim)
    events = EventLog()
    reached = threading.Event()
    sim.on_restore(lambda path: reached.set())
    sim.hang_restores(1, then="succeed", future=True)
    engine = RecoveryEngine(RecoveryPolicy(enabled=True, poll_interval=3600.0, attempt_timeout=20.0), clock=clock)
    engine.subscribe(events)
    engine.start()
    handle = engine.watch(client.model_id, sim)
    sim.corrupt(client.model_id)
    engine.poll_once()
    assert reached.wait(WAIT)
    releaser = threading.Timer(0.0005 * seed, sim.release)
    releaser.start()
    engine.close(timeout=0.5)
    releaser.join()
    (made,) = new_runs(sim, client.model_id)
    adopted = {r.new_run_id for r in handle.recoveries}
    assert (made in adopted) != (made in named(events)), (adopted, events.kinds())


# -- split brain: two engines (two processes) racing on one lineage -------------------------------------------
class Turns:
    """Lets the steps of two recoveries (listing before, restore, listing after) happen in a given order: each
    step waits for its turn and passes it on when it ends; a recovery that has ended gives up its turns."""

    def __init__(self, order: str) -> None:
        self._order = order
        self._pos = 0
        self._cond = threading.Condition()
        self.done: set[str] = set()

    def _skip(self) -> None:
        while self._pos < len(self._order) and self._order[self._pos] in self.done:
            self._pos += 1

    def _turn_of(self, name: str) -> bool:
        self._skip()
        return self._pos >= len(self._order) or self._order[self._pos] == name

    def step(self, name: str, fn: Any) -> Any:
        with self._cond:
            assert self._cond.wait_for(lambda: self._turn_of(name), WAIT)
        try:
            return fn()
        finally:
            with self._cond:
                self._pos += 1
                self._cond.notify_all()

    def finish(self, name: str) -> None:
        with self._cond:
            self.done.add(name)
            self._cond.notify_all()


class Process:
    """One process's view of the shared service: its restores and listings take their turns."""

    def __init__(self, sim: SimulatedTinker, name: str, turns: Turns) -> None:
        self.sim, self.name, self.turns = sim, name, turns

    def get_training_run(self, run_id: str) -> Any:
        return self.sim.get_training_run(run_id)

    def list_checkpoints(self, run_id: str) -> Any:
        return self.sim.list_checkpoints(run_id)

    def list_training_runs(self, limit: int = 20, offset: int = 0) -> Any:
        return self.turns.step(self.name, lambda: self.sim.list_training_runs(limit=limit, offset=offset))

    def create_training_client_from_state_with_optimizer(self, path: str, user_metadata: Any = None) -> Any:
        method = self.sim.create_training_client_from_state_with_optimizer
        return self.turns.step(self.name, lambda: method(path, user_metadata=user_metadata).result())

    create_training_client_from_state = create_training_client_from_state_with_optimizer


ORDERS = sorted({"".join(p) for p in itertools.permutations("AAABBB")})


@pytest.mark.parametrize("order", ORDERS)
def test_two_processes_recovering_one_run_leave_exactly_one_loop_training(order: str) -> None:
    clock = FakeClock()
    sim = SimulatedTinker(clock=clock)
    client = run_with_checkpoints(sim)
    turns = Turns(order)
    policy = RecoveryPolicy(enabled=True, poll_interval=3600.0, jitter=0.0, max_attempts=1)
    events = EventLog()
    outcomes: dict[str, Any] = {}
    with (
        RecoveryEngine(policy, status=Process(sim, "A", turns), clock=clock) as a,
        RecoveryEngine(policy, status=Process(sim, "B", turns), clock=clock) as b,
    ):
        handles = {}
        for name, engine in (("A", a), ("B", b)):
            engine.subscribe(events)
            handles[name] = engine.watch(client.model_id, Process(sim, name, turns))
        sim.corrupt(client.model_id)

        def wait(name: str) -> None:
            try:
                outcomes[name] = handles[name].wait_for_recovery(WAIT)
            except RecoveryExhausted as exc:
                outcomes[name] = exc
            turns.finish(name)

        waiters = [threading.Thread(target=wait, args=(n,)) for n in "AB"]
        for engine in (a, b):
            engine.poll_once()
        for t in waiters:
            t.start()
        for t in waiters:
            t.join(WAIT)
    recovered = [n for n, o in outcomes.items() if not isinstance(o, RecoveryExhausted)]
    assert len(recovered) == 1, outcomes  # never two loops training on
    (winner,) = recovered
    loser = outcomes["B" if winner == "A" else "A"]
    assert loser.reason is ExhaustedReason.FORKED and loser.winner == outcomes[winner].new_run_id
    made = [r for r in sim.run_ids if r != client.model_id]
    assert 1 <= len(made) <= 2 and outcomes[winner].new_run_id in made
    restored = [i for i, n in enumerate(order) if n == winner][1]  # the winner's restore is its second step
    if order.index("B" if winner == "A" else "A") > restored:  # the loser's first listing saw the winner's run
        assert len(made) == 1  # so it never restored
    orphans = {str(e.new_run_id) for e in events.of(EventKind.RUN_ORPHANED) if e.reason == "forked"}
    assert orphans == set(made) - {outcomes[winner].new_run_id}  # the loser's run, if it made one, is named
