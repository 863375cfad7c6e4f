"""A Lightning callback that keeps a Tinker run alive through ``Trainer.fit``, every batch trained exactly once.

``Trainer(callbacks=[TinkexRecovery(policy)])`` is all it takes when the LightningModule holds its Tinker
training client as ``training_client`` and its service client as ``service_client``. The callback is an
adapter: it translates Lightning's hooks into the framework-free core, and decides nothing itself.

- :class:`~tinkex_recovery._ledger.Ledger` (one per callback, i.e. per watched run) counts the ``optim_step``
  and ``save_state`` calls the module makes, so every checkpoint holds a known step (a bare
  ``save_state(name)`` is enough) and the engine restores only one the fit can resume from.
- :class:`~tinkex_recovery._replay.Replayer` (one per module, shared by every callback on it) runs each batch:
  a run lost anywhere (a Tinker call in ``training_step`` or ``validation_step``, a poll between batches, the
  check at the end of the fit) is recovered, the batches since its checkpoint are replayed through the module's
  own ``training_step`` (a healthy run in the same step answers from its recorded calls, never trained twice),
  and the interrupted step runs again.

The callback's own parts: it wraps the module's ``training_step`` and ``validation_step`` for the length of the
fit, swaps each new client into the module, sets ``trainer.global_step`` back for a replay
(:func:`_set_global_step`, the one use of Lightning internals), saves a Tinker checkpoint with every Lightning
checkpoint and restores exactly that one when ``fit(ckpt_path=...)`` resumes.

DDP is refused at fit start: Tinker gives a run one training client, and the SDK (0.38) cannot attach a second
process to an existing run, so ranks cannot share one run, nor move together to one recovered run.
Lightning is imported here only; without it, importing works and constructing the callback raises ImportError.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from tinkex_recovery import Clock, Recovery, RecoveryEngine, RecoveryExhausted, RecoveryPolicy, RunHandle
from tinkex_recovery._integration import (
    Lane,
    Ledger,
    Replayer,
    Tape,
    describe,
    lineage_metadata,
    report_steps_lost,
    resolve,
    restore_from,
    would_do,
)

try:
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # the callback can still be named; constructing it says what to install
    _LIGHTNING_MISSING: ImportError | None = exc
    Callback = object  # type: ignore[assignment,misc]
    MisconfigurationException = RuntimeError  # type: ignore[assignment,misc]
else:
    _LIGHTNING_MISSING = None

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["LineageRecord", "TinkexRecovery"]

logger = logging.getLogger("tinkex_recovery")

_INSTALL_HINT = "TinkexRecovery needs Lightning: pip install 'tinkex-recovery[lightning]'"
_REPLAYER = "_tinkex_recovery_replayer"
_PROGRESS = "_tinkex_recovery_progress"  # (fit loop, the tracker behind global_step), cached on the trainer  # the module's Replayer, an instance attribute for the length of the fit
_DDP_REFUSED = (
    "TinkexRecovery does not support distributed training (world_size={n}): Tinker gives a run one training "
    "client and the SDK (0.38) cannot attach a second process to an existing run, so the ranks can neither "
    "share one run nor move together to one recovered run. Train with one process (devices=1, num_nodes=1); "
    "the model lives on Tinker, so more local processes add no training capacity."
)


class LineageRecord(TypedDict):
    """One recovery as the callback keeps it (and checkpoints it): ids, paths and numbers only."""

    number: int  #: 1, 2, ... over the whole lineage, across restarts from a Lightning checkpoint
    old_run_id: str
    new_run_id: str
    checkpoint: str  #: the tinker:// path restored from
    attempts: int
    seconds: float  #: from detection to the new client in hand
    global_step: int  #: the batches the lost run had completed
    resume_step: int | None  #: the restored checkpoint's step (the batches it holds)
    steps_lost: int | None  #: global_step - resume_step: the batches trained again


class TinkexRecovery(Callback):
    """Recovers the module's Tinker run when the server marks it corrupted, and replays the batches the restored
    checkpoint lacks, so the final run has trained every batch exactly once and ``trainer.global_step`` equals
    the optimizer steps run (manual or automatic optimization).

    ``policy`` defaults to ``RecoveryPolicy(enabled=True)``; ``enabled=False`` makes the callback a no-op.
    ``client_attr`` and ``service_attr`` name the module's attributes holding the training client and the service
    client (one callback per training client: a module training two runs takes two callbacks).

    After each swap the module's optional ``on_tinker_recovery(recovery[, steps])`` hook runs on the main thread,
    the new client in place; ``steps`` is the ``range`` of batch indices the checkpoint lacks. With ``replay=True``
    (the default) the callback replays them itself (``global_step`` is at the range's start when the hook runs);
    ``replay=False`` leaves them to the hook, the interrupted batch still running again.
    ``on_exhausted="raise"`` lets :class:`RecoveryExhausted` leave ``fit``; ``"stop"`` ends the fit gracefully.
    ``retry_failed_step=False`` lets a step that fails on a lost run end the fit. ``clock`` is for tests.
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
        replay: bool = True,
        clock: Clock | None = None,
    ) -> None:
        if _LIGHTNING_MISSING is not None:
            raise ImportError(_INSTALL_HINT) from _LIGHTNING_MISSING
        policy = RecoveryPolicy(enabled=True) if policy is None else policy
        if not isinstance(policy, RecoveryPolicy):
            raise TypeError(f"policy must be a RecoveryPolicy, got {type(policy).__name__}")
        for name, value in (("client_attr", client_attr), ("service_attr", service_attr)):
            if not isinstance(value, str) or not value.isidentifier():
                raise ValueError(f"{name} must name an attribute of the LightningModule, got {value!r}")
        if on_exhausted not in ("raise", "stop"):
            raise ValueError(f"on_exhausted must be 'raise' or 'stop', got {on_exhausted!r}")
        self.policy, self.client_attr, self.service_attr = policy, client_attr, service_attr
        self.on_exhausted, self.retry_failed_step, self.replay = on_exhausted, retry_failed_step, replay
        self._status, self._clock = status, clock
        self._lineage: list[LineageRecord] = []
        self._run_id: str | None = None
        self._resume: dict[str, Any] | None = None  # the Tinker checkpoint saved with a loaded Lightning checkpoint
        self._engine: RecoveryEngine | None = None
        self._lane: Lane | None = None
        self._replayer: Replayer | None = None
        self._exhausted: RecoveryExhausted | None = None
        self._state_key = ("", "")

    # -- public state ---------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:  # one per watched client; cached, as Lightning reads it at every hook call
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
        """The engine's handle on the run during ``fit`` (None outside it)."""
        return self._lane.handle if self._lane is not None else None

    @property
    def ledger(self) -> Ledger | None:
        """The book of the run during ``fit`` (None outside it)."""
        return self._lane.ledger if self._lane is not None else None

    @property
    def exhausted(self) -> RecoveryExhausted | None:
        """Why recovery gave up, if it did."""
        return self._exhausted

    @property
    def buffered(self) -> int:
        """How many trained batches are kept for replay now (those since the oldest checkpoint a recovery may use)."""
        return len(self._replayer.kept) if self._replayer is not None else 0

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
        resume = state_dict.get("tinker_checkpoint")
        ok = isinstance(resume, dict) and isinstance(resume.get("path"), str) and isinstance(resume.get("step"), int)
        self._resume = resume if ok else None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Save a Tinker checkpoint with the Lightning one, so a resume restores exactly these steps."""
        replayer, lane, entry = self._replayer, self._lane, checkpoint.get("callbacks", {}).get(self.state_key)
        if replayer is None or lane is None or entry is None:
            return
        name = f"lightning-{replayer.at:08d}"

        def save() -> Any:
            return resolve(lane.tape.__wrapped__.save_state(name, None, True), self.policy.attempt_timeout)

        path = replayer.call(save, (), {}).path
        entry["tinker_checkpoint"] = {"path": path, "step": replayer.at}

    # -- hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.policy.enabled and trainer.world_size > 1:
            raise MisconfigurationException(_DDP_REFUSED.format(n=trainer.world_size))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release(pl_module)  # a second fit with the same callback starts afresh
        if not self.policy.enabled:
            logger.info("TinkexRecovery: the policy has enabled=False; the run is not watched")
            return
        module = type(pl_module).__name__
        service = getattr(pl_module, self.service_attr, None)
        if service is None:
            raise AttributeError(f"TinkexRecovery: {module}.{self.service_attr} must hold the Tinker service client")
        start, client = 0, getattr(pl_module, self.client_attr, None)
        if trainer.ckpt_path is not None:
            start, client = self._resumed(trainer.ckpt_path, service, client)
        run_id = getattr(client, "model_id", None)
        if not isinstance(run_id, str) or not run_id:
            raise AttributeError(
                f"TinkexRecovery: {module}.{self.client_attr} must be a Tinker training client with a model_id "
                f"(got {type(client).__name__})"
            )
        if self._run_id is not None and self._run_id != run_id:
            logger.info("TinkexRecovery: the lineage of run %s continues with run %s", self._run_id, run_id)
        self._run_id, self._exhausted = run_id, None
        replayer = vars(pl_module).get(_REPLAYER)
        if replayer is None:
            replayer = _install(trainer, pl_module, self.replay, self.retry_failed_step, start)
        elif replayer.replay != self.replay or replayer.at != start:
            raise MisconfigurationException("TinkexRecovery: every callback on one module needs the same replay=")
        ledger = Ledger(position=lambda: replayer.at)
        engine = RecoveryEngine(self.policy, status=self._status, poll_concurrency=1, clock=self._clock)
        try:
            handle = engine.watch(run_id, service, step_of=replayer.step_of(ledger))
            self._engine = engine.start()
        except BaseException:
            engine.close()
            raise
        p = self.policy
        self._lane = Lane(
            ledger,
            handle,
            client,
            install=lambda tape: setattr(pl_module, self.client_attr, tape),
            on_recovery=lambda recovery, steps: self._recovered(trainer, pl_module, recovery, steps),
            on_exhausted=lambda error, cause: self._give_up(trainer, error, cause),
            fallback_depth=p.fallback_depth,
            wait_limit=p.max_attempts * (p.attempt_timeout + p.max_backoff) + 120.0,
        )
        replayer.lanes.append(self._lane)
        self._replayer = replayer

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run lost in the last batch (or found lost since) is recovered and replayed before fit returns.
        if self._replayer is not None and self._lane is self._replayer.lanes[0]:
            self._replayer.settle(check=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(pl_module)

    # -- what the core reports -------------------------------------------------------------------------
    def _recovered(self, trainer: pl.Trainer, pl_module: pl.LightningModule, recovery: Recovery, steps: range) -> None:
        done, resume = steps.stop, recovery.step
        record = LineageRecord(
            number=len(self._lineage) + 1,
            old_run_id=recovery.old_run_id,
            new_run_id=recovery.new_run_id,
            checkpoint=recovery.checkpoint.tinker_path,
            attempts=recovery.attempts,
            seconds=recovery.seconds,
            global_step=done,
            resume_step=resume,
            steps_lost=len(steps),
        )
        self._run_id = recovery.new_run_id
        self._lineage.append(record)
        logger.info(
            "TinkexRecovery: run %s recovered as %s from %s (step %s); %d batch(es) to train again",
            recovery.old_run_id,
            recovery.new_run_id,
            record["checkpoint"],
            resume,
            len(steps),
        )
        report_steps_lost(len(steps), "lightning")
        metrics = {
            "tinker/recoveries": float(record["number"]),
            "tinker/seconds_to_recover": recovery.seconds,
            "tinker/steps_lost": float(len(steps)),
        }
        for lightning_logger in trainer.loggers:
            lightning_logger.log_metrics(metrics, step=done)
        hook = getattr(pl_module, "on_tinker_recovery", None)
        if callable(hook):
            hook(recovery, steps) if _takes_two(hook) else hook(recovery)

    def _give_up(self, trainer: pl.Trainer, error: RecoveryExhausted, cause: BaseException | None) -> None:
        self._exhausted = error
        if self.on_exhausted == "raise":
            raise error from cause
        logger.error("TinkexRecovery: %s; stopping the fit", error)
        trainer.should_stop = True

    def _resumed(self, ckpt_path: str, service: Any, client: Any) -> tuple[int, Any]:
        """``fit(ckpt_path=...)``: a new run restored from the Tinker checkpoint saved with that Lightning one."""
        resume = self._resume
        if resume is None:
            raise MisconfigurationException(
                f"TinkexRecovery: fit(ckpt_path={ckpt_path!r}) resumes Lightning's steps, but that checkpoint names "
                "no Tinker checkpoint to restore the run to (it was saved without TinkexRecovery in the callbacks, "
                "or with weights_only=True): resume from a checkpoint saved with the callback, or start a new fit "
                "without ckpt_path on a run restored by hand"
            )
        path, step = resume["path"], resume["step"]
        meta = lineage_metadata(getattr(client, "model_id", "") or "", path)
        restored = resolve(
            restore_from(service, path, with_optimizer=self.policy.restore_optimizer, metadata=meta),
            self.policy.attempt_timeout,
        )
        logger.info(
            "TinkexRecovery: resuming at batch %d on run %s, restored from %s (the module's run %s is not used)",
            step,
            restored.model_id,
            path,
            getattr(client, "model_id", None),
        )
        return step, restored

    def _release(self, pl_module: pl.LightningModule) -> None:
        """Stop the engine's threads and give the module its newest client back, unwrapped. Idempotent."""
        engine, lane, replayer = self._engine, self._lane, self._replayer
        self._engine = self._lane = self._replayer = None
        if engine is not None:
            engine.close()
        if lane is None or replayer is None:
            return
        setattr(pl_module, self.client_attr, lane.tape.__wrapped__.__wrapped__)
        replayer.lanes.remove(lane)
        if not replayer.lanes and vars(pl_module).get(_REPLAYER) is replayer:
            for name in (_REPLAYER, "training_step", "validation_step"):
                vars(pl_module).pop(name, None)


