"""``FakeClock`` never loses an advance: a wait returns at once when time moved since the waiting thread last read
the clock, however many advances came before, and a thread that never read the clock does not wait out an advance
it could not have seen."""

from __future__ import annotations

import threading
from collections.abc import Callable

from tinkex_recovery import FakeClock

from .helpers import WAIT


def returns_without_another_advance(clock: FakeClock, before_wait: Callable[[], None]) -> bool:
    """Run ``before_wait()`` then ``clock.wait(...)`` on a fresh thread; whether the wait returned on its own.
    A wait that did not is released by one more advance, so no thread is left behind either way."""
    cond = threading.Condition()
    done = threading.Event()

    def waiter() -> None:
        before_wait()
        with cond:
            clock.wait(cond, 3600.0)
        done.set()

    thread = threading.Thread(target=waiter, name="fake-clock-waiter")
    thread.start()
    returned = done.wait(WAIT)
    if not returned:
        clock.advance(0.0)
    thread.join(WAIT)
    return returned


def test_an_advance_between_reading_the_clock_and_waiting_is_never_lost_even_after_earlier_advances() -> None:
    clock = FakeClock()
    clock.advance(1.0)
    clock.advance(1.0)

    def read_then_time_moves() -> None:
        clock.monotonic()
        clock.advance(1.0)  # lands after the read, before the wait: the wait must not sleep through it

    assert returns_without_another_advance(clock, read_then_time_moves)
    assert clock.monotonic() == 3.0


def test_a_thread_that_never_read_the_clock_does_not_wait_out_an_advance_it_missed() -> None:
    clock = FakeClock()
    clock.advance(1.0)
    assert returns_without_another_advance(clock, lambda: None)
