"""A Lightning callback that keeps a Tinker run alive through ``Trainer.fit``.

``Trainer(callbacks=[TinkexRecovery(policy)])`` is all it takes when the LightningModule holds its Tinker
training client as ``training_client`` and its service client as ``service_client``. The engine's threads
poll the run and restore it; the callback only reads their results, on the main thread:

- at each ``on_train_batch_start`` it swaps the recovered client into the module before the batch runs, calls
  the module's optional ``on_tinker_recovery(recovery)`` hook (where the module can rewind its own data), and
  logs ``tinker/recoveries``, ``tinker/seconds_to_recover`` and ``tinker/steps_lost`` to the trainer's loggers;
- a ``training_step`` that raises checks the run at once: if the run was corrupted (the usual reason a
  Tinker call fails mid-batch), it waits for the recovery, swaps, and runs the same batch again on the new
  client; any other error propagates unchanged.

Under DDP only global rank 0 polls. At each batch start rank 0 broadcasts what happened; the other ranks
rebuild their client from the same checkpoint through their own service, so every rank swaps at the same
batch. Recovering a failed step inside ``training_step`` is single-process only: the ranks could not agree
on it without a collective that the healthy ranks are not in.

Lightning is imported here only; without it, importing this module works and constructing the callback
raises :class:`ImportError` with the install command.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from tinkex_recovery._clock import Clock, SystemClock
from tinkex_recovery._engine import RecoveryEngine, RunHandle, RunState
from tinkex_recovery._exceptions import ExhaustedReason, RecoveryExhausted
from tinkex_recovery._futures import resolve
from tinkex_recovery._integration import report_steps_lost, would_do
from tinkex_recovery._models import Checkpoint
from tinkex_recovery._policy import RecoveryPolicy
from tinkex_recovery._recovery import Recovery, lineage_metadata, restore_from
from tinkex_recovery._retry import backoff_delay, describe

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # the callback can still be named; constructing it says what to install
    _LIGHTNING_MISSING: ImportError | None = exc
    Callback = object  # type: ignore[assignment,misc]
else:
    _LIGHTNING_MISSING = None

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["LineageRecord", "TinkexRecovery"]

logger = logging.getLogger("tinkex_recovery")

_INSTALL_HINT = "TinkexRecovery needs Lightning: pip install 'tinkex-recovery[lightning]'"
_STEP_KEY = "step"  # checkpoint user_metadata: the index of the next step to run (as recovery_guard writes it)
_MAX_STEP_RERUNS = 3  # a batch that keeps failing after this many recoveries lets its error through
_HOOK = "on_tinker_recovery"


class LineageRecord(TypedDict):
    """One recovery as the callback keeps it (and checkpoints it): ids, paths and numbers only."""

    number: int  #: 1, 2, ... over the whole lineage, across restarts from a Lightning checkpoint
    old_run_id: str
    new_run_id: str
    checkpoint: str  #: the tinker:// path restored from
    attempts: int
    seconds: float  #: from detection to the new client in hand
    global_step: int  #: the trainer's global_step when the new client was swapped in
    resume_step: int | None  #: the checkpoint's user_metadata "step", when it has one
    steps_lost: int | None  #: global_step - resume_step, when known


class _Notice(TypedDict):
    """What rank 0 tells every rank at a batch start (None when nothing happened)."""

    records: list[LineageRecord]
    checkpoints: list[dict[str, Any]]
    exhausted: tuple[str, int, str | None, str] | None


class TinkexRecovery(Callback):
    """Recovers the module's Tinker run when the server marks it corrupted, without stopping ``fit``.

    ``policy`` defaults to ``RecoveryPolicy(enabled=True)``: adding the callback is the opt-in, and a policy
    with ``enabled=False`` makes it a no-op. ``client_attr`` and ``service_attr`` name the module's
    attributes holding the training client and the service client (the service restores the run, and
    provides the REST client that polls it unless ``status`` is given).

    After each swap the module's optional ``on_tinker_recovery(recovery)`` hook is called (on every rank, on
    the main thread, with the new client already in place) so the module can rewind its data. A checkpoint
    whose ``user_metadata`` has ``"step"`` (the index of the next step to run) gives ``steps_lost``.

    ``on_exhausted="raise"`` lets :class:`RecoveryExhausted` leave ``fit``; ``"stop"`` ends the fit
    gracefully instead (``trainer.should_stop``; Lightning still starts the batch in flight, which the
    ``training_step`` wrapper skips, since its run is lost). ``retry_failed_step`` wraps the module's
    ``training_step`` so that a step failing because the run was corrupted mid-batch is recovered and run
    again, from its start, on the new client (at most 3 times; single-process only): call
    ``self.optimizers().step()`` after the Tinker calls. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        policy: RecoveryPolicy | None = None,
        *,
        client_attr: str = "training_client",
        service_attr: str = "service_client",
        status: Any = None,
        on_exhausted: Literal["raise", "stop"] = "raise",
        retry_failed_step: bool = True,
        clock: Clock | None = None,
    ) -> None:
        if _LIGHTNING_MISSING is not None:
            raise ImportError(_INSTALL_HINT) from _LIGHTNING_MISSING
        if policy is None:
            policy = RecoveryPolicy(enabled=True)
        if not isinstance(policy, RecoveryPolicy):
            raise TypeError(f"policy must be a RecoveryPolicy, got {type(policy).__name__}")
        for name, value in (("client_attr", client_attr), ("service_attr", service_attr)):
            if not isinstance(value, str) or not value.isidentifier():
                raise ValueError(f"{name} must name an attribute of the LightningModule, got {value!r}")
        if on_exhausted not in ("raise", "stop"):
            raise ValueError(f"on_exhausted must be 'raise' or 'stop', got {on_exhausted!r}")
        self.policy = policy
        self.client_attr = client_attr
        self.service_attr = service_attr
        self.on_exhausted = on_exhausted
        self.retry_failed_step = retry_failed_step
        self._status = status
        self._clock = clock or SystemClock()
        self._lineage: list[LineageRecord] = []
        self._run_id: str | None = None
        self._engine: RecoveryEngine | None = None
        self._handle: RunHandle | None = None
        self._state_key = ("", "")  # (client_attr, the key built from it)
        self._watching = False  # between on_fit_start and the release, on every rank
        self._rank_zero, self._distributed = True, False  # read from the trainer at fit start (the hot path)
        self._stopped = False
        self._exhausted: RecoveryExhausted | None = None
        self._unwrap: Callable[[], None] | None = None

    # -- public state ---------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # One callback per watched client: two instances differ by the attribute they watch. Lightning reads
        # this at every hook call, hence the cache.
        attr, key = self._state_key
        if attr != self.client_attr:
            key = self._generate_state_key(client_attr=self.client_attr)
            self._state_key = (self.client_attr, key)
        return key

    @property
    def run_id(self) -> str | None:
        """The run the module's client belongs to now (None before the first fit)."""
        return self._run_id

    @property
    def lineage(self) -> tuple[LineageRecord, ...]:
        """Every recovery so far, oldest first, including those restored from a Lightning checkpoint."""
        return tuple(r.copy() for r in self._lineage)

    @property
    def handle(self) -> RunHandle | None:
        """The engine's handle on the run, on global rank 0 during ``fit`` (None elsewhere)."""
        return self._handle

    @property
    def exhausted(self) -> RecoveryExhausted | None:
        """Why recovery gave up, if it did."""
        return self._exhausted

    # -- Lightning state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self._run_id, "lineage": [dict(r) for r in self._lineage]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        lineage = state_dict.get("lineage", [])
        if not isinstance(lineage, list):
            raise ValueError("TinkexRecovery state: 'lineage' must be a list of records")
        self._lineage = [_as_record(r) for r in lineage]
        run_id = state_dict.get("run_id")
        self._run_id = run_id if isinstance(run_id, str) else None

    # -- hooks ----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()  # a second fit with the same callback starts afresh
        if not self.policy.enabled:
            logger.info("TinkexRecovery: the policy has enabled=False; the run is not watched")
            return
        client = getattr(pl_module, self.client_attr, None)
        run_id = getattr(client, "model_id", None)
        if not isinstance(run_id, str) or not run_id:
            raise AttributeError(
                f"TinkexRecovery: {type(pl_module).__name__}.{self.client_attr} must be a Tinker training "
                f"client with a model_id (got {type(client).__name__})"
            )
        service = getattr(pl_module, self.service_attr, None)
        if service is None:
            raise AttributeError(
                f"TinkexRecovery: {type(pl_module).__name__}.{self.service_attr} must hold the Tinker service "
                "client that restores the run"
            )
        if self._run_id is not None and self._run_id != run_id:
            logger.info("TinkexRecovery: the lineage of run %s continues with run %s", self._run_id, run_id)
        self._run_id = run_id
        self._stopped = False
        self._exhausted = None
        self._rank_zero, self._distributed = trainer.is_global_zero, trainer.world_size > 1
        if self._rank_zero:
            engine = RecoveryEngine(self.policy, status=self._status, poll_concurrency=1, clock=self._clock)
            self._handle = engine.watch(run_id, service)
            self._engine = engine.start()
        self._watching = True
        if self.retry_failed_step:
            self._wrap_training_step(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._watching or self._stopped:
            return
        local: list[Recovery] = []
        notice: _Notice | None = None
        if self._rank_zero:
            local, exhausted = self._collect()
            notice = self._notice(trainer, local, exhausted)
        if self._distributed:
            notice = trainer.strategy.broadcast(notice, src=0)
        if notice is not None:
            self._act(trainer, pl_module, notice, local)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()  # Lightning calls no teardown after an exception

    # -- rank 0: what the engine did since the last look ----------------------------------------------
    def _collect(self) -> tuple[list[Recovery], RecoveryExhausted | None]:
        """Recoveries finished since the last call (waiting for one under way), and exhaustion if any."""
        handle = self._handle
        got: list[Recovery] = []
        if handle is None:
            return got, None
        while not handle.settled:  # the common case, nothing happened, skips the loop: no lock, no wait
            try:
                got.append(handle.wait_for_recovery(self._wait_limit()))
            except RecoveryExhausted as exc:
                return got, exc
        return got, None

    def _wait_limit(self) -> float:
        # Every restore call is bounded by attempt_timeout and every retry delay by max_backoff; the rest is
        # slack for the listing calls. The engine ends a recovery long before this; it is only a backstop.
        p = self.policy
        return p.max_attempts * (p.attempt_timeout + p.max_backoff) + 120.0

    def _notice(
        self, trainer: pl.Trainer, recoveries: list[Recovery], exhausted: RecoveryExhausted | None
    ) -> _Notice | None:
        if not recoveries and exhausted is None:
            return None
        step = trainer.global_step
        records: list[LineageRecord] = []
        for i, recovery in enumerate(recoveries):
            resume = _resume_step(recovery.checkpoint)
            records.append(
                LineageRecord(
                    number=len(self._lineage) + i + 1,
                    old_run_id=recovery.old_run_id,
                    new_run_id=recovery.new_run_id,
                    checkpoint=recovery.checkpoint.tinker_path,
                    attempts=recovery.attempts,
                    seconds=recovery.seconds,
                    global_step=step,
                    resume_step=resume,
                    steps_lost=max(step - resume, 0) if resume is not None else None,
                )
            )
        return _Notice(
            records=records,
            checkpoints=[r.checkpoint.model_dump(mode="json") for r in recoveries],
            exhausted=(exhausted.run_id, exhausted.attempts, exhausted.last_error, exhausted.reason.value)
            if exhausted
            else None,
        )

    # -- every rank: act on the notice, on the main thread --------------------------------------------
    def _act(self, trainer: pl.Trainer, pl_module: pl.LightningModule, notice: _Notice, local: list[Recovery]) -> None:
        records = notice["records"]
        if records:
            recoveries: list[Recovery] | None = local
            error: BaseException | None = None
            if not trainer.is_global_zero:
                try:
                    recoveries = self._restore_here(pl_module, notice)
                except Exception as exc:
                    recoveries, error = None, exc
            # Every rank learns whether every rank has its client, so none is left waiting in a collective.
            if trainer.world_size > 1 and not trainer.strategy.reduce_boolean_decision(error is None, all=True):
                cause = describe(error) if error else "another rank could not restore from the checkpoint"
                raise RecoveryExhausted(
                    records[-1]["old_run_id"], records[-1]["attempts"], cause, reason=ExhaustedReason.FATAL
                ) from error
            assert recoveries is not None
            self._swap(trainer, pl_module, records, recoveries)
        if notice["exhausted"] is not None:
            run_id, attempts, last_error, reason = notice["exhausted"]
            self._give_up(trainer, RecoveryExhausted(run_id, attempts, last_error, reason=ExhaustedReason(reason)))

    def _swap(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        records: list[LineageRecord],
        recoveries: list[Recovery],
    ) -> None:
        hook = getattr(pl_module, _HOOK, None)
        for record, recovery in zip(records, recoveries, strict=True):
            if recovery.client is not None:
                setattr(pl_module, self.client_attr, recovery.client)
                self._run_id = recovery.new_run_id
            self._lineage.append(record)
            logger.info(
                "TinkexRecovery: run %s recovered as %s from %s; swapped in at global step %d (steps lost: %s)",
                record["old_run_id"],
                recovery.new_run_id,
                record["checkpoint"],
                record["global_step"],
                "?" if record["steps_lost"] is None else record["steps_lost"],
            )
            if trainer.is_global_zero:
                metrics = {"tinker/recoveries": float(record["number"]), "tinker/seconds_to_recover": record["seconds"]}
                if record["steps_lost"] is not None:
                    metrics["tinker/steps_lost"] = float(record["steps_lost"])
                    report_steps_lost(record["steps_lost"], "lightning")
                for lightning_logger in trainer.loggers:
                    lightning_logger.log_metrics(metrics, step=trainer.global_step)
            if callable(hook):
                hook(recovery)

    def _restore_here(self, pl_module: pl.LightningModule, notice: _Notice) -> list[Recovery]:
        """On a rank other than 0: a client of this rank's own, restored from the newest broadcast checkpoint."""
        records = notice["records"]
        checkpoints = [Checkpoint.model_validate(c) for c in notice["checkpoints"]]
        old_run_id = self._run_id or records[0]["old_run_id"]
        client = self._restore(pl_module, checkpoints[-1].tinker_path, old_run_id, records[-1]["number"])
        recoveries = []
        for i, (record, checkpoint) in enumerate(zip(records, checkpoints, strict=True)):
            last = i == len(records) - 1
            recoveries.append(
                Recovery(
                    old_run_id=old_run_id if i == 0 else records[i - 1]["new_run_id"],
                    new_run_id=client.model_id if last else record["new_run_id"],
                    checkpoint=checkpoint,
                    attempts=record["attempts"],
                    seconds=record["seconds"],
                    number=record["number"],
                    client=client if last else None,
                )
            )
        return recoveries

    def _restore(self, pl_module: pl.LightningModule, path: str, old_run_id: str, number: int) -> Any:
        service = getattr(pl_module, self.service_attr)
        metadata = lineage_metadata(old_run_id, path, number)
        cond = threading.Condition()
        for attempt in range(1, self.policy.max_attempts + 1):
            try:
                pending = restore_from(service, path, with_optimizer=self.policy.restore_optimizer, metadata=metadata)
                client = resolve(pending, timeout=self.policy.attempt_timeout)
                if not isinstance(getattr(client, "model_id", None), str):
                    raise TypeError(f"the restored client has no model_id (got {type(client).__name__})")
                return client
            except Exception as exc:
                if attempt == self.policy.max_attempts:
                    raise
                logger.warning("TinkexRecovery: restore from %s failed (%s); retrying", path, describe(exc))
                p = self.policy
                delay = backoff_delay(attempt, base=p.backoff, cap=p.max_backoff, jitter=0.0, u=0.0)
                with cond:
                    self._clock.wait(cond, delay)
        raise AssertionError("unreachable")

    def _give_up(self, trainer: pl.Trainer, error: RecoveryExhausted, cause: BaseException | None = None) -> None:
        self._exhausted = error
        if self.on_exhausted == "raise":
            raise error from cause
        logger.error("TinkexRecovery: %s; stopping the fit", error)
        self._stopped = True
        trainer.should_stop = True

    # -- a training_step that fails because the run was lost mid-batch --------------------------------
    def _wrap_training_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            for rerun in range(_MAX_STEP_RERUNS + 1):
                if self._stopped:  # once stopped, the rest of the fit must not call the lost run
                    break
                try:
                    return original(*args, **kwargs)
                except Exception as exc:
                    if rerun == _MAX_STEP_RERUNS or not self._recover_failed_step(trainer, pl_module, exc):
                        raise
            return None

        setattr(pl_module, "training_step", training_step)  # noqa: B010 (an instance attribute, undone below)

        def unwrap() -> None:
            if vars(pl_module).get("training_step") is training_step:
                delattr(pl_module, "training_step")

        self._unwrap = unwrap

    def _recover_failed_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exc: Exception) -> bool:
        """True if the step should run again (a recovery was swapped in) or be skipped (a graceful stop)."""
        handle = self._handle
        if handle is None or trainer.world_size > 1:
            return False
        if not handle.check_now() and handle.state is not RunState.EXHAUSTED:
            if handle.observed is not None:  # observe mode: report what recover mode would do, change nothing
                logger.warning(
                    "TinkexRecovery (observe mode): training_step failed on run %s, which is corrupted (%s); %s; "
                    "the error is let through",
                    handle.observed,
                    describe(exc),
                    would_do(handle, self._wait_limit()),
                )
            return False  # the run is healthy (or only observed): the error is the step's own
        logger.warning("TinkexRecovery: training_step failed on a lost run (%s); recovering", describe(exc))
        recoveries, exhausted = self._collect()
        notice = self._notice(trainer, recoveries, exhausted)
        if notice is None:
            return False
        if notice["records"]:
            self._swap(trainer, pl_module, notice["records"], recoveries)
        if exhausted is not None:
            self._give_up(trainer, exhausted, cause=exc)
        return True

    def _release(self) -> None:
        """Stop the engine's threads and undo the training_step wrapper. Idempotent."""
        self._watching = False
        engine, self._engine, self._handle = self._engine, None, None
        if engine is not None:
            engine.close()
        unwrap, self._unwrap = self._unwrap, None
        if unwrap is not None:
            unwrap()


def _as_record(value: Any) -> LineageRecord:
    missing = set(LineageRecord.__annotations__) - set(value) if isinstance(value, dict) else {"all"}
    if missing:
        raise ValueError(f"TinkexRecovery state: a lineage record lacks {sorted(missing)}")
    return cast(LineageRecord, {k: value[k] for k in LineageRecord.__annotations__})


def _resume_step(checkpoint: Checkpoint) -> int | None:
    value = (checkpoint.user_metadata or {}).get(_STEP_KEY)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
