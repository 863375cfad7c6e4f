"""Typed recovery events, and the bus that hands them to subscribers and to the ``tinkex_recovery`` logger."""

from __future__ import annotations

import logging
import threading
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


_LEVELS = {
    EventKind.DETECTED: logging.WARNING,
    EventKind.FAILED: logging.WARNING,
    EventKind.POLL_ERROR: logging.WARNING,
    EventKind.POLL_DEGRADED: logging.WARNING,
    EventKind.CHECKPOINT_SKIPPED: logging.WARNING,
    EventKind.EXHAUSTED: logging.ERROR,
}


@dataclass(frozen=True, slots=True)
class RecoveryEvent:
    """One step of watching or recovering a run.

    ``run_id`` is the run being recovered (or polled); ``attempt`` counts restore calls (0 before the first);
    ``since_detected`` is seconds since the corruption was detected and ``attempt_seconds`` the duration of
    the current attempt, where they apply. ``error`` is a redacted one-line description of a failure.
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
        if self.error:
            parts.append(f"error: {self.error}")
        return ", ".join(parts)


Subscriber = Callable[[RecoveryEvent], object]


class EventBus:
    """Delivers each event to the logger and to every subscriber, on the emitting thread.

    A subscriber that raises is logged and skipped; it never stops the engine.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()
        self._closed = False

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        if not callable(fn):
            raise TypeError(f"subscribe() needs a callable, got {type(fn).__name__}")
        with self._lock:
            self._subscribers = (*self._subscribers, fn)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not fn)

        return unsubscribe

    def close(self) -> None:
        """After close no subscriber is called again."""
        with self._lock:
            self._closed = True
            self._subscribers = ()

    def emit(self, event: RecoveryEvent) -> None:
        with self._lock:
            if self._closed:
                return
            subscribers = self._subscribers
        logger.log(_LEVELS.get(event.kind, logging.INFO), "%s", event.message)
        report_event(event)
        for fn in subscribers:
            call_safely(fn, event, what=f"event subscriber {fn!r}")


def call_safely(fn: Callable[..., object], *args: object, what: str) -> None:
    """Call a user callback; log and swallow anything it raises."""
    try:
        fn(*args)
    except Exception:
        logger.exception("%s raised; ignored", what)
