"""One recovery of one lineage: choose a checkpoint, restore from it, decide what to do on failure.

This is the only place a run is ever restored: a poll that finds the run corrupted, a training call that
fails, a guard resuming at entry and the Lightning callback all end up here, under one set of rules.

A :class:`RecoveryJob` is what the executor runs. Each attempt happens on a worker thread and reports what it
learned (which checkpoints turned out unusable) in its outcome; all decisions and all state changes happen in
:meth:`RecoveryJob.on_outcome`, on the executor's dispatcher thread. An abandoned attempt (past
``attempt_timeout``) stops waiting at once. A restore call it sent stays the recovery's one run in the making:
the next attempt waits for its answer rather than send another (see :meth:`RecoveryJob._make_run`); once the
recovery ended, a client that call still gets is closed and reported, never adopted.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from ._clock import Clock
from ._events import EventBus, EventKind, RecoveryEvent
from ._exceptions import (
    ExhaustedReason,
    InvalidTinkerPath,
    NoRestorableCheckpoint,
    RecoveryExhausted,
    RecoveryRefused,
    RunNotFound,
    TinkerConnectionError,
)
from ._executor import Cancellation, Outcome, OutcomeKind
from ._ledger import RESUME_KEY
from ._lineage import (
    all_runs,
    children,
    continuing,
    lists_runs,
    metadata_of,
)
from ._models import STEP_KEY, Checkpoint, CheckpointList, TinkerPath, TrainingRun, parse_step
from ._names import CREATED_AT_KEY, FROM_RUN_KEY, LINEAGE_KEYS, RECOVERY_ID_KEY
from ._policy import RecoveryPolicy
from ._redact import without_secrets
from ._retry import FailureKind, backoff_delay, classify, describe, is_connection_error, status_code_of, unreachable
from ._selection import StepOf, dedupe, rank, synthetic, walk

__all__ = ["BUDGET_KEYS", "LINEAGE_KEYS", "Recovery", "checkpoint_step"]

logger = logging.getLogger("tinkex_recovery")


#: The checkpoint user_metadata keys that may hold its step, first found wins: the user's ``step`` (the guard's
#: ``save_state`` and the cookbook write it), then the one the ledger writes (:data:`~._ledger.RESUME_KEY`).
STEP_KEYS = (STEP_KEY, RESUME_KEY)


def checkpoint_step(checkpoint: Checkpoint) -> int | None:
    """How many optimizer steps ``checkpoint`` holds, per its user_metadata (:data:`STEP_KEYS`), or None. The
    one place the safety budgets read a step from."""
    metadata = checkpoint.user_metadata or {}
    return next((s for key in STEP_KEYS if (s := parse_step(metadata.get(key))) is not None), None)


BUDGET_KEYS = ("tinkex_recovery.recovery_times", "tinkex_recovery.no_progress", "tinkex_recovery.restored_step")
"""user_metadata keys written on every recovered run for the safety budgets, so that a restarted process counts
the recoveries of the process before it: the wall-clock times (UTC, ISO 8601, space-separated, oldest first)
of the lineage's recoveries still inside ``recovery_window``, the one that made this run included; how many
recoveries in a row before that one made no progress (their restored run was lost before it saved a checkpoint
holding more steps than the one it was restored from); and that checkpoint's step, when known."""

_NAMED = 3  # checkpoints a "no restorable checkpoint left" message names per reason (events name every one)
_KEPT_WITHOUT_BUDGET = 10  # recovery times kept in user_metadata when max_recoveries is None (for the record)


def _format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class History:
    """What the past recoveries of a lineage tell the safety budgets about the next one: kept by the engine for
    each lineage, and in each recovered run's user_metadata (:data:`BUDGET_KEYS`) for the next process."""

    times: tuple[datetime, ...] = ()  #: wall-clock times of the recoveries, oldest first
    no_progress: int = 0  #: recoveries in a row, before the one that made the current run, without progress
    restored_from: str | None = None  #: the checkpoint the current run was restored from; None: not restored
    restored_step: int | None = None  #: that checkpoint's step, when it records one

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> History:
        """The history a recovered run's user_metadata records (empty for a run no recovery made). Entries that
        do not parse are ignored: the metadata is the user's to edit."""
        metadata = metadata or {}
        times = (_parse_time(t) for t in metadata.get(BUDGET_KEYS[0], "").split())
        try:
            streak = max(int(metadata.get(BUDGET_KEYS[1], "0")), 0)
        except ValueError:
            streak = 0
        try:
            step: int | None = int(metadata[BUDGET_KEYS[2]])
        except (KeyError, ValueError):
            step = None
        return cls(
            tuple(sorted(t for t in times if t is not None)),
            streak,
            metadata.get(LINEAGE_KEYS[1]),
            step if step is None or step >= 0 else None,
        )

    def merged(self, other: History) -> History:
        """Both records of one lineage (the engine's and the run's metadata): every recovery either knows of.
        Two recoveries may share a time, so a time appears as often as in the record that has it most often."""
        return History(
            tuple(sorted((Counter(self.times) | Counter(other.times)).elements())),
            max(self.no_progress, other.no_progress),
            self.restored_from if self.restored_from is not None else other.restored_from,
            self.restored_step if self.restored_from is not None else other.restored_step,
        )

    def metadata(self) -> dict[str, str]:
        """The :data:`BUDGET_KEYS` entries for a run this history's last recovery makes."""
        return {BUDGET_KEYS[0]: " ".join(_format_time(t) for t in self.times), BUDGET_KEYS[1]: str(self.no_progress)}

    def clamped(self, now: datetime) -> History:
        """This history with every time after ``now`` counted as ``now``: a host whose clock runs ahead must not
        keep a lineage refused for as long as its skew, only for ``recovery_window`` from now."""
        return replace(self, times=tuple(sorted(min(t, now) for t in self.times)))


