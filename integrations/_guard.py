"""``recovery_guard``: a plain training loop that survives its run being corrupted.

The guard watches the run with the process's :class:`~tinkex_recovery.RecoveryEngine` for its policy (shared by
every guard with that policy, sync or async, and closed when the last one leaves) or the one passed as
``engine=``. The loop talks only to ``guard.client`` and walks ``guard.steps(...)``; at step boundaries the guard
swaps in the recovered client and moves the step iterator to the step the restored checkpoint was saved at, so
every step after that checkpoint is trained again on the new run, and none twice.

One guard serves plain loops and coroutines alike: ``with``/``async with``, ``for``/``async for``, ``with step``/
``async with step``. Every decision (is this failure a lost run? where to resume? what to close?) is made once, in
the plans below, which say what to wait for and never wait themselves; a blocking driver and an awaiting driver
(:mod:`._aio`) do the waiting, so an event loop is never blocked while its run is polled or recovered.

- Failures are judged in ``with step:``: an exception polls the run at once; if it is corrupted (or a
  recovery is under way) the guard waits for the new run and suppresses the exception (logged with its
  traceback and kept as :attr:`GuardRecovery.cause`), otherwise it propagates unchanged. Recoveries the poller
  finds are taken in before the next step. When the iterable runs out, one last poll makes sure the loop does
  not end on a run already marked corrupted.
- Where to resume is the ledger's one rule (:class:`~tinkex_recovery._ledger.Ledger`, the engine's ``step_of``):
  ``guard.client`` is the client behind a proxy that tells the ledger of every ``optim_step`` and ``save_state``
  sent, so each save, a bare ``save_state(name)`` too, records the step it holds in its user_metadata; a step the
  user records wins (``step`` in the user_metadata, else the ``batch`` of its record in
  ``{log_path}/checkpoints.jsonl``, tinker-cookbook's file). A checkpoint with no step is never restored for a
  guarded loop.
- Without a ``client``, the guard resumes at entry, as a restarted process needs: the engine restores a new
  run from ``run_id``'s checkpoint chosen by the policy (the same recovery, with the same rules, as for a
  corruption), and the loop starts at :attr:`RecoveryGuard.start_step`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from types import TracebackType
from typing import Any, Self, TypeVar

from tinkex_recovery import (
    Checkpoint,
    Clock,
    EngineClosed,
    Recovery,
    RecoveryEngine,
    RecoveryPolicy,
    RunHandle,
    RunState,
    SystemClock,
)
from tinkex_recovery._integration import (
    SERVICE_METHODS,
    STATUS_METHODS,
    Ledger,
    describe,
    report_steps_lost,
    require_methods,
    resolve,
    validate_run_id,
    would_do,
)

from . import _aio
from ._checkpoint_log import CheckpointLog, metadata_for, validate_metrics, validate_step
from ._rollouts import WeightsVersion, staleness
from ._shared import shared_engines
from ._steps import Step, StepCursor

__all__ = ["GuardRecovery", "RecoveryGuard", "Steps", "recovery_guard"]

logger = logging.getLogger("tinkex_recovery")

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardRecovery(Recovery):
    """A :class:`~tinkex_recovery.Recovery` as the training loop lived it."""

    resumed_at: int  #: the step the loop resumed at: the restored checkpoint's ``step``
    steps_lost: int  #: steps completed after that checkpoint, trained again on the new run
    waited: float  #: seconds the loop was held up waiting for the recovery (0 if it was done in time)
    #: the exception the loop's step raised and the guard suppressed because the run was lost (None when the
    #: poller found the loss between steps); also logged with its traceback
    cause: BaseException | None = field(default=None, repr=False, compare=False)


class _State(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


# -- what a plan asks its driver to wait for ---------------------------------------------------------------------
class _Poll:
    """Poll the run now; the answer is ``check_now()``'s."""

    __slots__ = ("handle",)

    def __init__(self, handle: RunHandle) -> None:
        self.handle = handle


class _Wait:
    """The next recovery of the run (``RecoveryExhausted`` and ``TimeoutError`` raised into the plan)."""

    __slots__ = ("bound", "handle")

    def __init__(self, handle: RunHandle, bound: float) -> None:
        self.handle, self.bound = handle, bound


