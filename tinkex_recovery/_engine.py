"""The recovery engine: watches runs, detects corruption, and hands each detection to the executor.

Threads, all owned by the engine and all gone when :meth:`RecoveryEngine.close` returns: one poller, a fixed
pool of poll workers (so the thread count does not grow with the number of runs), the executor's dispatcher,
the notifier that runs subscribers and user callbacks, and one short-lived thread per running restore attempt
(an attempt blocked inside a service call that returns no future cannot be interrupted: it is left behind as
a daemon thread, with a warning, and whatever it returns is discarded).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any, Self

from ._clock import Clock, SystemClock
from ._events import EventBus, EventKind, RecoveryEvent, Subscriber, call_safely
from ._exceptions import (
    EngineClosed,
    EngineNotStarted,
    ExhaustedReason,
    RecoveryDisabled,
    RecoveryExhausted,
)
from ._executor import Cancellation, Executor
from ._futures import resolve
from ._models import Checkpoint, TrainingRun, validate_run_id
from ._observers import report_poll, track_engine
from ._policy import RecoveryPolicy
from ._recovery import History, Recovery, RecoveryJob, run_not_found
from ._redact import redact_loggers, without_secrets
from ._retry import describe, status_code_of, unreachable
from ._selection import StepOf

__all__ = ["EngineState", "RecoveryEngine", "RunHandle", "RunState"]

logger = logging.getLogger("tinkex_recovery")

SERVICE_METHODS = ("create_training_client_from_state", "create_training_client_from_state_with_optimizer")
STATUS_METHODS = ("get_training_run", "list_checkpoints")


class EngineState(Enum):
    """The engine's lifecycle: it starts once and closes once."""

    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


class RunState(Enum):
    """Where a watched lineage stands."""

    WATCHING = "watching"
    RECOVERING = "recovering"
    EXHAUSTED = "exhausted"
    UNWATCHED = "unwatched"


def require_methods(obj: object, names: Iterable[str], role: str) -> None:
    missing = [n for n in names if not callable(getattr(obj, n, None))]
    if missing:
        raise TypeError(f"{role} {type(obj).__name__} lacks the method(s) {', '.join(missing)}")


def rest_client_of(service: Any, *, timeout: float | None = None) -> Any:
    """The REST client of ``service``: the status source when none is given.

    ``tinker.ServiceClient`` (0.38) deprecates ``create_rest_client()`` with a FutureWarning; its own
    ``_rest_client()`` builds the same client without one (and ``close()`` closes it). The public replacement,
    ``tinker.RestClient(base_url=..., api_key=...)``, needs credentials a ServiceClient does not expose.

    Making it contacts Tinker (the SDK fetches its client config, retrying for minutes when the server is down),
    so with ``timeout`` it is made on a thread of its own and waited for that long at most: past it,
    :class:`TinkerConnectionError` names the URL to check. The call cannot be interrupted; its thread is left to
    end (a daemon), and a client it makes late is closed, never used. While such a call is stuck, another one
    for the same service waits for it rather than start a thread of its own, for up to :data:`_JOIN_FOR`
    timeouts from its start (then a fresh call is made): watching again and again against a server that does
    not answer leaves a thread behind per :data:`_JOIN_FOR` attempts, not one per attempt, and a call that hangs
    for good does not keep the service from a server that is back.
    """
    if timeout is None:
        return _make_rest_client(service)
    end = time.monotonic() + timeout
    got = _MAKINGS.join(service, stale_after=_JOIN_FOR * timeout).take(timeout)
    if got is _TAKEN:  # made in time for another caller waiting with this one: one of this call's own, unshared
        got = _Making(service).start().take(end - time.monotonic())
    if got is _TAKEN or got is _NOT_YET:
        what = f"could not make the REST client of {type(service).__name__} within setup_timeout={timeout:g}s"
        raise unreachable(what, service) from None
    return got


_JOIN_FOR = 4  #: a stuck making of a REST client is joined for this many setup timeouts from its start
_NOT_YET, _TAKEN = object(), object()  # what _Making.take() gives instead of a client


