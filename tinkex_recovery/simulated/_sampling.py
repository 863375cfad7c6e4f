"""Sampling in the simulated Tinker: sampler sessions tied to the weights they were made from.

The semantics are observable and deterministic, so a test can tell which weights every sample came from:

- **A sample's first token is the number of optimizer steps its weights hold.** The other tokens (``max_tokens``
  in all, 4 when unset) derive from the prompt and the sample's index in its request; ``stop_reason`` is
  ``"length"``; every sampled token's logprob is ``-1 / (1 + steps)``. ``compute_logprobs`` answers None for the
  first prompt token and ``-1 / (1 + steps)`` for each later one.
- A sampler serves the weights it was made from. ``save_weights_and_get_sampling_client()`` (``kind="snapshot"``)
  captures the run's weights where the call falls in the run's request order (after every ``optim_step`` sent
  before it); ``kind="inflight"`` serves the newest weights its run published with ``kind="inflight"``;
  ``create_sampling_client(model_path=...)`` serves a saved checkpoint (``sampler_weights/`` from
  ``save_weights_for_sampler``, or ``weights/`` from ``save_state``); ``base_model=`` alone serves the base model
  (0 steps). A restored run's weights hold the steps of the checkpoint it was restored from.
- The weights are fixed when the sample request arrives; what happens to it afterwards is decided when it is
  delivered: a sampler of a *lost* run (corrupted or deleted) keeps serving its weights by default
  (:attr:`lost_run_samplers` ``"serve"``), or fails every sample not yet delivered (``"fail"``:
  ``SimulatedRequestFailedError``, category ``server``, the SDK's ``RequestFailedError`` over HTTP).

Fault controls on :class:`~tinkex_recovery.simulated.SimulatedTinker`: :meth:`fail_samples` (errors of a healthy
sampler, which a recovery layer must not mistake for a lost run), :meth:`hold_samples` / :meth:`release_samples`
(rollouts in flight, deterministically), :meth:`slow_samples` (answers ``seconds`` late), and
:attr:`lost_run_samplers`.
"""

from __future__ import annotations

import itertools
import struct
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from .._models import TinkerPath
from . import _tinker

if TYPE_CHECKING:
    from ._tinker import SimulatedAPIFuture, SimulatedTinker

__all__ = [
    "SampleResult",
    "SampledSequence",
    "SaveWeightsForSamplerResult",
    "SimulatedSamplingClient",
]

LostRunSamplers = Literal["serve", "fail"]
_DEFAULT_MAX_TOKENS = 4
_VOCAB = 32_000


@dataclass(frozen=True, slots=True)
class SampledSequence:
    """One sample: ``tokens[0]`` is the number of optimizer steps of the weights that produced it."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str
    sequence_id: str


@dataclass(frozen=True, slots=True)
class SampleResult:
    """What :meth:`SimulatedSamplingClient.sample` returns (the SDK's ``SampleResponse``)."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None


@dataclass(frozen=True, slots=True)
class SaveWeightsForSamplerResult:
    """What ``save_weights_for_sampler`` answers, as the SDK's ``SaveWeightsForSamplerResponse``: the
    ``tinker://{run}/sampler_weights/{name}`` path a sampler can be made from."""

    path: str


@dataclass(frozen=True, slots=True)
class _Sampler:
    """A sampling session: the weights it serves (fixed, or its run's newest inflight ones)."""

    sampler_id: str
    base_model: str
    run_id: str | None  #: the run whose weights it serves; None for the base model
    steps: int
    model_path: str | None
    inflight: bool = False


@dataclass
class _SamplingState:
    lock: threading.Condition = field(default_factory=threading.Condition)
    samplers: dict[str, _Sampler] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)  # run id -> steps its newest inflight weights hold
    seq: itertools.count[int] = field(default_factory=itertools.count)
    requests: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    failures: list[tuple[int | None, str]] = field(default_factory=list)  # (HTTP status | None, category)
    holds: int = 0
    slow: tuple[float, int | None] | None = None  # (seconds, samples left; None: every sample)
    # samples in flight: (future, how to deliver it, the timer of a slow one or None for a held one)
    held: list[tuple[Future[Any], Callable[[], Any], threading.Timer | None]] = field(default_factory=list)
    lost_run_samplers: LostRunSamplers = "serve"
    sample_count: int = 0