class _Call:
    """A call that may block (it makes a REST client, or joins threads): never on an event loop's thread. Calls
    of one ``lane`` (the guard's service) run one after the other; other lanes never wait for them."""

    __slots__ = ("fn", "lane")

    def __init__(self, fn: Callable[[], object], lane: object = None) -> None:
        self.fn, self.lane = fn, lane


_Request = _Poll | _Wait | _Call
#: A decision procedure: yields what it needs waited for, receives the answer (or has the error raised into it).
_Plan = Generator[_Request, Any, T]


def _drive(plan: _Plan[T]) -> T:
    """Run ``plan``, blocking the calling thread for each wait."""
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = plan.send(answer) if error is None else plan.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        try:
            if isinstance(request, _Poll):
                answer, error = request.handle.check_now(), None
            elif isinstance(request, _Wait):
                answer, error = request.handle.wait_for_recovery(timeout=request.bound), None
            else:
                answer, error = request.fn(), None
        except BaseException as exc:
            answer, error = None, exc


async def _drive_async(plan: _Plan[T]) -> T:
    """Run ``plan``, awaiting each wait: the event loop runs on while the run is polled or recovered."""
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = plan.send(answer) if error is None else plan.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        try:
            if isinstance(request, _Poll):
                answer, error = await _aio.poll(request.handle), None
            elif isinstance(request, _Wait):
                answer, error = await _aio.next_recovery(request.handle, request.bound), None
            else:
                answer, error = await _aio.off_loop(request.fn, lane=request.lane), None
        except BaseException as exc:
            answer, error = None, exc


def _warn_if_on_event_loop(what: str, instead: str) -> None:
    if _aio.on_event_loop():
        warnings.warn(
            f"{what} on an event loop's thread blocks the loop while the run is polled or recovered; "
            f"use {instead} in a coroutine",
            RuntimeWarning,
            stacklevel=3,
        )


