"""A Lightning callback that keeps a Tinker run alive through ``Trainer.fit``, every batch trained exactly once.

An adapter, deciding nothing itself: per watched client a :class:`~tinkex_recovery._ledger.Ledger` (which
checkpoint the fit can resume from: a bare ``save_state(name)`` is enough) and an engine watch; per module one
:class:`~tinkex_recovery._replay.Replayer`, shared by its callbacks, which runs ``training_step`` and
``validation_step`` for the length of the fit: a run lost anywhere (a Tinker call in a step, a poll between
batches, the check at the end of the training) is recovered, the batches since its checkpoint replayed through
the module's own ``training_step`` (a healthy run in the same step answers from its recorded calls), and the
interrupted step run again. The callback's own parts: swapping clients into the module, setting
``trainer.global_step`` back for a replay (:func:`_set_global_step`, the one use of Lightning internals), and a
Tinker checkpoint saved with each Lightning checkpoint, restored exactly when ``fit(ckpt_path=...)`` resumes.

DDP is refused at fit start: Tinker gives a run one training client, and the SDK (0.38) cannot attach a second
process to an existing run. Lightning is imported here only; without it, constructing the callback says what to
install.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from tinkex_recovery import Clock, Recovery, RecoveryExhausted, RecoveryPolicy, RunHandle
from tinkex_recovery._integration import (
    Lane,
    Ledger,
    LineageRecord,
    Replayer,
    as_record,
    call_hook,
    checked_options,
    lineage_record,
    resolve,
    restore_exactly,
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
_REPLAYER = "_tinkex_recovery_replayer"  # the module's Replayer, an instance attribute for the length of the fit
_PROGRESS = "_tinkex_recovery_progress"  # (fit loop, the tracker behind global_step), cached on the trainer
_DDP_REFUSED = (
    "TinkexRecovery does not support distributed training (world_size={n}): Tinker gives a run one training client "
    "and the SDK (0.38) cannot attach a second process to an existing run, so the ranks can neither share one run "
    "nor move together to a recovered one. Train with one process (devices=1, num_nodes=1): the model is on Tinker."
)


class TinkexRecovery(Callback):
    """Recovers the module's Tinker run when the server marks it corrupted and replays the batches the restored
    checkpoint lacks: the final run has trained every batch once, and ``trainer.global_step`` counts each optimizer
    step once (manual or automatic optimization).

    ``policy`` defaults to ``RecoveryPolicy(enabled=True)`` (``enabled=False``: a no-op). ``client_attr`` and
    ``service_attr`` name the module's training client and service client; a module training two runs takes two
    callbacks. The module's optional ``on_tinker_recovery(recovery[, steps])`` runs after each swap, the new client
    in place; ``steps`` is the ``range`` of batch indices the checkpoint lacks, which the callback replays
    (``replay=True``; ``global_step`` is then at the range's start) or leaves to the hook (``replay=False``; the
    interrupted batch still runs again). ``on_exhausted="stop"`` ends the fit gracefully instead of raising
    :class:`RecoveryExhausted`; ``retry_failed_step=False`` lets a step failing on a lost run end the fit.
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
        policy = checked_options(policy, client_attr=client_attr, service_attr=service_attr, on_exhausted=on_exhausted)
        self.policy, self.client_attr, self.service_attr = policy, client_attr, service_attr
        self.on_exhausted, self.retry_failed_step, self.replay = on_exhausted, retry_failed_step, replay
        self._status, self._clock = status, clock
        self._lineage: list[LineageRecord] = []
        self._run_id: str | None = None
        self._resume: dict[str, Any] | None = None  # the Tinker checkpoint saved with a loaded Lightning checkpoint
        self._lane: Lane | None = None
        self._replayer: Replayer | None = None
        self._exhausted: RecoveryExhausted | None = None
        self._state_key = ("", "")
        self._last: tuple[Any, int] | None = None  # after a fit: its newest client (observed) and batches trained

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
        """The engine's handle on the run during ``fit``."""
        return self._lane.handle if self._lane else None

    @property
    def ledger(self) -> Ledger | None:
        """The book of the run during ``fit``."""
        return self._lane.ledger if self._lane else None

    @property
    def exhausted(self) -> RecoveryExhausted | None:
        """Why recovery gave up, if it did."""
        return self._exhausted

    @property
    def buffered(self) -> int:
        """The trained batches kept for replay now (since the oldest checkpoint a recovery may fall back to)."""
        return len(self._replayer.kept) if self._replayer else 0

    # -- Lightning state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self._run_id, "lineage": [dict(r) for r in self._lineage]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        lineage = state_dict.get("lineage", [])
        if not isinstance(lineage, list):
            raise ValueError("TinkexRecovery state: 'lineage' must be a list of records")
        self._lineage = [as_record(r) for r in lineage]
        run_id = state_dict.get("run_id")
        self._run_id = run_id if isinstance(run_id, str) else None
        resume = state_dict.get("tinker_checkpoint")
        ok = isinstance(resume, dict) and isinstance(resume.get("path"), str) and isinstance(resume.get("step"), int)
        self._resume = resume if ok else None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A Tinker checkpoint saved with the Lightning one (during or after the fit), so a resume from it restores
        exactly these steps."""
        entry, replayer = checkpoint.get("callbacks", {}).get(self.state_key), self._replayer
        if entry is None or (replayer is None and self._last is None):
            return
        client, at = (self._lane.tape.__wrapped__, replayer.at) if replayer and self._lane else self._last  # type: ignore[misc]

        def save() -> Any:
            return resolve(client.save_state(f"lightning-{at:08d}", None, True), self.policy.attempt_timeout)

        result = replayer.call(save, (), {}) if replayer else save()
        entry["tinker_checkpoint"] = {"path": result.path, "step": at}

    # -- hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.policy.enabled and trainer.world_size > 1:
            raise MisconfigurationException(_DDP_REFUSED.format(n=trainer.world_size))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release(pl_module)  # a second fit with the same callback starts afresh
        self._last = None
        if not self.policy.enabled:
            logger.info("TinkexRecovery: the policy has enabled=False; the run is not watched")
            return
        module, service = type(pl_module).__name__, getattr(pl_module, self.service_attr, None)
        if service is None:
            raise AttributeError(
                f"TinkexRecovery: {module}.{self.service_attr} must hold the Tinker service client; if the module "
                'keeps it under another attribute, name it: TinkexRecovery(service_attr="...")'
            )
        start, client = 0, getattr(pl_module, self.client_attr, None)
        if trainer.ckpt_path is not None:
            start, client = self._resumed(str(trainer.ckpt_path), service, client)
        if not isinstance(run_id := getattr(client, "model_id", None), str) or not run_id:
            raise AttributeError(
                f"TinkexRecovery: {module}.{self.client_attr} must be a Tinker training client with a model_id (got "
                f"{type(client).__name__}); if the module keeps it under another attribute, name it: "
                'TinkexRecovery(client_attr="...")'
            )
        if self._run_id is not None and self._run_id != run_id:
            logger.info("TinkexRecovery: the lineage of run %s continues with run %s", self._run_id, run_id)
        self._run_id, self._exhausted = run_id, None
        replayer = vars(pl_module).get(_REPLAYER)
        if replayer is None:
            replayer = _install(trainer, pl_module, self.replay, self.retry_failed_step, start)
        elif replayer.replay != self.replay or replayer.at != start:
            raise MisconfigurationException("TinkexRecovery: every callback on one module needs the same replay=")
        self._lane = Lane.watch(
            replayer,
            client,
            service,
            policy=self.policy,
            status=self._status,
            clock=self._clock,
            install=lambda tape: setattr(pl_module, self.client_attr, tape),
            on_recovery=lambda recovery, steps: self._recovered(trainer, pl_module, recovery, steps),
            on_exhausted=lambda error, cause: self._give_up(trainer, error, cause),
        )
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
        record = lineage_record(len(self._lineage) + 1, recovery, steps, "lightning", "TinkexRecovery")
        self._run_id = recovery.new_run_id
        self._lineage.append(record)
        metrics = {"tinker/recoveries": float(record["number"]), "tinker/seconds_to_recover": recovery.seconds}
        for lightning_logger in trainer.loggers:
            lightning_logger.log_metrics({**metrics, "tinker/steps_lost": float(len(steps))}, step=steps.stop)
        call_hook(getattr(pl_module, "on_tinker_recovery", None), recovery, steps)

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
        path, step, mine = resume["path"], resume["step"], getattr(client, "model_id", None)
        restored = restore_exactly(service, path, self.policy, mine)
        logger.info("TinkexRecovery: resuming at batch %d on run %s from %s (the module's run %s is not used)", step,
                    restored.model_id, path, mine)  # fmt: skip
        return step, restored

    def _release(self, pl_module: pl.LightningModule) -> None:
        """Stop the engine's threads and give the module its newest client back, unwrapped. Idempotent."""
        lane, replayer, self._lane, self._replayer = self._lane, self._replayer, None, None
        if lane is None or replayer is None:
            return
        self._last = (lane.tape.__wrapped__, replayer.at)
        setattr(pl_module, self.client_attr, lane.close())
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
    setattr(module, _REPLAYER, replayer)
    setattr(module, "training_step", replayer.step)  # noqa: B010
    if type(module).validation_step is not LightningModule.validation_step:
        validate = module.validation_step
        setattr(module, "validation_step", lambda *a, **k: replayer.call(validate, a, k))  # noqa: B010
    return replayer


