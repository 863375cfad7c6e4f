"""The REST client reads at most 16 MiB of one answer: a body of exactly that size is still Tinker's answer, one
byte more is not Tinker talking and fails as :class:`MalformedResponse` (never read whole into memory first),
over real HTTP on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tinkex_recovery import MalformedResponse, TinkerRest
from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve

from .http_support import KEY

#: The documented cap of one response body.
CAP = 16 * 1024 * 1024


@pytest.fixture
def server(sim: SimulatedTinker) -> Iterator[SimulatedServer]:
    with serve(sim, KEY) as srv:
        yield srv


@pytest.fixture
def rest(server: SimulatedServer) -> Iterator[TinkerRest]:
    with TinkerRest(api_key=KEY, base_url=server.base_url, jitter=0.0, timeout=60.0, read_timeout=30.0) as client:
        yield client


def run_body(run_id: str, size: int) -> bytes:
    """A training run as Tinker sends it, padded (in a user_metadata value) to exactly ``size`` bytes."""
    run = {
        "training_run_id": run_id,
        "base_model": "Qwen/Qwen3-8B",
        "model_owner": "me",
        "is_lora": True,
        "last_request_time": "2026-01-01T00:00:00Z",
        "corrupted": False,
        "user_metadata": {"note": ""},
    }
    bare = len(json.dumps(run).encode())
    run["user_metadata"] = {"note": "x" * (size - bare)}
    body = json.dumps(run).encode()
    assert len(body) == size
    return body


def test_an_answer_of_exactly_the_cap_is_read(server: SimulatedServer, rest: TinkerRest) -> None:
    server.malform_next(1, body=run_body("run-big", CAP))
    run = rest.get_training_run("run-big")
    assert run.training_run_id == "run-big" and len((run.user_metadata or {})["note"]) > CAP - 1000


def test_an_answer_one_byte_over_the_cap_is_malformed_and_not_retried(
    server: SimulatedServer, rest: TinkerRest
) -> None:
    server.malform_next(1, body=run_body("run-big", CAP + 1))
    with pytest.raises(MalformedResponse, match=f"exceeds {CAP} bytes") as info:
        rest.get_training_run("run-big")
    assert info.value.run_id == "run-big"
    assert len(server.requests) == 1  # refused at once: a body this size is not a transient fault
