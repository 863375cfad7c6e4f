"""The bounded executor: slots, FIFO order, duplicates, retries that wait without a slot, timeouts."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_mock import MockerFixture

from tinkex_recovery import FakeClock
from tinkex_recovery._executor import Cancellation, Executor, Outcome, OutcomeKind

from .helpers import WAIT


class Tracker:
    """Shared record of which attempts ran, and how many at once."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.started: list[str] = []
        self.outcomes: list[tuple[str, OutcomeKind]] = []
        self.late: list[tuple[str, OutcomeKind]] = []
        self.crashed: list[str] = []
        self.running = 0
        self.peak = 0

    def wait(self, predicate: object, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, WAIT), what  # type: ignore[arg-type]


class ScriptedJob:
    """Each attempt waits for its gate (if gated), then fails until ``failures`` run out."""

    def __init__(
        self, key: str, tracker: Tracker, *, failures: int = 0, delay: float | None = 0.0, gated: bool = False
    ):
        self.key = key
        self.tracker = tracker
        self.failures = failures
        self.delay = delay
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def run_attempt(self, deadline: float, cancelled: Cancellation) -> Outcome:
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

    def on_late(self, outcome: Outcome) -> None:
        with self.tracker.cond:
            self.tracker.late.append((self.key, outcome.kind))
            self.tracker.cond.notify_all()

    def on_crash(self, error: BaseException) -> None:
        with self.tracker.cond:
            self.tracker.crashed.append(self.key)
            self.tracker.cond.notify_all()


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


def test_a_job_whose_key_is_busy_waits_for_the_first_then_runs(executor: Executor, tracker: Tracker) -> None:
    first = ScriptedJob("run-a", tracker, gated=True)
    second = ScriptedJob("run-a", tracker, gated=True)
    assert executor.submit(first)
    assert executor.submit(second)  # parked: never beside the first, never refused for good
    tracker.wait(lambda: tracker.started == ["run-a"], "the first starts")
    assert executor.queued == 0 and executor.running == 1
    first.gate.set()
    tracker.wait(lambda: tracker.started == ["run-a", "run-a"], "the second starts once the first has ended")
    assert tracker.outcomes == [("run-a", OutcomeKind.DONE)] and executor.pending("run-a")
    second.gate.set()
    tracker.wait(lambda: not executor.pending("run-a"), "key released after the second")
    assert tracker.outcomes == [("run-a", OutcomeKind.DONE)] * 2


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


def test_attempt_timeout_abandons_a_hung_attempt_and_its_late_result_is_never_adopted(
    executor: Executor, clock: FakeClock, tracker: Tracker
) -> None:
    hung = ScriptedJob("run-hung", tracker, gated=True, delay=None)  # no retry: the job ends at the timeout
    executor.submit(hung)
    tracker.wait(lambda: tracker.started == ["run-hung"], "attempt starts")
    clock.advance(30.0)
    tracker.wait(lambda: tracker.outcomes == [("run-hung", OutcomeKind.TIMED_OUT)], "attempt times out")
    assert executor.running == 0  # the abandoned attempt no longer holds its slot
    hung.gate.set()  # the call returns after all, with a result
    tracker.wait(lambda: tracker.late == [("run-hung", OutcomeKind.DONE)], "the late result goes to on_late")
    assert tracker.outcomes == [("run-hung", OutcomeKind.TIMED_OUT)]


def test_close_cancels_what_running_attempts_wait_for(clock: FakeClock, tracker: Tracker) -> None:
    ex = Executor(max_concurrent=2, attempt_timeout=30.0, clock=clock)
    ex.start()
    woken = threading.Event()

    class WaitsForCancel(ScriptedJob):
        def run_attempt(self, deadline: float, cancelled: Cancellation) -> Outcome:
            cancelled.on_cancel(woken.set)
            return super().run_attempt(deadline, cancelled)

    job = WaitsForCancel("run-a", tracker, gated=True)
    job.gate = woken  # the attempt blocks until it is cancelled: nothing else releases it
    ex.submit(job)
    ex.submit(ScriptedJob("run-a", tracker))  # parked behind the first: close drops it
    tracker.wait(lambda: tracker.started == ["run-a"], "attempt starts")
    ex.close(timeout=WAIT)
    assert not [t for t in threading.enumerate() if t.name.startswith("tinkex-recovery-attempt")]
    # What the cancelled attempt returned is released (on_late), never adopted, and the parked job never ran.
    assert tracker.late == [("run-a", OutcomeKind.DONE)] and tracker.outcomes == []
    assert tracker.started == ["run-a"]


def test_a_failing_outcome_handler_ends_that_job_and_the_others_go_on(executor: Executor, tracker: Tracker) -> None:
    class Broken(ScriptedJob):
        def on_outcome(self, outcome: Outcome) -> float | None:
            raise RuntimeError("a bug in outcome handling")

    executor.submit(Broken("run-broken", tracker))
    tracker.wait(lambda: tracker.crashed == ["run-broken"], "the broken job is ended through on_crash")
    assert not executor.pending("run-broken")
    executor.submit(ScriptedJob("run-ok", tracker))
    tracker.wait(lambda: tracker.outcomes == [("run-ok", OutcomeKind.DONE)], "the dispatcher still serves others")


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


