"""Typed recovery events, and the bus that hands them to subscribers and to the ``tinkex_recovery`` logger.

Delivery happens on the bus's own notifier thread, in the order things happened, so a slow or failing
subscriber or user callback never holds up a restore, a deadline or a poll.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from ._observers import report_event

__all__ = ["EventKind", "RecoveryEvent"]

logger = logging.getLogger("tinkex_recovery")
logger.addHandler(logging.NullHandler())  # the application decides where log lines go


class EventKind(StrEnum):
    """What happened. The first eight are Tinkex's telemetry events."""

    DETECTED = "detected"
    STARTED = "started"
    CHECKPOINT_SELECTED = "checkpoint_selected"
    CLIENT_CREATED = "client_created"
    COMPLETED = "completed"
    FAILED = "failed"
    EXHAUSTED = "exhausted"
    POLL_ERROR = "poll_error"
    POLL_DEGRADED = "poll_degraded"
    CHECKPOINT_SKIPPED = "checkpoint_skipped"
    CLIENT_DISCARDED = "client_discarded"  #: a restore answered after its attempt was abandoned; closed, not used
    #: a run a recovery created and did not adopt, found in the account's listing (``new_run_id``); or the
    #: loser's run of two processes that recovered the same run (``reason="forked"``)
    RUN_ORPHANED = "run_orphaned"


#: The level each event is logged at; the rest are INFO. A recovery is one WARNING (``completed``) or one ERROR
#: (``exhausted``); its steps (detected, started, checkpoint_selected or _skipped, client_created, a failed
#: attempt) and a single failed poll are INFO, so a log at WARNING shows what happened and INFO shows how.
_LEVELS = {
    EventKind.COMPLETED: logging.WARNING,
    EventKind.POLL_DEGRADED: logging.WARNING,
    EventKind.CLIENT_DISCARDED: logging.WARNING,
    EventKind.RUN_ORPHANED: logging.WARNING,
    EventKind.EXHAUSTED: logging.ERROR,
}


@dataclass(frozen=True, slots=True)
class RecoveryEvent:
    """One step of watching or recovering a run.

    ``run_id`` is the run being recovered (or polled); ``attempt`` counts restore calls (0 before the first);
    ``since_detected`` is seconds since the corruption was detected and ``attempt_seconds`` the duration of
    the current attempt, where they apply. ``error`` is a redacted one-line description of a failure;
    ``reason`` (an :class:`~tinkex_recovery.ExhaustedReason` value) says why a recovery was exhausted, or, on a
    ``failed`` event, that a safety budget refused it (in observe mode: would have).
    """

    kind: EventKind
    run_id: str
    attempt: int = 0
    since_detected: float | None = None
    attempt_seconds: float | None = None
    checkpoint: str | None = None
    new_run_id: str | None = None
    error: str | None = None
    will_retry: bool | None = None
    reason: str | None = None

    @property
    def message(self) -> str:
        """A readable one-line description, as logged."""
        parts = [f"run {self.run_id}: {self.kind.value}"]
        if self.attempt:
            parts.append(f"attempt {self.attempt}")
        if self.checkpoint:
            parts.append(f"checkpoint {self.checkpoint}")
        if self.new_run_id:
            parts.append(f"new run {self.new_run_id}")
        if self.since_detected is not None:
            parts.append(f"{self.since_detected:.3f}s since detection")
        if self.attempt_seconds is not None:
            parts.append(f"attempt took {self.attempt_seconds:.3f}s")
        if self.will_retry is not None:
            parts.append("will retry" if self.will_retry else "no retry")
        if self.reason:
            parts.append(f"reason: {self.reason}")
        if self.error:
            parts.append(f"error: {self.error}")
        return ", ".join(parts)

    def __str__(self) -> str:  # print(event), f"{event}": the one line, not the dataclass's repr
        return self.message


Subscriber = Callable[[RecoveryEvent], object]
_STOP = object()


class EventBus:
    """Delivers each event to the logger and to every subscriber, and runs the engine's user callbacks, in
    order, on one notifier thread (inline until :meth:`start`).

    A subscriber or callback that raises is logged with its traceback and skipped; it never stops the engine.
    After :meth:`close` returns no subscriber or callback is called again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()
        self._closed = False
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._deliver, name="tinkex-recovery-notifier", daemon=True)
            self._thread.start()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        if not callable(fn):
            raise TypeError(f"subscribe() needs a callable, got {type(fn).__name__}")
        with self._lock:
            self._subscribers = (*self._subscribers, fn)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not fn)

        return unsubscribe

    def close(self, timeout: float = 1.0) -> None:
        """Stop delivering; wait up to ``timeout`` for a callback under way. Idempotent."""
        with self._lock:
            self._closed = True
            self._subscribers = ()
            thread = self._thread
        self._queue.put(_STOP)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("an event subscriber or callback is still running at close; left as a daemon thread")

    def emit(self, event: RecoveryEvent) -> None:
        self._submit(event)

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the notifier thread, after every event emitted so far."""
        self._submit(fn)

    def flush(self, timeout: float | None = None) -> None:
        """Return once everything submitted before this call has been delivered (or the bus is closed, or
        ``timeout`` seconds passed)."""
        with self._lock:
            if self._thread is None or self._closed or self._thread is threading.current_thread():
                return
        delivered = threading.Event()
        self._queue.put(delivered.set)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not delivered.wait(0.05):
            if deadline is not None and time.monotonic() >= deadline:
                return
            with self._lock:
                if self._closed:
                    return

    def _submit(self, item: object) -> None:
        with self._lock:
            if self._closed:
                return
            started = self._thread is not None
        if started:
            self._queue.put(item)
        else:
            self._run(item)

    def _deliver(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            with self._lock:
                if self._closed:
                    return
            self._run(item)

    def _run(self, item: object) -> None:
        if isinstance(item, RecoveryEvent):
            logger.log(_LEVELS.get(item.kind, logging.INFO), "%s", item.message)
            report_event(item)
            with self._lock:
                subscribers = self._subscribers
            for fn in subscribers:
                call_safely(fn, item, what=f"event subscriber {fn!r}")
        else:
            call_safely(item, what="engine callback")  # type: ignore[arg-type]


def call_safely(fn: Callable[..., object], *args: object, what: str) -> None:
    """Call a user callback; log (with the traceback) and swallow anything it raises."""
    try:
        fn(*args)
    except Exception:
        logger.exception("%s raised; ignored", what)
