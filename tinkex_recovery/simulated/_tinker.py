"""An in-memory Tinker: training runs, checkpoints, corruption, restores, and faults on demand.

It keeps the books a test needs: :meth:`SimulatedTinker.lineage` is the exact list of data items a run's
weights have been trained on (items of ``forward_backward`` calls committed by ``optim_step``, followed back
through the checkpoint each run was restored from), so "nothing trained twice, nothing lost" is checkable.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

from .._clock import Clock, SystemClock
from .._models import Checkpoint, CheckpointList, Cursor, TinkerPath, TrainingRun, TrainingRunList
from ._sampling import SamplingService, TrainingSampling

__all__ = [
    "ForwardBackwardResult",
    "OptimStepResult",
    "SaveStateResult",
    "SimulatedAPIError",
    "SimulatedAPIFuture",
    "SimulatedRequestFailedError",
    "SimulatedRestClient",
    "SimulatedTinker",
    "SimulatedTrainingClient",
]


class SimulatedAPIError(Exception):
    """An HTTP error status from the simulated service (the SDK's ``APIStatusError`` counterpart)."""

    def __init__(self, status_code: int, message: str) -> None:
        self.status_code = status_code
        self.detail = message
        super().__init__(f"Error code: {status_code} - {message}")


class SimulatedRequestFailedError(Exception):
    """A request that reached the server and failed there (the SDK's ``RequestFailedError`` counterpart)."""

    def __init__(self, message: str, *, category: str = "server") -> None:
        self.category = category
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class ForwardBackwardResult:
    """What a simulated ``forward_backward`` returns: a loss and the metrics the SDK's output carries."""

    loss: float
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class OptimStepResult:
    """What a simulated ``optim_step`` returns: how many optimizer steps the run has taken."""

    step: int


@dataclass(frozen=True, slots=True)
class SaveStateResult:
    """What a simulated ``save_state`` returns: the checkpoint's ``tinker://`` path, as the SDK's ``.path``."""

    path: str


@dataclass
class _Checkpoint:
    name: str
    path: str
    time: datetime
    trained: tuple[Any, ...]
    user_metadata: dict[str, str] | None
    expires_at: datetime | None
    broken: int | None = None  # a status code the server answers a restore with
    steps: int = 0  # the optimizer steps the saved weights hold
    # "weights" or "sampler_weights", parsed once: every listing reads it for every checkpoint of every run (to
    # find what changed), so a parse there made a listing of a thousand runs cost seconds, not milliseconds.
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = TinkerPath.parse(self.path).kind

    def model(self) -> Checkpoint:
        return Checkpoint(
            checkpoint_id=f"{self.kind}/{self.name}",
            checkpoint_type="training" if self.kind == "weights" else "sampler",
            time=self.time,
            tinker_path=self.path,
            size_bytes=1024,
            user_metadata=dict(self.user_metadata) if self.user_metadata is not None else None,
            expires_at=self.expires_at,
        )


@dataclass
class _Run:
    run_id: str
    base_model: str
    lora_rank: int
    user_metadata: dict[str, str] | None
    created: datetime
    trained: list[Any]
    pending: list[Any] = field(default_factory=list)
    checkpoints: list[_Checkpoint] = field(default_factory=list)
    corrupted: bool = False
    deleted: bool = False
    last_request: datetime | None = None
    steps: int = 0
    fail_next_calls: int = 0
    _model: tuple[tuple[Any, ...], TrainingRun] | None = field(default=None, repr=False)

    def model(self) -> TrainingRun:
        last = max((c for c in self.checkpoints if c.kind == "weights"), key=lambda c: c.time, default=None)
        last_sampler = max(
            (c for c in self.checkpoints if c.kind == "sampler_weights"), key=lambda c: c.time, default=None
        )
        # What the model shows, cheaply: a listing of thousands of runs rebuilds only those that changed.
        key = (
            self.corrupted,
            self.last_request,
            id(last),
            last.expires_at if last else None,
            id(last_sampler),
            last_sampler.expires_at if last_sampler else None,
        )
        if self._model is not None and self._model[0] == key:
            return self._model[1]
        model = TrainingRun(
            training_run_id=self.run_id,
            base_model=self.base_model,
            model_owner="simulated",
            is_lora=True,
            corrupted=self.corrupted,
            lora_rank=self.lora_rank,
            last_request_time=self.last_request or self.created,
            last_checkpoint=last.model() if last else None,
            last_sampler_checkpoint=last_sampler.model() if last_sampler else None,
            user_metadata=dict(self.user_metadata) if self.user_metadata is not None else None,
        )
        self._model = (key, model)
        return model


T = TypeVar("T")


class SimulatedAPIFuture(Future[T]):
    """What every simulated call returns, as the SDK's ``APIFuture``: a ``concurrent.futures.Future`` that can
    also be awaited (``await fut`` or ``await fut.result_async()``, never blocking the event loop, even while
    pending); ``future()`` is itself, as the SDK's is the future behind it."""

    def future(self) -> SimulatedAPIFuture[T]:
        return self

    async def result_async(self, timeout: float | None = None) -> T:
        if self.done():
            return self.result()
        return await asyncio.wait_for(asyncio.wrap_future(self), timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


def _done(value: T) -> SimulatedAPIFuture[T]:
    fut: SimulatedAPIFuture[T] = SimulatedAPIFuture()
    fut.set_result(value)
    return fut


def _failed(exc: BaseException) -> SimulatedAPIFuture[Any]:
    fut: SimulatedAPIFuture[Any] = SimulatedAPIFuture()
    fut.set_exception(exc)
    return fut


async def _submitted(future: SimulatedAPIFuture[T]) -> SimulatedAPIFuture[T]:
    """What an SDK ``*_async`` call gives back once its request is sent: the future of the result. The event loop
    gets a turn first, as it does while a real request is sent."""
    await asyncio.sleep(0)
    return future


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"user_metadata must map str to str; bad keys: {bad!r}")
    return dict(metadata)


class SimulatedTinker(SamplingService):
    """A Tinker service in memory: a ``ServiceClient`` look-alike plus controls for tests and demos.

    Service methods: ``create_lora_training_client``, ``create_training_client_from_state``,
    ``create_training_client_from_state_with_optimizer`` (futures of clients, as in SDK 0.38),
    ``create_sampling_client`` and ``create_rest_client``. Controls: :meth:`corrupt`, :meth:`lineage`, and the
    fault injectors (sampling's are described in ``_sampling``).
    """

    def __init__(self, *, clock: Clock | None = None, session_id: str | None = None) -> None:
        self._clock = clock or SystemClock()
        self._lock = threading.RLock()
        self._session = session_id or str(uuid.uuid4())
        self._seq = itertools.count()
        self._runs: dict[str, _Run] = {}
        self._last_time: datetime | None = None
        self._restore_failures: list[tuple[str | None, int]] = []  # (only restores from this run, status)
        self._poll_failures: list[int] = []
        self._hangs: list[tuple[bool, bool]] = []  # (then succeed, as a pending future), one per hung restore
        self._pending: list[tuple[Future[SimulatedTrainingClient], Any]] = []  # hung futures: (future, finish)
        self._released = threading.Event()
        self._restore_hook: Callable[[str], object] | None = None
        self._list_hook: Callable[[], object] | None = None
        self._read_hook: Callable[[str], object] | None = None
        self.restore_calls: list[tuple[str, bool, dict[str, str] | None]] = []
        self.poll_count = 0
        self._init_sampling()

    # -- time -----------------------------------------------------------------------------------------
    def _now(self) -> datetime:
        """Strictly increasing timestamps, so 'newest' is never a tie."""
        now = self._clock.now()
        if self._last_time is not None and now <= self._last_time:
            now = self._last_time + timedelta(microseconds=1)
        self._last_time = now
        return now

    # -- service API ----------------------------------------------------------------------------------
    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        user_metadata: Mapping[str, str] | None = None,
        *,
        run_id: str | None = None,
        **_: Any,
    ) -> SimulatedTrainingClient:
        """A fresh LoRA run with nothing trained yet. ``run_id`` names it (default ``{session}:train:{n}``): the
        SDK derives a new run's id from its own session, so the wire server passes it in."""
        with self._lock:
            run = self._new_run(base_model, rank, _check_metadata(user_metadata), trained=(), run_id=run_id)
        return SimulatedTrainingClient(self, run.run_id)

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: Mapping[str, str] | None = None,
        *,
        run_id: str | None = None,
        **_: Any,
    ) -> SimulatedAPIFuture[SimulatedTrainingClient]:
        """A new run holding the checkpoint's weights (optimizer state reset); ``run_id`` as for a LoRA run."""
        return self._restore(path, user_metadata, with_optimizer=False, run_id=run_id)

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: Mapping[str, str] | None = None,
        *,
        run_id: str | None = None,
        **_: Any,
    ) -> SimulatedAPIFuture[SimulatedTrainingClient]:
        """A new run holding the checkpoint's weights and optimizer state; ``run_id`` as for a LoRA run."""
        return self._restore(path, user_metadata, with_optimizer=True, run_id=run_id)

    def create_rest_client(self) -> SimulatedRestClient:
        return SimulatedRestClient(self)

    # -- the SDK's async service calls (coroutines that return the client, as tinker 0.38's do) ---------------
    async def create_lora_training_client_async(
        self, base_model: str, rank: int = 32, user_metadata: Mapping[str, str] | None = None, **kwargs: Any
    ) -> SimulatedTrainingClient:
        await asyncio.sleep(0)
        return self.create_lora_training_client(base_model, rank, user_metadata, **kwargs)

    async def create_training_client_from_state_async(
        self, path: str, base_model: str | None = None, user_metadata: Mapping[str, str] | None = None, **kwargs: Any
    ) -> SimulatedTrainingClient:
        """As :meth:`create_training_client_from_state`, awaited (a restore hung as a future is awaited, never
        blocking the event loop; one hung as a blocking call blocks, as the SDK's blocking call would)."""
        return await (
            await _submitted(self.create_training_client_from_state(path, base_model, user_metadata, **kwargs))
        )

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str, base_model: str | None = None, user_metadata: Mapping[str, str] | None = None, **kwargs: Any
    ) -> SimulatedTrainingClient:
        """As :meth:`create_training_client_from_state_with_optimizer`, awaited."""
        future = self.create_training_client_from_state_with_optimizer(path, base_model, user_metadata, **kwargs)
        return await (await _submitted(future))

    # -- inspection -----------------------------------------------------------------------------------
    def lineage(self, run_id: str) -> list[Any]:
        """The data items the run's weights were trained on, in order, through every restore. (A ``Datum`` the
        SDK sends over HTTP is recorded as the tuple of its input token ids.)"""
        with self._lock:
            return list(self._run(run_id).trained)

    def sampler_weights(self, run_id: str) -> dict[str, list[Any]]:
        """The run's ``save_weights_for_sampler`` saves: name -> the data items those weights were trained on."""
        with self._lock:
            run = self._run(run_id)
            return {c.name: list(c.trained) for c in run.checkpoints if c.kind == "sampler_weights"}

    def get_training_run(self, run_id: str) -> TrainingRun:
        hook = self._read_hook
        if hook is not None:
            hook(run_id)
        with self._lock:
            self.poll_count += 1
            if self._poll_failures:
                code = self._poll_failures.pop(0)
                raise SimulatedAPIError(code, "simulated poll failure")
            return self._run(run_id).model()

    def list_training_runs(self, limit: int | None = None, offset: int = 0) -> list[TrainingRun]:
        """Every run not deleted, the most recently created first (not a poll: ``poll_count`` stays); ``limit``
        and ``offset`` cut one page out of that list, as the REST listing does."""
        hook = self._list_hook
        if hook is not None:
            hook()
        with self._lock:
            runs = [run for run in reversed(self._runs.values()) if not run.deleted]
            page = runs[offset:] if limit is None else runs[offset : offset + limit]
            return [run.model() for run in page]

    def on_read(self, hook: Callable[[str], object] | None) -> None:
        """Call ``hook(run_id)`` at the start of every read of a run (a poll, a recovery's first read), on the
        caller's thread. None removes it."""
        self._read_hook = hook

    def on_list(self, hook: Callable[[], object] | None) -> None:
        """Call ``hook()`` at the start of every training-runs listing, on the caller's thread (to hold or count
        listings from a test, as :meth:`on_restore` does restores). None removes it."""
        self._list_hook = hook

    def list_checkpoints(self, run_id: str) -> CheckpointList:
        with self._lock:
            run = self._run(run_id)
            return CheckpointList(checkpoints=[c.model() for c in reversed(run.checkpoints)])

    @property
    def run_count(self) -> int:
        """How many runs the listing holds (not deleted)."""
        with self._lock:
            return sum(1 for run in self._runs.values() if not run.deleted)

    @property
    def run_ids(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    # -- controls and faults --------------------------------------------------------------------------
    def corrupt(self, run_id: str) -> None:
        """Mark the run corrupted: polls report it, and its client fails every call from now on."""
        with self._lock:
            run = self._run(run_id)
            run.corrupted = True
            run.pending.clear()

    def delete_run(self, run_id: str) -> None:
        """Polls of the run answer 404 from now on."""
        with self._lock:
            self._run(run_id).deleted = True

    def fail_restores(self, n: int = 1, *, status_code: int = 503, from_run: str | None = None) -> None:
        """The next ``n`` restores (from ``from_run``'s checkpoints only, if given) fail with ``status_code``
        (503: transient; a 4xx rejects the checkpoint)."""
        with self._lock:
            self._restore_failures += [(from_run, status_code)] * n

    def fail_polls(self, n: int = 1, *, status_code: int = 503) -> None:
        """The next ``n`` ``get_training_run`` calls fail with ``status_code``."""
        with self._lock:
            self._poll_failures += [status_code] * n

    def fail_next_calls(self, run_id: str, n: int = 1) -> None:
        """The run's client fails its next ``n`` training calls with a transient 503 (the run stays healthy)."""
        with self._lock:
            self._run(run_id).fail_next_calls += n

    def on_restore(self, hook: Callable[[str], object] | None) -> None:
        """Call ``hook(path)`` at the start of every restore call, on the caller's thread, before it is served
        (so a hook may inject a fault for that very call): to observe or hold restores from a test. None removes it."""
        self._restore_hook = hook

    def hang_restores(self, n: int = 1, *, then: Literal["fail", "succeed"] = "fail", future: bool = False) -> None:
        """The next ``n`` restore calls hang until :meth:`release` (or :meth:`close`), then fail with 504 or,
        with ``then="succeed"``, create their new run after all (a late success), whether or not the caller
        still waits: cancelling the future does not undo a request the server has. The call itself blocks, or,
        with ``future=True``, returns at once a future that stays pending until then (never, without release)."""
        if then not in ("fail", "succeed"):
            raise ValueError(f"then must be 'fail' or 'succeed', got {then!r}")
        with self._lock:
            self._hangs += [(then == "succeed", future)] * n
            self._released.clear()

    def release(self) -> None:
        """Unblock every hung restore (pending futures complete now). A restore reached the server when it was
        called: it has its effect (``then="succeed"``: its run is created) even if the caller cancelled its future
        or went away meanwhile, as with the real service; only the answer is lost then."""
        with self._lock:
            self._released.set()
            pending, self._pending = self._pending, []
        for fut, finish in pending:
            try:
                outcome: tuple[bool, Any] = (True, finish())
            except Exception as exc:
                outcome = (False, exc)
            if fut.set_running_or_notify_cancel():  # a future the caller cancelled stays cancelled; its run exists
                if outcome[0]:
                    fut.set_result(outcome[1])
                else:
                    fut.set_exception(outcome[1])

    def close(self) -> None:
        """Unblock every hung restore and deliver every held or slow sample."""
        self.release()
        self.release_samples()

    def break_checkpoint(self, path: str, *, status_code: int = 400) -> None:
        """Restores from ``path`` are rejected with ``status_code`` (the checkpoint is invalid)."""
        with self._lock:
            self._checkpoint(path).broken = status_code

    def expire_checkpoint(self, path: str) -> None:
        """The checkpoint's TTL has run out: it is listed as expired and restores from it get a 404."""
        with self._lock:
            self._checkpoint(path).expires_at = self._clock.now() - timedelta(seconds=1)

    # -- internals used by the clients ----------------------------------------------------------------
    def _run(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None or run.deleted:
            raise SimulatedAPIError(404, f"training run {run_id!r} not found")
        return run

    def _checkpoint(self, path: str) -> _Checkpoint:
        parsed = TinkerPath.parse(path)
        for c in self._run(parsed.run_id).checkpoints:
            if c.path == path:
                return c
        raise SimulatedAPIError(404, f"checkpoint {path!r} not found")

    def _new_run(
        self,
        base_model: str,
        rank: int,
        user_metadata: dict[str, str] | None,
        trained: Sequence[Any],
        run_id: str | None = None,
    ) -> _Run:
        if run_id is None:
            run_id = f"{self._session}:train:{next(self._seq)}"
        elif run_id in self._runs:
            raise SimulatedAPIError(409, f"training run {run_id!r} already exists")
        now = self._now()
        run = _Run(run_id, base_model, rank, user_metadata, created=now, trained=list(trained))
        self._runs[run_id] = run
        return run

    def _restore(
        self, path: str, user_metadata: Mapping[str, str] | None, *, with_optimizer: bool, run_id: str | None = None
    ) -> SimulatedAPIFuture[SimulatedTrainingClient]:
        metadata = _check_metadata(user_metadata)
        hook = self._restore_hook
        if hook is not None:
            hook(path)
        with self._lock:
            self.restore_calls.append((path, with_optimizer, metadata))
            hang = self._hangs.pop(0) if self._hangs else None
        if hang is not None:
            succeed, as_future = hang

            def finish() -> SimulatedTrainingClient:
                if not succeed:
                    raise SimulatedAPIError(504, "restore timed out at the gateway")
                return self._restore_now(path, metadata, run_id).result()

            if as_future:
                fut: SimulatedAPIFuture[SimulatedTrainingClient] = SimulatedAPIFuture()
                with self._lock:
                    if not self._released.is_set():
                        self._pending.append((fut, finish))
                        return fut
            self._released.wait()
            try:
                return _done(finish())
            except SimulatedAPIError as exc:
                return _failed(exc)
        return self._restore_now(path, metadata, run_id)

    def _restore_now(
        self, path: str, metadata: dict[str, str] | None, run_id: str | None
    ) -> SimulatedAPIFuture[SimulatedTrainingClient]:
        with self._lock:
            source_run_id = path[len("tinker://") :].split("/", 1)[0]
            for i, (only, code) in enumerate(self._restore_failures):
                if only is None or only == source_run_id:
                    del self._restore_failures[i]
                    return _failed(SimulatedAPIError(code, f"simulated restore failure from {path}"))
            try:
                parsed = TinkerPath.parse(path)
            except ValueError as exc:
                return _failed(SimulatedAPIError(400, str(exc)))
            if not parsed.restorable:
                return _failed(SimulatedAPIError(400, f"{path} is a sampler checkpoint"))
            try:
                checkpoint = self._checkpoint(path)
            except SimulatedAPIError as exc:
                return _failed(exc)
            if checkpoint.broken is not None:
                return _failed(SimulatedAPIError(checkpoint.broken, f"checkpoint {path} is invalid"))
            if checkpoint.expires_at is not None and checkpoint.expires_at <= self._clock.now():
                return _failed(SimulatedAPIError(404, f"checkpoint {path} has expired"))
            source = self._runs[parsed.run_id]
            try:
                run = self._new_run(
                    source.base_model, source.lora_rank, metadata, trained=checkpoint.trained, run_id=run_id
                )
            except SimulatedAPIError as exc:
                return _failed(exc)
            run.steps = checkpoint.steps
        return _done(SimulatedTrainingClient(self, run.run_id))

    def _save_checkpoint(
        self,
        run_id: str,
        name: str,
        *,
        ttl_seconds: int | None,
        overwrite: bool,
        user_metadata: Mapping[str, str] | None,
        kind: Literal["weights", "sampler_weights"],
    ) -> str:
        """Save the run's weights as ``tinker://{run_id}/{kind}/{name}`` and return that path (a call on the run)."""
        metadata = _check_metadata(user_metadata)
        with self._lock:
            run = self._call(run_id)
            if isinstance(run, BaseException):
                raise run
            path = f"tinker://{run_id}/{kind}/{name}"
            try:
                TinkerPath.parse(path)
            except ValueError as exc:
                raise SimulatedAPIError(400, str(exc)) from None
            if not overwrite and any(c.path == path for c in run.checkpoints):
                raise SimulatedAPIError(409, f"checkpoint {name!r} already exists")
            run.checkpoints = [c for c in run.checkpoints if c.path != path]
            now = self._now()
            expires = now + timedelta(seconds=ttl_seconds) if ttl_seconds is not None else None
            run.checkpoints.append(_Checkpoint(name, path, now, tuple(run.trained), metadata, expires, steps=run.steps))
        return path

    def _model_info(self, run_id: str) -> tuple[str, int]:
        """The run's base model and LoRA rank, with no side effect (unlike a poll)."""
        with self._lock:
            run = self._run(run_id)
            return run.base_model, run.lora_rank

    def _call(self, run_id: str) -> _Run | BaseException:
        """The run a training call acts on, or the error the call must fail with."""
        try:
            run = self._run(run_id)
        except SimulatedAPIError as exc:
            return exc
        if run.corrupted:
            return SimulatedRequestFailedError(f"training run {run_id} is corrupted", category="server")
        if run.fail_next_calls:
            run.fail_next_calls -= 1
            return SimulatedAPIError(503, "simulated transient failure")
        run.last_request = self._now()
        return run


class SimulatedTrainingClient(TrainingSampling):
    """A ``TrainingClient`` look-alike bound to one simulated run; every call returns a future."""

    def __init__(self, sim: SimulatedTinker, model_id: str) -> None:
        self._sim = sim
        self.model_id = model_id

    def forward_backward(
        self, data: Sequence[Any], loss_fn: str = "cross_entropy", loss_fn_config: Any = None
    ) -> SimulatedAPIFuture[ForwardBackwardResult]:
        """Queue ``data`` for the next ``optim_step``; the loss is a deterministic stand-in."""
        with self._sim._lock:
            run = self._sim._call(self.model_id)
            if isinstance(run, BaseException):
                return _failed(run)
            run.pending.extend(data)
            loss = 1.0 / (1.0 + len(run.trained) + len(run.pending))
        return _done(ForwardBackwardResult(loss=loss, metrics={"loss:mean": loss}))

    def forward(self, data: Sequence[Any], loss_fn: str = "cross_entropy") -> SimulatedAPIFuture[ForwardBackwardResult]:
        """The loss of ``data`` without training on it: nothing is queued for ``optim_step``."""
        with self._sim._lock:
            run = self._sim._call(self.model_id)
            if isinstance(run, BaseException):
                return _failed(run)
            loss = 1.0 / (1.0 + len(run.trained) + len(run.pending))
        return _done(ForwardBackwardResult(loss=loss, metrics={"loss:mean": loss}))

    def optim_step(self, adam_params: Any = None) -> SimulatedAPIFuture[OptimStepResult]:
        """Commit every queued item to the run's weights."""
        with self._sim._lock:
            run = self._sim._call(self.model_id)
            if isinstance(run, BaseException):
                return _failed(run)
            run.trained.extend(run.pending)
            run.pending.clear()
            run.steps += 1
            return _done(OptimStepResult(step=run.steps))

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: Mapping[str, str] | None = None,
    ) -> SimulatedAPIFuture[SaveStateResult]:
        """Save the weights trained so far as ``tinker://{model_id}/weights/{name}``."""
        try:
            path = self._sim._save_checkpoint(
                self.model_id,
                name,
                ttl_seconds=ttl_seconds,
                overwrite=overwrite,
                user_metadata=user_metadata,
                kind="weights",
            )
        except (SimulatedAPIError, SimulatedRequestFailedError) as exc:
            return _failed(exc)
        return _done(SaveStateResult(path=path))

    # -- the SDK's async surface: coroutines returning a future of the result (two awaits, as in tinker 0.38) ----
    async def forward_backward_async(
        self, data: Sequence[Any], loss_fn: str = "cross_entropy", loss_fn_config: Any = None
    ) -> SimulatedAPIFuture[ForwardBackwardResult]:
        return await _submitted(self.forward_backward(data, loss_fn, loss_fn_config))

    async def forward_async(
        self, data: Sequence[Any], loss_fn: str = "cross_entropy"
    ) -> SimulatedAPIFuture[ForwardBackwardResult]:
        return await _submitted(self.forward(data, loss_fn))

    async def optim_step_async(self, adam_params: Any = None) -> SimulatedAPIFuture[OptimStepResult]:
        return await _submitted(self.optim_step(adam_params))

    async def save_state_async(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: Mapping[str, str] | None = None,
    ) -> SimulatedAPIFuture[SaveStateResult]:
        return await _submitted(self.save_state(name, ttl_seconds, overwrite, user_metadata))

    def __repr__(self) -> str:
        return f"<SimulatedTrainingClient model_id={self.model_id!r}>"


class SimulatedRestClient:
    """A ``RestClient`` look-alike: methods return ``concurrent.futures.Future``s, as in the SDK."""

    def __init__(self, sim: SimulatedTinker) -> None:
        self._sim = sim

    def get_training_run(self, run_id: str) -> SimulatedAPIFuture[TrainingRun]:
        try:
            return _done(self._sim.get_training_run(run_id))
        except SimulatedAPIError as exc:
            return _failed(exc)

    def list_checkpoints(self, run_id: str) -> SimulatedAPIFuture[CheckpointList]:
        try:
            return _done(self._sim.list_checkpoints(run_id))
        except SimulatedAPIError as exc:
            return _failed(exc)

    def list_training_runs(self, limit: int = 20, offset: int = 0, **_: Any) -> SimulatedAPIFuture[TrainingRunList]:
        """One page of the account's runs with its cursor, as the SDK's ``RestClient.list_training_runs``."""
        page = self._sim.list_training_runs(limit=limit, offset=offset)
        total = self._sim.run_count
        cursor = Cursor(offset=offset, limit=limit, total_count=total)
        return _done(TrainingRunList.model_construct(training_runs=page, cursor=cursor))  # the runs are models already