@dataclass(frozen=True, slots=True)
class Recovery:
    """A finished recovery: ``old_run_id`` was lost and ``new_run_id`` restored from ``checkpoint``."""

    old_run_id: str
    new_run_id: str
    checkpoint: Checkpoint
    attempts: int
    seconds: float  #: from detection to the new client in hand
    number: int  #: 1 for the first recovery of a lineage, then 2, ...
    step: int | None = None  #: the restored checkpoint's step, when the watch was given ``step_of``
    client: Any = field(default=None, repr=False, compare=False)


class AttemptAbandoned(Exception):
    """The attempt's wait was cancelled (deadline passed, or the engine closed)."""


class LineageForked(Exception):
    """Another recovery of the same run (another process, another engine) made the run that continues the lineage,
    :attr:`winner`: this recovery stops (its own run, if it made one, is named an orphan)."""

    def __init__(self, run_id: str, winner: str, *, made: str | None) -> None:
        self.winner = winner
        mine = f"; this recovery's run {made} does not continue" if made else ""
        super().__init__(f"run {run_id} was also recovered elsewhere: run {winner} continues the lineage{mine}")


class _Unwatchable(Exception):
    """A restore call's future of unknown make, abandoned: its answer cannot be waited for (the listing names
    the run it makes)."""


@dataclass(eq=False)
class _Call:
    """A restore call sent: its answer comes in ``future``, whichever attempt (or none) waits for it then."""

    future: Future[Any]
    checkpoint: Checkpoint
    sent: float  #: clock time it was sent
    answered: bool = False
    taken: bool = False  #: an attempt took the answer (adopted it, or handled its error), or it was named


def _copy(done: Future[Any], to: Future[Any]) -> None:
    if done.cancelled():
        to.set_exception(AttemptAbandoned("the restore future was cancelled"))
    elif (error := done.exception()) is not None:
        to.set_exception(error)
    else:
        to.set_result(done.result())


@dataclass
class _Report:
    checkpoint: Checkpoint | None = None
    step: int | None = None  # the chosen checkpoint's step, as step_of said when it was chosen
    unusable: set[str] = field(default_factory=set)
    rejected_by_server: bool = False
    selected: RecoveryEvent | None = None


def run_not_found(run_id: str, error: BaseException) -> RunNotFound:
    """A 404 on reading the run itself (whatever client raised it) as one :class:`RunNotFound` saying what to
    check: nothing is retried for it, as no retry can find a run that is not there."""
    if isinstance(error, RunNotFound):
        return error
    return RunNotFound(
        f"run {run_id} not found ({describe(error)}): check the run id, and that the client points at the Tinker "
        "that holds it (base_url, TINKER_BASE_URL)",
        status_code=404,
        run_id=run_id,
    )


def lineage_metadata(from_run: str, checkpoint_path: str, number: int | None = None) -> dict[str, str]:
    """The user_metadata keys naming where a recovered run came from (``number``: its place in the lineage)."""
    keys = dict(zip(LINEAGE_KEYS[:2], (from_run, checkpoint_path), strict=True))
    return keys if number is None else {**keys, LINEAGE_KEYS[2]: str(number)}


def restore_from(service: Any, path: str, *, with_optimizer: bool, metadata: Mapping[str, str]) -> Any:
    """Ask ``service`` for a new run from the checkpoint at ``path`` (with its optimizer state if
    ``with_optimizer``), passing ``metadata`` as the new run's user_metadata where the service takes it.
    Returns the training client, or a future of it."""
    if with_optimizer:
        method = service.create_training_client_from_state_with_optimizer
    else:
        method = service.create_training_client_from_state
    if not accepts_kwarg(method, "user_metadata"):
        return method(path)
    return method(path, user_metadata=dict(metadata))


