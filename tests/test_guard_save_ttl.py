"""``recovery_guard``'s ``save_state`` (sync and async) takes ``ttl_seconds`` as a whole number of seconds or None:
``True`` (which Python would count as 1, a checkpoint gone after one second) or ``3.5`` fail with a TypeError
before anything is saved; a good TTL reaches Tinker as given."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tinkex_recovery import FakeClock, RecoveryPolicy, recovery_guard
from tinkex_recovery.simulated import SimulatedTinker

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, attempt_timeout=30)


@pytest.mark.parametrize("ttl", [True, False, 3.5, "3600"])
def test_a_ttl_that_is_not_a_whole_number_of_seconds_is_refused_and_nothing_is_saved(
    sim: SimulatedTinker, clock: FakeClock, ttl: Any
) -> None:
    client = sim.create_lora_training_client(base_model="m")
    with (
        recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard,
        pytest.raises(TypeError, match="ttl_seconds must be an int or None"),
    ):
        guard.save_state("0003", step=3, ttl_seconds=ttl)
    assert sim.list_checkpoints(client.model_id).checkpoints == []


@pytest.mark.parametrize("ttl", [True, 3.5])
def test_the_async_save_refuses_the_same_ttls(sim: SimulatedTinker, clock: FakeClock, ttl: Any) -> None:
    client = sim.create_lora_training_client(base_model="m")

    async def save() -> None:
        async with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
            await guard.save_state_async("0003", step=3, ttl_seconds=ttl)

    with pytest.raises(TypeError, match="ttl_seconds must be an int or None"):
        asyncio.run(save())
    assert sim.list_checkpoints(client.model_id).checkpoints == []


def test_a_whole_ttl_is_saved_with_the_checkpoint(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
        guard.save_state("0003", step=3, ttl_seconds=3600)
    [checkpoint] = sim.list_checkpoints(client.model_id).checkpoints
    assert checkpoint.expires_at is not None and checkpoint.expires_at > checkpoint.time
