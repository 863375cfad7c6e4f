"""A restore call abandoned at its attempt timeout is not forgotten: ``close()`` still waits for its thread, and
names it in the warning when it is still blocked, so an operator knows which restore never returned."""

from __future__ import annotations

import logging
import threading

import pytest

from tinkex_recovery import FakeClock
from tinkex_recovery._executor import Cancellation, Executor, Outcome, OutcomeKind

from .helpers import WAIT


class DeafRestore:
    """A job whose one attempt blocks until ``release`` and ignores its cancellation (a restore call stuck in a
    library that cannot be interrupted)."""

    key = "run-deaf"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.outcomes: list[OutcomeKind] = []
        self.late: list[OutcomeKind] = []
        self.cond = threading.Condition()

    def run_attempt(self, deadline: float, cancelled: Cancellation) -> Outcome:
        self.started.set()
        self.release.wait(WAIT)
        return Outcome(OutcomeKind.DONE, value="late")

    def on_outcome(self, outcome: Outcome) -> float | None:
        with self.cond:
            self.outcomes.append(outcome.kind)
            self.cond.notify_all()
        return None

    def on_late(self, outcome: Outcome) -> None:
        with self.cond:
            self.late.append(outcome.kind)
            self.cond.notify_all()

    def on_crash(self, error: BaseException) -> None:
        raise AssertionError(f"unexpected crash: {error!r}")


def test_close_names_a_restore_abandoned_at_its_timeout_that_is_still_blocked(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    executor = Executor(max_concurrent=1, attempt_timeout=30.0, clock=clock)
    executor.start()
    job = DeafRestore()
    try:
        executor.submit(job)
        assert job.started.wait(WAIT)
        clock.advance(30.0)
        with job.cond:
            assert job.cond.wait_for(lambda: job.outcomes == [OutcomeKind.TIMED_OUT], WAIT)
        assert executor.running == 0  # abandoned: it holds no slot any more
        with caplog.at_level(logging.WARNING, logger="tinkex_recovery"):
            executor.close(timeout=0.05)
        stuck = [r.getMessage() for r in caplog.records if "still blocked at close" in r.getMessage()]
        assert len(stuck) == 1 and "tinkex-recovery-attempt[run-deaf]" in stuck[0]
    finally:
        job.release.set()
    with job.cond:
        assert job.cond.wait_for(lambda: job.late == [OutcomeKind.DONE], WAIT)