class _Making:
    """A REST client being made for a service, on a thread of its own: given to the first caller that waits for
    it in time, closed if every caller gave up on it."""

    __slots__ = ("claimed", "client", "done", "error", "registry", "service", "started", "waiting")

    def __init__(self, service: Any, registry: _Makings | None = None) -> None:
        self.service = service
        self.registry = registry  # where other callers find it while it runs (None: one caller's own)
        self.client: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started = time.monotonic()
        self.waiting = 1  # callers waiting for it now: made with its first
        self.claimed = False  # a caller took the client (or, made for nobody, it was closed)

    def start(self) -> _Making:
        """Start making the client, on a thread of its own."""
        threading.Thread(target=self._run, name="tinkex-recovery-rest-client", daemon=True).start()
        return self

    def take(self, seconds: float) -> Any:
        """Wait up to ``seconds`` as one of its callers: the client (raising the making's error, if it failed),
        or ``_NOT_YET`` (not made yet) or ``_TAKEN`` (made, and another caller took it)."""
        try:
            self.done.wait(max(seconds, 0.0))
        except BaseException:  # interrupted (Ctrl-C): a client made meanwhile for nobody else is closed, not kept
            self._leave(take=False)
            raise
        return self._leave(take=True)

    def _leave(self, *, take: bool) -> Any:
        with _MAKINGS.lock:
            self.waiting -= 1
            made = self.done.is_set() and self.error is None and not self.claimed
            mine = made and take
            unwanted = made and not take and self.waiting == 0
            self.claimed = self.claimed or mine or unwanted
        if unwanted:
            self._close()
        if not take:
            return None
        if self.error is not None:
            raise self.error
        if mine:
            return self.client
        return _TAKEN if self.done.is_set() else _NOT_YET

    def _run(self) -> None:
        try:
            self.client = _make_rest_client(self.service)
        except BaseException as exc:
            self.error = exc
        with _MAKINGS.lock:
            if self.registry is not None:
                self.registry.drop(self)
            self.done.set()
            unwanted = self.waiting == 0 and self.error is None
            self.claimed = self.claimed or unwanted
        if unwanted:
            self._close()

    def _close(self) -> None:
        close = getattr(self.client, "close", None)
        if callable(close):
            call_safely(close, what="closing a REST client made after setup_timeout")


class _Makings:
    """The REST clients being made now, one joinable per service (by ``id(service)``; the entry holds the
    service, so its id is not reused while it lives)."""

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Start empty (also in a forked child: the threads making clients stayed in the parent)."""
        self.lock = threading.Lock()
        self.by_service: dict[int, _Making] = {}

    def join(self, service: Any, *, stale_after: float) -> _Making:
        """The making of ``service``'s client to wait for, one more caller counted: the one under way, unless it
        started more than ``stale_after`` seconds ago (it is then left to end, and a fresh one started)."""
        with self.lock:
            making = self.by_service.get(id(service))
            if making is not None and time.monotonic() - making.started <= stale_after:
                making.waiting += 1
                return making
            making = self.by_service[id(service)] = _Making(service, registry=self)
        return making.start()

    def drop(self, making: _Making) -> None:
        """``making`` ended: no caller joins it any more (under :attr:`lock`)."""
        if self.by_service.get(id(making.service)) is making:
            del self.by_service[id(making.service)]


_MAKINGS = _Makings()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_MAKINGS.forget)


def _make_rest_client(service: Any) -> Any:
    if callable(getattr(type(service), "_rest_client", None)):  # on the class: not an attribute a mock conjures
        status = resolve(service._rest_client())
    else:
        factory = getattr(service, "create_rest_client", None)
        if not callable(factory):
            raise TypeError(f"service {type(service).__name__} has no create_rest_client(); pass status= to the engine")
        status = resolve(factory())
    require_methods(status, STATUS_METHODS, "status")
    return status


#: when_ready() futures a lineage keeps before dropping the cancelled ones (then twice the live ones).
_PRUNE_AT = 16


@dataclass(eq=False)
class _Lineage:
    """One watched run and every run recovered from it. Guarded by the engine's lock."""

    run_id: str
    service: Any
    status: Any
    metadata: dict[str, str]
    client: Any = None
    state: RunState = RunState.WATCHING
    recoveries: tuple[Recovery, ...] = ()  # replaced, never mutated: a handle reads it without the lock
    rejected: set[str] = field(default_factory=set)
    inherited: list[Checkpoint] = field(default_factory=list)
    step_of: StepOf | None = None
    on_unsettled: Callable[[], None] | None = None  # told, under the lock, when the lineage stops being settled
    observed: str | None = None  # observe mode: the corrupted run already reported (it stays corrupted)
    observation: RecoveryEvent | None = None  # observe mode: what a recovery of `observed` would do
    history: History = field(default_factory=History)  # what the safety budgets count (merged with run metadata)
    failed_polls: int = 0
    polled: bool = False  # a poll has read the run: a 404 now is a run deleted, not one that never was
    exhausted: RecoveryExhausted | None = None
    announced: int = 0  # recoveries whose events and callbacks have run: wait_for_recovery() may return them
    consumed: int = 0  # recoveries already returned by wait_for_recovery()
    ready: list[Future[None]] = field(default_factory=list)  # when_ready() futures not yet woken
    prune_at: int = _PRUNE_AT  # len(ready) at which the done (cancelled) ones are dropped
    uses_rest_client: bool = False  # its status is a REST client the engine made (released at unwatch)


def _settle(future: Future[Any], result: object = None, error: BaseException | None = None) -> None:
    """Complete ``future`` unless it is already done (answered, or cancelled by its waiter)."""
    if future.set_running_or_notify_cancel():  # False: the waiter cancelled it
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _wake(ready: list[Future[None]]) -> None:
    """Complete when_ready() futures (outside the engine's lock: their callbacks are the waiters')."""
    for future in ready:
        if future.set_running_or_notify_cancel():  # False: the waiter cancelled it
            future.set_result(None)


