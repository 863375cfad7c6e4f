"""Suite-wide rules: no test leaves a thread behind; warnings (including unhandled exceptions in threads,
which pytest reports as warnings) are errors, configured in pyproject.toml."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tinkex_recovery import FakeClock, RecoveryEngine, RecoveryPolicy
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import EventLog

# Threads that libraries start once per process and keep on purpose (not leaks of the code under test).
_PROCESS_THREADS = ("pydevd", "asyncio_", "ThreadPoolExecutor-", "Dummy-")


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    """Fail any test that leaves a thread running for more than a second after it ends."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 1.0
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith(_PROCESS_THREADS)
        ]
        if not leaked or time.monotonic() > deadline:
            break
        leaked[0].join(0.05)
    assert not leaked, f"test left thread(s) running: {[t.name for t in leaked]}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[SimulatedTinker]:
    tinker = SimulatedTinker(clock=clock)
    yield tinker
    tinker.release()


@pytest.fixture
def events() -> EventLog:
    return EventLog()


#: The policy of ``make_engine``'s engines: retries wait out a known backoff, no jitter, and only the test polls.
ENGINE_POLICY = {"enabled": True, "jitter": 0.0, "backoff": 5.0, "max_backoff": 60.0, "poll_interval": 3600.0}


@pytest.fixture
def make_engine(clock: FakeClock, events: EventLog) -> Iterator[Callable[..., RecoveryEngine]]:
    """Started engines on the test's clock, every event recorded in ``events``; closed after the test.
    ``make_engine(status=None, max_concurrent=1, **policy_fields)``."""
    engines: list[RecoveryEngine] = []

    def make(status: Any = None, max_concurrent: int = 1, **policy: Any) -> RecoveryEngine:
        engine = RecoveryEngine(
            RecoveryPolicy(**{**ENGINE_POLICY, **policy}), status=status, max_concurrent=max_concurrent, clock=clock
        )
        engine.subscribe(events)
        engines.append(engine.start())
        return engine

    yield make
    for engine in engines:
        engine.close()
