"""How a guard waits inside a coroutine without blocking its event loop.

- A poll the loop asks for runs on the engine's poll workers (``RunHandle.check_soon()``), awaited.
- Waiting for a recovery awaits ``RunHandle.when_ready()``, a future the engine completes from its own thread;
  the recovery is then collected with ``wait_for_recovery(timeout=0)``, which never waits. No thread is held.
- The few blocking calls of a guard's entry and exit (making the service's REST client, which costs the SDK two
  round trips; closing the engine, which joins its threads) run on the offload thread, awaited: one thread for
  every guard of the process, started when there is such a call to make and gone when there is none left, so
  16 loops entering at once add one thread, not 16.
- A training client's future (the SDK's ``APIFuture``, a ``concurrent.futures.Future``, any awaitable) is awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
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


class _Offloader:
    """Runs blocking calls one after the other on one thread, which exits as soon as none is left."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: deque[Callable[[], None]] = deque()
        self._thread: threading.Thread | None = None

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            self._calls.append(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tinkex-recovery-offload", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    self._thread = None
                    return
                call = self._calls.popleft()
            call()  # never raises: off_loop's call catches everything


_offloader = _Offloader()


async def off_loop(fn: Callable[[], T]) -> T:
    """``fn()`` on the offload thread, awaited. Not interruptible: a cancelled caller still waits for ``fn`` to
    return (what it opened must be known, to be closed), then the cancellation goes on."""
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

    _offloader.submit(call)
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