class TimedTracker(Tracker):
    """Counts what the executor waits for: an attempt stops counting when it returns or is abandoned."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = 0
        self.hung = 0
        self.per_key: dict[str, int] = {}
        self.overlap = False
        self.abandoned_ids: set[int] = set()
        self.adopted_ids: list[int] = []
        self.late_ids: list[int] = []
        self.ids = itertools.count()


class TimedJob:
    """Attempt ``i`` of this job fails, succeeds, or hangs until abandoned and then returns a late success."""

    def __init__(self, key: str, tracker: TimedTracker, script: list[str]) -> None:
        self.key = key
        self.t = tracker
        self.script = list(script)

    def run_attempt(self, deadline: float, cancelled: Cancellation) -> Outcome:
        t = self.t
        behaviour = self.script.pop(0) if self.script else "ok"
        attempt_id = next(t.ids)
        with t.cond:
            t.waited += 1
            t.peak = max(t.peak, t.waited)
            t.per_key[self.key] = t.per_key.get(self.key, 0) + 1
            t.overlap |= t.per_key[self.key] > 1
            t.hung += behaviour == "hang"
            t.cond.notify_all()
        counted = [True]

        def stop_counting() -> None:
            with t.cond:
                if counted[0]:
                    counted[0] = False
                    t.waited -= 1
                    t.per_key[self.key] -= 1
                    t.cond.notify_all()

        def abandoned() -> None:
            with t.cond:
                t.abandoned_ids.add(attempt_id)
                t.hung -= behaviour == "hang"
            stop_counting()

        cancelled.on_cancel(abandoned)
        if behaviour == "hang":
            released = threading.Event()
            cancelled.on_cancel(released.set)
            assert released.wait(WAIT), "a hung attempt is abandoned once its deadline passes"
        stop_counting()
        if behaviour == "fail":
            return Outcome(OutcomeKind.FAILED, error=RuntimeError("boom"))
        return Outcome(OutcomeKind.DONE, value=attempt_id)

    def on_outcome(self, outcome: Outcome) -> float | None:
        with self.t.cond:
            self.t.outcomes.append((self.key, outcome.kind))
            if outcome.kind is OutcomeKind.DONE:
                self.t.adopted_ids.append(outcome.value)
            self.t.cond.notify_all()
        return None if outcome.kind is OutcomeKind.DONE else 1.0

    def on_late(self, outcome: Outcome) -> None:
        with self.t.cond:
            self.t.late_ids.append(outcome.value)
            self.t.cond.notify_all()

    def on_crash(self, error: BaseException) -> None:
        raise AssertionError(f"on_outcome never raises here: {error!r}")


def drive(ex: Executor, max_concurrent: int, clock: FakeClock, t: TimedTracker, finished: int) -> None:
    """Advance time whenever nothing can move without it (every attempt waited for is hung, and nothing
    ready to start has a free slot): timeouts and backoff delays are actually taken, never only configured."""
    for _ in range(2000):
        with t.cond:
            if sum(k is OutcomeKind.DONE for _, k in t.outcomes) >= finished:
                return
            hung = t.hung
        running = ex.running
        if running == hung and (ex.queued == 0 or running >= max_concurrent):
            clock.advance(30.0)
        with t.cond:
            t.cond.wait(0.01)  # until an attempt moves; the bound only lets the loop re-read the counters
    raise AssertionError(f"not finished: {t.outcomes}")


behaviours = st.lists(st.sampled_from(["ok", "fail", "hang"]), max_size=3)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.lists(st.tuples(st.sampled_from("abcdef"), behaviours), min_size=1, max_size=10))
def test_timeouts_and_retries_never_exceed_max_concurrent_nor_overlap_a_key_nor_adopt_a_late_result(
    max_concurrent: int, requests: list[tuple[str, list[str]]]
) -> None:
    clock = FakeClock()
    t = TimedTracker()
    ex = Executor(max_concurrent=max_concurrent, attempt_timeout=30.0, clock=clock)
    ex.start()
    try:
        accepted = sum(ex.submit(TimedJob(key, t, script)) for key, script in requests)
        drive(ex, max_concurrent, clock, t, accepted)
        with t.cond:
            assert t.cond.wait_for(lambda: len(t.late_ids) == len(t.abandoned_ids), WAIT), "every late result reported"
            assert t.peak <= max_concurrent
            assert not t.overlap, "a key was in two attempts the executor waited for at once"
            assert not set(t.adopted_ids) & t.abandoned_ids, "an abandoned attempt's result was adopted"
            assert sorted(t.late_ids) == sorted(t.abandoned_ids)
            # A duplicate submitted after its twin finished is accepted: every accepted job ends adopted, once.
            assert len(t.adopted_ids) == accepted >= len({key for key, _ in requests})
    finally:
        ex.close()
