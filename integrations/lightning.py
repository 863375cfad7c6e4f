"""A Lightning callback that keeps a Tinker run alive through ``Trainer.fit``, every batch trained exactly once.

An adapter over the core's :class:`~tinkex_recovery._replay.Replayer` (one per module, shared by its callbacks:
it runs ``training_step`` and ``validation_step``, replays what a lost run lacks) and a
:class:`~tinkex_recovery._replay.Lane` per watched client (its ledger and engine watch). Its own parts: the swap
of clients into the module, ``trainer.global_step`` (:func:`_step_counter`, the one use of Lightning internals),
and a Tinker checkpoint saved with each Lightning one, restored exactly by ``fit(ckpt_path=...)``. DDP is refused
(Tinker gives a run one training client). Lightning is imported here only; without it, constructing the callback
says what to install.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from tinkex_recovery import Clock, Recovery, RecoveryExhausted, RecoveryPolicy, RunHandle
from tinkex_recovery import _integration as core
from tinkex_recovery._integration import LineageRecord

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
        policy = core.checked_options(
            policy, client_attr=client_attr, service_attr=service_attr, on_exhausted=on_exhausted
        )
        self.policy, self.client_attr, self.service_attr = policy, client_attr, service_attr
        self.on_exhausted, self.retry_failed_step, self.replay = on_exhausted, retry_failed_step, replay
        self._status, self._clock = status, clock
        self._lineage: list[LineageRecord] = []
        self._run_id: str | None = None
        self._resume: dict[str, Any] | None = None  # the Tinker checkpoint saved with a loaded Lightning checkpoint
        self._lane: core.Lane | None = None
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
    def ledger(self) -> core.Ledger | None:
        """The book of the run during ``fit``."""
        return self._lane.ledger if self._lane else None

    @property
    def exhausted(self) -> RecoveryExhausted | None:
        """Why recovery gave up, if it did."""
        return self._exhausted

    @property
    def buffered(self) -> int:
        """The trained batches kept for replay now (since the oldest checkpoint a recovery may fall back to)."""
        return len(self._lane.replayer.kept) if self._lane else 0

    # -- Lightning state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self._run_id, "lineage": [dict(r) for r in self._lineage]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        lineage = state_dict.get("lineage", [])
        if not isinstance(lineage, list):
            raise ValueError("TinkexRecovery state: 'lineage' must be a list of records")
        self._lineage = [core.as_record(r) for r in lineage]
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
        entry, lane = checkpoint.get("callbacks", {}).get(self.state_key), self._lane
        if entry is None or (lane is None and self._last is None):
            return
        client, at = (lane.observed, lane.replayer.at) if lane else self._last  # type: ignore[misc]

        def save() -> Any:
            return core.resolve(client.save_state(f"lightning-{at:08d}", None, True), self.policy.attempt_timeout)

        result = lane.replayer.call(save, (), {}) if lane else save()
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
        if (service := getattr(pl_module, self.service_attr, None)) is None:
            raise _misplaced(pl_module, "service_attr", self.service_attr, "hold the Tinker service client")
        start, client = 0, getattr(pl_module, self.client_attr, None)
        if trainer.ckpt_path is not None:
            start, client = self._resumed(str(trainer.ckpt_path), service, client)
        if not isinstance(run_id := getattr(client, "model_id", None), str) or not run_id:
            what = f"be a Tinker training client with a model_id (got {type(client).__name__})"
            raise _misplaced(pl_module, "client_attr", self.client_attr, what)
        if self._run_id is not None and self._run_id != run_id:
            logger.info("TinkexRecovery: the lineage of run %s continues with run %s", self._run_id, run_id)
        self._run_id, self._exhausted = run_id, None
        replayer = vars(pl_module).get(_REPLAYER)
        if replayer is None:
            replayer = _install(trainer, pl_module, self.replay, self.retry_failed_step, start)
        elif replayer.replay != self.replay or replayer.at != start:
            raise MisconfigurationException("TinkexRecovery: every callback on one module needs the same replay=")
        self._lane = core.Lane.watch(
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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run lost in the last batch (or found lost since) is recovered and replayed before fit returns.
        if self._lane is not None and self._lane is self._lane.replayer.lanes[0]:
            self._lane.replayer.settle(check=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(pl_module)

    # -- what the core reports -------------------------------------------------------------------------
    def _recovered(self, trainer: pl.Trainer, pl_module: pl.LightningModule, recovery: Recovery, steps: range) -> None:
        record = core.lineage_record(len(self._lineage) + 1, recovery, steps, "lightning", "TinkexRecovery")
        self._run_id = recovery.new_run_id
        self._lineage.append(record)
        metrics = {"tinker/recoveries": float(record["number"]), "tinker/seconds_to_recover": recovery.seconds}
        for lightning_logger in trainer.loggers:
            lightning_logger.log_metrics({**metrics, "tinker/steps_lost": float(len(steps))}, step=steps.stop)
        core.call_hook(getattr(pl_module, "on_tinker_recovery", None), recovery, steps)

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
        restored = core.restore_exactly(service, path, self.policy, mine)
        logger.info("TinkexRecovery: resuming at batch %d on run %s from %s (the module's run %s is not used)", step,
                    restored.model_id, path, mine)  # fmt: skip
        return step, restored

    def _release(self, pl_module: pl.LightningModule) -> None:
        """Stop the engine's threads and give the module its newest client back, unwrapped. Idempotent."""
        lane, self._lane = self._lane, None
        if lane is None:
            return
        replayer, self._last = lane.replayer, (lane.observed, lane.replayer.at)
        setattr(pl_module, self.client_attr, lane.close())  # and the lane leaves the replayer's loop
        if not replayer.lanes and vars(pl_module).get(_REPLAYER) is replayer:
            for name in (_REPLAYER, "training_step", "validation_step"):
                vars(pl_module).pop(name, None)


