"""The official ``tinker`` SDK's protocol (proven with 0.38.0) on the loopback server, backed by the same
:class:`SimulatedTinker` as the REST routes, so ``sim.corrupt(run_id)`` and ``sim.lineage(run_id)`` work for
runs a real ``tinker.ServiceClient`` created.

What the SDK does, and what answers it here (all under ``/api/v1``):

- start: ``client/config`` (plain API-key auth, plain httpx transport, uncompressed protobuf), then
  ``client/dynamic_config`` and ``create_session``; ``session_heartbeat`` every 10 s; ``sessions/{id}/finish``
  on ``close()``; ``telemetry`` (accepted and dropped; tests set ``TINKER_TELEMETRY=0``).
- training calls (``create_model``, ``forward_backward``, ``optim_step``, ``save_weights``, ``load_weights``)
  answer a future ``{"request_id"}`` at once; the SDK then fetches the result with ``retrieve_future``.
  Every operation runs before its submit is answered, so the first fetch has the result: JSON, or protobuf
  for ``forward_backward``. A failed operation's result is ``{"error", "category"}``, which the SDK raises as
  its own ``RequestFailedError``: a corrupted run (category ``server``), a restore the simulation fails with a
  status (``user`` for a 4xx, ``server`` otherwise), a checkpoint name taken, an unknown session.
- the SDK names a run itself when it restores one (``{session_id}:train:{model_seq_id}``), and the simulated
  run gets that id; a ``Datum`` is recorded in the lineage as the tuple of its input token ids; the loss is a
  deterministic stand-in.
- ``get_info``, ``get_server_capabilities`` and ``healthz`` answer plainly; ``GET training_runs/...`` are the
  REST routes of ``_server``.

- an operation may also finish later (a sample in flight): ``retrieve_future`` then holds the request until it
  does (a long poll, as the service's), answering ``try_again`` after :data:`LONG_POLL` seconds.
- sampling (``save_weights_for_sampler``, ``create_sampling_session``, ``samplers/{id}``, ``asample``) is served
  by ``_sdk_sampling``.

A handler bug answers 422 with ``x-should-retry: false``: the SDK retries a 5xx for minutes, a 422 never.
Not simulated: ``load_state`` into an existing run, zstd-compressed bodies, the sampling futures poller
(``sample_use_retrieve_futures``), ``join_sampling_session``.

Admin routes for a person rehearsing a corruption from another shell (they need the API key too):
``POST /_sim/corrupt/{run_id}``, ``GET /_sim/runs``, ``GET /_sim/lineage/{run_id}``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

from ._proto import ProtoError, decode_forward_backward_request, encode_output
from ._server import ROUTES, Call, Handler, HTTPError, Reply, SimulatedServer
from ._tinker import SimulatedAPIError, SimulatedRequestFailedError, SimulatedTrainingClient

__all__ = ["CLIENT_CONFIG", "DYNAMIC_CONFIG"]

logger = logging.getLogger("tinkex_recovery.simulated.server")

#: ``POST client/config``: API-key auth (no JWT exchange); plain httpx (the default native transport starts
#: threads nothing can stop); forward_backward bodies as plain protobuf (no zstd).
CLIENT_CONFIG: dict[str, Any] = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    "parallel_fwdbwd_chunks": True,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}
#: ``POST client/dynamic_config``: the SDK refreshes it every ``refresh_interval_sec`` (at least 10 s).
DYNAMIC_CONFIG: dict[str, Any] = {"refresh_interval_sec": 3600, "sample_cancel_enabled": False}

_PROTOBUF = "application/x-protobuf"
# The SDK never closes the pool it fetches its config with, nor a telemetry pool opened while it closes: without
# this, their keep-alive connections (and the server threads serving them) outlive ServiceClient.close().
_CLOSE = {"Connection": "close"}
_NO_RETRY = {"x-should-retry": "false"}
# The SDK fetches each result at once; a long rehearsal must not keep every one forever.
_KEEP_RESULTS = 4096
#: Seconds ``retrieve_future`` holds a request for an operation still in flight before it answers ``try_again``.
LONG_POLL = 20.0


@dataclass
class _Session:
    tags: list[str]
    heartbeats: int = 0
    finished: dict[str, Any] | None = None


@dataclass
class _State:
    """What the protocol remembers for one server: sessions and the results of submitted operations."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sessions: dict[str, _Session] = field(default_factory=dict)
    results: OrderedDict[str, Reply | Future[Reply]] = field(default_factory=OrderedDict)  # the newest _KEEP_RESULTS
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