def accepts_kwarg(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` can be called with the keyword ``name``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _concurrent_future(value: Any) -> Future[Any] | None:
    """The ``concurrent.futures.Future`` behind ``value``: itself, or the SDK's ``APIFuture.future()``."""
    if isinstance(value, Future):
        return value
    getter = getattr(type(value), "future", None)  # on the class: not an attribute a mock conjures
    if callable(getter):
        inner = value.future()
        if isinstance(inner, Future):
            return inner
    return None


_POLL_SLICE = 0.05  # a future-like with nothing to wait on but result(timeout) is asked again this often


def await_result(
    value: Any,
    cancelled: Cancellation,
    on_late: Callable[[Future[Any]], None] | None = None,
    *,
    timeout: float | None = None,
) -> Any:
    """``value``, or the result of the future it is, waiting until it is ready or ``cancelled`` is set (raises
    :class:`AttemptAbandoned`) or, with ``timeout``, that many seconds passed (raises ``TimeoutError``).

    A read (``on_late`` None) is cancelled then. A call with a side effect is not: the server has the request
    and acts on it whatever the client does, so its future is left to finish and ``on_late(future)`` gets it
    when it does, to name what it made.
    """
    result = getattr(value, "result", None)
    if result is None or not callable(result) or inspect.isclass(value):
        return value
    inner = _concurrent_future(value)
    if inner is None:  # a future-like of unknown make: ask in slices
        end = None if timeout is None else time.monotonic() + timeout
        while not cancelled.is_set():
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"no answer within {timeout:g}s")
            try:
                return result(timeout=_POLL_SLICE)
            except TimeoutError:
                continue
        raise AttemptAbandoned
    wake = threading.Event()
    inner.add_done_callback(lambda _: wake.set())
    cancelled.on_cancel(wake.set)
    wake.wait(timeout)
    if inner.done():
        return inner.result()
    if on_late is None:
        inner.cancel()
    else:
        inner.add_done_callback(on_late)
    if cancelled.is_set():
        raise AttemptAbandoned
    raise TimeoutError(f"no answer within {timeout:g}s")


class RecoveryJob:
    """Recovers one lineage from ``run`` (fetched on the first attempt when None: a recovery the caller asked
    for); reports through ``on_done`` or ``on_exhausted``. In ``observe`` mode it selects and reports the
    checkpoint it would restore, and never calls a restore."""

    def __init__(
        self,
        *,
        run_id: str,
        run: TrainingRun | None,
        service: Any,
        status: Any,
        policy: RecoveryPolicy,
        clock: Clock,
        bus: EventBus,
        rng: random.Random,
        metadata: dict[str, str],
        rejected: set[str],
        inherited: list[Checkpoint],
        step_of: StepOf | None,
        number: int,
        history: History,
        detected_at: float,
        on_done: Callable[[RecoveryJob, Recovery], None],
        on_exhausted: Callable[[RecoveryJob, RecoveryExhausted], None],
        on_observed: Callable[[RecoveryJob, RecoveryEvent], None] | None = None,
        on_abandoned: Callable[[RecoveryJob], None] | None = None,
        forsaken: Callable[[str], bool] | None = None,
    ) -> None:
        self.run = run
        # asked for (request_recovery(): a guard's entry), not found by a poll: its reads are bounded by setup_timeout
        self._asked = run is None
        #: stamped on every run this recovery's attempts make: the listing tells them from any other run
        self.recovery_id = uuid.uuid4().hex
        self.run_id = run_id
        self._service = service
        self._status = status
        self._policy = policy
        self._observe = policy.mode == "observe"
        self._clock = clock
        self._bus = bus
        self._rng = rng
        self._metadata = metadata
        self.rejected = set(rejected)
        self.inherited = inherited
        self._step_of = step_of
        self._number = number
        self._history = history
        #: the lineage's history once the budgets admitted this recovery, this recovery's time included (None
        #: until then: they are checked once, on the first attempt that knows the run)
        self.admitted: History | None = None
        self.detected_at = detected_at
        self._on_done = on_done
        self._on_exhausted = on_exhausted
        self._on_observed = on_observed
        self._on_abandoned = on_abandoned
        #: whether a recovery id is one of this process's whose run nobody watches (never a rival: see _check_fork)
        self._forsaken = forsaken or (lambda _: False)
        self._lock = threading.Condition()
        self.attempts = 0
        self._tries = 0  # attempts digested (restore call or not): what backoff and max_attempts count
        self.abandoned = False  #: an attempt of this recovery was abandoned: the listing must be reconciled
        self.adopted: str | None = None  #: the run this recovery made and handed on, once it did
        self.named: set[str] = set()  #: runs this recovery made and named (discarded, orphaned)
        self.unanswered = 0  #: restore calls sent whose answer has not come (yet)
        self._call: _Call | None = None  # the restore call in flight or answered, not taken by an attempt yet
        self._ended = False  # no attempt follows: an answer is named, never adopted
        self.restore_calls = 0  #: restore calls actually made (an attempt may end before it makes one)
        #: why each checkpoint this recovery passed over was unusable, for the message it may end with
        self.passed_over: dict[str, str] = {}
        self._server_rejections = 0
        self.listed: list[Checkpoint] | None = None
        self._refetched = False
        self._restored_from: str | None = None  # the checkpoint the run came from, per the lineage's history
        self.origin: list[Checkpoint] = []  # that checkpoint and older ones of its run, when read (see _origin)
        self._sent = ""  # the created_at stamp of the last restore call

    @property
    def key(self) -> str:
        return self.run_id

    # -- events ---------------------------------------------------------------------------------------
    def _emit(self, kind: EventKind, cancelled: Cancellation | None = None, **fields: Any) -> RecoveryEvent | None:
        if cancelled is not None and cancelled.is_set():
            return None  # an abandoned attempt speaks no more
        event = RecoveryEvent(
            kind=kind,
            run_id=self.run_id,
            attempt=self.attempts,
            since_detected=self._clock.monotonic() - self.detected_at,
            **fields,
        )
        self._bus.emit(event)
        return event

    # -- one attempt, on a worker thread ---------------------------------------------------------------
    def run_attempt(self, deadline: float, cancelled: Cancellation) -> Outcome:
        started = self._clock.monotonic()
        report = _Report()
        cancelled.on_cancel(self._note_abandoned)
        if self.admitted is None:  # first learn the run, and whether the budgets allow another recovery
            try:
                refusal = self._admit(self._ensure_run(cancelled), cancelled)
            except Exception as exc:
                self._begin(cancelled)
                return Outcome(OutcomeKind.FAILED, value=report, error=exc)
            if refusal is not None:
                return Outcome(OutcomeKind.FAILED, value=report, error=refusal)
        self._begin(cancelled)

        def skip(c: Checkpoint, reason: str) -> None:
            report.unusable.add(c.tinker_path)
            self.passed_over[c.tinker_path] = reason
            self._emit(EventKind.CHECKPOINT_SKIPPED, cancelled, checkpoint=c.tinker_path, error=reason)

        rejected = set(self.rejected)
        step_of = self._step_of
        if step_of is not None:  # asked once per checkpoint: the step the choice was made on is the one reported
            steps: dict[str, int | None] = {}
            asked = step_of

            def step_of(c: Checkpoint) -> int | None:
                if c.tinker_path not in steps:
                    steps[c.tinker_path] = asked(c)
                return steps[c.tinker_path]

        try:
            candidates = self._candidates(cancelled)
            chosen = next(walk(candidates, rejected=rejected, now=self._clock.now(), skip=skip, step_of=step_of), None)
            if chosen is None:
                raise NoRestorableCheckpoint(self._nothing_left())
        except Exception as exc:
            return Outcome(OutcomeKind.FAILED, value=report, error=exc)
        report.checkpoint = chosen
        report.step = step_of(chosen) if step_of is not None else None
        report.selected = self._emit(EventKind.CHECKPOINT_SELECTED, cancelled, checkpoint=chosen.tinker_path)
        if self._observe:
            return Outcome(OutcomeKind.DONE, value=(report, None))
        return self._make_run(chosen, report, cancelled, started)

    def _make_run(self, chosen: Checkpoint, report: _Report, cancelled: Cancellation, started: float) -> Outcome:
        """The side effect of an attempt: check the listing, restore from ``chosen``, check it again.

        A restore call sent by an abandoned attempt and not answered yet is this recovery's one run in the
        making: no other restore call is sent while it is outstanding; this attempt waits for its answer instead
        (a client is adopted, an error lets the next attempt restore again)."""
        call = self._outstanding()
        if call is None:
            try:
                self._check_fork(cancelled, made=None)  # another process recovered this run already: do not restore
                if not cancelled.claim():  # abandoned (deadline, close): no restore call from this attempt, ever
                    raise AttemptAbandoned
                call = self._send(chosen, cancelled)
            except Exception as exc:
                return Outcome(OutcomeKind.FAILED, value=report, error=exc)
        else:
            chosen = report.checkpoint = call.checkpoint  # the run in the making comes from that checkpoint
            report.step = self._step_of(chosen) if self._step_of is not None else None
        try:
            client = await_result(call.future, cancelled, on_late=lambda _: None)  # never cancelled: see _answered
        except AttemptAbandoned as exc:
            return Outcome(OutcomeKind.FAILED, value=report, error=exc)  # the call stays outstanding
        except Exception as exc:
            self._take(call)
            if classify(exc) is FailureKind.CHECKPOINT:
                report.unusable.add(chosen.tinker_path)
                report.rejected_by_server = True
                self.passed_over[chosen.tinker_path] = f"Tinker refused to restore it ({describe(exc)})"
            return Outcome(OutcomeKind.FAILED, value=report, error=exc)
        if not self._take(call, cancelled):  # abandoned meanwhile: the answer waits for the next attempt
            return Outcome(OutcomeKind.FAILED, value=report, error=AttemptAbandoned())
        new_run_id = getattr(client, "model_id", None)
        if not isinstance(new_run_id, str) or not new_run_id:
            error = TypeError(f"the restored client has no model_id (got {type(client).__name__})")
            return Outcome(OutcomeKind.FAILED, value=report, error=error)
        self._emit(
            EventKind.CLIENT_CREATED,
            cancelled,
            checkpoint=chosen.tinker_path,
            new_run_id=new_run_id,
            attempt_seconds=self._clock.monotonic() - started,
        )
        try:
            self._check_fork(cancelled, made=new_run_id)  # did another process make a run from it meanwhile?
        except LineageForked as exc:
            self.orphan(client, "forked", f"another recovery's run {exc.winner} continues the lineage")
            return Outcome(OutcomeKind.FAILED, value=report, error=exc)
        except Exception as exc:
            if cancelled.is_set():  # abandoned while checking: the run is kept for the next attempt (or named)
                self._keep(client, chosen)
                return Outcome(OutcomeKind.FAILED, value=report, error=exc)
            logger.warning(
                "run %s: could not read the training-runs listing after restoring %s, so a second recovery of "
                "this run elsewhere would go unseen: %s",
                self.run_id,
                new_run_id,
                describe(exc),
            )
        return Outcome(OutcomeKind.DONE, value=(report, client))

    # -- the one restore call in flight ---------------------------------------------------------------
    def _send(self, chosen: Checkpoint, cancelled: Cancellation) -> _Call:
        """Make the restore call (on this attempt's thread: a call that blocks blocks here), as a :class:`_Call`
        whose future gets its answer, whoever waits for it then."""
        call = _Call(Future(), chosen, self._clock.monotonic())
        call.future.set_running_or_notify_cancel()
        with self._lock:
            self._call = call
            self.unanswered += 1
            self.restore_calls += 1
        call.future.add_done_callback(lambda _: self._answered(call))
        try:
            pending = self._restore(chosen)
        except BaseException as exc:
            call.future.set_exception(exc)
            return call
        inner = _concurrent_future(pending)
        if inner is not None:
            inner.add_done_callback(lambda done: _copy(done, call.future))
            return call
        try:  # a client, or a future-like of unknown make (asked in slices, cancelled with the attempt)
            call.future.set_result(await_result(pending, cancelled))
        except AttemptAbandoned:
            call.future.set_exception(_Unwatchable())  # no answer can be waited for: the listing names its run
        except BaseException as exc:
            call.future.set_exception(exc)
        return call

    def _outstanding(self) -> _Call | None:
        """The restore call still this recovery's run in the making, if any."""
        with self._lock:
            call = self._call
            if call is not None and call.future.done() and isinstance(call.future.exception(), _Unwatchable):
                self._call = None
                return None
            return call

    def _take(self, call: _Call, cancelled: Cancellation | None = None) -> bool:
        """Take ``call``'s answer for this attempt: False (left for the next attempt) once it is abandoned."""
        with self._lock:
            if cancelled is not None and cancelled.is_set():
                return False
            call.taken = True
            if self._call is call:
                self._call = None
            return True

    def _keep(self, client: Any, checkpoint: Checkpoint) -> None:
        """A client an abandoned attempt got: the next attempt adopts it, or, once the recovery ended, it is named."""
        call = _Call(Future(), checkpoint, self._clock.monotonic(), answered=True)
        call.future.set_running_or_notify_cancel()
        call.future.set_result(client)
        with self._lock:
            ended = self._ended
            if not ended:
                self._call = call
        if ended:
            self.discard(client)

    def _answered(self, call: _Call) -> None:
        """The restore call answered: the recovery's next attempt takes the answer; once it ended, its run is named."""
        with self._lock:
            call.answered = True
            self.unanswered = max(self.unanswered - 1, 0)
            self._lock.notify_all()
            drop = self._ended and not call.taken
            call.taken = call.taken or drop
        if drop:
            self._drop(call)

    def end(self) -> None:
        """No attempt follows (the recovery ended, or the engine closes): an answer no attempt took is named."""
        with self._lock:
            self._ended = True
            call, self._call = self._call, None
            drop = call is not None and call.answered and not call.taken
            if call is not None:
                call.taken = call.taken or drop
        if drop:
            assert call is not None
            self._drop(call)

    def _drop(self, call: _Call) -> None:
        done = call.future
        if not done.cancelled() and done.exception() is None:
            self.discard(done.result())

    def _check_fork(self, cancelled: Cancellation, *, made: str | None) -> None:
        """Split brain: raise :class:`LineageForked` if, per the account's listing, a run recovered from this one
        by another recovery continues the lineage (:func:`~._lineage.continuing`): before restoring
        (``made`` None: any such run), and after (``made``: the run this attempt made, in the listing or not).
        A status source that cannot list runs is not checked."""
        if not lists_runs(self._status):
            return
        if cancelled.is_set():
            raise AttemptAbandoned
        runs = all_runs(self._status, wait=lambda pending: self._read(pending, cancelled))
        rivals = [
            r
            for r in children(runs, self.run_id)
            if (rid := metadata_of(r, RECOVERY_ID_KEY)) != self.recovery_id and not (rid and self._forsaken(rid))
        ]
        if not rivals:
            return
        if made is None:
            raise LineageForked(self.run_id, continuing(rivals).training_run_id, made=None)
        mine = [r for r in runs if r.training_run_id == made]
        if not mine:  # not listed yet: stands in for itself, as created now
            mine = [self._as_listed(made)]
        winner = continuing([*rivals, *mine])
        if winner.training_run_id != made:
            raise LineageForked(self.run_id, winner.training_run_id, made=made)

    def _as_listed(self, run_id: str) -> TrainingRun:
        assert self.run is not None
        return TrainingRun(
            training_run_id=run_id,
            base_model=self.run.base_model,
            model_owner=self.run.model_owner,
            is_lora=self.run.is_lora,
            last_request_time=self._clock.now(),
            user_metadata={FROM_RUN_KEY: self.run_id, RECOVERY_ID_KEY: self.recovery_id, CREATED_AT_KEY: self._sent},
        )

    def _begin(self, cancelled: Cancellation) -> None:
        if not self._observe and not cancelled.is_set():  # an abandoned attempt no longer counts
            with self._lock:
                self.attempts += 1
            self._emit(EventKind.STARTED, cancelled)

    def _note_abandoned(self) -> None:
        self.abandoned = True
        if self._on_abandoned is not None:
            self._on_abandoned(self)

    def _ensure_run(self, cancelled: Cancellation) -> TrainingRun:
        if self.run is None or (self.run.last_checkpoint is None and not self._refetched):
            # asked for (no poll result yet), or a poll result without last_checkpoint: read the run afresh
            self._refetched = True
            try:
                self.run = TrainingRun.coerce(self._read(self._status.get_training_run(self.run_id), cancelled))
            except Exception as exc:
                if status_code_of(exc) == 404:  # the run itself, not a checkpoint: no retry can find it
                    raise run_not_found(self.run_id, exc) from exc
                raise
        return self.run

    def _nothing_left(self) -> str:
        """Why no checkpoint is left, naming each one passed over and why, with the fix where there is one."""
        if not self.passed_over:
            return (
                f"no restorable checkpoint left for run {self.run_id}: it has none (save one with the training "
                "client's save_state() before a recovery can restore it)"
            )
        by_reason: dict[str, list[str]] = {}
        for path, reason in self.passed_over.items():
            by_reason.setdefault(reason, []).append(path)
        why = "; ".join(
            ", ".join(paths[:_NAMED]) + (f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else "") + f": {r}"
            for r, paths in by_reason.items()
        )
        return f"no restorable checkpoint left for run {self.run_id}; passed over {why}"

    def _admit(self, run: TrainingRun, cancelled: Cancellation) -> RecoveryRefused | None:
        """The safety budgets, checked once per recovery, wherever it started: the lineage's history is the
        engine's record merged with what ``run``'s user_metadata says (a previous process's recoveries)."""
        p = self._policy
        now = self._clock.now()
        past = self._history.clamped(now).merged(History.from_metadata(run.user_metadata).clamped(now))
        self._restored_from = past.restored_from
        start = now - timedelta(seconds=p.recovery_window)
        recent = tuple(t for t in past.times if t > start)  # a recovery leaves the window recovery_window s later
        if p.max_recoveries is not None and len(recent) >= p.max_recoveries:
            return RecoveryRefused(
                f"{len(recent)} recoveries of this lineage within recovery_window={p.recovery_window:g}s reach "
                f"max_recoveries={p.max_recoveries} (the oldest leaves the window at "
                f"{_format_time(recent[-p.max_recoveries] + timedelta(seconds=p.recovery_window))})",
                reason=ExhaustedReason.BUDGET,
            )
        streak = 0
        if past.restored_from is not None and not self._made_progress(run, past, cancelled):
            streak = past.no_progress + 1
        if p.max_no_progress is not None and streak >= p.max_no_progress:
            return RecoveryRefused(
                f"{streak} recoveries in a row made no progress (max_no_progress={p.max_no_progress}): each "
                f"restored run was lost before it saved a checkpoint holding more steps than {past.restored_from}",
                reason=ExhaustedReason.NO_PROGRESS,
            )
        keep = p.max_recoveries or _KEPT_WITHOUT_BUDGET
        self.admitted = History((*recent, now)[-keep:], streak)
        return None

    def _made_progress(self, run: TrainingRun, past: History, cancelled: Cancellation) -> bool:
        """Whether ``run``, restored from ``past.restored_from``, saved a checkpoint holding more steps than that
        one (:func:`checkpoint_step`): its last_checkpoint, else its listing, which selection would read anyway.
        An eval snapshot or a "checkpoint on resume" at the restored step is no progress. Where a step is not
        recorded (on either side), a checkpoint other than the restored one counts, as nothing better is known."""

        def progressed(c: Checkpoint) -> bool:
            step = checkpoint_step(c)
            if past.restored_step is None or step is None:
                return c.tinker_path != past.restored_from
            return step > past.restored_step

        if run.last_checkpoint is not None and progressed(run.last_checkpoint):
            return True
        return any(progressed(c) for c in self._listing(cancelled))

    def _candidates(self, cancelled: Cancellation) -> Iterator[Checkpoint]:
        assert self.run is not None
        pinned = self._policy.specific_path
        if pinned is not None:
            known = {c.tinker_path: c for c in [*self._listing(cancelled), *self.inherited]}
            yield known.get(str(pinned)) or synthetic(pinned)
            return
        if self._policy.checkpoint_strategy == "best":
            own = [*self._listing(cancelled), *self.inherited]
            yield from rank(self._policy, dedupe([*own, *self._origin(cancelled)]))
            return
        latest = self.run.last_checkpoint
        if latest is not None:
            yield latest
        yield from rank(self._policy, self._listing(cancelled))  # listed only if the newest one was unusable
        yield from self.inherited
        yield from self._origin(cancelled)

    def _origin(self, cancelled: Cancellation) -> list[Checkpoint]:
        """In a process that did not make the run (nothing inherited): the checkpoint its user_metadata says it
        was restored from, then that run's older ones, as :meth:`RecoveryEngine.watch`'s ``inherited`` would
        be; read from the source run's listing (a deleted run or checkpoint yields nothing)."""
        if self.inherited or self._restored_from is None:
            return []
        try:
            source = TinkerPath.parse(self._restored_from)
            listed = CheckpointList.coerce(self._read(self._status.list_checkpoints(source.run_id), cancelled))
        except Exception as exc:
            if isinstance(exc, InvalidTinkerPath) or classify(exc) is FailureKind.CHECKPOINT:
                return []  # an edited path, or the source run or its checkpoints are gone
            raise
        origin = next((c for c in listed.checkpoints if c.tinker_path == self._restored_from), None)
        if origin is None:
            return []
        self.origin = [origin, *rank(self._policy, [c for c in listed.checkpoints if c.time < origin.time])]
        return self.origin

    def _listing(self, cancelled: Cancellation) -> list[Checkpoint]:
        if self.listed is None:
            listed = CheckpointList.coerce(self._read(self._status.list_checkpoints(self.run_id), cancelled))
            self.listed = listed.checkpoints
        return self.listed

    def _read(self, pending: Any, cancelled: Cancellation) -> Any:
        """The answer of a read of the status source (the run, a checkpoint listing, the runs' listing). In a
        recovery asked for before the loop runs (a guard's entry) it is waited for ``setup_timeout`` at most: the
        loop has not started, and a server that does not answer a small read in that long is down or out of
        reach. A recovery a poll found waits out ``attempt_timeout``, as for a slow server or the SDK retrying a
        503. A read timed out, or one that could not connect, raises :class:`TinkerConnectionError` naming the
        URL to check; a recovery retries it as any transient failure."""
        bound = self._policy.setup_timeout if self._asked else None
        try:
            return await_result(pending, cancelled, timeout=bound)
        except TimeoutError as exc:
            if bound is None:
                raise
            what = f"a read of run {self.run_id} did not answer within setup_timeout={bound:g}s"
            raise unreachable(what, self._service) from exc
        except Exception as exc:
            if isinstance(exc, TinkerConnectionError) or not is_connection_error(exc):
                raise
            raise unreachable(f"a read of run {self.run_id} failed ({describe(exc)})", self._service) from exc

    def _restore(self, checkpoint: Checkpoint) -> Any:
        assert self.run is not None
        assert self.admitted is not None
        self._sent = _format_time(self._clock.now())
        step = checkpoint_step(checkpoint)
        metadata = {
            **(self.run.user_metadata or {}),
            **self._metadata,
            **lineage_metadata(self.run_id, checkpoint.tinker_path, self._number),
            RECOVERY_ID_KEY: self.recovery_id,
            CREATED_AT_KEY: self._sent,
            **self.admitted.metadata(),
        }
        if step is not None:
            metadata[BUDGET_KEYS[2]] = str(step)
        else:
            metadata.pop(BUDGET_KEYS[2], None)  # the old run's, copied above: not this checkpoint's
        return restore_from(
            self._service, checkpoint.tinker_path, with_optimizer=self._policy.restore_optimizer, metadata=metadata
        )

    # -- results that are not adopted ------------------------------------------------------------------
    def on_late(self, outcome: Outcome) -> None:
        if outcome.kind is OutcomeKind.DONE:
            report, client = outcome.value
            if client is not None:
                self._keep(client, report.checkpoint)

    def wait_answered(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every abandoned restore call's answer; False if one is still due."""
        with self._lock:
            return self._lock.wait_for(lambda: self.unanswered == 0, max(timeout, 0.0))

    def discard(self, client: Any) -> None:
        """A client no recovery adopts (its attempt was abandoned): close it if it can be, and name its run."""
        self._close_client(client)
        run_id = str(getattr(client, "model_id", "?"))
        with self._lock:
            first = run_id not in self.named
            self.named.add(run_id)
        if first:
            self._emit(
                EventKind.CLIENT_DISCARDED,
                new_run_id=run_id,
                error="a restore answered after its attempt was abandoned (timeout or close); that run is not used",
            )

    def orphan(self, client: Any, reason: str, why: str) -> None:
        """A run this recovery made and does not hand on: close its client, name it (``run_orphaned``)."""
        self._close_client(client)
        self.name_orphan(str(getattr(client, "model_id", "?")), reason, why)

    def name_orphan(self, run_id: str, reason: str, why: str) -> None:
        """Name ``run_id``, made by this recovery and not adopted, once: a ``run_orphaned`` event (a WARNING)."""
        with self._lock:
            if run_id in self.named or run_id == self.adopted:
                return
            self.named.add(run_id)
        self._emit(EventKind.RUN_ORPHANED, new_run_id=run_id, reason=reason, error=f"not used: {why}")

    def _close_client(self, client: Any) -> None:
        close = getattr(client, "close", None)
        if callable(close):
            try:
                close()
            except Exception as exc:  # closing is best effort; the event naming the run follows anyway
                self._emit(EventKind.FAILED, error=f"closing a client not used failed: {describe(exc)}")

    def reconcile(self, cancelled: Cancellation) -> list[str]:
        """Name every run the account's listing shows this recovery made and did not adopt (blocking: run it on a
        thread of the engine; ``cancelled`` ends the wait). Returns the runs named by this call."""
        if not lists_runs(self._status):
            logger.warning(
                "run %s: recovery %s abandoned a call, and its status source %s cannot list training runs: a run it "
                "may have made is unknown; `tinkex-recovery status %s` shows the lineage's runs",
                self.run_id,
                self.recovery_id,
                type(self._status).__name__,
                self.run_id,
            )
            return []
        runs = all_runs(self._status, wait=lambda pending: self._read(pending, cancelled))
        found = [r.training_run_id for r in runs if metadata_of(r, RECOVERY_ID_KEY) == self.recovery_id]
        named = []
        for run_id in found:
            with self._lock:
                known = run_id in self.named or run_id == self.adopted
            if not known:
                self.name_orphan(run_id, "abandoned", "a restore call of an abandoned attempt made it")
                named.append(run_id)
        return named

    # -- decisions, on the dispatcher thread ----------------------------------------------------------
    def on_outcome(self, outcome: Outcome) -> float | None:
        report = outcome.value[0] if outcome.kind is OutcomeKind.DONE else outcome.value
        report = report if isinstance(report, _Report) else _Report()
        self.rejected |= report.unusable
        self._tries += 1
        if outcome.kind is OutcomeKind.DONE:
            client = outcome.value[1]
            if client is not None:
                assert report.checkpoint is not None
                recovery = Recovery(
                    old_run_id=self.run_id,
                    new_run_id=client.model_id,
                    checkpoint=report.checkpoint,
                    attempts=self.attempts,
                    seconds=self._clock.monotonic() - self.detected_at,
                    number=self._number,
                    step=report.step,
                    client=client,
                )
                self.adopted = recovery.new_run_id
                self.end()
                self._on_done(self, recovery)
            elif report.selected is not None:  # observe mode: the selection was reported, nothing else to do
                self.end()
                self._observed(report.selected)
            return None
        error: BaseException = outcome.error or TimeoutError(
            f"restore did not finish within attempt_timeout={self._policy.attempt_timeout}s"
        )
        if report.rejected_by_server:
            self._server_rejections += 1
        reason = self._give_up_reason(error, report)
        if outcome.kind is OutcomeKind.TIMED_OUT:
            error = self._timed_out(error, ended=reason is not None)
        if reason is not None or self._observe:
            self.end()
        checkpoint = report.checkpoint.tinker_path if report.checkpoint else None
        will_retry = reason is None and not self._observe
        refused = error.reason.value if isinstance(error, RecoveryRefused) else None
        failed = self._emit(
            EventKind.FAILED, checkpoint=checkpoint, error=describe(error), will_retry=will_retry, reason=refused
        )
        if self._observe:  # observing: a failed selection (or a refusal) is reported, never retried
            if failed is not None:
                self._observed(failed)
            return None
        if reason is not None:
            self._exhaust(reason, error)
            return None
        if report.rejected_by_server:
            return 0.0  # a rejected checkpoint says nothing about the next one: try it at once
        return backoff_delay(
            self._tries,
            base=self._policy.backoff,
            cap=self._policy.max_backoff,
            jitter=self._policy.jitter,
            u=self._rng.random(),
        )

    def _observed(self, event: RecoveryEvent) -> None:
        if self._on_observed is not None:
            self._on_observed(self, event)

    def _give_up_reason(self, error: BaseException, report: _Report) -> ExhaustedReason | None:
        """One rule for every bound: whichever is reached first ends the recovery."""
        if isinstance(error, RecoveryRefused):
            return error.reason
        if isinstance(error, RunNotFound) and error.run_id == self.run_id:
            return ExhaustedReason.RUN_NOT_FOUND
        if isinstance(error, NoRestorableCheckpoint):
            return ExhaustedReason.CHECKPOINTS
        if isinstance(error, LineageForked):
            return ExhaustedReason.FORKED
        if not report.rejected_by_server and classify(error) is FailureKind.FATAL:
            return ExhaustedReason.FATAL
        if self._server_rejections > self._policy.fallback_depth:
            return ExhaustedReason.CHECKPOINTS
        if self._tries >= self._policy.max_attempts:
            return ExhaustedReason.ATTEMPTS
        return None

    def history_after(self, recovery: Recovery) -> History:
        """The lineage's history once ``recovery`` (this job's) completed."""
        assert self.admitted is not None
        return replace(
            self.admitted,
            restored_from=recovery.checkpoint.tinker_path,
            restored_step=checkpoint_step(recovery.checkpoint),
        )

    def _timed_out(self, error: BaseException, *, ended: bool) -> BaseException:
        """The timeout, naming the restore call still outstanding (if one is) and what becomes of it."""
        with self._lock:
            call = self._call if self._call is not None and not self._call.answered else None
        if call is None:
            return error
        ago = self._clock.monotonic() - call.sent
        what = f"the restore call from {call.checkpoint.tinker_path}, sent {ago:.0f}s ago, has not answered"
        if ended:
            then = "the run it makes, if it appears, will be closed and named (client_discarded)"
        else:
            then = "the next attempt waits for it (no second restore call while it is outstanding)"
        return TimeoutError(f"{error}; {what}: {then}")

    def on_crash(self, error: BaseException) -> None:
        self.end()
        self._exhaust(ExhaustedReason.INTERNAL, error)

    def _exhaust(self, reason: ExhaustedReason, error: BaseException) -> None:
        winner = error.winner if isinstance(error, LineageForked) else None
        exhausted = RecoveryExhausted(self.run_id, self.restore_calls, describe(error), reason=reason, winner=winner)
        exhausted.__cause__ = without_secrets(error)  # as `raise ... from error`: its traceback is kept
        self._on_exhausted(self, exhausted)
