"""The bounded executor: at most ``max_concurrent`` recovery attempts waited for at once, first come first served.

The executor knows nothing of Tinker. A :class:`Job` runs one attempt at a time on a short-lived thread and
decides, from each :class:`Outcome`, whether and when to try again; the executor only keeps the slots, the
FIFO queue, the retries waiting out their backoff (they hold no slot) and the per-attempt deadline. Jobs of
one key never run side by side: one submitted while its key is busy is parked until the earlier one ends.

An attempt still running at its deadline is *abandoned*: its ``cancelled`` event is set (the job cancels what
it waits for), its slot is freed, and its outcome, if it ever comes, goes to :meth:`Job.on_late` instead of
:meth:`Job.on_outcome`, so nothing it produced is adopted. ``max_concurrent`` counts the attempts waited for.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from ._clock import Clock

__all__ = ["Cancellation", "Executor", "Job", "Outcome", "OutcomeKind"]

logger = logging.getLogger("tinkex_recovery")


class OutcomeKind(Enum):
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended."""

    kind: OutcomeKind
    value: Any = None
    error: BaseException | None = None


class Cancellation:
    """Set once when an attempt is abandoned; what the attempt waits on registers to be woken by it.

    A side effect (a restore call) is made only after :meth:`claim` succeeded: claiming and abandoning take the
    same lock, so an attempt abandoned first never makes the call, and one that claimed first made it before it
    was abandoned (its outcome is then the job's to reconcile).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self.claimed = False  #: a side effect was claimed (and so may have happened) before or without abandonment
        self._callbacks: list[Callable[[], object]] = []

    def claim(self) -> bool:
        """Whether the attempt may make its side effect now: False once it is abandoned."""
        with self._lock:
            if self._set:
                return False
            self.claimed = True
            return True

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()

    def is_set(self) -> bool:
        return self._set

    def on_cancel(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` when this is set (at once if it already is)."""
        with self._lock:
            if not self._set:
                self._callbacks.append(fn)
                return
        fn()


class Job(Protocol):
    """One recovery, as the executor sees it."""

    @property
    def key(self) -> str:
        """At most one job per key is queued or running."""

    def run_attempt(self, deadline: float, cancelled: Cancellation) -> Outcome:
        """Run one attempt (on a worker thread); ``deadline`` is the clock time it must end by, ``cancelled``
        is set when the attempt is abandoned (deadline passed, or the executor closed)."""

    def on_outcome(self, outcome: Outcome) -> float | None:
        """Digest an attempt's outcome (on the dispatcher thread): seconds until the next attempt, or None
        when the job is finished."""

    def on_late(self, outcome: Outcome) -> None:
        """The outcome of an abandoned attempt (on its worker thread): release whatever it produced."""

    def on_crash(self, error: BaseException) -> None:
        """:meth:`on_outcome` raised ``error``: end the job (the executor goes on with the others)."""


@dataclass(eq=False)
class _Running:
    job: Job
    deadline: float
    outcome: Outcome | None = None
    abandoned: bool = False
    cancelled: Cancellation = field(default_factory=Cancellation, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)


