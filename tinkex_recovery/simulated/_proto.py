"""The two protobuf messages on Tinker's training path, in plain stdlib: the SDK sends ``forward_backward`` as a
``ForwardBackwardRequest`` and expects its result as a ``ForwardBackwardOutput``; no JSON form exists for either.

Field numbers are those of ``tinker/proto/tinker_public_pb2`` in SDK 0.38.0::

    ForwardBackwardRequest: model_id=1 string, seq_id=2 int32, data=3 Datum*, loss_fn=4 string,
        loss_fn_config=5 map<string, double>, forward_only=6 bool, loss_fn_config_v2=7 map<string, LossConfigValue>
    LossConfigValue: number=1 double, text=2 string
    Datum: model_input=1 Chunk*, loss_fn_inputs=2 map<string, Tensor>
    Chunk (oneof): encoded_text=1 {tokens=1 bytes: int32 LE}, image=2, dmel=3
    Tensor: dense=1 bytes, sparse_csr=2 {values=1 bytes}, dtype=3 DType, shape=4 int64*
    ForwardBackwardOutput: loss_fn_output_type=1 string, loss_fn_outputs=2 ArrayRecord*, metrics=3 map<string, double>
    ArrayRecord: type_tag=1 string, fields=2 map<string, BatchedTensor>, num_datums=3 int64
    BatchedTensor: data=1 bytes, offsets=2 bytes (int64 LE byte offsets, one per datum plus one), dtype=3 DType,
        trailing_shape=4 int64*
    DType: FLOAT32=1, INT64=2, INT32=3, BFLOAT16=4

Only what a simulation needs is decoded: token ids of text chunks and flat values of tensors.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ForwardBackwardRequest",
    "ProtoError",
    "WireDatum",
    "decode_forward_backward_request",
    "encode_output",
    "encode_sample_response",
]

_FLOAT32, _INT64, _INT32, _BFLOAT16 = 1, 2, 3, 4
_FORMATS = {_FLOAT32: ("f", 4), _INT64: ("q", 8), _INT32: ("i", 4)}
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5

Fields = dict[int, list[int | bytes]]


class ProtoError(ValueError):
    """The bytes are not the message they claim to be."""


@dataclass(frozen=True, slots=True)
class WireDatum:
    """One ``Datum``: the token ids of its text chunks, in order, and its loss inputs as flat values."""

    tokens: tuple[int, ...]
    loss_fn_inputs: dict[str, tuple[float, ...] | tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class ForwardBackwardRequest:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool
    data: tuple[WireDatum, ...]


# -- reading --------------------------------------------------------------------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ProtoError("truncated or overlong varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> Fields:
    """One message level: field number -> its raw values (ints for varints, bytes otherwise), in order."""
    out: Fields = {}
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == _VARINT:
            value, i = _varint(buf, i)
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            value, i = buf[i : i + size], i + size
        elif wire == _LENGTH:
            length, i = _varint(buf, i)
            value, i = buf[i : i + length], i + length
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        if i > n:
            raise ProtoError("truncated message")
        out.setdefault(number, []).append(value)
    return out


def _bytes(fields: Fields, number: int) -> bytes:
    values = fields.get(number)
    if not values:
        return b""
    value = values[-1]
    if not isinstance(value, bytes):
        raise ProtoError(f"field {number} is not length-delimited")
    return value


def _int(fields: Fields, number: int) -> int:
    values = fields.get(number)
    if not values:
        return 0
    value = values[-1]
    if not isinstance(value, int):
        raise ProtoError(f"field {number} is not a varint")
    return value


def _text(fields: Fields, number: int) -> str:
    try:
        return _bytes(fields, number).decode()
    except UnicodeDecodeError:
        raise ProtoError(f"field {number} is not UTF-8") from None


def _entries(fields: Fields, number: int) -> list[tuple[str, Fields]]:
    """A map field: (key, the entry's fields, whose value is field 2)."""
    entries = []
    for raw in fields.get(number, []):
        if not isinstance(raw, bytes):
            raise ProtoError(f"map field {number} is not length-delimited")
        entry = _fields(raw)
        entries.append((_text(entry, 1), entry))
    return entries


def _unpack(raw: bytes, dtype: int) -> tuple[float, ...] | tuple[int, ...]:
    if dtype == _BFLOAT16:  # the upper half of a float32
        halves = struct.unpack(f"<{len(raw) // 2}H", raw[: len(raw) // 2 * 2])
        return tuple(struct.unpack(f"<{len(halves)}f", struct.pack(f"<{len(halves)}I", *(h << 16 for h in halves))))
    code, size = _FORMATS.get(dtype, _FORMATS[_FLOAT32])
    if len(raw) % size:
        raise ProtoError(f"{len(raw)} bytes is not a whole number of {size}-byte values")
    return tuple(struct.unpack(f"<{len(raw) // size}{code}", raw))


def _tensor(buf: bytes) -> tuple[float, ...] | tuple[int, ...]:
    fields = _fields(buf)
    raw = _bytes(_fields(_bytes(fields, 2)), 1) if 2 in fields else _bytes(fields, 1)  # sparse: its values only
    return _unpack(raw, _int(fields, 3) or _FLOAT32)


def _datum(buf: bytes) -> WireDatum:
    fields = _fields(buf)
    tokens: list[int] = []
    for chunk in fields.get(1, []):
        if not isinstance(chunk, bytes):
            raise ProtoError("a model_input chunk is not length-delimited")
        chunk_fields = _fields(chunk)
        if 1 in chunk_fields:  # encoded_text; images and audio carry no token ids
            raw = _bytes(_fields(_bytes(chunk_fields, 1)), 1)
            tokens.extend(int(t) for t in _unpack(raw, _INT32))
    inputs = {name: _tensor(_bytes(entry, 2)) for name, entry in _entries(fields, 2)}
    return WireDatum(tuple(tokens), inputs)


def decode_forward_backward_request(body: bytes) -> ForwardBackwardRequest:
    """Decode the SDK's ``forward_backward`` body; :class:`ProtoError` if it is not one."""
    try:
        fields = _fields(body)
        data = []
        for raw in fields.get(3, []):
            if not isinstance(raw, bytes):
                raise ProtoError("a datum is not length-delimited")
            data.append(_datum(raw))
        config: dict[str, float | str] = {}
        for name, entry in _entries(fields, 5):
            config[name] = struct.unpack("<d", _bytes(entry, 2))[0] if 2 in entry else 0.0
        for name, entry in _entries(fields, 7):  # v2 wins where both are set, as on the real server
            value = _fields(_bytes(entry, 2))
            config[name] = struct.unpack("<d", _bytes(value, 1))[0] if 1 in value else _text(value, 2)
        seq_id = _int(fields, 2)
        return ForwardBackwardRequest(
            model_id=_text(fields, 1),
            seq_id=seq_id - (1 << 64) if seq_id >= 1 << 63 else seq_id,
            loss_fn=_text(fields, 4),
            loss_fn_config=config,
            forward_only=bool(_int(fields, 6)),
            data=tuple(data),
        )
    except struct.error as exc:
        raise ProtoError(str(exc)) from None


# -- writing --------------------------------------------------------------------------------------------------
def _put_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _put_bytes(number: int, payload: bytes) -> bytes:
    return _put_varint(number << 3 | _LENGTH) + _put_varint(len(payload)) + payload


def _put_int(number: int, value: int) -> bytes:
    return _put_varint(number << 3 | _VARINT) + _put_varint(value)


def _put_double_entry(key: str, value: float) -> bytes:
    return _put_bytes(1, key.encode()) + _put_varint(2 << 3 | _FIXED64) + struct.pack("<d", value)


def encode_output(
    outputs: Sequence[Mapping[str, Sequence[float]]],
    metrics: Mapping[str, float],
    output_type: str = "ArrayRecord",
) -> bytes:
    """A ``ForwardBackwardOutput``: per datum, named float32 vectors (every datum names the same fields), and
    the metrics (whose keys need a reduction suffix such as ``loss:sum``: the SDK merges them across chunks)."""
    out = _put_bytes(1, output_type.encode())
    if outputs:
        record = _put_bytes(1, output_type.encode())
        for name in outputs[0]:
            data, offsets = bytearray(), [0]
            for datum in outputs:
                values = datum[name]
                data += struct.pack(f"<{len(values)}f", *values)
                offsets.append(len(data))
            tensor = (
                _put_bytes(1, bytes(data))
                + _put_bytes(2, struct.pack(f"<{len(offsets)}q", *offsets))
                + _put_int(3, _FLOAT32)
            )  # no trailing_shape: each datum's value is a vector
            record += _put_bytes(2, _put_bytes(1, name.encode()) + _put_bytes(2, tensor))
        record += _put_int(3, len(outputs))
        out += _put_bytes(2, record)
    for key, value in metrics.items():
        out += _put_bytes(3, _put_double_entry(key, float(value)))
    return out


def encode_sample_response(
    sequences: Sequence[tuple[Sequence[int], Sequence[float]]], prompt_logprobs: Sequence[float | None] | None
) -> bytes:
    """A ``SampleResponse`` (SDK 0.38: sequences=1 SampledSequence*, prompt_logprobs=2 bytes float32 with NaN
    where there is none; SampledSequence: stop_reason=1 enum (STOP=0, LENGTH=1), tokens=2 bytes int32 LE,
    logprobs=3 bytes float32 LE). Every sequence stopped for its length."""
    out = b""
    for tokens, logprobs in sequences:
        seq = _put_int(1, 1) + _put_bytes(2, struct.pack(f"<{len(tokens)}i", *tokens))
        if logprobs:
            seq += _put_bytes(3, struct.pack(f"<{len(logprobs)}f", *logprobs))
        out += _put_bytes(1, seq)
    if prompt_logprobs:
        values = [float("nan") if v is None else v for v in prompt_logprobs]
        out += _put_bytes(2, struct.pack(f"<{len(values)}f", *values))
    return out
