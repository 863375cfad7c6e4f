"""How a guard waits inside a coroutine without blocking its event loop.

- A poll the loop asks for runs on the engine's poll workers (``RunHandle.check_soon()``), awaited.
- Waiting for a recovery awaits ``RunHandle.when_ready()``, a future the engine completes from its own thread;
  the recovery is then collected with ``wait_for_recovery(timeout=0)``, which never waits. No thread is held.
- The few blocking calls of a guard's entry and exit (making the service's REST client, which costs the SDK two
  round trips; closing the engine, which joins its threads) run in the *lane* of the guard's service, awaited:
  one thread per lane while it has calls to make, gone when it has none. Calls of one service run one after the
  other (16 loops on one ServiceClient entering at once add one thread, not 16); a slow service never delays a
  guard of another one, nor an ``asyncio.timeout`` around its leaving (one queue for every guard did both).
- A training client's future (the SDK's ``APIFuture``, a ``concurrent.futures.Future``, any awaitable) is awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from tinkex_recovery import Recovery, RunHandle

__all__ = ["next_recovery", "off_loop", "on_event_loop", "poll", "settle"]

T = TypeVar("T")


def on_event_loop() -> bool:
    """Whether the calling thread is running an event loop (blocking here would stall it)."""
    return asyncio._get_running_loop() is not None


class _Lanes:
    """Blocking calls by lane: each lane with calls to make has one thread, which runs them in order and ends
    when none is left. Lanes never wait for one another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lanes: dict[int, tuple[object, deque[Callable[[], None]]]] = {}  # id(lane) -> (lane, its calls)

    def submit(self, lane: object, call: Callable[[], None]) -> None:
        key = id(lane)  # the entry holds the lane: its id is not reused while the entry lives
        with self._lock:
            entry = self._lanes.get(key)
            if entry is not None:
                entry[1].append(call)
                return
            calls = deque([call])
            self._lanes[key] = (lane, calls)
        threading.Thread(target=self._run, args=(key, calls), name="tinkex-recovery-offload", daemon=True).start()

    def _run(self, key: int, calls: deque[Callable[[], None]]) -> None:
        while True:
            with self._lock:
                if not calls:
                    del self._lanes[key]
                    return
                call = calls.popleft()
            call()  # never raises: off_loop's call catches everything

    def forget(self) -> None:
        """In a forked child: the parent's lane threads do not exist there."""
        self._lock = threading.Lock()
        self._lanes = {}


_lanes = _Lanes()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_lanes.forget)


async def off_loop(fn: Callable[[], T], *, lane: object = None) -> T:
    """``fn()`` in ``lane`` (None: a lane of its own), awaited. Not interruptible: a cancelled caller still waits
    for ``fn`` to return (what it opened must be known, to be closed), then the cancellation goes on."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle_done(result: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def call() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle_done, result, error)

    _lanes.submit(object() if lane is None else lane, call)
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await done
        raise


async def poll(handle: RunHandle) -> bool:
    """``handle.check_now()``, run on the engine's poll workers and awaited."""
    return await asyncio.wrap_future(handle.check_soon())


async def next_recovery(handle: RunHandle, timeout: float) -> Recovery:
    """``handle.wait_for_recovery(timeout)``, awaited: no thread waits, the engine wakes the loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return handle.wait_for_recovery(timeout=0)  # never waits: returns, raises, or TimeoutError
        except TimeoutError:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"no recovery of run {handle.run_id} within {timeout}s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(handle.when_ready()), remaining)


async def settle(pending: Any) -> Any:
    """The result of what a training client call returned: an SDK ``APIFuture`` (``result_async()``), a
    ``concurrent.futures.Future``, any awaitable, or a plain value."""
    result_async = getattr(type(pending), "result_async", None)  # on the class: not an attribute a mock conjures
    if callable(result_async):
        return await pending.result_async()
    if isinstance(pending, Future):
        return await asyncio.wrap_future(pending)
    if inspect.isawaitable(pending):
        return await pending
    return pending