class Executor:
    """Runs :class:`Job` attempts with bounded concurrency, on one dispatcher thread."""

    def __init__(self, *, max_concurrent: int, attempt_timeout: float, clock: Clock) -> None:
        if not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool) or max_concurrent < 1:
            raise ValueError(f"max_concurrent must be an integer >= 1, got {max_concurrent!r}")
        self._max = max_concurrent
        self._timeout = attempt_timeout
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: deque[Job] = deque()
        self._delayed: list[tuple[float, int, Job]] = []
        self._running: list[_Running] = []
        self._abandoned: list[threading.Thread] = []
        self._keys: set[str] = set()
        self._parked: dict[str, deque[Job]] = {}  # jobs whose key was busy when submitted, in order
        self._seq = itertools.count()
        self._closed = False
        self._dispatcher: threading.Thread | None = None
        self.peak_running = 0  #: the most attempts ever waited for at once

    # -- public ---------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._dispatcher is not None or self._closed:
                return
            self._dispatcher = threading.Thread(target=self._dispatch, name="tinkex-recovery-executor", daemon=True)
            self._dispatcher.start()

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False (refused) once the executor is closed. Jobs of one key run one after the other: a
        job whose key is queued or running waits, parked, until the earlier one ends (a lineage watched anew
        while the recovery of its old watch still runs recovers after it, never beside it, never not at all)."""
        with self._cond:
            if self._closed:
                return False
            if job.key in self._keys:
                self._parked.setdefault(job.key, deque()).append(job)
                return True
            self._keys.add(job.key)
            self._ready.append(job)
            self._cond.notify_all()
            return True

    def pending(self, key: str) -> bool:
        with self._cond:
            return key in self._keys

    @property
    def running(self) -> int:
        """Attempts waited for now (abandoned ones no longer count)."""
        with self._cond:
            return len(self._running)

    @property
    def queued(self) -> int:
        """Jobs ready to start, waiting for a slot (retries waiting out their backoff not included)."""
        with self._cond:
            return len(self._ready)

    @property
    def delayed(self) -> int:
        """Retries waiting out their backoff (they hold no slot)."""
        with self._cond:
            return len(self._delayed)

    def close(self, timeout: float = 1.0) -> None:
        """Stop dispatching, abandon the running attempts (their waits are cancelled) and wait up to
        ``timeout`` for their threads. Idempotent."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._delayed.clear()
            self._parked.clear()
            for slot in self._running:
                slot.abandoned = True
                slot.cancelled.set()
            threads = [r.thread for r in self._running if r.thread] + self._abandoned
            dispatcher = self._dispatcher
            self._cond.notify_all()
        if dispatcher is not None and dispatcher is not threading.current_thread():
            dispatcher.join(timeout)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            logger.warning("restore call(s) still blocked at close, left as daemon threads: %s", stuck)

    # -- dispatcher -----------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = self._clock.monotonic()
                finished = self._take_finished(now)
                if not finished:
                    self._promote_due(now)
                    self._start_ready(now)
                    self._clock.wait(self._cond, self._next_wake(now))
                    continue
            for job, outcome in finished:
                try:
                    delay = job.on_outcome(outcome)
                except Exception as exc:  # one job's bug must not stop every other recovery
                    logger.exception("handling the outcome of recovery %s failed; that recovery ends", job.key)
                    delay = None
                    try:
                        job.on_crash(exc)
                    except Exception:
                        logger.exception("ending recovery %s failed too", job.key)
                with self._cond:
                    if delay is None or self._closed:
                        self._end(job.key)
                    elif delay <= 0:
                        self._ready.appendleft(job)  # a retry keeps its place at the head of the queue
                    else:
                        due = self._clock.monotonic() + delay
                        heapq.heappush(self._delayed, (due, next(self._seq), job))

    def _end(self, key: str) -> None:
        """The job of ``key`` ended: start the next one parked under it, if any, else free the key."""
        parked = self._parked.get(key)
        if parked and not self._closed:
            self._ready.append(parked.popleft())
            if not parked:
                del self._parked[key]
        else:
            self._parked.pop(key, None)
            self._keys.discard(key)

    def _take_finished(self, now: float) -> list[tuple[Job, Outcome]]:
        finished: list[tuple[Job, Outcome]] = []
        for slot in list(self._running):
            if slot.outcome is not None:
                outcome = slot.outcome
                if slot.thread is not None:
                    slot.thread.join()  # it has only to return: a finished attempt leaves no thread behind
            elif now >= slot.deadline:
                outcome = Outcome(OutcomeKind.TIMED_OUT)
                slot.abandoned = True
                slot.cancelled.set()  # the attempt stops waiting; anything it still gets goes to on_late
                if slot.thread is not None:
                    self._abandoned.append(slot.thread)
            else:
                continue
            self._running.remove(slot)
            finished.append((slot.job, outcome))
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        return finished

    def _promote_due(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            self._ready.append(heapq.heappop(self._delayed)[2])

    def _start_ready(self, now: float) -> None:
        while self._ready and len(self._running) < self._max:
            slot = _Running(self._ready.popleft(), deadline=now + self._timeout)
            slot.thread = threading.Thread(
                target=self._attempt,
                args=(slot,),
                name=f"tinkex-recovery-attempt[{slot.job.key}]",
                daemon=True,
            )
            self._running.append(slot)
            self.peak_running = max(self.peak_running, len(self._running))
            slot.thread.start()

    def _next_wake(self, now: float) -> float | None:
        times = [r.deadline for r in self._running if r.outcome is None]
        if self._delayed:
            times.append(self._delayed[0][0])
        return min(times) - now if times else None

    def _attempt(self, slot: _Running) -> None:
        try:
            outcome = slot.job.run_attempt(slot.deadline, slot.cancelled)
        except BaseException as exc:  # an attempt never kills its thread noisily; the job decides
            outcome = Outcome(OutcomeKind.FAILED, error=exc)
        with self._cond:
            late = slot.abandoned
            if not late:
                slot.outcome = outcome
                self._cond.notify_all()
        if late:
            try:
                slot.job.on_late(outcome)
            except Exception:
                logger.exception("releasing the late result of an abandoned attempt of %s failed", slot.job.key)
