"""The server's stdlib protobuf codec against the SDK's own (google.protobuf) converters: what the SDK encodes,
the server decodes; what the server encodes, the SDK decodes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

from tinkex_recovery.simulated._proto import ProtoError, decode_forward_backward_request, encode_output

pytestmark = pytest.mark.sdk

tokens = st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), min_size=1, max_size=8)
floats32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)


@st.composite
def datums(draw: st.DrawFn) -> types.Datum:
    ids = draw(tokens)
    weights = draw(st.lists(floats32, min_size=len(ids), max_size=len(ids)))
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids),
        loss_fn_inputs={"target_tokens": [i // 2 for i in ids], "weights": weights},
    )


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(datums(), max_size=4),
    model_id=names,
    seq_id=st.integers(min_value=0, max_value=2**31 - 1),
    config=st.dictionaries(names, st.one_of(st.floats(allow_nan=False), names), max_size=3),
    loss_fn=st.sampled_from(["cross_entropy", "importance_sampling", "ppo"]),
)
def test_the_server_decodes_what_the_sdk_encodes(
    data: list[types.Datum], model_id: str, seq_id: int, config: dict[str, float | str], loss_fn: str
) -> None:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config or None),
        model_id=model_id,
        seq_id=seq_id,
    )
    decoded = decode_forward_backward_request(forward_backward_request_to_proto(request).SerializeToString())
    assert (decoded.model_id, decoded.seq_id, decoded.loss_fn, decoded.forward_only) == (
        model_id,
        seq_id,
        loss_fn,
        False,
    )
    assert decoded.loss_fn_config == config
    assert [d.tokens for d in decoded.data] == [tuple(d.model_input.to_ints()) for d in data]
    for sent, got in zip(data, decoded.data, strict=True):
        assert list(got.loss_fn_inputs["target_tokens"]) == sent.loss_fn_inputs["target_tokens"].tolist()
        assert list(got.loss_fn_inputs["weights"]) == sent.loss_fn_inputs["weights"].tolist()


@settings(max_examples=60, deadline=None)
@given(
    outputs=st.integers(min_value=1, max_value=4).flatmap(
        lambda n: st.lists(
            st.fixed_dictionaries({"logprobs": st.lists(floats32, max_size=n), "loss": st.lists(floats32, max_size=3)}),
            max_size=5,
        )
    ),
    metrics=st.dictionaries(names.map(lambda s: f"{s}:sum"), st.floats(allow_nan=False), max_size=3),
)
def test_the_sdk_decodes_what_the_server_encodes(
    outputs: list[dict[str, list[float]]], metrics: dict[str, float]
) -> None:
    result = deserialize_forward_backward_output(encode_output(outputs, metrics))
    assert result.metrics == metrics
    assert [{k: v.tolist() for k, v in o.items()} for o in result.loss_fn_outputs] == outputs
    assert all(o[k].dtype == "float32" for o in result.loss_fn_outputs for k in o)


def test_garbage_is_a_proto_error_not_a_crash() -> None:
    for body in (b"\x0a\xff", b"\x0f", b"\x1a\x05\x0a\x03", b"\x12\x80"):
        with pytest.raises(ProtoError):
            decode_forward_backward_request(body)
    assert math.isclose(
        deserialize_forward_backward_output(encode_output([], {"loss:sum": 1.5})).metrics["loss:sum"], 1.5
    )
