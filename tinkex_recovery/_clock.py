"""Time as an injectable dependency, so tests record waits instead of waiting.

Every wait in the engine goes through :meth:`Clock.wait` on a ``threading.Condition`` the caller holds;
callers always re-check their own predicate after a wait returns, so a clock may wake them early.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """What the engine needs of time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""

    def now(self) -> datetime:
        """The wall-clock time (UTC), for checkpoint expiry."""

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Wait on ``cond`` (held by the caller) until notified or ``timeout`` seconds pass."""


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        cond.wait(None if timeout is None else max(timeout, 0.0))


class FakeClock:
    """A manual clock for tests: time moves only when :meth:`advance` is called.

    Every requested wait is recorded in :attr:`waits`, and :meth:`advance` wakes every waiter. A wait
    returns at once if time moved since the waiting thread last read :meth:`monotonic`, so an advance that
    lands between a caller computing its timeout and starting to wait is never lost.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._lock = threading.Lock()
        self._elapsed = 0.0
        self._generation = 0
        self._seen = threading.local()
        self._start = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._waiters: set[threading.Condition] = set()
        self.waits: list[float | None] = []

    def monotonic(self) -> float:
        with self._lock:
            self._seen.generation = self._generation
            return self._elapsed

    def now(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=self._elapsed)

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        with self._lock:
            self.waits.append(timeout)
            moved = getattr(self._seen, "generation", -1) != self._generation
            if moved or (timeout is not None and timeout <= 0):
                return
            self._waiters.add(cond)
        try:
            cond.wait()
        finally:
            with self._lock:
                self._waiters.discard(cond)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every thread waiting on this clock."""
        with self._lock:
            self._elapsed += seconds
            self._generation += 1
            waiters = list(self._waiters)
        for cond in waiters:
            with cond:
                cond.notify_all()
