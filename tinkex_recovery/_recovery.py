"""One recovery of one corrupted run: choose a checkpoint, restore from it, decide what to do on failure.

A :class:`RecoveryJob` is what the executor runs. Each attempt happens on a worker thread and reports what it
learned (which checkpoints turned out unusable) in its outcome; all decisions and all state changes happen in
:meth:`RecoveryJob.on_outcome`, on the executor's dispatcher thread.
"""

from __future__ import annotations

import inspect
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._clock import Clock
from ._events import EventBus, EventKind, RecoveryEvent
from ._exceptions import RecoveryExhausted, TinkexRecoveryError
from ._executor import Outcome, OutcomeKind
from ._futures import resolve
from ._models import Checkpoint, CheckpointList, TrainingRun
from ._policy import RecoveryPolicy
from ._retry import FailureKind, backoff_delay, classify, describe
from ._selection import dedupe, rank, synthetic, walk

__all__ = ["LINEAGE_KEYS", "Recovery"]

#: user_metadata keys written on every recovered run, naming where it came from.
LINEAGE_KEYS = (
    "tinkex_recovery.recovered_from_run",
    "tinkex_recovery.recovered_from_checkpoint",
    "tinkex_recovery.recovery_number",
)


@dataclass(frozen=True, slots=True)
class Recovery:
    """A finished recovery: ``old_run_id`` was lost and ``new_run_id`` restored from ``checkpoint``."""

    old_run_id: str
    new_run_id: str
    checkpoint: Checkpoint
    attempts: int
    seconds: float  #: from detection to the new client in hand
    number: int  #: 1 for the first recovery of a lineage, then 2, ...
    client: Any = field(default=None, repr=False, compare=False)


class NoRestorableCheckpoint(TinkexRecoveryError):
    """Nothing left to try: no checkpoint, or every one within the fallback depth was unusable."""


@dataclass
class _Report:
    checkpoint: Checkpoint | None = None
    unusable: set[str] = field(default_factory=set)
    rejected_by_server: bool = False


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


