"""Shared pieces of the loopback-HTTP tests."""

from __future__ import annotations

import threading

#: The key the loopback server accepts. Long enough for redaction (>= 8 characters) and unlike any other text.
KEY = "tml-LOOPBACK-KEY-5f0c1e9a77d2"
#: A key the server rejects.
WRONG_KEY = "tml-WRONG-KEY-0b4d2c6e8f1a"


class FakeTime:
    """``sleep``/``monotonic`` for :class:`TinkerRest`: a sleep records its wait and moves time on, at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.waits.append(seconds)
            self.now += seconds