def prompt_tokens(prompt: Any) -> tuple[int, ...]:
    """The token ids of a prompt: an SDK ``ModelInput`` (or anything with ``to_ints()``) or a sequence of ints."""
    to_ints = getattr(prompt, "to_ints", None)
    values = to_ints() if callable(to_ints) else prompt
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"a prompt is a ModelInput or a sequence of token ids, not {type(prompt).__name__}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
        raise TypeError("a prompt's token ids must be ints")
    return tuple(values)


def max_tokens_of(sampling_params: Any) -> int:
    """``sampling_params.max_tokens`` (an SDK ``SamplingParams``, a mapping, or None), 4 when unset."""
    if isinstance(sampling_params, Mapping):
        value = sampling_params.get("max_tokens")
    else:
        value = getattr(sampling_params, "max_tokens", None)
    if value is None:
        return _DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_tokens must be a positive int, got {value!r}")
    return value


def sampled_tokens(steps: int, prompt: Sequence[int], index: int, max_tokens: int) -> list[int]:
    """The tokens a simulated sampler produces: ``steps`` first, then tokens derived from the prompt and the
    sample's ``index`` in its request."""
    seed = zlib.crc32(struct.pack(f"<{len(prompt)}q", *prompt)) if prompt else 0
    return [steps] + [(seed + 104_729 * index + 7_919 * j) % _VOCAB for j in range(1, max_tokens)]


def _logprob(steps: int) -> float:
    return -1.0 / (1.0 + steps)


class SimulatedSamplingClient:
    """A ``SamplingClient`` look-alike bound to one sampler session; every call returns an awaitable future."""

    def __init__(self, sim: SimulatedTinker, sampler_id: str) -> None:
        self._sim = sim
        self.sampler_id = sampler_id

    def sample(
        self,
        prompt: Any,
        num_samples: int,
        sampling_params: Any = None,
        include_prompt_logprobs: bool = False,
        **_: Any,
    ) -> SimulatedAPIFuture[SampleResult]:
        """``num_samples`` samples of ``prompt`` from this sampler's weights (see the module for the rule)."""
        return self._sim._sample(self.sampler_id, prompt, num_samples, sampling_params, include_prompt_logprobs)

    def compute_logprobs(self, prompt: Any, prompt_logprobs_last_n: int | None = None) -> SimulatedAPIFuture[Any]:
        """The prompt's logprobs: None first, then ``-1 / (1 + steps)`` per token."""
        sampled = self._sim._sample(self.sampler_id, prompt, 1, {"max_tokens": 1}, True)
        out: SimulatedAPIFuture[list[float | None]] = _tinker.SimulatedAPIFuture()

        def relay(done: Future[SampleResult]) -> None:
            if done.cancelled():
                out.cancel()
            elif (exc := done.exception()) is not None:
                out.set_exception(exc)
            else:
                logprobs: list[float | None] = list(done.result().prompt_logprobs or [])
                if prompt_logprobs_last_n is not None:
                    cut = len(logprobs) - prompt_logprobs_last_n
                    logprobs[:cut] = [None] * cut
                out.set_result(logprobs)

        sampled.add_done_callback(relay)
        return out

    def get_base_model(self) -> str:
        return self._sim._sampler(self.sampler_id).base_model

    def __repr__(self) -> str:
        return f"<SimulatedSamplingClient sampler_id={self.sampler_id!r}>"


