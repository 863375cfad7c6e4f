"""The bounded executor: slots, FIFO order, duplicates, retries that wait without a slot, timeouts."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_mock import MockerFixture

from tinkex_recovery import FakeClock
from tinkex_recovery._executor import Executor, Outcome, OutcomeKind

from .helpers import WAIT


class Tracker:
    """Shared record of which attempts ran, and how many at once."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.started: list[str] = []
        self.outcomes: list[tuple[str, OutcomeKind]] = []
        self.running = 0
        self.peak = 0

    def wait(self, predicate: object, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, WAIT), what  # type: ignore[arg-type]


class ScriptedJob:
    """Each attempt waits for its gate (if gated), then fails until ``failures`` run out."""

    def __init__(self, key: str, tracker: Tracker, *, failures: int = 0, delay: float = 0.0, gated: bool = False):
        self.key = key
        self.tracker = tracker
        self.failures = failures
        self.delay = delay
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def run_attempt(self, deadline: float) -> Outcome:
        t = self.tracker
        with t.cond:
            t.started.append(self.key)
            t.running += 1
            t.peak = max(t.peak, t.running)
            t.cond.notify_all()
        self.gate.wait(WAIT)
        with t.cond:
            t.running -= 1
        if self.failures:
            self.failures -= 1
            return Outcome(OutcomeKind.FAILED, error=RuntimeError("boom"))
        return Outcome(OutcomeKind.DONE, value=self.key)

    def on_outcome(self, outcome: Outcome) -> float | None:
        with self.tracker.cond:
            self.tracker.outcomes.append((self.key, outcome.kind))
            self.tracker.cond.notify_all()
        return self.delay if outcome.kind is not OutcomeKind.DONE else None


@pytest.fixture
def tracker() -> Tracker:
    return Tracker()


@pytest.fixture
def executor(clock: FakeClock) -> Iterator[Executor]:
    ex = Executor(max_concurrent=2, attempt_timeout=30.0, clock=clock)
    ex.start()
    yield ex
    ex.close()


def test_at_most_max_concurrent_run_and_they_start_in_fifo_order(executor: Executor, tracker: Tracker) -> None:
    jobs = [ScriptedJob(f"run-{i}", tracker, gated=True) for i in range(5)]
    for job in jobs:
        assert executor.submit(job)
    tracker.wait(lambda: len(tracker.started) == 2, "two attempts start")
    assert tracker.started == ["run-0", "run-1"] and executor.running == 2
    for job in jobs:
        job.gate.set()
    tracker.wait(lambda: len(tracker.outcomes) == 5, "all finish")
    assert tracker.started == [f"run-{i}" for i in range(5)]
    assert tracker.peak == 2 and executor.peak_running == 2


def test_a_duplicate_request_is_refused_until_the_first_finishes(executor: Executor, tracker: Tracker) -> None:
    first = ScriptedJob("run-a", tracker, gated=True)
    assert executor.submit(first)
    assert not executor.submit(ScriptedJob("run-a", tracker))
    assert executor.pending("run-a")
    first.gate.set()
    tracker.wait(lambda: tracker.outcomes == [("run-a", OutcomeKind.DONE)], "first finishes")
    tracker.wait(lambda: not executor.pending("run-a"), "key released")
    assert executor.submit(ScriptedJob("run-a", tracker))


def test_a_finished_attempt_leaves_no_thread_once_its_outcome_is_handled(
    executor: Executor, tracker: Tracker, mocker: MockerFixture
) -> None:
    attempt = Executor._attempt

    def slow_to_exit(self: Executor, slot: object) -> None:
        attempt(self, slot)  # type: ignore[arg-type]
        threading.Event().wait(0.05)  # the thread outlives its published outcome, as it may under load

    mocker.patch.object(Executor, "_attempt", slow_to_exit)
    alive_at_outcome: list[bool] = []

    class Observed(ScriptedJob):
        def on_outcome(self, outcome: Outcome) -> float | None:
            alive_at_outcome.append(any(t.name.startswith("tinkex-recovery-attempt") for t in threading.enumerate()))
            return super().on_outcome(outcome)

    executor.submit(Observed("run-a", tracker))
    tracker.wait(lambda: tracker.outcomes == [("run-a", OutcomeKind.DONE)], "the attempt finishes")
    assert alive_at_outcome == [False] and executor.running == 0


