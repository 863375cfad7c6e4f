"""Suite-wide rules: no test leaves a thread behind; warnings (including unhandled exceptions in threads,
which pytest reports as warnings) are errors, configured in pyproject.toml."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tinkex_recovery import FakeClock
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