class SamplingService:
    """The sampling half of :class:`~tinkex_recovery.simulated.SimulatedTinker` (mixed into it): sampler
    sessions, samples, and the sampling fault controls."""

    _lock: threading.RLock
    _session: str
    _sampling_state: _SamplingState

    def _init_sampling(self) -> None:
        self._sampling_state = _SamplingState()

    # -- service API ----------------------------------------------------------------------------------------
    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
        *,
        sampler_id: str | None = None,
    ) -> SimulatedAPIFuture[SimulatedSamplingClient]:
        """A future of a sampler of ``model_path``'s weights (a ``weights/`` or ``sampler_weights/`` checkpoint),
        or of ``base_model``'s. ``sampler_id`` names the session (the wire server passes the SDK's)."""
        try:
            sampler = self._new_sampler_from_path(model_path, base_model, sampler_id)
        except _tinker.SimulatedAPIError as exc:
            return _tinker._failed(exc)
        return _tinker._done(SimulatedSamplingClient(self._sim, sampler.sampler_id))

    # -- controls --------------------------------------------------------------------------------------------
    @property
    def lost_run_samplers(self) -> LostRunSamplers:
        """What a sampler of a lost (corrupted or deleted) run does: ``"serve"`` its weights (the default), or
        ``"fail"`` every sample not yet delivered."""
        return self._sampling_state.lost_run_samplers

    @lost_run_samplers.setter
    def lost_run_samplers(self, mode: LostRunSamplers) -> None:
        if mode not in ("serve", "fail"):
            raise ValueError(f"lost_run_samplers must be 'serve' or 'fail', got {mode!r}")
        self._sampling_state.lost_run_samplers = mode

    def fail_samples(self, n: int = 1, *, status_code: int | None = None, category: str = "server") -> None:
        """The next ``n`` sample requests fail although their sampler is healthy: with a failed result
        (``SimulatedRequestFailedError`` of ``category``; the SDK's ``RequestFailedError``), or, given
        ``status_code``, answered with that HTTP status (which the SDK retries if it is a 5xx, 408 or 429)."""
        _check_count(n)
        if category not in ("server", "user", "unknown"):
            raise ValueError(f"category must be 'server', 'user' or 'unknown', got {category!r}")
        with self._sampling_state.lock:
            self._sampling_state.failures += [(status_code, category)] * n

    def hold_samples(self, n: int = 1) -> None:
        """The next ``n`` sample requests are accepted and stay in flight until :meth:`release_samples`."""
        _check_count(n)
        with self._sampling_state.lock:
            self._sampling_state.holds += n

    def release_samples(self) -> None:
        """Deliver every held or slow sample now (a sampler of a lost run in ``"fail"`` mode fails them)."""
        state = self._sampling_state
        with state.lock:
            held, state.held = state.held, []
        for fut, finish, timer in held:
            if timer is not None:
                timer.cancel()
            _finish(fut, finish)
        for _, _, timer in held:
            if timer is not None and timer is not threading.current_thread():
                timer.join()

    def slow_samples(self, seconds: float, n: int | None = None) -> None:
        """The next ``n`` samples (every one, if None) are delivered ``seconds`` late; 0 ends it."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        if n is not None:
            _check_count(n)
        with self._sampling_state.lock:
            self._sampling_state.slow = (float(seconds), n) if seconds > 0 else None

    @property
    def sample_count(self) -> int:
        """Sample requests received (``compute_logprobs`` included)."""
        return self._sampling_state.sample_count

    def wait_for_samples(self, count: int, timeout: float) -> bool:
        """Block until ``count`` sample requests have been received in all; False on timeout."""
        state = self._sampling_state
        with state.lock:
            return state.lock.wait_for(lambda: state.sample_count >= count, timeout)

    # -- inspection ------------------------------------------------------------------------------------------
    def sampler_steps(self, sampler_id: str) -> int:
        """The optimizer steps the weights sampler ``sampler_id`` serves now hold."""
        return self._weights_steps(self._sampler(sampler_id))

    # -- internals used by the clients and the wire routes -------------------------------------------------
    @property
    def _sim(self) -> SimulatedTinker:
        return cast("SimulatedTinker", self)

    def _sampler(self, sampler_id: str) -> _Sampler:
        with self._sampling_state.lock:
            sampler = self._sampling_state.samplers.get(sampler_id)
        if sampler is None:
            raise _tinker.SimulatedAPIError(404, f"sampling session {sampler_id!r} not found")
        return sampler

    def _sampler_name(self, sampler_id: str | None, session: str) -> str:
        state = self._sampling_state
        with state.lock:
            if sampler_id is None:
                sampler_id = f"{session}:sample:{next(state.seq)}"
            elif sampler_id in state.samplers:
                raise _tinker.SimulatedAPIError(409, f"sampling session {sampler_id!r} already exists")
            return sampler_id

    def _register(self, sampler: _Sampler) -> _Sampler:
        with self._sampling_state.lock:
            self._sampling_state.samplers[sampler.sampler_id] = sampler
        return sampler

    def _new_sampler_from_path(
        self, model_path: str | None, base_model: str | None, sampler_id: str | None
    ) -> _Sampler:
        if model_path is None:
            if not base_model:
                raise _tinker.SimulatedAPIError(400, "a sampler needs a model_path or a base_model")
            name = self._sampler_name(sampler_id, self._session)
            return self._register(_Sampler(name, base_model, None, 0, None))
        try:
            parsed = TinkerPath.parse(model_path)
        except ValueError as exc:
            raise _tinker.SimulatedAPIError(400, str(exc)) from None
        sim = self._sim
        with sim._lock:
            checkpoint = sim._checkpoint(str(parsed))
            if checkpoint.expires_at is not None and checkpoint.expires_at <= sim._clock.now():
                raise _tinker.SimulatedAPIError(404, f"checkpoint {model_path} has expired")
            run = sim._runs[parsed.run_id]
            name = self._sampler_name(sampler_id, self._session)
            return self._register(_Sampler(name, run.base_model, run.run_id, checkpoint.steps, model_path))

    def _new_sampler_of_run(self, run_id: str, kind: str, sampler_id: str | None) -> _Sampler:
        """A sampler of the run's weights now (the caller holds the simulator's lock and checked the run)."""
        if kind not in ("snapshot", "inflight"):
            raise _tinker.SimulatedAPIError(400, f"kind must be 'snapshot' or 'inflight', not {kind!r}")
        run = self._sim._runs[run_id]
        name = self._sampler_name(sampler_id, run_id.rsplit(":train:", 1)[0])
        if kind == "inflight":
            with self._sampling_state.lock:
                self._sampling_state.inflight[run_id] = run.steps
        return self._register(_Sampler(name, run.base_model, run_id, run.steps, None, inflight=kind == "inflight"))

    def _weights_steps(self, sampler: _Sampler) -> int:
        if sampler.inflight and sampler.run_id is not None:
            with self._sampling_state.lock:
                return self._sampling_state.inflight.get(sampler.run_id, sampler.steps)
        return sampler.steps

    def _lost_error(self, sampler: _Sampler) -> BaseException | None:
        """The error a sample of ``sampler`` fails with now because its run was lost, if it does."""
        if sampler.run_id is None or self._sampling_state.lost_run_samplers == "serve":
            return None
        sim = self._sim
        with sim._lock:
            run = sim._runs.get(sampler.run_id)
            lost = run is None or run.deleted or run.corrupted
        if not lost:
            return None
        return _tinker.SimulatedRequestFailedError(
            f"sampling session {sampler.sampler_id} serves training run {sampler.run_id}, which was lost",
            category="server",
        )

    def _sample(
        self,
        sampler_id: str,
        prompt: Any,
        num_samples: int,
        sampling_params: Any,
        include_prompt_logprobs: bool,
    ) -> SimulatedAPIFuture[SampleResult]:
        """Accept a sample request (its weights fixed now) and deliver it now, late, or when released."""
        state = self._sampling_state
        with state.lock:
            state.sample_count += 1
            state.lock.notify_all()
            failure = state.failures.pop(0) if state.failures else None
            held = state.holds > 0
            state.holds -= held
            delay = None
            if state.slow is not None and not held:
                delay, left = state.slow
                if left is not None:
                    state.slow = (delay, left - 1) if left > 1 else None
            request = next(state.requests)
        try:
            sampler = self._sampler(sampler_id)
            tokens = prompt_tokens(prompt)
            max_tokens = max_tokens_of(sampling_params)
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
                raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        except _tinker.SimulatedAPIError as exc:
            return _tinker._failed(exc)
        except (TypeError, ValueError) as exc:
            return _tinker._failed(_tinker.SimulatedAPIError(400, str(exc)))
        if failure is not None:
            status, category = failure
            if status is not None:
                return _tinker._failed(_tinker.SimulatedAPIError(status, "simulated sampler failure"))
            return _tinker._failed(_tinker.SimulatedRequestFailedError("simulated sampler failure", category=category))
        steps = self._weights_steps(sampler)
        lp = _logprob(steps)
        result = SampleResult(
            sequences=[
                SampledSequence(
                    tokens=(toks := sampled_tokens(steps, tokens, i, max_tokens)),
                    logprobs=[lp] * len(toks),
                    stop_reason="length",
                    sequence_id=f"{sampler_id}:{request}:{i}",
                )
                for i in range(num_samples)
            ],
            prompt_logprobs=([None] + [lp] * (len(tokens) - 1) if tokens else []) if include_prompt_logprobs else None,
        )

        def finish() -> SampleResult:
            lost = self._lost_error(sampler)
            if lost is not None:
                raise lost
            return result

        fut: SimulatedAPIFuture[SampleResult] = _tinker.SimulatedAPIFuture()
        if held:
            with state.lock:
                state.held.append((fut, finish, None))
            return fut
        if delay is not None:
            entry: tuple[Future[Any], Callable[[], Any], threading.Timer | None]
            timer = threading.Timer(delay, lambda: self._deliver_late(entry))
            timer.name = "tinkex-sim-slow-sample"
            entry = (fut, finish, timer)
            with state.lock:
                state.held.append(entry)
            timer.start()
            return fut
        _finish(fut, finish)
        return fut

    def _deliver_late(self, entry: tuple[Future[Any], Callable[[], Any], threading.Timer | None]) -> None:
        with self._sampling_state.lock:
            if entry not in self._sampling_state.held:
                return  # released already
            self._sampling_state.held.remove(entry)
        _finish(entry[0], entry[1])


def _finish(fut: Future[Any], finish: Callable[[], Any]) -> None:
    if not fut.set_running_or_notify_cancel():  # the caller cancelled it
        return
    try:
        fut.set_result(finish())
    except BaseException as exc:
        fut.set_exception(exc)


def _check_count(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")


class TrainingSampling:
    """The sampling calls of :class:`~tinkex_recovery.simulated.SimulatedTrainingClient` (mixed into it): each is
    a call on the run, so a lost run fails it as it fails ``optim_step``."""

    _sim: SimulatedTinker
    model_id: str

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, user_metadata: Mapping[str, str] | None = None
    ) -> SimulatedAPIFuture[SaveWeightsForSamplerResult]:
        """Save the weights as ``tinker://{model_id}/sampler_weights/{name}``, for ``create_sampling_client``."""
        try:
            path = self._sim._save_checkpoint(
                self.model_id,
                name,
                ttl_seconds=ttl_seconds,
                overwrite=False,
                user_metadata=user_metadata,
                kind="sampler_weights",
            )
        except (_tinker.SimulatedAPIError, _tinker.SimulatedRequestFailedError) as exc:
            return _tinker._failed(exc)
        return _tinker._done(SaveWeightsForSamplerResult(path=path))

    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
        kind: str = "snapshot",
        *,
        sampler_id: str | None = None,
    ) -> SimulatedAPIFuture[SimulatedSamplingClient]:
        """A future of a sampler of the run's weights now (``kind``: ``"snapshot"`` or ``"inflight"``)."""
        sim = self._sim
        with sim._lock:
            run = sim._call(self.model_id)
            if isinstance(run, BaseException):
                return _tinker._failed(run)
            try:
                sampler = sim._new_sampler_of_run(self.model_id, kind, sampler_id)
            except _tinker.SimulatedAPIError as exc:
                return _tinker._failed(exc)
        return _tinker._done(SimulatedSamplingClient(sim, sampler.sampler_id))

    def create_sampling_client(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> SimulatedAPIFuture[SimulatedSamplingClient]:
        """As the service's ``create_sampling_client(model_path=...)``."""
        return self._sim.create_sampling_client(model_path)
