"""A Lightning callback that keeps a Tinker run alive through ``Trainer.fit``, every batch trained exactly once.

``Trainer(callbacks=[TinkexRecovery(policy)])`` is all it takes when the LightningModule holds its Tinker
training client as ``training_client`` and its service client as ``service_client``, optimizes manually
(``self.optimizers().step()`` once per batch, after the Tinker calls) and saves its checkpoints with
``user_metadata={"step": str(self.global_step)}``. The engine's threads poll the run and restore it; the
callback only reads their results, on the main thread, inside the module's ``training_step`` (which it wraps
for the length of the fit):

- **Detection.** Before each batch the callback looks (two lock-free reads) at whether a poll found the run
  lost. A ``training_step`` that raises makes it check the run at once; if the run is lost, it waits for the
  recovery, otherwise the error propagates unchanged.
- **Swap and replay.** The new client is swapped into the module; the trainer's step counter is set back to
  the restored checkpoint's step; the module's optional ``on_tinker_recovery(recovery[, steps])`` hook runs;
  then the batches trained since that checkpoint are run again, through the module's own ``training_step``,
  on the new client (each calls ``optimizers().step()`` again, so the counter comes back to where it was);
  then the interrupted batch runs from its start. Checkpoints due during the replay, or at the batch that
  failed, are saved on the new run by the module's own code.
- **The replay buffer** holds the batches trained since the newest checkpoint the callback knows of: it wraps
  the client's ``save_state`` to learn each checkpoint's ``step`` and, once the save has succeeded, drops the
  batches that checkpoint holds. Memory is bounded by the save interval; only references to the batches are
  kept, never copies, and nothing is kept after the fit.

The ``step`` of a checkpoint is the number of optimizer steps it holds (``self.global_step`` right after
``optimizers().step()``). A checkpoint without one, older than the buffer reaches, or with a step beyond the
steps taken, is never restored: the engine skips it (``step_of``) before any restore call.

DDP is refused at fit start: Tinker gives a run one training client, and the SDK (0.38) cannot attach a second
process to an existing run, so ranks cannot share one run, nor move together to one recovered run.

Lightning is imported here only; without it, importing this module works and constructing the callback
raises :class:`ImportError` with the install command.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypedDict, cast

from tinkex_recovery import (
    CannotReplay,
    Checkpoint,
    Clock,
    Recovery,
    RecoveryEngine,
    RecoveryExhausted,
    RecoveryPolicy,
    RunHandle,
    RunState,
    SystemClock,
)
from tinkex_recovery._integration import STEP_KEY, describe, report_steps_lost, resolve, would_do

try:
    from lightning.fabric.utilities.exceptions import MisconfigurationException
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
_MAX_STEP_RERUNS = 3  # a batch that keeps failing after this many recoveries lets its error through
_HOOK = "on_tinker_recovery"
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
    global_step: int  #: the optimizer steps the lost run had taken in completed batches
    resume_step: int | None  #: the restored checkpoint's step
    steps_lost: int | None  #: global_step - resume_step: the steps the checkpoint lacked (replayed by default)


class _Batch(NamedTuple):
    """A trained batch kept for replay: the global step it started at and the arguments of its
    ``training_step`` (references, not copies)."""

    step: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class TinkexRecovery(Callback):
    """Recovers the module's Tinker run when the server marks it corrupted, and replays the batches the
    restored checkpoint lacks, so the final run has trained every batch exactly once and
    ``trainer.global_step`` equals the optimizer steps run.

    ``policy`` defaults to ``RecoveryPolicy(enabled=True)``: adding the callback is the opt-in, and a policy
    with ``enabled=False`` makes it a no-op. ``client_attr`` and ``service_attr`` name the module's
    attributes holding the training client and the service client (the service restores the run, and
    provides the REST client that polls it unless ``status`` is given).

    After each swap the module's optional ``on_tinker_recovery(recovery)`` hook is called on the main thread,
    with the new client in place; a hook with a second parameter also gets ``steps``, the ``range`` of global
    steps the restored checkpoint lacks (``range(recovery_step, steps_taken)``). With ``replay=True`` (the
    default) the callback then replays those steps itself, and ``trainer.global_step`` is at the start of the
    range when the hook runs. ``replay=False`` is for a module that replays on its own in the hook: the
    callback then leaves data and step counter to it (it only undoes the steps a failed batch counted before
    running that batch again). Replay needs manual optimization.

    ``on_exhausted="raise"`` lets :class:`RecoveryExhausted` leave ``fit``; ``"stop"`` ends the fit
    gracefully instead (``trainer.should_stop``; the batch in flight is skipped, since its run is lost).
    ``retry_failed_step=False`` lets a step that fails on a lost run end the fit instead of being recovered
    and run again (at most 3 times). ``clock`` is injectable for tests.

    Single process only: a fit with ``world_size > 1`` is refused at its start (see the module docs).
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
        self.replay = replay
        self._status = status
        self._clock = clock or SystemClock()
        self._lineage: list[LineageRecord] = []
        self._run_id: str | None = None
        self._engine: RecoveryEngine | None = None
        self._handle: RunHandle | None = None
        self._state_key = ("", "")  # (client_attr, the key built from it)
        self._stopped = False
        self._exhausted: RecoveryExhausted | None = None
        self._undo: list[Callable[[], None]] = []  # what on_fit_start patched, undone at the release
        # The trainer's step counter (Lightning's progress trackers behind trainer.global_step), from the
        # training start; None under automatic optimization.
        self._counter: Any = None
        self._progress: Any = None
        self._buffer: deque[_Batch] = deque()
        self._floor = 0  # the step of the newest checkpoint known: the buffer holds every batch from there
        self._saves: list[tuple[int, Any]] = []  # (step, the save_state future) not yet known to have succeeded
        self._replay_from: int | None = None  # set by a recovery, cleared when its replay starts
        self._reached = 0  # the steps taken by the batches before the current one

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
        """The engine's handle on the run during ``fit`` (None outside it)."""
        return self._handle

    @property
    def exhausted(self) -> RecoveryExhausted | None:
        """Why recovery gave up, if it did."""
        return self._exhausted

    @property
    def buffered(self) -> int:
        """How many trained batches the replay buffer holds now (those since the newest known checkpoint)."""
        return len(self._buffer)

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
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the strategy wraps the model or any collective runs: refuse what cannot be kept alive.
        if stage == "fit" and self.policy.enabled and trainer.world_size > 1:
            raise MisconfigurationException(_DDP_REFUSED.format(n=trainer.world_size))

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
                f"client with a model_id (got {type(client).__name__}); if the module keeps it under another "
                'attribute, name it: TinkexRecovery(client_attr="...")'
            )
        service = getattr(pl_module, self.service_attr, None)
        if service is None:
            raise AttributeError(
                f"TinkexRecovery: {type(pl_module).__name__}.{self.service_attr} must hold the Tinker service "
                "client that restores the run"
            )
        if self.replay and pl_module.automatic_optimization:
            raise MisconfigurationException(
                "TinkexRecovery replays batches through training_step, which needs manual optimization "
                "(self.automatic_optimization = False, and self.optimizers().step() once per batch); pass "
                "replay=False to replay on your own"
            )
        if self._run_id is not None and self._run_id != run_id:
            logger.info("TinkexRecovery: the lineage of run %s continues with run %s", self._run_id, run_id)
        self._run_id = run_id
        self._stopped = False
        self._exhausted = None
        engine = RecoveryEngine(self.policy, status=self._status, poll_concurrency=1, clock=self._clock)
        try:
            self._handle = engine.watch(run_id, service, step_of=self._step_of)
            self._engine = engine.start()
        except BaseException:
            engine.close()
            self._handle = None
            raise
        self._wrap_training_step(trainer, pl_module)
        if self.replay:
            self._track_saves(client)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores its loops (global_step included) after on_fit_start; read the counter from here.
        if pl_module.automatic_optimization:
            return
        self._progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        self._counter = self._progress.total
        self._floor = self._reached = self._counter.completed
        self._buffer.clear()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()  # Lightning calls no teardown after an exception

    # -- the wrapped training_step: every decision happens here, on the main thread -------------------
    def _wrap_training_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            if self._stopped:  # once stopped, the rest of the fit must not call the lost run
                return None
            counter = self._counter
            self._reached = counter.completed if counter is not None else 0
            handle = self._handle
            if handle is not None and not handle.settled:  # a poll found the run lost: swap before the batch
                self._take_recoveries(trainer, pl_module, cause=None)
            for rerun in range(_MAX_STEP_RERUNS + 1):
                if self._stopped:
                    return None
                try:
                    if self._replay_from is not None:
                        self._replay(original)
                    step = counter.completed if counter is not None else 0
                    output = original(*args, **kwargs)
                except Exception as exc:
                    if rerun == _MAX_STEP_RERUNS or not self._recover_failed_step(trainer, pl_module, exc):
                        raise
                    continue
                if self.replay:
                    self._buffer.append(_Batch(step, args, kwargs))
                    if self._saves:
                        self._settle_saves()
                return output
            raise AssertionError("unreachable")

        setattr(pl_module, "training_step", training_step)  # noqa: B010 (an instance attribute, undone below)

        def unwrap() -> None:
            if vars(pl_module).get("training_step") is training_step:
                delattr(pl_module, "training_step")

        self._undo.append(unwrap)

    def _recover_failed_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exc: Exception) -> bool:
        """True if the step should run again (a recovery was swapped in) or be skipped (a graceful stop)."""
        handle = self._handle
        if handle is None or not self.retry_failed_step:
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
        logger.info("TinkexRecovery: training_step failed on a lost run (%s); recovering", describe(exc))
        return self._take_recoveries(trainer, pl_module, cause=exc)

    def _take_recoveries(self, trainer: pl.Trainer, pl_module: pl.LightningModule, cause: Exception | None) -> bool:
        """Swap in what the engine recovered (waiting for a recovery under way); False if there was nothing."""
        recoveries, exhausted = self._collect()
        if not recoveries and exhausted is None:
            return False
        for recovery in recoveries:
            self._swap(trainer, pl_module, recovery)
        if exhausted is not None:
            self._set_counter(self._reached)  # the failed batch's own steps never happened on a live run
            self._give_up(trainer, exhausted, cause)
        return True

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

    def _swap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, recovery: Recovery) -> None:
        reached = self._reached
        resume = recovery.step
        record = LineageRecord(
            number=len(self._lineage) + 1,
            old_run_id=recovery.old_run_id,
            new_run_id=recovery.new_run_id,
            checkpoint=recovery.checkpoint.tinker_path,
            attempts=recovery.attempts,
            seconds=recovery.seconds,
            global_step=reached,
            resume_step=resume,
            steps_lost=max(reached - resume, 0) if resume is not None else None,
        )
        if recovery.client is not None:
            old = getattr(pl_module, self.client_attr, None)
            setattr(pl_module, self.client_attr, recovery.client)
            if self.replay:
                self._untrack_saves(old)
                self._track_saves(recovery.client)
        self._run_id = recovery.new_run_id
        self._lineage.append(record)
        logger.info(
            "TinkexRecovery: run %s recovered as %s from %s (step %s); the lost run had taken %d step(s)",
            record["old_run_id"],
            record["new_run_id"],
            record["checkpoint"],
            "?" if resume is None else resume,
            reached,
        )
        metrics = {"tinker/recoveries": float(record["number"]), "tinker/seconds_to_recover": record["seconds"]}
        if record["steps_lost"] is not None:
            metrics["tinker/steps_lost"] = float(record["steps_lost"])
            report_steps_lost(record["steps_lost"], "lightning")
        for lightning_logger in trainer.loggers:
            lightning_logger.log_metrics(metrics, step=reached)
        if self.replay:
            self._check_replayable(recovery, resume)
            assert resume is not None  # checked above
            self._set_counter(resume)
            self._release_to(resume)
            self._replay_from = resume
        else:
            self._set_counter(reached)  # undo what a failed batch counted; the module rewinds on its own
        self._call_hook(pl_module, recovery, range(resume if resume is not None else reached, reached))

    def _check_replayable(self, recovery: Recovery, resume: int | None) -> None:
        where = f"run {recovery.new_run_id} was restored from {recovery.checkpoint.tinker_path}"
        if resume is None:
            raise CannotReplay(f"{where}, which records no {STEP_KEY!r} in its user_metadata")
        if resume < self._floor:
            raise CannotReplay(
                f"{where} (step {resume}), older than the replay buffer reaches (step {self._floor}): the "
                "batches in between are no longer held"
            )
        if resume > self._reached:
            raise CannotReplay(
                f"{where} (step {resume}), ahead of the {self._reached} steps this fit has taken: its step does "
                "not count optimizer steps as the trainer does"
            )

    def _call_hook(self, pl_module: pl.LightningModule, recovery: Recovery, steps: range) -> None:
        hook = getattr(pl_module, _HOOK, None)
        if not callable(hook):
            return
        if _takes_two(hook):
            hook(recovery, steps)
        else:
            hook(recovery)

    def _replay(self, original: Callable[..., Any]) -> None:
        """Run again, on the new client, every buffered batch from the restored checkpoint's step on. The
        replayed batches go back into the buffer as they complete, so a run lost during the replay is replayed
        from the next recovery in turn."""
        start, self._replay_from = self._replay_from, None
        assert start is not None
        todo = [b for b in self._buffer if b.step >= start]
        self._buffer.clear()
        counter = self._counter
        logger.info("TinkexRecovery: replaying %d batch(es) from step %d on the new run", len(todo), start)
        for i, batch in enumerate(todo):
            step = counter.completed if counter is not None else batch.step
            try:
                original(*batch.args, **batch.kwargs)
            except BaseException:
                self._buffer.extend(todo[i:])
                raise
            self._buffer.append(_Batch(step, batch.args, batch.kwargs))

    def _set_counter(self, step: int) -> None:
        """Set ``trainer.global_step`` (under manual optimization: the optimizer-step progress) to ``step``.

        Called on the main thread between optimizer steps, never during one. Both trackers (``total``, which
        global_step reads, and ``current``) move by the same amount, and ``ready`` is aligned with ``completed``,
        as Lightning's own restart does."""
        progress = self._progress
        if progress is None:
            return
        delta = step - progress.total.completed
        if delta == 0:
            return
        for tracker in (progress.total, progress.current):
            tracker.completed = max(tracker.completed + delta, 0)
            tracker.ready = tracker.completed

    # -- the checkpoints the module saves: where the replay buffer starts -----------------------------
    def _track_saves(self, client: Any) -> None:
        """Wrap ``client.save_state`` (an instance attribute, removed at the release) to learn the step of each
        checkpoint the module saves."""
        original = getattr(client, "save_state", None)
        if not callable(original) or getattr(original, "_tinkex_tracked", False):
            return

        @functools.wraps(original)
        def save_state(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            metadata = kwargs["user_metadata"] if "user_metadata" in kwargs else (args[3] if len(args) > 3 else None)
            step = _step_in(metadata)
            if step is not None:
                self._saves.append((step, result))
            return result

        save_state._tinkex_tracked = True  # type: ignore[attr-defined]
        try:
            setattr(client, "save_state", save_state)  # noqa: B010
        except (AttributeError, TypeError) as exc:
            raise TypeError(
                f"TinkexRecovery: cannot follow {type(client).__name__}.save_state to bound the replay buffer "
                f"({exc}); pass replay=False and replay in on_tinker_recovery"
            ) from exc
        self._undo.append(lambda: self._untrack_saves(client))

    @staticmethod
    def _untrack_saves(client: Any) -> None:
        current = vars(client).get("save_state") if hasattr(client, "__dict__") else None
        if current is not None and getattr(current, "_tinkex_tracked", False):
            delattr(client, "save_state")

    def _settle_saves(self) -> None:
        """Drop from the buffer what a checkpoint that is now known to be saved holds."""
        handle = self._handle
        if handle is not None and not handle.settled:
            return  # a recovery is choosing its checkpoint: keep every batch until it is swapped in
        pending: list[tuple[int, Any]] = []
        newest = self._floor
        for step, future in self._saves:
            try:
                resolve(future, timeout=0)
            except TimeoutError:
                pending.append((step, future))
                continue
            except Exception:  # the save failed: there is no such checkpoint
                continue
            newest = max(newest, step)
        self._saves = pending
        if newest > self._floor:
            self._release_to(newest)

    def _release_to(self, step: int) -> None:
        """The newest known checkpoint holds ``step`` optimizer steps: the batches before it are not needed."""
        self._floor = step
        buffer = self._buffer
        while buffer and buffer[0].step < step:
            buffer.popleft()

    def _step_of(self, checkpoint: Checkpoint) -> int | None:
        """The engine's choice of checkpoints (called on its threads): only those with a step, and with replay,
        a step the buffer can replay from (no older than it reaches back, no further than the steps taken)."""
        step = checkpoint.step
        if step is None or not self.replay:
            return step
        counter = self._counter
        if step < self._floor or (counter is not None and step > counter.completed):
            return None
        return step

    # -- the end -----------------------------------------------------------------------------------------
    def _give_up(self, trainer: pl.Trainer, error: RecoveryExhausted, cause: BaseException | None = None) -> None:
        self._exhausted = error
        if self.on_exhausted == "raise":
            raise error from cause
        logger.error("TinkexRecovery: %s; stopping the fit", error)
        self._stopped = True
        trainer.should_stop = True

    def _release(self) -> None:
        """Stop the engine's threads, undo the wrappers, drop the buffer. Idempotent."""
        engine, self._engine, self._handle = self._engine, None, None
        if engine is not None:
            engine.close()
        undo, self._undo = self._undo, []
        for fn in reversed(undo):
            fn()
        self._buffer.clear()
        self._saves = []
        self._replay_from = None
        self._counter = self._progress = None


def _as_record(value: Any) -> LineageRecord:
    missing = set(LineageRecord.__annotations__) - set(value) if isinstance(value, dict) else {"all"}
    if missing:
        raise ValueError(f"TinkexRecovery state: a lineage record lacks {sorted(missing)}")
    return cast(LineageRecord, {k: value[k] for k in LineageRecord.__annotations__})


def _step_in(metadata: object) -> int | None:
    """The step a save_state call records (as :attr:`Checkpoint.step` would read it), or None."""
    if not isinstance(metadata, Mapping):
        return None
    raw = metadata.get(STEP_KEY)
    try:
        step = int(raw) if isinstance(raw, str | int) else None
    except ValueError:
        return None
    return step if step is not None and step >= 0 else None


def _takes_two(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` (the module's bound hook) accepts a second positional argument."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional for p in params) >= 2