def _misplaced(module: pl.LightningModule, option: str, attr: str, what: str) -> AttributeError:
    return AttributeError(
        f"TinkexRecovery: {type(module).__name__}.{attr} must {what}; if the module keeps it under another "
        f'attribute, name it: TinkexRecovery({option}="...")'
    )


def _install(trainer: pl.Trainer, module: pl.LightningModule, replay: bool, retry: bool, start: int) -> core.Replayer:
    """The module's Replayer, with ``training_step`` and ``validation_step`` (if the module has one) run by it."""
    train, (counter, set_counter) = module.training_step, _step_counter(trainer)
    replayer = core.Replayer(
        train, start=start, counter=counter, set_counter=set_counter, replay=replay, retry_failed_step=retry
    )
    setattr(module, _REPLAYER, replayer)
    setattr(module, "training_step", replayer.step)  # noqa: B010
    if type(module).validation_step is not LightningModule.validation_step:
        validate = module.validation_step
        setattr(module, "validation_step", lambda *a, **k: replayer.call(validate, a, k))  # noqa: B010
    return replayer


def _step_counter(trainer: pl.Trainer) -> tuple[Callable[[], int], Callable[[int], None]]:
    """Read and set ``trainer.global_step`` (read-only in Lightning's API), the one use of Lightning internals,
    tested on 2.4.0 and 2.6 (``make lightning-lower-bound``; the loop-state test fails if they move). Its tracker,
    ``optim_step_progress`` (manual optimization) or ``optim_progress.optimizer.step`` (automatic), is one object
    for the whole fit (a restored checkpoint is loaded into it). Setting moves ``total`` and ``current`` (this
    epoch's) alike, ``ready`` with ``completed``, so a Lightning checkpoint saved later is what a fit that never
    lost its run saves (``current`` may dip below 0 while a replay crosses an epoch's start, and comes back)."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.lightning_module.automatic_optimization:
        progress = loop.automatic_optimization.optim_progress.optimizer.step
    else:
        progress = loop.manual_optimization.optim_step_progress
    total, current = progress.total, progress.current

    def set_step(step: int) -> None:
        delta = step - total.completed
        for tracker in (total, current):
            tracker.completed += delta
            tracker.ready += delta

    return functools.partial(getattr, total, "completed"), set_step  # read every batch: no Python frame