class RecoveryJob:
    """Recovers ``run_id``; reports the result through ``on_done`` or ``on_exhausted``."""

    def __init__(
        self,
        *,
        run: TrainingRun,
        service: Any,
        status: Any,
        policy: RecoveryPolicy,
        clock: Clock,
        bus: EventBus,
        rng: random.Random,
        metadata: dict[str, str],
        rejected: set[str],
        inherited: list[Checkpoint],
        number: int,
        detected_at: float,
        on_done: Callable[[RecoveryJob, Recovery], None],
        on_exhausted: Callable[[RecoveryJob, RecoveryExhausted], None],
    ) -> None:
        self.run = run
        self.run_id = run.training_run_id
        self._service = service
        self._status = status
        self._policy = policy
        self._clock = clock
        self._bus = bus
        self._rng = rng
        self._metadata = metadata
        self.rejected = rejected
        self.inherited = inherited
        self._number = number
        self.detected_at = detected_at
        self._on_done = on_done
        self._on_exhausted = on_exhausted
        self.attempts = 0
        self._server_rejections = 0
        self._token = 0
        self._token_lock = threading.Lock()
        self.listed: list[Checkpoint] | None = None

    @property
    def key(self) -> str:
        return self.run_id

    # -- events ---------------------------------------------------------------------------------------
    def _emit(self, kind: EventKind, *, token: int | None = None, **fields: Any) -> None:
        with self._token_lock:
            if token is not None and token != self._token:
                return  # an abandoned (timed-out) attempt speaks no more
        self._bus.emit(
            RecoveryEvent(
                kind=kind,
                run_id=self.run_id,
                attempt=self.attempts,
                since_detected=self._clock.monotonic() - self.detected_at,
                **fields,
            )
        )

    # -- one attempt, on a worker thread ---------------------------------------------------------------
    def run_attempt(self, deadline: float) -> Outcome:
        with self._token_lock:
            token = self._token
        self.attempts += 1
        started = self._clock.monotonic()
        report = _Report()
        self._emit(EventKind.STARTED, token=token)

        def skip(c: Checkpoint, reason: str) -> None:
            report.unusable.add(c.tinker_path)
            self._emit(EventKind.CHECKPOINT_SKIPPED, token=token, checkpoint=c.tinker_path, error=reason)

        rejected = set(self.rejected)
        try:
            chosen = next(walk(self._candidates(), rejected=rejected, now=self._clock.now(), skip=skip), None)
            if chosen is None:
                raise NoRestorableCheckpoint(f"no restorable checkpoint left for run {self.run_id}")
        except Exception as exc:
            return Outcome(OutcomeKind.FAILED, value=report, error=exc)
        report.checkpoint = chosen
        self._emit(EventKind.CHECKPOINT_SELECTED, token=token, checkpoint=chosen.tinker_path)
        try:
            client = resolve(self._restore(chosen), timeout=max(deadline - self._clock.monotonic(), 0.0))
        except Exception as exc:
            if classify(exc) is FailureKind.CHECKPOINT:
                report.unusable.add(chosen.tinker_path)
                report.rejected_by_server = True
            return Outcome(OutcomeKind.FAILED, value=report, error=exc)
        new_run_id = getattr(client, "model_id", None)
        if not isinstance(new_run_id, str) or not new_run_id:
            error = TypeError(f"the restored client has no model_id (got {type(client).__name__})")
            return Outcome(OutcomeKind.FAILED, value=report, error=error)
        self._emit(
            EventKind.CLIENT_CREATED,
            token=token,
            checkpoint=chosen.tinker_path,
            new_run_id=new_run_id,
            attempt_seconds=self._clock.monotonic() - started,
        )
        return Outcome(OutcomeKind.DONE, value=(report, client))

    def _candidates(self) -> Iterator[Checkpoint]:
        pinned = self._policy.specific_path
        if pinned is not None:
            known = {c.tinker_path: c for c in [*self._listing(), *self.inherited]}
            yield known.get(str(pinned)) or synthetic(pinned)
            return
        if self._policy.checkpoint_strategy == "best":
            yield from rank(self._policy, dedupe([*self._listing(), *self.inherited]))
            return
        latest = self.run.last_checkpoint or self._refetch_last()
        if latest is not None:
            yield latest
        yield from rank(self._policy, self._listing())  # listed only if the newest one was unusable
        yield from self.inherited

    def _refetch_last(self) -> Checkpoint | None:
        run = TrainingRun.coerce(resolve(self._status.get_training_run(self.run_id), timeout=60.0))
        return run.last_checkpoint

    def _listing(self) -> list[Checkpoint]:
        if self.listed is None:
            listed = CheckpointList.coerce(resolve(self._status.list_checkpoints(self.run_id), timeout=60.0))
            self.listed = listed.checkpoints
        return self.listed

    def _restore(self, checkpoint: Checkpoint) -> Any:
        metadata = {
            **(self.run.user_metadata or {}),
            **self._metadata,
            **lineage_metadata(self.run_id, checkpoint.tinker_path, self._number),
        }
        return restore_from(
            self._service, checkpoint.tinker_path, with_optimizer=self._policy.restore_optimizer, metadata=metadata
        )

    # -- decisions, on the dispatcher thread ----------------------------------------------------------
    def on_outcome(self, outcome: Outcome) -> float | None:
        with self._token_lock:
            self._token += 1
        if outcome.kind is OutcomeKind.DONE:
            report, client = outcome.value
            self.rejected |= report.unusable
            recovery = Recovery(
                old_run_id=self.run_id,
                new_run_id=client.model_id,
                checkpoint=report.checkpoint,
                attempts=self.attempts,
                seconds=self._clock.monotonic() - self.detected_at,
                number=self._number,
                client=client,
            )
            self._on_done(self, recovery)
            return None
        report = outcome.value if isinstance(outcome.value, _Report) else _Report()
        self.rejected |= report.unusable
        error: BaseException = outcome.error or TimeoutError(
            f"restore did not finish within attempt_timeout={self._policy.attempt_timeout}s"
        )
        if report.rejected_by_server:
            self._server_rejections += 1
        give_up = (
            isinstance(error, NoRestorableCheckpoint)
            or self.attempts >= self._policy.max_attempts
            or self._server_rejections > self._policy.fallback_depth
        )
        checkpoint = report.checkpoint.tinker_path if report.checkpoint else None
        self._emit(EventKind.FAILED, checkpoint=checkpoint, error=describe(error), will_retry=not give_up)
        if give_up:
            self._on_exhausted(self, RecoveryExhausted(self.run_id, self.attempts, describe(error)))
            return None
        if report.rejected_by_server:
            return 0.0  # a rejected checkpoint says nothing about the next one: try it at once
        return backoff_delay(
            self.attempts,
            base=self._policy.backoff,
            cap=self._policy.max_backoff,
            jitter=self._policy.jitter,
            u=self._rng.random(),
        )