class RunHandle:
    """The caller's view of a watched run and its recoveries. Thread-safe."""

    def __init__(self, engine: RecoveryEngine, lineage: _Lineage) -> None:
        self._engine = engine
        self._lineage = lineage

    @property
    def run_id(self) -> str:
        """The newest run of the lineage (changes after each recovery)."""
        with self._engine._cond:
            return self._lineage.run_id

    @property
    def client(self) -> Any:
        """The newest recovered training client, or None before the first recovery."""
        with self._engine._cond:
            return self._lineage.client

    @property
    def state(self) -> RunState:
        """Where the lineage stands: watching, recovering, exhausted or unwatched."""
        # One read of a field that is only ever replaced whole: no lock, as a guarded loop reads it every step.
        return self._lineage.state

    @property
    def recoveries(self) -> tuple[Recovery, ...]:
        """Every finished recovery of the lineage, oldest first."""
        return self._lineage.recoveries

    @property
    def observed(self) -> str | None:
        """In ``observe`` mode, the watched run found corrupted: its recovery was reported (``detected``,
        ``checkpoint_selected``) and not made. None otherwise. Lock-free."""
        return self._lineage.observed

    def observation(self, timeout: float | None = None) -> RecoveryEvent | None:
        """In ``observe`` mode, what a recovery of the observed run (:attr:`observed`) would do: the
        ``checkpoint_selected`` event naming the checkpoint it would restore, or the ``failed`` event saying why
        it would not (no usable checkpoint, a safety budget). Waits up to ``timeout`` seconds for that check to
        finish; None when no run was observed, or on timeout, or if the engine closes first."""
        engine, lineage = self._engine, self._lineage
        with engine._cond:
            engine._cond.wait_for(
                lambda: (
                    lineage.observed is None
                    or lineage.observation is not None
                    or lineage.state is not RunState.WATCHING
                    or engine.state is EngineState.CLOSED
                ),
                timeout,
            )
            return lineage.observation if lineage.observed is not None else None

    @property
    def settled(self) -> bool:
        """True while nothing awaits the caller: the run is watched and healthy, and every recovery has been
        returned by :meth:`wait_for_recovery`. Lock-free, for loops that look at every step."""
        lineage = self._lineage
        # state first: the engine replaces recoveries before it sets the state back to WATCHING
        return lineage.state is RunState.WATCHING and len(lineage.recoveries) <= lineage.consumed

    def check_now(self) -> bool:
        """Poll this run now, on the calling thread; True if a recovery is under way (or just finished
        one not yet collected by :meth:`wait_for_recovery`). Raises :class:`EngineNotStarted` before
        ``start()``, :class:`EngineClosed` after ``close()``."""
        self._engine._require_opened()
        self._engine._poll_one(self._lineage)
        self._engine._bus.flush()
        with self._engine._cond:
            lineage = self._lineage
            return lineage.state is RunState.RECOVERING or len(lineage.recoveries) > lineage.consumed

    def wait_for_recovery(self, timeout: float | None = None) -> Recovery:
        """Block until the next recovery not yet returned by this method completes, and return it.

        Raises :class:`RecoveryExhausted` if the lineage gave up, :class:`TimeoutError` after ``timeout``
        seconds, :class:`EngineClosed` if the engine closes first.
        """
        cond = self._engine._cond
        lineage = self._lineage
        with cond:
            done = cond.wait_for(
                lambda: (
                    lineage.announced > lineage.consumed
                    or lineage.exhausted is not None
                    or self._engine.state is EngineState.CLOSED
                ),
                timeout,
            )
            if lineage.announced > lineage.consumed:
                lineage.consumed += 1
                return lineage.recoveries[lineage.consumed - 1]
            if lineage.exhausted is not None:
                raise lineage.exhausted
            if not done:
                raise TimeoutError(f"no recovery of run {lineage.run_id} within {timeout}s")
            raise EngineClosed("the engine closed while waiting for a recovery")

    def when_ready(self) -> Future[None]:
        """A future that is done once :meth:`wait_for_recovery` would return (or raise) without waiting: a
        recovery to collect, the lineage exhausted, or the engine closed. For callers that must not block, such
        as an event loop: ``await asyncio.wrap_future(handle.when_ready())``, then ``wait_for_recovery(0)``.
        Cancelling the future is allowed."""
        ready: Future[None] = Future()
        engine = self._engine
        lineage = self._lineage
        with engine._cond:
            if not (
                lineage.announced > lineage.consumed
                or lineage.exhausted is not None
                or engine.state is EngineState.CLOSED
            ):
                if len(lineage.ready) >= lineage.prune_at:  # a waiter that timed out cancels its future
                    lineage.ready = [f for f in lineage.ready if not f.done()]
                    lineage.prune_at = max(_PRUNE_AT, 2 * len(lineage.ready))
                lineage.ready.append(ready)
                engine._waited.add(lineage)
                return ready
        ready.set_result(None)
        return ready

    def check_soon(self) -> Future[bool]:
        """:meth:`check_now` without blocking the caller: the poll runs on the engine's poll workers, and the
        future gets what ``check_now()`` would return once the poll's events are delivered (or
        :class:`EngineClosed`). For callers that must not block: ``await asyncio.wrap_future(...)``."""
        engine = self._engine
        lineage = self._lineage
        checked: Future[bool] = Future()

        def answer() -> None:  # on the notifier, after the poll's events: a poll worker never waits for them
            with engine._cond:
                if checked not in engine._checks:  # close() answered it
                    return
                engine._checks.discard(checked)
                result = lineage.state is RunState.RECOVERING or len(lineage.recoveries) > lineage.consumed
            _settle(checked, result)

        with engine._cond:
            engine._require_opened()
            engine._checks.add(checked)
            # Under the lock, as in _poll_cycle: close() queues its stop markers after this, so it is run.
            engine._poll_queue.put((lineage, lambda: engine._bus.call(answer)))
        return checked

    def request_recovery(self) -> None:
        """Restore this run now from the checkpoint the policy chooses, whether or not it is corrupted: what a
        restarted process does to resume. The same recovery as for a corruption (rules, events, callbacks);
        collect it with :meth:`wait_for_recovery`. Raises :class:`RuntimeError` if a recovery is under way
        or the lineage is not being watched. In ``observe`` mode it only reports the checkpoint it would restore
        from: no recovery follows."""
        self._engine._require_opened()
        self._engine._recover(self._lineage, None)

    def unwatch(self) -> None:
        """Stop polling this lineage (a recovery already under way still finishes). The REST client the engine
        made for its service is closed once no watched lineage (nor that recovery) reads through it. Watching
        the run again is allowed: a recovery it needs runs once the old one has ended."""
        self._engine._unwatch(self._lineage)

    def __repr__(self) -> str:
        return f"<RunHandle run_id={self.run_id!r} state={self.state.value} recoveries={len(self.recoveries)}>"