def _install(trainer: pl.Trainer, module: pl.LightningModule, replay: bool, retry: bool, start: int) -> Replayer:
    """The module's Replayer, with ``training_step`` and ``validation_step`` (if the module has one) run by it."""
    train = module.training_step
    replayer = Replayer(
        train,
        start=start,
        counter=lambda: _step_progress(trainer).total.completed,
        set_counter=lambda n: _set_global_step(trainer, n),
        replay=replay,
        retry_failed_step=retry,
    )
    replayer.on_observed = lambda lane, exc: logger.warning(
        "TinkexRecovery (observe mode): a step failed on run %s, which is corrupted (%s); %s; the error is let "
        "through",
        lane.handle.observed,
        describe(exc),
        would_do(lane.handle, 60.0),
    )
    setattr(module, _REPLAYER, replayer)
    setattr(module, "training_step", replayer.step)  # noqa: B010
    if type(module).validation_step is not LightningModule.validation_step:
        validate = module.validation_step
        setattr(module, "validation_step", lambda *a, **k: replayer.call(validate, a, k))  # noqa: B010
    return replayer


def _step_progress(trainer: pl.Trainer) -> Any:
    """The progress tracker behind ``trainer.global_step`` (manual optimization: ``optim_step_progress``;
    automatic: ``optim_progress.optimizer.step``), read directly as ``global_step`` itself is a chain of properties.
    With :func:`_set_global_step`, the one use of Lightning internals; tested at both bounds of the Lightning range
    pyproject.toml allows (tests/test_lightning_edges.py::test_the_loop_state_lightning_saves_is_untouched_by_a_recovery)."""
    cached = trainer.__dict__.get(_PROGRESS)
    if cached is None or cached[0] is not trainer.fit_loop:  # the loops are built once per fit
        loop = trainer.fit_loop.epoch_loop
        if trainer.lightning_module.automatic_optimization:
            progress = loop.automatic_optimization.optim_progress.optimizer.step
        else:
            progress = loop.manual_optimization.optim_step_progress
        cached = trainer.__dict__[_PROGRESS] = (trainer.fit_loop, progress)
    return cached[1]


def _set_global_step(trainer: pl.Trainer, step: int) -> None:
    """Set ``trainer.global_step`` (read-only in Lightning's API) by moving its progress tracker's ``total`` and
    ``current`` (this epoch's) alike, ``ready`` with ``completed``, so that what Lightning saves in a checkpoint is
    what a fit that never lost its run would save (``current`` may go below 0 while a replay crosses an epoch's
    start, and comes back)."""
    progress = _step_progress(trainer)
    delta = step - progress.total.completed
    for tracker in (progress.total, progress.current):
        tracker.completed += delta
        tracker.ready += delta


def _as_record(value: Any) -> LineageRecord:
    missing = set(LineageRecord.__annotations__) - set(value) if isinstance(value, dict) else {"all"}
    if missing:
        raise ValueError(f"TinkexRecovery state: a lineage record lacks {sorted(missing)}")
    return cast(LineageRecord, {k: value[k] for k in LineageRecord.__annotations__})


def _takes_two(fn: Any) -> bool:
    """Whether ``fn`` (the module's bound hook) accepts a second positional argument."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) or sum(p.kind in positional for p in params) >= 2