_states: weakref.WeakKeyDictionary[SimulatedServer, _State] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def _state(server: SimulatedServer) -> _State:
    with _states_lock:
        state = _states.get(server)
        if state is None:
            state = _states[server] = _State()
        return state


def _route(method: str, template: str) -> Callable[[Handler], Handler]:
    """Register into :data:`ROUTES`; an unexpected error answers a 422 the SDK does not retry."""

    def register(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def guarded(call: Call) -> Any:
            try:
                return handler(call)
            except (HTTPError, SimulatedAPIError):
                raise
            except Exception as exc:
                logger.exception("simulated server: handler for %s %s raised", call.method, call.path)
                raise HTTPError(422, f"simulator error: {type(exc).__name__}", _NO_RETRY) from exc

        ROUTES.add(method, template, guarded)
        return handler

    return register


def _body(call: Call) -> dict[str, Any]:
    body = call.json()
    if not isinstance(body, dict):
        raise HTTPError(422, "the request body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HTTPError(422, f"{name!r} must be a {kind.__name__}")
    return value


class _Failed(Exception):
    """An operation that fails: its future's result is ``{"error", "category"}``."""

    def __init__(self, message: str, category: str) -> None:
        super().__init__(message)
        self.category = category


def _submit(call: Call, operation: Callable[[], Any], model_id: str | None = None) -> dict[str, Any]:
    """Run ``operation`` now, keep its outcome (or the ``Future`` of a :class:`Reply` it returns, for an
    operation that finishes later) for ``retrieve_future``, and answer the future."""
    outcome: Any
    try:
        outcome = operation()
    except SimulatedRequestFailedError as exc:
        outcome = {"error": str(exc), "category": exc.category}
    except SimulatedAPIError as exc:
        outcome = {"error": exc.detail, "category": "user" if exc.status_code < 500 else "server"}
    except _Failed as exc:
        outcome = {"error": str(exc), "category": exc.category}
    except TypeError as exc:  # user_metadata that is not str -> str
        outcome = {"error": str(exc), "category": "user"}
    reply = outcome if isinstance(outcome, Reply | Future) else Reply(200, outcome)
    state = _state(call.server)
    with state.lock:
        request_id = f"req-{next(state.ids)}-{uuid.uuid4().hex[:8]}"
        state.results[request_id] = reply
        if len(state.results) > _KEEP_RESULTS:
            state.results.popitem(last=False)
    future: dict[str, Any] = {"request_id": request_id}
    if model_id is not None:
        future["model_id"] = model_id
    return future


def _metadata(body: dict[str, Any]) -> dict[str, str] | None:
    value = body.get("user_metadata")
    if value is not None and not isinstance(value, dict):
        raise HTTPError(422, "'user_metadata' must be an object")
    return value


def _require_session(call: Call, session_id: str) -> None:
    state = _state(call.server)
    with state.lock:
        if session_id not in state.sessions:
            raise _Failed(f"unknown session {session_id!r}", "user")


# -- start, sessions, telemetry -------------------------------------------------------------------------------
@_route("POST", "/api/v1/client/config")
def _client_config(call: Call) -> Reply:
    return Reply(200, CLIENT_CONFIG, _CLOSE)


@_route("POST", "/api/v1/client/dynamic_config")
def _dynamic_config(call: Call) -> Any:
    return DYNAMIC_CONFIG


@_route("POST", "/api/v1/create_session")
def _create_session(call: Call) -> Any:
    body = _body(call)
    session_id = str(uuid.uuid4())
    state = _state(call.server)
    with state.lock:
        state.sessions[session_id] = _Session(tags=list(body.get("tags") or []))
    return {"type": "create_session", "session_id": session_id}


@_route("POST", "/api/v1/session_heartbeat")
def _session_heartbeat(call: Call) -> Any:
    session_id = _field(_body(call), "session_id", str)
    state = _state(call.server)
    with state.lock:
        session = state.sessions.get(session_id)
        if session is None:
            raise HTTPError(404, f"session {session_id!r} not found")
        if session.finished is not None:
            raise HTTPError(410, f"session {session_id!r} is finished")  # the SDK stops heartbeating
        session.heartbeats += 1
    return {"type": "session_heartbeat"}


@_route("POST", "/api/v1/sessions/{session_id}/finish")
def _finish_session(call: Call) -> Any:
    reason = _body(call).get("reason")
    state = _state(call.server)
    with state.lock:
        session = state.sessions.get(call.params["session_id"])
        if session is None:
            raise HTTPError(404, f"session {call.params['session_id']!r} not found")
        if session.finished is None:  # the first reason wins, as on the real service
            session.finished = reason if isinstance(reason, dict) else {}
    return None


@_route("POST", "/api/v1/telemetry")
def _telemetry(call: Call) -> Reply:
    return Reply(200, {"status": "accepted"}, _CLOSE)


@_route("GET", "/api/v1/get_server_capabilities")
def _capabilities(call: Call) -> Any:
    return {"supported_models": [{"model_name": "Qwen/Qwen3-8B", "trainable": True, "sampleable": True}]}


@_route("GET", "/api/v1/healthz")
def _healthz(call: Call) -> Any:
    return {"status": "ok"}


# -- training runs --------------------------------------------------------------------------------------------
@_route("POST", "/api/v1/create_model")
def _create_model(call: Call) -> Any:
    body = _body(call)
    session_id = _field(body, "session_id", str)
    seq = _field(body, "model_seq_id", int)
    base_model = _field(body, "base_model", str)
    rank = (body.get("lora_config") or {}).get("rank", 32)
    metadata = _metadata(body)

    def create() -> Any:
        _require_session(call, session_id)
        client = call.sim.create_lora_training_client(
            base_model, rank=rank, user_metadata=metadata, run_id=f"{session_id}:train:{seq}"
        )
        return {"type": "create_model", "model_id": client.model_id}

    return _submit(call, create)


@_route("POST", "/api/v1/load_weights")
def _load_weights(call: Call) -> Any:
    body = _body(call)
    path = _field(body, "path", str)
    optimizer = bool(body.get("optimizer"))
    metadata = _metadata(body)
    if body.get("model_id") is not None:
        model_id = body["model_id"]

        def refuse() -> Any:
            raise _Failed("load_state into an existing run is not simulated; restore into a new run", "user")

        return _submit(call, refuse, model_id)
    session_id = _field(body, "session_id", str)
    run_id = f"{session_id}:train:{_field(body, 'model_seq_id', int)}"

    def restore() -> Any:
        _require_session(call, session_id)
        sim = call.sim
        method = (
            sim.create_training_client_from_state_with_optimizer if optimizer else sim.create_training_client_from_state
        )
        client = method(path, user_metadata=metadata, run_id=run_id).result()
        return {"type": "load_weights", "path": path, "model_id": client.model_id}

    return _submit(call, restore)


@_route("POST", "/api/v1/get_info")
def _get_info(call: Call) -> Any:
    model_id = _field(_body(call), "model_id", str)
    base_model, rank = call.sim._model_info(model_id)
    return {
        "type": "get_info",
        "model_id": model_id,
        "model_data": {"arch": "simulated", "model_name": base_model, "tokenizer_id": base_model},
        "is_lora": True,
        "lora_rank": rank,
        "model_name": base_model,
    }


@_route("POST", "/api/v1/forward_backward")
def _forward_backward(call: Call) -> Any:
    if call.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise HTTPError(415, "compressed bodies are not simulated (client/config sets proto_compress_fwdbwd false)")
    try:
        request = decode_forward_backward_request(call.body)
    except ProtoError as exc:
        raise HTTPError(400, f"not a ForwardBackwardRequest: {exc}") from None

    def run() -> Any:
        client = SimulatedTrainingClient(call.sim, request.model_id)
        items = [datum.tokens for datum in request.data]
        if request.forward_only:
            result = client.forward(items, request.loss_fn).result()
        else:
            result = client.forward_backward(items, request.loss_fn).result()
        outputs = []
        for datum in request.data:
            n = len(datum.loss_fn_inputs.get("target_tokens", datum.tokens))
            weights = [float(w) for w in datum.loss_fn_inputs.get("weights", ())]
            if len(weights) != n:
                weights = [1.0] * n
            outputs.append({"logprobs": [-result.loss] * n, "elementwise_loss": [result.loss * w for w in weights]})
        total = sum(sum(o["elementwise_loss"]) for o in outputs)
        return Reply(200, encode_output(outputs, {"loss:sum": total}), content_type=_PROTOBUF)

    return _submit(call, run, request.model_id)


@_route("POST", "/api/v1/optim_step")
def _optim_step(call: Call) -> Any:
    body = _body(call)
    model_id = _field(body, "model_id", str)
    params = body.get("adam_params") or body.get("optimizer_params")

    def step() -> Any:
        result = SimulatedTrainingClient(call.sim, model_id).optim_step(params).result()
        return {"metrics": {"step:max": float(result.step)}}

    return _submit(call, step, model_id)


@_route("POST", "/api/v1/save_weights")
def _save_weights(call: Call) -> Any:
    body = _body(call)
    model_id = _field(body, "model_id", str)
    name = _field(body, "path", str)  # the request's "path" is the checkpoint's name
    ttl = body.get("ttl_seconds")
    metadata = _metadata(body)

    def save() -> Any:
        client = SimulatedTrainingClient(call.sim, model_id)
        result = client.save_state(name, ttl, bool(body.get("overwrite")), metadata).result()
        return {"type": "save_weights", "path": result.path}

    return _submit(call, save, model_id)


@_route("POST", "/api/v1/retrieve_future")
def _retrieve_future(call: Call) -> Reply:
    request_id = _field(_body(call), "request_id", str)
    state = _state(call.server)
    with state.lock:
        reply = state.results.get(request_id)
    if reply is None:
        raise HTTPError(404, f"unknown request_id {request_id!r}")
    if isinstance(reply, Future):
        return _when_done(call, reply, request_id)
    return reply


def _when_done(call: Call, pending: Future[Reply], request_id: str) -> Reply:
    """The reply of an operation in flight, once it finishes: within :data:`LONG_POLL` seconds, else
    ``try_again`` (the SDK asks again at once); cut short when the server stops."""
    deadline = LONG_POLL
    while not pending.done() and deadline > 0 and not call.server._stopping.is_set():
        wait_futures([pending], timeout=0.05)
        deadline -= 0.05
    if not pending.done():
        if call.server._stopping.is_set():
            raise HTTPError(503, "the server is stopping")
        return Reply(200, {"type": "try_again", "request_id": request_id, "queue_state": "active"})
    return pending.result()


# -- admin: for a person rehearsing a corruption --------------------------------------------------------------
@_route("POST", "/_sim/corrupt/{run_id}")
def _admin_corrupt(call: Call) -> Any:
    run_id = call.params["run_id"]
    call.sim.corrupt(run_id)
    logger.warning("simulated server: run %s marked corrupted", run_id)
    return {"run_id": run_id, "corrupted": True}


@_route("GET", "/_sim/runs")
def _admin_runs(call: Call) -> Any:
    return {"runs": call.sim.run_ids}


@_route("GET", "/_sim/lineage/{run_id}")
def _admin_lineage(call: Call) -> Any:
    items = call.sim.lineage(call.params["run_id"])
    return {"run_id": call.params["run_id"], "lineage": json.loads(json.dumps(items, default=repr))}
