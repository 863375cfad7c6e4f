"""The official ``tinker`` SDK's sampling protocol (proven with 0.38.0) on the loopback server, backed by the
sampling half of :class:`SimulatedTinker` (``_sampling``), so the SDK's own ``SamplingClient`` drives it unmodified.

What the SDK calls, and what answers it here (all under ``/api/v1``):

- ``TrainingClient.save_weights_and_get_sampling_client(kind=...)``: ``save_weights_for_sampler`` without a
  ``path`` but with ``sampling_session_seq_id``, a future whose result is ``{"sampling_session_id"}``; the
  session is named ``{session_id}:sample:{seq}`` from the SDK's session and counter.
- ``TrainingClient.save_weights_for_sampler(name)``: ``save_weights_for_sampler`` with ``path`` (the name), a
  future whose result is ``{"path": "tinker://{run}/sampler_weights/{name}"}``.
- ``create_sampling_client(model_path=...|base_model=...)`` (service or training client):
  ``create_sampling_session`` (answered at once, not a future), then ``GET samplers/{id}`` for the base model.
- ``SamplingClient.sample`` and ``compute_logprobs``: ``asample`` (a future carrying one ``sample_sequence_ids``
  entry per sample), then ``retrieve_future``, whose result is a protobuf ``SampleResponse`` (the SDK accepts no
  JSON one); a sample in flight is long-polled there. ``fail_samples(status_code=...)`` answers ``asample``
  itself with that status; other failures are the future's ``{"error", "category"}``, the SDK's
  ``RequestFailedError``.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from ._proto import encode_sample_response
from ._sampling import SampleResult, SimulatedSamplingClient
from ._sdk_routes import _PROTOBUF, _body, _Failed, _field, _metadata, _require_session, _route, _submit
from ._server import Call, HTTPError, Reply
from ._tinker import SimulatedAPIError, SimulatedRequestFailedError, SimulatedTrainingClient

__all__: list[str] = []


def _session_of(model_id: str) -> str:
    return model_id.rsplit(":train:", 1)[0]


@_route("POST", "/api/v1/save_weights_for_sampler")
def _save_weights_for_sampler(call: Call) -> Any:
    body = _body(call)
    model_id = _field(body, "model_id", str)
    client = SimulatedTrainingClient(call.sim, model_id)
    if body.get("path") is not None:
        name = _field(body, "path", str)
        ttl, metadata = body.get("ttl_seconds"), _metadata(body)

        def save() -> Any:
            result = client.save_weights_for_sampler(name, ttl, metadata).result()
            return {"type": "save_weights_for_sampler", "path": result.path}

        return _submit(call, save, model_id)
    seq = _field(body, "sampling_session_seq_id", int)
    kind = body.get("kind", "snapshot")

    def publish() -> Any:
        sampler_id = f"{_session_of(model_id)}:sample:{seq}"
        sampler = client.save_weights_and_get_sampling_client(kind=kind, sampler_id=sampler_id).result()
        return {"type": "save_weights_for_sampler", "sampling_session_id": sampler.sampler_id}

    return _submit(call, publish, model_id)


@_route("POST", "/api/v1/create_sampling_session")
def _create_sampling_session(call: Call) -> Any:
    body = _body(call)
    session_id = _field(body, "session_id", str)
    seq = _field(body, "sampling_session_seq_id", int)
    try:
        _require_session(call, session_id)
    except _Failed as exc:
        raise HTTPError(404, str(exc)) from None
    sampler = call.sim.create_sampling_client(
        model_path=body.get("model_path"), base_model=body.get("base_model"), sampler_id=f"{session_id}:sample:{seq}"
    ).result()  # a SimulatedAPIError answers its status
    return {"type": "create_sampling_session", "sampling_session_id": sampler.sampler_id}


@_route("GET", "/api/v1/samplers/{sampler_id}")
def _get_sampler(call: Call) -> Any:
    sampler = call.sim._sampler(call.params["sampler_id"])
    return {"sampler_id": sampler.sampler_id, "base_model": sampler.base_model, "model_path": sampler.model_path}


def _tokens_of(prompt: Any) -> list[int]:
    """The token ids of a JSON ``ModelInput`` (its ``encoded_text`` chunks; images carry none)."""
    if not isinstance(prompt, dict) or not isinstance(prompt.get("chunks"), list):
        raise HTTPError(422, "'prompt' must be a ModelInput: {'chunks': [...]}")
    tokens: list[int] = []
    for chunk in prompt["chunks"]:
        if isinstance(chunk, dict) and chunk.get("type", "encoded_text") == "encoded_text":
            values = chunk.get("tokens")
            if not isinstance(values, list) or not all(isinstance(t, int) for t in values):
                raise HTTPError(422, "an encoded_text chunk needs 'tokens': a list of ints")
            tokens.extend(values)
    return tokens


def _reply(done: Future[SampleResult]) -> Reply:
    exc = done.exception()
    if isinstance(exc, SimulatedRequestFailedError):
        return Reply(200, {"error": str(exc), "category": exc.category})
    if exc is not None:
        return Reply(200, {"error": f"simulator error: {type(exc).__name__}", "category": "server"})
    result = done.result()
    body = encode_sample_response([(seq.tokens, seq.logprobs) for seq in result.sequences], result.prompt_logprobs)
    return Reply(200, body, content_type=_PROTOBUF)


@_route("POST", "/api/v1/asample")
def _asample(call: Call) -> Any:
    body = _body(call)
    sampler_id = _field(body, "sampling_session_id", str)
    num_samples = body.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise HTTPError(422, "'num_samples' must be a positive int")
    prompt = _tokens_of(body.get("prompt"))
    params = body.get("sampling_params") or {}
    call.sim._sampler(sampler_id)  # an unknown session: 404, at once
    sampled = SimulatedSamplingClient(call.sim, sampler_id).sample(
        prompt, num_samples, params, bool(body.get("prompt_logprobs"))
    )
    if sampled.done() and isinstance(exc := sampled.exception(), SimulatedAPIError):
        raise exc  # a bad request, or fail_samples(status_code=...): the request itself answers the status

    def relay() -> Future[Reply]:
        out: Future[Reply] = Future()
        sampled.add_done_callback(lambda done: out.set_result(_reply(done)))
        return out

    future = _submit(call, relay)
    future["sample_sequence_ids"] = [f"{sampler_id}:{future['request_id']}:{i}" for i in range(num_samples)]
    return future