def _step_progress(trainer: pl.Trainer) -> Any:
    """The progress tracker behind ``trainer.global_step`` (manual: ``optim_step_progress``; automatic:
    ``optim_progress.optimizer.step``), cached per fit. With :func:`_set_global_step` the one use of Lightning
    internals, tested on 2.4.0 and 2.6 (``make lightning-lower-bound``; the loop-state test fails if it moves)."""
    cached = trainer.__dict__.get(_PROGRESS)
    if cached is None or cached[0] is not trainer.fit_loop:
        loop = trainer.fit_loop.epoch_loop
        if trainer.lightning_module.automatic_optimization:
            progress = loop.automatic_optimization.optim_progress.optimizer.step
        else:
            progress = loop.manual_optimization.optim_step_progress
        cached = trainer.__dict__[_PROGRESS] = (trainer.fit_loop, progress)
    return cached[1]


def _set_global_step(trainer: pl.Trainer, step: int) -> None:
    """Set ``trainer.global_step`` (read-only in Lightning's API): ``total`` and ``current`` (this epoch's) move
    alike, ``ready`` with ``completed``, so a Lightning checkpoint saved later is what a fit that never lost its
    run saves (``current`` may dip below 0 while a replay crosses an epoch's start, and comes back)."""
    progress = _step_progress(trainer)
    delta = step - progress.total.completed
    for tracker in (progress.total, progress.current):
        tracker.completed += delta
        tracker.ready += delta