class RecoveryEngine:
    """Watches Tinker training runs and restores corrupted ones from checkpoints.

    ``status`` is anything with ``get_training_run(run_id)`` and ``list_checkpoints(run_id)`` (values or
    futures); when omitted, each watched service's ``create_rest_client()`` is used. ``clock`` and ``rng``
    are injectable for tests. Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        policy: RecoveryPolicy,
        *,
        status: Any = None,
        max_concurrent: int = 1,
        poll_concurrency: int = 16,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(policy, RecoveryPolicy):
            raise TypeError(f"policy must be a RecoveryPolicy, got {type(policy).__name__}")
        if status is not None:
            require_methods(status, STATUS_METHODS, "status")
        if not isinstance(poll_concurrency, int) or poll_concurrency < 1:
            raise ValueError(f"poll_concurrency must be an integer >= 1, got {poll_concurrency!r}")
        self.policy = policy
        self._status = status
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._bus = EventBus()
        self._executor = Executor(
            max_concurrent=max_concurrent, attempt_timeout=policy.attempt_timeout, clock=self._clock
        )
        self._cond = threading.Condition()
        self._state = EngineState.UNOPENED
        self._watched: dict[str, _Lineage] = {}
        self._rest_clients: dict[int, tuple[Any, Any]] = {}  # id(service) -> (service, the REST client we made)
        self._threads: list[threading.Thread] = []
        # (lineage, what to call once it is polled), or None: a poll worker's stop marker
        self._poll_queue: queue.SimpleQueue[tuple[_Lineage, Callable[[], object]] | None] = queue.SimpleQueue()
        self._poll_concurrency = poll_concurrency
        self._waited: set[_Lineage] = set()  # lineages with when_ready() futures to wake
        # Recoveries that abandoned a call (timeout, close): the listing is read for the runs they made. Own lock:
        # the executor reports an abandonment while it holds its own lock.
        self._abandon_lock = threading.Lock()
        # Recoveries that finished for a lineage no longer watched (its guard left): the run each made is this
        # process's, unwatched and closed by its leaver, so a later recovery of the same run is no fork of it.
        self._forsaken_ids: set[str] = set()
        self._unreconciled: set[RecoveryJob] = set()
        self._reconciling: dict[RecoveryJob, tuple[threading.Thread, Cancellation]] = {}
        self._checks: set[Future[bool]] = set()  # check_soon() futures not yet answered
        self._rest_users: dict[int, int] = {}  # id(service) -> lineages whose status is its REST client
        track_engine(self)

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        """Where the engine is in its life: unopened, opened (started) or closed."""
        return self._state

    def start(self) -> Self:
        """Start the poller, the poll workers and the executor. A closed engine cannot restart."""
        redact_loggers()  # loggers the HTTP stack made since the last look get the redacting filter too
        with self._cond:
            if self._state is EngineState.CLOSED:
                raise EngineClosed("a closed RecoveryEngine cannot be started again")
            if self._state is EngineState.OPENED:
                return self
            self._state = EngineState.OPENED
            self._bus.start()
            self._executor.start()
            self._threads = [threading.Thread(target=self._poller, name="tinkex-recovery-poller", daemon=True)]
            self._threads += [
                threading.Thread(target=self._poll_worker, name=f"tinkex-recovery-poll-{i}", daemon=True)
                for i in range(self._poll_concurrency)
            ]
            for t in self._threads:
                t.start()
        return self

    def close(self, timeout: float = 1.0) -> None:
        """Stop every thread, cancel what restore attempts wait for, and close the REST clients the engine
        made; no event or callback fires after it returns. Idempotent."""
        with self._cond:
            if self._state is EngineState.CLOSED:
                return
            self._state = EngineState.CLOSED
            self._cond.notify_all()
            for _ in self._threads[1:]:
                self._poll_queue.put(None)
            made, self._rest_clients = list(self._rest_clients.values()), {}
            self._rest_users.clear()
            waiting = [f for lineage in self._waited for f in lineage.ready]
            for lineage in self._waited:
                lineage.ready = []
            self._waited.clear()
            checks, self._checks = list(self._checks), set()
        _wake(waiting)
        for check in checks:  # their answers, queued on the notifier, will never be delivered
            _settle(check, error=EngineClosed("the engine closed before the poll's answer"))
        deadline = time.monotonic() + timeout
        self._executor.close(timeout)
        self._reconcile_at_close(deadline, timeout)
        self._bus.flush(timeout)  # the orphans' events are delivered before close() returns
        self._bus.close(timeout)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        for _, rest in made:
            close = getattr(rest, "close", None)
            if callable(close):
                call_safely(close, what=f"closing the REST client {type(rest).__name__}")

    def _reconcile_at_close(self, deadline: float, timeout: float) -> None:
        """Name the runs of every recovery that abandoned a call (close() abandons those under way), within the
        close bound: first the abandoned restore calls' answers, then the listing."""
        with self._abandon_lock:
            jobs = list(self._unreconciled)
        for job in jobs:
            job.end()  # no attempt follows: a restore call answering now is closed and named, never adopted
        for job in jobs:
            job.wait_answered(deadline - time.monotonic())
        for job in jobs:
            self._start_reconcile(job)
        with self._abandon_lock:
            running = list(self._reconciling.items())
        end = max(deadline, time.monotonic()) + timeout  # the listing gets its own bound, after the answers'
        for job, (thread, cancelled) in running:
            thread.join(max(end - time.monotonic(), 0.0))
            if thread.is_alive():
                cancelled.set()
                logger.warning(
                    "run %s: the training-runs listing did not answer within close()'s bound; runs recovery %s "
                    "may have made are not named here (`tinkex-recovery status %s` shows them as orphans)",
                    job.run_id,
                    job.recovery_id,
                    job.run_id,
                )
        for job in jobs:
            if job.unanswered:
                logger.warning(
                    "run %s: %d restore call(s) of recovery %s were unanswered at close; a run such a call makes is "
                    "never used, and not named here (`tinkex-recovery status %s` shows it as an orphan)",
                    job.run_id,
                    job.unanswered,
                    job.recovery_id,
                    job.run_id,
                )

    def _abandoned(self, job: RecoveryJob) -> None:
        with self._abandon_lock:
            self._unreconciled.add(job)

    def _forsaken(self, recovery_id: str) -> bool:
        """Whether ``recovery_id`` is a recovery of this engine that finished for a lineage no longer watched."""
        with self._cond:
            return recovery_id in self._forsaken_ids

    def _finished(self, job: RecoveryJob) -> None:
        """A recovery ended: if it abandoned a call, read the listing for runs it made (on a thread of its own)."""
        if job.abandoned and self._state is EngineState.OPENED:
            self._start_reconcile(job)

    def _start_reconcile(self, job: RecoveryJob) -> None:
        with self._abandon_lock:
            if job not in self._unreconciled:
                return
            self._unreconciled.discard(job)
            cancelled = Cancellation()
            thread = threading.Thread(
                target=self._reconcile, args=(job, cancelled), name=f"tinkex-recovery-reconcile[{job.run_id}]"
            )
            thread.daemon = True
            self._reconciling[job] = (thread, cancelled)
        thread.start()

    def _reconcile(self, job: RecoveryJob, cancelled: Cancellation) -> None:
        try:
            job.reconcile(cancelled)
        except Exception as exc:
            if not cancelled.is_set():
                logger.warning(
                    "run %s: reading the training-runs listing for the runs recovery %s made failed: %s",
                    job.run_id,
                    job.recovery_id,
                    describe(exc),
                )
        finally:
            with self._abandon_lock:
                self._reconciling.pop(job, None)

    def __enter__(self) -> Self:
        if self._state is not EngineState.UNOPENED:
            raise RuntimeError(f"a RecoveryEngine is single-use; this one is {self._state.value}")
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- public API -----------------------------------------------------------------------------------
    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(event)`` for every event (on the engine's threads); returns an unsubscribe function."""
        return self._bus.subscribe(fn)

    def watch(
        self,
        run_id: str,
        service: Any,
        metadata: Mapping[str, str] | None = None,
        *,
        inherited: Iterable[Checkpoint] = (),
        step_of: StepOf | None = None,
        status: Any = None,
        on_unsettled: Callable[[], None] | None = None,
    ) -> RunHandle:
        """Start watching ``run_id``; ``service`` restores it (anything with the two
        ``create_training_client_from_state*`` methods). ``metadata`` is added to every recovered run's
        user_metadata, next to the old run's own. ``inherited`` are checkpoints of earlier runs (e.g. the
        one ``run_id`` was restored from) that a recovery may fall back on while the run has none of its own.
        ``step_of(checkpoint)`` is for callers that must know where to resume: checkpoints for which it is
        None are skipped before any restore call, and each :class:`Recovery` carries the restored one's step.
        ``status`` reads this run (default: the engine's ``status``, else the service's REST client), so one
        engine can watch runs of callers that each bring their own status source. ``on_unsettled()`` is called
        whenever the handle stops being :attr:`RunHandle.settled` (a recovery starts, the lineage gives up or is
        unwatched), on the thread that changed it and under the engine's lock, before any event of it is
        delivered: a loop that must not read ``settled`` at every step raises a flag there, and reads it only once
        the flag is up. It must be quick, must not block, call the engine or take a lock that a thread calling
        the engine may hold (a deadlock); an ``Exception`` it raises is logged and ignored."""
        run_id = validate_run_id(run_id)
        for name, hook in (("step_of", step_of), ("on_unsettled", on_unsettled)):
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be callable, got {type(hook).__name__}")
        if not self.policy.enabled:
            raise RecoveryDisabled("the policy has enabled=False; pass RecoveryPolicy(enabled=True) to opt in")
        require_methods(service, SERVICE_METHODS, "service")
        pinned = self.policy.specific_path
        if pinned is not None and pinned.run_id != run_id:
            raise ValueError(
                f"checkpoint_strategy {self.policy.checkpoint_strategy!r} belongs to run {pinned.run_id}, "
                f"not to the watched run {run_id}"
            )
        meta = dict(metadata or {})
        bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"metadata must map str to str (Tinker's user_metadata); bad keys: {bad!r}")
        fallback = [Checkpoint.coerce(c) for c in inherited]
        if status is not None:
            require_methods(status, STATUS_METHODS, "status")
        made = status is None and self._status is None
        status = self._status_for(service) if made else (status or self._status)
        lineage = _Lineage(
            run_id=run_id,
            service=service,
            status=status,
            metadata=meta,
            inherited=fallback,
            step_of=step_of,
            on_unsettled=on_unsettled,
            uses_rest_client=made,
        )
        with self._cond:
            refused: Exception | None = None
            if self._state is EngineState.CLOSED:
                refused = EngineClosed("the engine is closed")
            elif run_id in self._watched:
                refused = ValueError(f"run {run_id} is already watched by this engine")
            else:
                self._watched[run_id] = lineage
        if refused is not None:
            self._release_status(lineage)
            raise refused
        return RunHandle(self, lineage)

    def poll_once(self) -> None:
        """Poll every watched run once, now, through the poll workers; returns when the polls are done and
        their events delivered. Raises :class:`EngineNotStarted` before ``start()``, :class:`EngineClosed`
        after ``close()``."""
        self._require_opened()
        self._poll_cycle()
        self._bus.flush()

    def _require_opened(self) -> None:
        state = self._state
        if state is EngineState.UNOPENED:
            raise EngineNotStarted("start() the engine first: before it, a detection could not be acted on")
        if state is EngineState.CLOSED:
            raise EngineClosed("the engine is closed")

    def _poll_cycle(self) -> None:
        done = threading.Semaphore(0)
        with self._cond:
            if self._state is not EngineState.OPENED:
                return
            lineages = [lin for lin in self._watched.values() if lin.state is RunState.WATCHING]
            # Enqueued under the lock, so close() (which takes it first) queues its stop markers after these.
            for lineage in lineages:
                self._poll_queue.put((lineage, done.release))
        for _ in lineages:
            done.acquire()

    @property
    def watched_runs(self) -> list[str]:
        """The newest run of every lineage this engine watches."""
        with self._cond:
            return list(self._watched)

    # -- polling --------------------------------------------------------------------------------------
    def _status_for(self, service: Any) -> Any:
        """The REST client the engine made for ``service`` (one per service), one more lineage counted as its
        user: the last one to be unwatched closes it (:meth:`_release_status`), so a long-lived engine keeps
        the clients of the services it watches now, not of every service it ever watched."""
        key = id(service)  # the entry holds the service: its id is not reused while the entry lives
        with self._cond:
            cached = self._rest_clients.get(key)
            if cached is not None:
                self._rest_users[key] += 1
                return cached[1]
        status = rest_client_of(service, timeout=self.policy.setup_timeout)
        with self._cond:
            closed = self._state is EngineState.CLOSED  # close() has closed the clients it knew: not this one
            kept = None if closed else self._rest_clients.setdefault(key, (service, status))[1]
            if not closed:
                self._rest_users[key] = self._rest_users.get(key, 0) + 1
        if kept is not status:  # closed, or another thread made one first: one client per service
            close = getattr(status, "close", None)
            if callable(close):
                call_safely(close, what="closing a REST client not kept")
        if kept is None:
            raise EngineClosed("the engine is closed")
        return kept

    def _release_status(self, lineage: _Lineage) -> None:
        """``lineage`` no longer reads its run: one user fewer of its REST client, closed by the last one."""
        with self._cond:
            if not lineage.uses_rest_client:
                return
            lineage.uses_rest_client = False
            key = id(lineage.service)
            users = self._rest_users.get(key, 0) - 1
            if users > 0:
                self._rest_users[key] = users
                return
            self._rest_users.pop(key, None)
            made = self._rest_clients.pop(key, None)
        rest = made[1] if made is not None else None
        close = getattr(rest, "close", None)
        if callable(close):
            call_safely(close, what=f"closing the REST client {type(rest).__name__}")

    def _poller(self) -> None:
        next_at = self._clock.monotonic() + self.policy.poll_interval  # the first poll one interval after start
        while True:
            with self._cond:
                while self._state is EngineState.OPENED:
                    now = self._clock.monotonic()
                    if now >= next_at:
                        break
                    self._clock.wait(self._cond, next_at - now)
                if self._state is not EngineState.OPENED:
                    return
            self._poll_cycle()
            now = self._clock.monotonic()
            next_at += self.policy.poll_interval
            next_at = max(next_at, now)  # a cycle that overran its interval: poll again at once, not in a burst

    def _poll_worker(self) -> None:
        while (item := self._poll_queue.get()) is not None:
            lineage, done = item
            try:
                self._poll_one(lineage)
            finally:
                done()

    def _poll_one(self, lineage: _Lineage) -> None:
        with self._cond:
            if lineage.state is not RunState.WATCHING or self._state is EngineState.CLOSED:
                return
            run_id = lineage.run_id
        try:
            run = TrainingRun.coerce(
                resolve(lineage.status.get_training_run(run_id), timeout=min(self.policy.poll_interval, 60.0))
            )
        except Exception as exc:
            report_poll(False)
            if status_code_of(exc) == 404 and not lineage.polled:  # watch("no-such-run"): say so, once
                self._exhausted(lineage, None, self._never_found(run_id, exc))
                return
            self._poll_failed(lineage, run_id, exc)
            return
        report_poll(True)
        with self._cond:
            lineage.polled = True
            if lineage.failed_polls >= self.policy.degraded_after:
                logger.info("run %s: polls answer again after %d failures", run_id, lineage.failed_polls)
            lineage.failed_polls = 0
        if run.corrupted:
            self._detect(lineage, run)

    def _poll_failed(self, lineage: _Lineage, run_id: str, exc: Exception) -> None:
        with self._cond:
            if lineage.run_id != run_id or lineage.state is RunState.UNWATCHED:  # unwatched during the poll
                return
            lineage.failed_polls += 1
            failures = lineage.failed_polls
        error = describe(exc)
        self._bus.emit(RecoveryEvent(EventKind.POLL_ERROR, run_id, error=error))
        if failures == self.policy.degraded_after:
            self._bus.emit(
                RecoveryEvent(EventKind.POLL_DEGRADED, run_id, error=f"{failures} polls failed in a row: {error}")
            )

    # -- recovery -------------------------------------------------------------------------------------
    def _detect(self, lineage: _Lineage, run: TrainingRun) -> None:
        with self._cond:
            if lineage.run_id != run.training_run_id or lineage.observed == run.training_run_id:
                return
        self._recover(lineage, run, quiet=True)

    def _recover(self, lineage: _Lineage, run: TrainingRun | None, *, quiet: bool = False) -> None:
        """Submit the one recovery job of ``lineage``: for a corruption a poll found (``run``), or on request
        (``run`` None: fetched by the job). ``quiet``: a lineage that cannot start one now is left alone."""
        observe = self.policy.mode == "observe"
        with self._cond:
            if lineage.state is not RunState.WATCHING or self._state is not EngineState.OPENED:
                if quiet:
                    return
                raise RuntimeError(f"run {lineage.run_id} is {lineage.state.value}; no recovery can start now")
            if observe:
                lineage.observed, lineage.observation = lineage.run_id, None
            else:
                lineage.state = RunState.RECOVERING
                self._unsettled(lineage)
            job = RecoveryJob(
                run_id=lineage.run_id,
                run=run,
                service=lineage.service,
                status=lineage.status,
                policy=self.policy,
                clock=self._clock,
                bus=self._bus,
                rng=self._rng,
                metadata=lineage.metadata,
                rejected=lineage.rejected,
                inherited=lineage.inherited,
                step_of=lineage.step_of,
                number=len(lineage.recoveries) + 1,
                history=lineage.history,
                detected_at=self._clock.monotonic(),
                on_done=lambda job, recovery: self._completed(lineage, job, recovery),
                on_exhausted=lambda job, error: self._exhausted(lineage, job, error),
                on_observed=lambda job, event: self._observed(lineage, event),
                on_abandoned=self._abandoned,
                forsaken=self._forsaken,
            )
        if run is not None:
            self._bus.emit(RecoveryEvent(EventKind.DETECTED, run.training_run_id, since_detected=0.0))
        if not self._executor.submit(job):  # closed meanwhile: nothing runs, so nothing is left RECOVERING
            with self._cond:
                if lineage.state is RunState.RECOVERING:
                    lineage.state = RunState.WATCHING

    @staticmethod
    def _unsettled(lineage: _Lineage) -> None:
        """``lineage`` was just moved (under the lock) to a state in which its handle is not settled: say so."""
        if lineage.on_unsettled is not None:
            call_safely(lineage.on_unsettled, what="on_unsettled callback")

    def _completed(self, lineage: _Lineage, job: RecoveryJob, recovery: Recovery) -> None:
        restored = recovery.checkpoint
        older = [c for c in [*(job.listed or []), *job.inherited, *job.origin] if c.time < restored.time]
        with self._cond:
            closed = self._state is EngineState.CLOSED
        if closed:  # answered while close() ran: never handed on, so closed and named
            job.adopted = None
            job.discard(recovery.client)
            return
        self._finished(job)
        with self._cond:
            if self._state is EngineState.CLOSED:
                job.discard(recovery.client)
                return
            if self._watched.get(lineage.run_id) is lineage:  # not a lineage watched anew meanwhile
                del self._watched[lineage.run_id]
            if lineage.state is RunState.UNWATCHED:  # nobody watches the run it made: not a rival of a re-watch
                self._forsaken_ids.add(job.recovery_id)
            lineage.run_id = recovery.new_run_id
            lineage.client = recovery.client
            lineage.recoveries = (*lineage.recoveries, recovery)
            lineage.rejected = job.rejected
            lineage.history = job.history_after(recovery)
            # The new run has no checkpoint of its own yet; if it is lost too, these are what it can use.
            lineage.inherited = [restored, *older]  # those in lineage.rejected are passed over at selection
            lineage.failed_polls = 0
            if lineage.state is RunState.RECOVERING:
                lineage.state = RunState.WATCHING
                self._watched.setdefault(recovery.new_run_id, lineage)
            unwatched = lineage.state is RunState.UNWATCHED
        if unwatched:
            self._release_status(lineage)
        self._bus.emit(
            RecoveryEvent(
                EventKind.COMPLETED,
                recovery.old_run_id,
                attempt=recovery.attempts,
                since_detected=recovery.seconds,
                checkpoint=restored.tinker_path,
                new_run_id=recovery.new_run_id,
            )
        )
        on_recovery = self.policy.on_recovery
        if on_recovery is not None:
            self._bus.call(lambda: call_safely(on_recovery, recovery, what="on_recovery callback"))
        self._bus.call(lambda: self._announce(lineage))  # waiters wake once the events and callbacks have run

    def _observed(self, lineage: _Lineage, event: RecoveryEvent) -> None:
        def record() -> None:
            with self._cond:
                lineage.observation = event
                self._cond.notify_all()

        # On the notifier, after the events it follows: observation() returns once subscribers have seen them.
        self._bus.call(record)

    def _announce(self, lineage: _Lineage) -> None:
        with self._cond:
            lineage.announced += 1
            self._cond.notify_all()
            ready, lineage.ready = lineage.ready, []
            self._waited.discard(lineage)
        _wake(ready)

    @staticmethod
    def _never_found(run_id: str, error: BaseException) -> RecoveryExhausted:
        """The end of a lineage whose run the first poll did not find: nothing to watch, nothing to restore."""
        not_found = run_not_found(run_id, error)
        exhausted = RecoveryExhausted(run_id, 0, describe(not_found), reason=ExhaustedReason.RUN_NOT_FOUND)
        exhausted.__cause__ = without_secrets(not_found)
        return exhausted

    def _exhausted(self, lineage: _Lineage, job: RecoveryJob | None, error: RecoveryExhausted) -> None:
        """The lineage ends: by a recovery that gave up (``job``), or a run the first poll did not find."""
        if job is not None:
            self._finished(job)
        with self._cond:
            if self._state is EngineState.CLOSED or (job is None and lineage.state is not RunState.WATCHING):
                return
            unwatched = lineage.state is RunState.UNWATCHED
            lineage.state = RunState.EXHAUSTED
            self._unsettled(lineage)
            if job is not None:
                lineage.rejected = job.rejected
        if unwatched:
            self._release_status(lineage)
        self._bus.emit(
            RecoveryEvent(
                EventKind.EXHAUSTED,
                error.run_id,
                attempt=error.attempts,
                since_detected=self._clock.monotonic() - job.detected_at if job is not None else None,
                error=error.last_error,
                reason=error.reason.value,
            )
        )
        on_failure = self.policy.on_failure
        if on_failure is not None:
            self._bus.call(lambda: call_safely(on_failure, error, what="on_failure callback"))

        def give_up() -> None:  # waiters wake once the event and callback have run
            with self._cond:
                lineage.exhausted = error
                self._cond.notify_all()
                ready, lineage.ready = lineage.ready, []
                self._waited.discard(lineage)
            _wake(ready)

        self._bus.call(give_up)

    def _unwatch(self, lineage: _Lineage) -> None:
        with self._cond:
            if self._watched.get(lineage.run_id) is lineage:
                del self._watched[lineage.run_id]
            recovering = lineage.state is RunState.RECOVERING
            if lineage.state is not RunState.EXHAUSTED:
                lineage.state = RunState.UNWATCHED  # a recovery under way still finishes, unwatched
                self._unsettled(lineage)
        if not recovering:  # else released when that recovery ends: it reads the run through the client
            self._release_status(lineage)
