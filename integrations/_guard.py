"""``recovery_guard``: a plain training loop that survives its run being corrupted.

The guard watches the run with a private :class:`~tinkex_recovery.RecoveryEngine`. The loop talks only to
``guard.client`` and walks ``guard.steps(...)``; at step boundaries the guard swaps in the recovered client
and moves the step iterator to the step the restored checkpoint was saved at, so every step after that
checkpoint is trained again on the new run, and none twice.

- Failures are judged in ``with step:``: an exception polls the run at once; if it is corrupted (or a
  recovery is under way) the guard waits for the new run and suppresses the exception (logged with its
  traceback and kept as :attr:`GuardRecovery.cause`), otherwise it propagates unchanged. Recoveries the poller
  finds are taken in before the next step. When the iterable runs out, one last poll makes sure the loop does
  not end on a run already marked corrupted.
- Where to resume comes from the checkpoint: ``step`` in its user_metadata (written by :meth:`save_state`),
  else the ``batch`` of its record in ``{log_path}/checkpoints.jsonl`` (tinker-cookbook's file). The engine is
  told so (``step_of``): a checkpoint with neither is never restored for a guarded loop.
- Without a ``client``, the guard resumes at entry, as a restarted process needs: the engine restores a new
  run from ``run_id``'s checkpoint chosen by the policy (the same recovery, with the same rules, as for a
  corruption), and the loop starts at :attr:`RecoveryGuard.start_step`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from types import TracebackType
from typing import Any, Self

from tinkex_recovery import (
    Checkpoint,
    Clock,
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
    report_steps_lost,
    require_methods,
    resolve,
    rest_client_of,
    validate_run_id,
)

from ._checkpoint_log import CheckpointLog, metadata_for, validate_metrics, validate_step
from ._steps import Step, StepCursor

__all__ = ["GuardRecovery", "RecoveryGuard", "recovery_guard"]

logger = logging.getLogger("tinkex_recovery")


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


class RecoveryGuard:
    """A context manager that keeps one training run alive for a plain loop; see :func:`recovery_guard`.

    Use it from the loop's thread only. It is single-use.
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
    ) -> None:
        self._origin = validate_run_id(run_id)
        if policy is None:
            policy = RecoveryPolicy(enabled=True)  # using the guard is the opt-in
        if not isinstance(policy, RecoveryPolicy):
            raise TypeError(f"policy must be a RecoveryPolicy, got {type(policy).__name__}")
        if client is not None:
            model_id = getattr(client, "model_id", None)
            if isinstance(model_id, str) and model_id != run_id:
                raise ValueError(f"client is bound to run {model_id}, not to run_id {run_id}")
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
        self._client = client
        self._run_id = run_id
        self._state = _State.NEW
        self._engine: RecoveryEngine | None = None
        self._handle: RunHandle | None = None
        self._cursor: StepCursor | None = None
        self._recoveries: list[GuardRecovery] = []
        self.start_step: int | None = None
        """The step to start the loop at, when the guard resumed the run at entry (no ``client`` given)."""
        self.resumed_from: Checkpoint | None = None
        """The checkpoint the guard resumed from at entry, if it did."""

    # -- what the loop reads ------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The training client to use now: the one passed in (or resumed at entry), then each recovered one."""
        return self._client

    @property
    def run_id(self) -> str:
        """The run :attr:`client` trains."""
        return self._run_id

    @property
    def recoveries(self) -> tuple[GuardRecovery, ...]:
        """Every recovery the loop has gone through, oldest first."""
        return tuple(self._recoveries)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"a recovery_guard is single-use; this one is {self._state.value}")
        self._state = _State.OPEN
        try:
            if self._client is None:
                self._resume()
            if not self.policy.enabled:
                logger.info(
                    "recovery_guard: recovery is disabled by the policy (enabled=False); run %s is not watched "
                    "and the guard passes everything through",
                    self._run_id,
                )
                return self
            if self._engine is None:
                self._engine, self._handle = self._watch(self.policy)
        except BaseException:
            self._close()
            raise
        return self

    def _watch(self, policy: RecoveryPolicy) -> tuple[RecoveryEngine, RunHandle]:
        engine = RecoveryEngine(policy, status=self._status_client(), poll_concurrency=1, clock=self._clock)
        try:
            handle = engine.start().watch(self._run_id, self._service, step_of=self._step_of)
        except BaseException:
            engine.close()
            raise
        return engine, handle

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    def _close(self) -> None:
        self._state = _State.CLOSED
        if self._engine is not None:
            self._engine.close(timeout=1.0)

    def _require_open(self, what: str) -> None:
        if self._state is not _State.OPEN:
            raise RuntimeError(f"{what} is only available inside `with recovery_guard(...) as guard:`")

    # -- the loop -----------------------------------------------------------------------------------------
    def steps(self, iterable: Iterable[int]) -> Iterator[Step]:
        """Yield a :class:`Step` for each step index of ``iterable`` (ints, strictly increasing, e.g. a
        ``range``); after a recovery, continue with the first index ``>=`` the restored checkpoint's step."""
        self._require_open("steps()")
        return self._walk(StepCursor(iterable))

    def _walk(self, cursor: StepCursor) -> Iterator[Step]:
        self._cursor = cursor
        # RunHandle.settled, inlined: as a property call it costs a third of the guard's per-step overhead.
        lineage = self._handle._lineage if self._handle is not None else None
        open_, watching = _State.OPEN, RunState.WATCHING  # locals: an enum member lookup costs in a hot loop
        while True:
            if self._state is not open_:
                raise RuntimeError("the recovery_guard was closed while its steps were being iterated")
            if lineage is not None and (lineage.state is not watching or len(lineage.recoveries) > lineage.consumed):
                self._catch_up(next_pos=cursor.pos)
            try:
                index = next(cursor)
            except StopIteration:
                # One last poll, so the loop never ends on a run the server already marked corrupted.
                if self._handle is not None:
                    self._handle.check_now()
                if self._catch_up(next_pos=cursor.pos):
                    continue
                return
            yield Step(self._judge, index)

    def _judge(self, step: Step, exc: BaseException | None) -> bool:
        """Whether to suppress ``exc``, raised inside ``step``: yes if the run is, or turns out to be,
        corrupted; then the recovery is awaited and the loop rewound."""
        handle = self._handle
        if exc is None or not isinstance(exc, Exception) or handle is None or self._state is not _State.OPEN:
            return False
        since = self._clock.monotonic()
        if not handle.check_now() and handle.state is not RunState.EXHAUSTED:
            return False
        logger.warning(
            "recovery_guard: step %d failed on run %s, which was lost; recovering (the step's error follows)",
            step.index,
            self._run_id,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        assert self._cursor is not None
        self._catch_up(next_pos=self._cursor.pos - 1, cause=exc, since=since)
        return True

    def _catch_up(self, *, next_pos: int, cause: BaseException | None = None, since: float | None = None) -> int:
        """Take in every recovery that is finished or under way, and return how many; ``next_pos`` is where
        the loop would go on without them, ``since`` when the loop stopped for them (default: now)."""
        handle = self._handle
        if handle is None:
            return 0
        taken = 0
        while not handle.settled:
            started = self._clock.monotonic() if since is None else since
            since = None
            recovery = handle.wait_for_recovery(timeout=self._wait_bound())  # RecoveryExhausted leaves the loop
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
        self._client = recovery.client
        self._run_id = recovery.new_run_id
        step = recovery.step
        assert step is not None, "the engine restores a guarded loop only from checkpoints with a step"
        assert self._cursor is not None
        self._cursor.seek(step)
        record = GuardRecovery(
            **{f.name: getattr(recovery, f.name) for f in fields(Recovery)},
            resumed_at=step,
            steps_lost=max(next_pos - self._cursor.pos, 0),
            waited=waited,
            cause=cause,
        )
        self._recoveries.append(record)
        report_steps_lost(record.steps_lost, "guard")
        logger.warning(
            "recovery_guard: run %s recovered as %s from %s in %.3fs; resuming at step %d (%d step(s) trained again)",
            record.old_run_id,
            record.new_run_id,
            record.checkpoint.tinker_path,
            record.seconds,
            step,
            record.steps_lost,
        )

    def _step_of(self, checkpoint: Checkpoint) -> int | None:
        """Where a loop restored from ``checkpoint`` resumes: its user_metadata ``step``, else its record in
        checkpoints.jsonl; None when neither says (the engine then never restores from it)."""
        step = checkpoint.step
        if step is None and self._log is not None:
            step = self._log.step_of(checkpoint.tinker_path)
        return step

    # -- checkpoints --------------------------------------------------------------------------------------
    def save_state(
        self,
        name: str,
        *,
        step: int,
        metrics: Mapping[str, int | float] | None = None,
        ttl_seconds: int | None = None,
    ) -> str:
        """Save the current client's state as checkpoint ``name`` and return its tinker path.

        ``step`` is the index of the next step to run (what a resume starts at); it and the numeric
        ``metrics`` go into the checkpoint's user_metadata, so recovery (and ``best``) can use them even
        in a new process. With ``log_path``, a tinker-cookbook record is appended to checkpoints.jsonl.
        """
        self._require_open("save_state()")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        step = validate_step(step)
        values = validate_metrics(metrics)
        if ttl_seconds is not None and (isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int)):
            raise TypeError(f"ttl_seconds must be an int or None, got {ttl_seconds!r}")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        result = resolve(
            self._client.save_state(name, ttl_seconds=ttl_seconds, user_metadata=metadata_for(step, values))
        )
        path = getattr(result, "path", result)
        if not isinstance(path, str):
            raise TypeError(f"save_state() returned no tinker path (got {type(result).__name__})")
        if self._log is not None:
            self._log.append(name, step, path, values)
        return path

    # -- resuming in a new process ------------------------------------------------------------------------
    def _status_client(self) -> Any:
        if self._status is None:
            self._status = rest_client_of(self._service)
        return self._status

    def _resume(self) -> None:
        """Without a client: the engine restores a new run from ``run_id``'s chosen checkpoint; the loop starts
        at its step. A disabled policy still resumes (there is no client otherwise), then watches nothing."""
        require_methods(self._service, SERVICE_METHODS, "service")
        engine, handle = self._watch(self.policy if self.policy.enabled else self.policy.replace(enabled=True))
        try:
            handle.request_recovery()
            recovery = handle.wait_for_recovery(timeout=self._wait_bound())
        except BaseException:
            engine.close()
            raise
        if self.policy.enabled:
            self._engine, self._handle = engine, handle  # the watch goes on, with what the resume learned
        else:
            engine.close()
        assert recovery.step is not None, "the engine resumes a guarded loop only from checkpoints with a step"
        self._client, self._run_id = recovery.client, recovery.new_run_id
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
) -> RecoveryGuard:
    """Keep ``run_id`` alive for a plain training loop::

        with recovery_guard(run_id, service, policy=policy, client=training_client) as guard:
            for step in guard.steps(range(start, num_steps)):
                with step:
                    ...  # train step.index through guard.client; guard.save_state(..., step=step.index + 1)

    ``service`` restores runs (a ``tinker.ServiceClient``); ``status`` reads them (default: the service's
    ``create_rest_client()``). No ``policy`` means ``RecoveryPolicy(enabled=True)``; a disabled policy makes
    the guard a pass-through that starts no thread. Without ``client``, the guard resumes at entry: it
    restores a new run from ``run_id``'s chosen checkpoint and sets :attr:`RecoveryGuard.start_step`.
    ``log_path`` adds a tinker-cookbook ``checkpoints.jsonl`` as a record of steps. ``clock`` is for tests.
    """
    return RecoveryGuard(run_id, service, policy=policy, client=client, status=status, log_path=log_path, clock=clock)
