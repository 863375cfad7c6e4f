"""RL loops with the real tinker SDK (0.38) over loopback HTTP: its own ``SamplingClient`` samples from the
simulated Tinker while the run is corrupted during sampling, between sampling and training, and with rollouts in
flight; the final run's lineage shows every step trained once, each on samples from weights ``k -
max_steps_off_policy..k`` steps (the first sampled token, carried in each step's datum). Detection comes from the
failing calls (sampling ones included); the poller's interval is an hour."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from tinker import types

from tinkex_recovery.simulated import SimulatedTinker

from .rl_support import Net, async_rl_loop, check_exactly_once_and_on_policy, sync_rl_loop
from .sdk_support import ADAM, SdkNet, datum, sdk_service

pytestmark = pytest.mark.sdk

STEPS = 20
EVERY = 5


@pytest.fixture(scope="module")
def sdk() -> Iterator[SdkNet]:
    with sdk_service(SimulatedTinker()) as net:
        yield net


@pytest.fixture
def net(sdk: SdkNet) -> Iterator[Net]:
    yield Net(
        sdk.sim,
        sdk.service,
        datum=datum,  # datum(k, t) is recorded in the lineage as (k, t)
        prompt=lambda i: types.ModelInput.from_ints([i, i + 1]),
        params=types.SamplingParams(max_tokens=2),
        adam=ADAM,
    )
    sdk.sim.lost_run_samplers = "serve"
    sdk.sim.release_samples()


@pytest.mark.parametrize(
    ("mode", "schedule"),
    [
        ("fail", {(7, 0): "sampling", (13, 1): "between"}),  # the lost run's sample fails: judged like training
        ("serve", {(7, 0): "sampling", (13, 1): "after"}),  # it is served; the training call fails
        ("serve", {(6, 0): "between", (12, 1): "mid"}),
    ],
)
def test_a_sync_sdk_rl_loop_trains_every_step_once_on_its_own_samples(
    sdk: SdkNet, net: Net, mode: str, schedule: dict[tuple[int, int], str]
) -> None:
    sdk.sim.lost_run_samplers = mode  # type: ignore[assignment]
    client = sdk.lora()
    guard = sync_rl_loop(net, client, dict(schedule), steps=STEPS, every=EVERY)
    assert [r.resumed_at for r in guard.recoveries] == [5, 10]
    check_exactly_once_and_on_policy(sdk.sim.lineage(guard.run_id), STEPS, max_steps_off_policy=0)


@pytest.mark.parametrize("mode", ["serve", "fail"])
def test_an_async_sdk_rl_loop_with_rollouts_in_flight_stays_within_max_steps_off_policy(
    sdk: SdkNet, net: Net, mode: str
) -> None:
    sdk.sim.lost_run_samplers = mode  # type: ignore[assignment]
    client = sdk.lora()
    schedule = {(12, 0): "in_flight", (13, 1): "between"}
    report = asyncio.run(async_rl_loop(net, client, schedule, steps=STEPS, every=EVERY, workers=3, group=2))
    assert not schedule and [r.resumed_at for r in report.guard.recoveries] == [10, 10]
    check_exactly_once_and_on_policy(sdk.sim.lineage(report.guard.run_id), STEPS, max_steps_off_policy=1)