def test_a_waiting_retry_holds_no_slot(clock: FakeClock, tracker: Tracker) -> None:
    ex = Executor(max_concurrent=1, attempt_timeout=30.0, clock=clock)
    ex.start()
    try:
        retrying = ScriptedJob("run-retry", tracker, failures=1, delay=10.0)
        other = ScriptedJob("run-other", tracker)
        ex.submit(retrying)
        tracker.wait(lambda: ("run-retry", OutcomeKind.FAILED) in tracker.outcomes, "first attempt fails")
        ex.submit(other)
        tracker.wait(lambda: ("run-other", OutcomeKind.DONE) in tracker.outcomes, "the other job runs meanwhile")
        assert tracker.started == ["run-retry", "run-other"]
        clock.advance(10.0)
        tracker.wait(lambda: ("run-retry", OutcomeKind.DONE) in tracker.outcomes, "the retry runs after its delay")
        assert 10.0 in clock.waits
    finally:
        ex.close()


def test_attempt_timeout_abandons_a_hung_attempt(executor: Executor, clock: FakeClock, tracker: Tracker) -> None:
    hung = ScriptedJob("run-hung", tracker, gated=True)
    executor.submit(hung)
    tracker.wait(lambda: tracker.started == ["run-hung"], "attempt starts")
    clock.advance(30.0)
    tracker.wait(lambda: tracker.outcomes == [("run-hung", OutcomeKind.TIMED_OUT)], "attempt times out")
    hung.gate.set()


def test_invalid_max_concurrent(clock: FakeClock) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_concurrent"):
            Executor(max_concurrent=bad, attempt_timeout=1, clock=clock)  # type: ignore[arg-type]


def test_close_is_idempotent_and_refuses_new_work(clock: FakeClock, tracker: Tracker) -> None:
    ex = Executor(max_concurrent=1, attempt_timeout=1, clock=clock)
    ex.start()
    ex.close()
    ex.close()
    assert not ex.submit(ScriptedJob("late", tracker))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.lists(st.integers(0, 2), min_size=1, max_size=12))
def test_never_more_than_max_concurrent(max_concurrent: int, failures: list[int]) -> None:
    clock = FakeClock()
    tracker = Tracker()
    ex = Executor(max_concurrent=max_concurrent, attempt_timeout=30.0, clock=clock)
    ex.start()
    try:
        for i, n in enumerate(failures):
            assert ex.submit(ScriptedJob(f"run-{i}", tracker, failures=n))
        done = len(failures)
        tracker.wait(lambda: sum(k is OutcomeKind.DONE for _, k in tracker.outcomes) == done, "all done")
        assert tracker.peak <= max_concurrent
        assert len(tracker.started) == len(failures) + sum(failures)
    finally:
        ex.close()


class PerKeyTracker(Tracker):
    def __init__(self) -> None:
        super().__init__()
        self.per_key: dict[str, int] = {}
        self.overlap = False


class PerKeyJob(ScriptedJob):
    def run_attempt(self, deadline: float) -> Outcome:
        t = self.tracker
        assert isinstance(t, PerKeyTracker)
        with t.cond:
            t.per_key[self.key] = t.per_key.get(self.key, 0) + 1
            t.overlap |= t.per_key[self.key] > 1
        try:
            return super().run_attempt(deadline)
        finally:
            with t.cond:
                t.per_key[self.key] -= 1


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 2)), min_size=1, max_size=15))
def test_a_key_is_never_in_two_recoveries_at_once(requests: list[tuple[str, int]]) -> None:
    clock = FakeClock()
    tracker = PerKeyTracker()
    ex = Executor(max_concurrent=3, attempt_timeout=30.0, clock=clock)
    ex.start()
    gate = threading.Event()  # every attempt holds its slot until all requests are in and the slots are full
    try:
        jobs = [PerKeyJob(key, tracker, failures=n, gated=True) for key, n in requests]
        for job in jobs:
            job.gate = gate
        accepted = sum(ex.submit(job) for job in jobs)
        tracker.wait(lambda: len(tracker.started) >= min(3, accepted), "the slots fill up")
        gate.set()
        tracker.wait(lambda: sum(k is OutcomeKind.DONE for _, k in tracker.outcomes) == accepted, "all done")
        assert not tracker.overlap and accepted == len({key for key, _ in requests})
    finally:
        gate.set()
        ex.close()