def _discard_late(handle: RunHandle) -> None:
    """A recovery that finished after its guard left (on an engine that went on): close its client."""
    try:
        recovery = handle.wait_for_recovery(timeout=0)
    except Exception:  # exhausted, or the engine closed: there is no new run
        return
    close = getattr(recovery.client, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            logger.exception("closing the client of run %s failed", recovery.new_run_id)
    logger.warning(
        "recovery_guard: run %s was recovered as %s after its guard left; that run is not used",
        recovery.old_run_id,
        recovery.new_run_id,
    )


class Steps(Iterator[Step], AsyncIterator[Step]):
    """What :meth:`RecoveryGuard.steps` returns: walk it once, with ``for`` in a plain loop or ``async for`` in a
    coroutine (where waiting for a recovery is awaited)."""

    __slots__ = ("_cursor", "_guard", "_walk")

    def __init__(self, guard: RecoveryGuard, cursor: StepCursor) -> None:
        self._guard = guard
        self._cursor = cursor
        self._walk: Iterator[Step] | AsyncIterator[Step] | None = None

    def __iter__(self) -> Iterator[Step]:
        if self._walk is None:
            _warn_if_on_event_loop("`for step in guard.steps(...)`", "`async for`")
            self._walk = self._guard._walk(self._cursor)
        if not isinstance(self._walk, Iterator):
            raise RuntimeError("these steps are walked with `async for`; walk each steps() once")
        return self._walk

    def __next__(self) -> Step:
        return next(self.__iter__())

    def __aiter__(self) -> AsyncIterator[Step]:
        if self._walk is None:
            self._walk = self._guard._awalk(self._cursor)
        if not isinstance(self._walk, AsyncIterator):
            raise RuntimeError("these steps are walked with `for`; walk each steps() once")
        return self._walk

    async def __anext__(self) -> Step:
        return await self.__aiter__().__anext__()


class RecoveryGuard:
    """A context manager that keeps one training run alive for a plain loop or a coroutine; see
    :func:`recovery_guard`.

    Use it from the loop's thread (or event loop) only. It is single-use.
    """

    def __init__(
        self,
        run_id: str,
        service: Any,
        *,
        policy: RecoveryPolicy | None = None,
        client: Any = None,
        status: Any = None,
        log_path: str | os.PathLike[str] | None = None,
        clock: Clock | None = None,
        engine: RecoveryEngine | None = None,
        on_swap: Callable[[Any], object] | None = None,
    ) -> None:
        self._origin = validate_run_id(run_id)
        if engine is not None and not isinstance(engine, RecoveryEngine):
            raise TypeError(f"engine must be a RecoveryEngine, got {type(engine).__name__}")
        if policy is None:
            # using the guard is the opt-in; on a given engine, its policy governs
            policy = engine.policy if engine is not None else RecoveryPolicy(enabled=True)
        if not isinstance(policy, RecoveryPolicy):
            raise TypeError(f"policy must be a RecoveryPolicy, got {type(policy).__name__}")
        if engine is not None and policy != engine.policy:
            raise ValueError("policy differs from the engine's: a guard on engine= recovers by the engine's policy")
        if on_swap is not None and not callable(on_swap):
            raise TypeError(f"on_swap must be callable, got {type(on_swap).__name__}")
        if client is not None:
            model_id = getattr(client, "model_id", None)
            if isinstance(model_id, str) and model_id != run_id:
                raise ValueError(f"client is bound to run {model_id}, not to run_id {run_id}")
        elif policy.mode == "observe":
            raise ValueError(
                "observe mode needs client=: resuming at entry restores a new run, which observe never does"
            )
        elif policy.specific_path is not None:
            raise ValueError(
                "a checkpoint_strategy pinned to a path needs client=: resuming at entry starts a new run, "
                "which the pinned path does not belong to"
            )
        if status is not None:
            require_methods(status, STATUS_METHODS, "status")
        self.policy = policy
        self._service = service
        self._status = status
        self._log = CheckpointLog(log_path) if log_path is not None else None
        self._clock = clock or SystemClock()
        # The shared engine is the one for this policy and this clock; every SystemClock is the same real time.
        self._engine_clock = None if clock is None or type(clock) is SystemClock else clock
        self._given_engine = engine
        self._on_swap = on_swap
        self._ledger = Ledger(position=self._position, recorded=self._log.step_of if self._log is not None else None)
        self._client: Any = self._ledger.adopt(client) if client is not None else None
        self._run_id = run_id
        self._state = _State.NEW
        self._engine: RecoveryEngine | None = None
        self._handle: RunHandle | None = None
        self._leased: RecoveryEngine | None = None  # the shared engine this guard must give back
        self._cursor: StepCursor | None = None
        self._recoveries: list[GuardRecovery] = []
        self._rewound = False  # a recovery was taken in since the last step was yielded
        self.start_step: int | None = None
        """The step to start the loop at, when the guard resumed the run at entry (no ``client`` given)."""
        self.resumed_from: Checkpoint | None = None
        """The checkpoint the guard resumed from at entry, if it did."""

    # -- what the loop reads ------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The training client to use now: the one passed in (or resumed at entry), then each recovered one.

        It is that client behind an :class:`~tinkex_recovery.ObservedClient`, a proxy that passes every call
        through and passes for the client (``isinstance(guard.client, tinker.TrainingClient)`` holds): its
        ``optim_step`` and ``save_state`` calls are counted by :attr:`ledger`, so a bare ``save_state(name)``
        records the step it holds in the checkpoint's user_metadata and is a checkpoint the loop resumes from.
        ``guard.client.__wrapped__`` is the client itself (calls made on it are not seen)."""
        return self._client

    @property
    def ledger(self) -> Ledger:
        """The book of the run: :attr:`Ledger.step` is the step a checkpoint saved now would hold (what the loop
        resumes at after restoring it), :attr:`Ledger.sent` the optimizer steps sent to the current run."""
        return self._ledger

    def _position(self) -> int | None:
        """The step under way (the last index yielded), for the ledger; None before the loop."""
        cursor = self._cursor
        return cursor.current if cursor is not None else None

    @property
    def run_id(self) -> str:
        """The run :attr:`client` trains."""
        return self._run_id

    @property
    def recoveries(self) -> tuple[GuardRecovery, ...]:
        """Every recovery the loop has gone through, oldest first. Its length changes exactly when the run
        does: a loop holding futures can tag them with it (or watch :attr:`Step.resumed`)."""
        return tuple(self._recoveries)

    @property
    def engine(self) -> RecoveryEngine | None:
        """The engine watching the run (the process's one for this policy, or ``engine=``); None before entry
        and when the policy is disabled. Subscribe to it for events."""
        return self._engine

    # -- RL: the weights samplers are made from ------------------------------------------------------------
    def weights_version(self, step: int | None = None) -> WeightsVersion:
        """The version of the weights :attr:`client` holds now, to tag a sampler made from them (and its
        rollouts) with: ``step`` (default: the :attr:`ledger`'s step, the index of the next step to train), the
        run, and how many recoveries the loop has gone through. Read it where the sampler is made, inside the
        step (recoveries are taken in only between steps)."""
        self._require_open("weights_version()")
        if step is None:
            step = self._ledger.step
            if step is None:
                raise ValueError("the step the weights hold is not known here (no step under way); pass step=")
        return WeightsVersion(validate_step(step), self._run_id, len(self._recoveries))

    def staleness(self, version: WeightsVersion, *, at: int) -> int | None:
        """How many steps the weights of ``version`` are behind step ``at`` of the current lineage (0: on-policy),
        or None when they are not in its history: from the future of a run lost and restored to an earlier step
        (or ahead of ``at``). An RL loop trains a rollout at step ``at`` only if this is not None and at most its
        ``max_steps_off_policy``."""
        if not isinstance(version, WeightsVersion):
            raise TypeError(f"version must be a WeightsVersion, got {type(version).__name__}")
        origin = self._recoveries[0].old_run_id if self._recoveries else self._run_id
        return staleness(version, validate_step(at), self._recoveries, origin)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        _warn_if_on_event_loop("`with recovery_guard(...)`", "`async with`")
        _drive(self._enter_plan())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _drive(self._close_plan())

    async def __aenter__(self) -> Self:
        await _drive_async(self._enter_plan())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await _drive_async(self._close_plan())

    def _enter_plan(self) -> _Plan[None]:
        if self._state is not _State.NEW:
            raise RuntimeError(f"a recovery_guard is single-use; this one is {self._state.value}")
        self._state = _State.OPEN
        try:
            if self._client is None:
                yield from self._resume_plan()
            if not self.policy.enabled:
                logger.info(
                    "recovery_guard: recovery is disabled by the policy (enabled=False); run %s is not watched "
                    "and the guard passes everything through",
                    self._run_id,
                )
                return
            if self._handle is None:
                policy = self.policy
                yield _Call(lambda: self._watch(policy), self._service)
        except BaseException:
            yield from self._close_plan()
            raise

    def _watch(self, policy: RecoveryPolicy) -> None:
        """Watch the run on the given engine or on the process's one for ``policy``. May block (the service's
        REST client is made here): a driver runs it off any event loop."""
        if self._given_engine is not None:
            engine = self._given_engine.start()
        else:
            engine = self._leased = shared_engines.acquire(policy, self._engine_clock)
        self._engine = engine
        self._handle = engine.watch(self._run_id, self._service, step_of=self._ledger.step_of, status=self._status)

    def _release(self) -> None:
        """Stop watching the run and give the shared engine back (the last guard to do so closes it, abandoning
        any restore under way). A restore still under way for this run on an engine that goes on (other guards
        use it, or it was given) finishes there, and the run it makes is closed and named, never used."""
        handle, leased = self._handle, self._leased
        self._handle = self._leased = None
        try:
            if handle is not None:
                recovering = handle.state is RunState.RECOVERING
                handle.unwatch()
                if recovering:
                    handle.when_ready().add_done_callback(lambda _: _discard_late(handle))
        finally:
            if leased is not None:
                shared_engines.release(leased)

    def _close_plan(self) -> _Plan[None]:
        self._state = _State.CLOSED
        if self._handle is not None or self._leased is not None:
            yield _Call(self._release, self._service)

    def _require_open(self, what: str) -> None:
        if self._state is not _State.OPEN:
            raise RuntimeError(f"{what} is only available inside `with recovery_guard(...) as guard:`")

    # -- the loop -----------------------------------------------------------------------------------------
    def steps(self, iterable: Iterable[int]) -> Steps:
        """A :class:`Step` for each step index of ``iterable`` (ints, strictly increasing, e.g. a ``range``),
        walked with ``for`` or ``async for``; after a recovery, continue with the first index ``>=`` the restored
        checkpoint's step."""
        self._require_open("steps()")
        return Steps(self, StepCursor(iterable))

    def _walk(self, cursor: StepCursor) -> Iterator[Step]:
        self._cursor = cursor
        # RunHandle.settled, inlined: as a property call it costs a third of the guard's per-step overhead.
        lineage = self._handle._lineage if self._handle is not None else None
        open_, watching = _State.OPEN, RunState.WATCHING  # locals: an enum member lookup costs in a hot loop
        while True:
            if self._state is not open_:
                raise RuntimeError("the recovery_guard was closed while its steps were being iterated")
            if lineage is not None and (lineage.state is not watching or len(lineage.recoveries) > lineage.consumed):
                _drive(self._catch_up_plan(next_pos=cursor.pos))
            try:
                index = next(cursor.iterator)
            except StopIteration:
                if _drive(self._end_plan(cursor)):
                    continue
                return
            if self._rewound:
                self._rewound = False
                yield Step(self, index, True)
            else:
                yield Step(self, index)

    async def _awalk(self, cursor: StepCursor) -> AsyncIterator[Step]:
        """:meth:`_walk`, awaiting where it blocks."""
        self._cursor = cursor
        lineage = self._handle._lineage if self._handle is not None else None
        open_, watching = _State.OPEN, RunState.WATCHING
        while True:
            if self._state is not open_:
                raise RuntimeError("the recovery_guard was closed while its steps were being iterated")
            if lineage is not None and (lineage.state is not watching or len(lineage.recoveries) > lineage.consumed):
                await _drive_async(self._catch_up_plan(next_pos=cursor.pos))
            try:
                index = next(cursor.iterator)
            except StopIteration:
                if await _drive_async(self._end_plan(cursor)):
                    continue
                return
            if self._rewound:
                self._rewound = False
                yield Step(self, index, True)
            else:
                yield Step(self, index)

    def _judge(self, step: Step, exc: BaseException) -> bool:
        """Whether to suppress ``exc``, raised inside ``step`` (``with step:``), waiting by blocking."""
        if self._handle is not None and isinstance(exc, Exception):
            _warn_if_on_event_loop("`with step:`", "`async with step:`")
        return _drive(self._judge_plan(step, exc))

    async def _judge_async(self, step: Step, exc: BaseException) -> bool:
        """Whether to suppress ``exc``, raised inside ``step`` (``async with step:``), waiting by awaiting."""
        return await _drive_async(self._judge_plan(step, exc))

    # -- the decisions, shared by both faces: they say what to wait for and never wait ----------------------
    def _judge_plan(self, step: Step, exc: BaseException) -> _Plan[bool]:
        """Suppress ``exc`` if the run is, or turns out to be, corrupted; then the recovery is taken in and the
        loop rewound."""
        handle = self._handle
        if not isinstance(exc, Exception) or handle is None or self._state is not _State.OPEN:
            return False
        since = self._clock.monotonic()
        try:
            lost = yield _Poll(handle)
        except EngineClosed:
            if self._given_engine is None:
                raise
            raise EngineClosed(
                f"recovery_guard: step {step.index} of run {self._run_id} failed, and the engine passed as engine= "
                f"({self._given_engine!r}) is closed, so the run could not be checked; the step's own error is the "
                "cause of this one"
            ) from exc
        if not lost and handle.state is not RunState.EXHAUSTED:
            if handle.observed is not None:  # observe mode: report what recover mode would do, change nothing
                wait = self._wait_bound()
                would = yield _Call(lambda: would_do(handle, wait))  # waits for the engine's check of it
                logger.warning(
                    "recovery_guard (observe mode): step %d failed on run %s, which is corrupted; %s; the error is "
                    "let through",
                    step.index,
                    handle.observed,
                    would,
                )
            return False
        logger.info(
            "recovery_guard: step %d failed on run %s, which was lost (%s); recovering",
            step.index,
            self._run_id,
            describe(exc),
        )
        logger.debug("recovery_guard: the error of step %d", step.index, exc_info=(type(exc), exc, exc.__traceback__))
        assert self._cursor is not None
        yield from self._catch_up_plan(next_pos=self._cursor.pos - 1, cause=exc, since=since)
        return True

    def _end_plan(self, cursor: StepCursor) -> _Plan[int]:
        """The iterable ran out: one last poll, so the loop never ends on a run the server already marked
        corrupted; how many recoveries that took in (the walk goes on if any)."""
        if self._handle is not None:
            yield _Poll(self._handle)
        return (yield from self._catch_up_plan(next_pos=cursor.pos))

    def _catch_up_plan(
        self, *, next_pos: int, cause: BaseException | None = None, since: float | None = None
    ) -> _Plan[int]:
        """Take in every recovery that is finished or under way, and return how many; ``next_pos`` is where
        the loop would go on without them, ``since`` when the loop stopped for them (default: now)."""
        handle = self._handle
        if handle is None:
            return 0
        taken = 0
        while not handle.settled:
            started = self._clock.monotonic() if since is None else since
            since = None
            recovery = yield _Wait(handle, self._wait_bound())  # RecoveryExhausted leaves the loop
            taken += 1
            self._apply(recovery, next_pos=next_pos, waited=self._clock.monotonic() - started, cause=cause)
            cause = None
            assert self._cursor is not None
            next_pos = self._cursor.pos
        return taken

    def _wait_bound(self) -> float:
        p = self.policy
        return p.max_attempts * (p.attempt_timeout + p.max_backoff) + 60.0

    def _apply(self, recovery: Recovery, *, next_pos: int, waited: float, cause: BaseException | None) -> None:
        step = recovery.step
        assert step is not None, "the engine restores a guarded loop only from checkpoints with a step"
        assert self._cursor is not None
        self._cursor.seek(step)
        self._client = self._ledger.adopt(recovery.client, step)
        self._run_id = recovery.new_run_id
        record = GuardRecovery(
            **{f.name: getattr(recovery, f.name) for f in fields(Recovery) if f.name != "client"},
            client=self._client,
            resumed_at=step,
            steps_lost=max(next_pos - self._cursor.pos, 0),
            waited=waited,
            cause=cause,
        )
        self._recoveries.append(record)
        self._rewound = True
        report_steps_lost(record.steps_lost, "guard")
        logger.info(
            "recovery_guard: run %s recovered as %s from %s in %.3fs; resuming at step %d (%d step(s) trained again)",
            record.old_run_id,
            record.new_run_id,
            record.checkpoint.tinker_path,
            record.seconds,
            step,
            record.steps_lost,
        )
        if self._on_swap is not None:
            self._on_swap(self._client)  # on the loop's thread, before its next step; what it raises propagates

    # -- checkpoints --------------------------------------------------------------------------------------
    def save_state(
        self,
        name: str,
        *,
        step: int | None = None,
        metrics: Mapping[str, int | float] | None = None,
        ttl_seconds: int | None = None,
    ) -> str:
        """Save the current client's state as checkpoint ``name`` and return its tinker path.

        ``step`` is the index of the next step to run (what a resume starts at); by default the one the
        :attr:`ledger` counted (the step under way plus one once an ``optim_step`` of it was sent; a bare
        ``guard.client.save_state(name)`` records the same). It and the numeric ``metrics`` go into the
        checkpoint's user_metadata, so recovery (and ``best``) can use them even in a new process. With
        ``log_path``, a tinker-cookbook record is appended to checkpoints.jsonl. A loop with requests in flight
        saves what the service has been sent: a save submitted after step k's requests holds every step up to
        k, so it is ``step=k + 1``.
        """
        self._require_open("save_state()")
        step, values, ttl_seconds = self._checked_save(name, step, metrics, ttl_seconds)
        result = resolve(
            self._client.save_state(name, ttl_seconds=ttl_seconds, user_metadata=metadata_for(step, values))
        )
        return self._saved(name, step, values, result)

    async def save_state_async(
        self,
        name: str,
        *,
        step: int | None = None,
        metrics: Mapping[str, int | float] | None = None,
        ttl_seconds: int | None = None,
    ) -> str:
        """:meth:`save_state`, awaited: the client's ``save_state(...)`` (which returns a future at once, in the
        SDK) is awaited, so the event loop runs on while the checkpoint is written."""
        self._require_open("save_state_async()")
        step, values, ttl_seconds = self._checked_save(name, step, metrics, ttl_seconds)
        pending = self._client.save_state(name, ttl_seconds=ttl_seconds, user_metadata=metadata_for(step, values))
        return self._saved(name, step, values, await _aio.settle(pending))

    def _checked_save(
        self, name: object, step: object, metrics: Mapping[str, int | float] | None, ttl_seconds: object
    ) -> tuple[int, dict[str, int | float], int | None]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if step is None:
            step = self._ledger.step
            if step is None:
                raise ValueError(
                    "the step this checkpoint holds is not known (no step under way, or a load_state was made "
                    "through the client); pass step= (the index of the next step to run)"
                )
        checked = validate_step(step)
        values = validate_metrics(metrics)
        if ttl_seconds is not None and (isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int)):
            raise TypeError(f"ttl_seconds must be an int or None, got {ttl_seconds!r}")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        return checked, values, ttl_seconds

    def _saved(self, name: str, step: int, values: dict[str, int | float], result: object) -> str:
        path = getattr(result, "path", result)
        if not isinstance(path, str):
            raise TypeError(f"save_state() returned no tinker path (got {type(result).__name__})")
        if self._log is not None:
            self._log.append(name, step, path, values)
        return path

    # -- resuming in a new process ------------------------------------------------------------------------
    def _resume_plan(self) -> _Plan[None]:
        """Without a client: the engine restores a new run from ``run_id``'s chosen checkpoint; the loop starts
        at its step. A disabled policy still resumes (there is no client otherwise), then watches nothing."""
        require_methods(self._service, SERVICE_METHODS, "service")
        policy = self.policy if self.policy.enabled else self.policy.replace(enabled=True)
        yield _Call(lambda: self._watch(policy), self._service)
        handle = self._handle
        assert handle is not None
        handle.request_recovery()
        recovery = yield _Wait(handle, self._wait_bound())
        if not self.policy.enabled:
            yield _Call(self._release, self._service)  # the resume is all a disabled guard does
            self._engine = None
        assert recovery.step is not None, "the engine resumes a guarded loop only from checkpoints with a step"
        self._client, self._run_id = self._ledger.adopt(recovery.client, recovery.step), recovery.new_run_id
        self.start_step, self.resumed_from = recovery.step, recovery.checkpoint
        logger.info(
            "recovery_guard: run %s resumed as %s from %s; start at step %d",
            self._origin,
            recovery.new_run_id,
            recovery.checkpoint.tinker_path,
            recovery.step,
        )

    def __repr__(self) -> str:
        return f"<RecoveryGuard run_id={self._run_id!r} state={self._state.value} recoveries={len(self._recoveries)}>"


def recovery_guard(
    run_id: str,
    service: Any,
    *,
    policy: RecoveryPolicy | None = None,
    client: Any = None,
    status: Any = None,
    log_path: str | os.PathLike[str] | None = None,
    clock: Clock | None = None,
    engine: RecoveryEngine | None = None,
    on_swap: Callable[[Any], object] | None = None,
) -> RecoveryGuard:
    """Keep ``run_id`` alive for a plain training loop::

        with recovery_guard(run_id, service, policy=policy, client=training_client) as guard:
            for step in guard.steps(range(start, num_steps)):
                with step:
                    ...  # train step.index through guard.client; guard.save_state(..., step=step.index + 1)

    or for a coroutine, the same guard awaited (the event loop is never blocked while the run is polled or
    recovered)::

        async with recovery_guard(run_id, service, policy=policy, client=training_client) as guard:
            async for step in guard.steps(range(start, num_steps)):
                async with step:
                    ...  # await guard.client's futures; await guard.save_state_async(..., step=step.index + 1)

    ``service`` restores runs (a ``tinker.ServiceClient``); ``status`` reads them (default: the service's
    REST client). No ``policy`` means ``RecoveryPolicy(enabled=True)``; a disabled policy makes the guard a
    pass-through that starts no thread. Without ``client``, the guard resumes at entry: it restores a new run
    from ``run_id``'s chosen checkpoint and sets :attr:`RecoveryGuard.start_step`. ``log_path`` adds a
    tinker-cookbook ``checkpoints.jsonl`` as a record of steps. ``clock`` is for tests.

    Guards in one process share one engine per policy (and clock), whose threads stop when the last of them
    leaves; ``engine=`` watches on that engine instead (started if need be, never closed by the guard).
    ``on_swap(new_client)`` is called on the loop's thread each time a recovery swaps the client, before the
    next step: keep objects that hold the client (a tinker-cookbook ``CheckpointManager``) current there.
    """
    return RecoveryGuard(
        run_id,
        service,
        policy=policy,
        client=client,
        status=status,
        log_path=log_path,
        clock=clock,
        engine=engine,
        on_swap=on_swap,
    )
