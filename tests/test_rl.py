"""RL loops on the simulated Tinker in memory (no SDK): a step that samples and then trains is trained exactly once
and on-policy across any number of recoveries, in the cookbook's sync shape (a sampler per step) and its async
shape (rollout workers on a shared sampler, ``max_steps_off_policy=1``). The loops are in ``rl_support``."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tinkex_recovery import FakeClock, recovery_guard
from tinkex_recovery.integrations import WeightsVersion
from tinkex_recovery.simulated import SimulatedRequestFailedError, SimulatedTinker

from .rl_support import ASYNC_POINTS, SYNC_POINTS, Net, async_rl_loop, check_exactly_once_and_on_policy, sync_rl_loop

STEPS = 24
EVERY = 5


def memory_net(lost_run_samplers: str = "serve") -> Net:
    clock = FakeClock()  # the poller never polls on its own: the failing calls find every loss
    sim = SimulatedTinker(clock=clock)
    sim.lost_run_samplers = lost_run_samplers  # type: ignore[assignment]
    return Net(sim, sim, datum=lambda k, t: (k, t), prompt=lambda i: [i, i + 1], params={"max_tokens": 2}, clock=clock)


@pytest.mark.parametrize("mode", ["serve", "fail"])
@pytest.mark.parametrize("point", SYNC_POINTS)
def test_a_sync_rl_step_is_trained_once_and_on_its_own_samples_through_two_recoveries(point: str, mode: str) -> None:
    net = memory_net(mode)
    client = net.sim.create_lora_training_client("base")
    guard = sync_rl_loop(net, client, {(7, 0): point, (13, 1): point}, steps=STEPS, every=EVERY)
    lineage = net.sim.lineage(guard.run_id)
    check_exactly_once_and_on_policy(lineage, STEPS, max_steps_off_policy=0)
    assert [r.resumed_at for r in guard.recoveries] == [5, 10]


# From step EVERY on a checkpoint always exists (a recovery never resumes below it).
schedules = st.dictionaries(
    st.tuples(st.integers(EVERY, STEPS - 1), st.integers(0, 3)), st.sampled_from(SYNC_POINTS), max_size=5
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules, mode=st.sampled_from(["serve", "fail"]))
@example(schedule={(6, 0): "sampling", (5, 1): "between", (9, 2): "after"}, mode="fail")
def test_any_corruption_schedule_leaves_every_rl_step_trained_once_on_policy(
    schedule: dict[tuple[int, int], str], mode: str
) -> None:
    net = memory_net(mode)
    guard = sync_rl_loop(net, net.sim.create_lora_training_client("base"), dict(schedule), steps=STEPS, every=EVERY)
    check_exactly_once_and_on_policy(net.sim.lineage(guard.run_id), STEPS, max_steps_off_policy=0)


async_schedules = st.dictionaries(
    st.tuples(st.integers(EVERY, STEPS - 1), st.integers(0, 3)), st.sampled_from(ASYNC_POINTS), max_size=4
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=async_schedules, mode=st.sampled_from(["serve", "fail"]))
@example(schedule={(12, 0): "in_flight", (11, 1): "between"}, mode="serve")
@example(schedule={(12, 0): "in_flight", (11, 1): "in_flight"}, mode="fail")
def test_the_async_rl_loop_trains_every_step_once_within_max_steps_off_policy(
    schedule: dict[tuple[int, int], str], mode: str
) -> None:
    net = memory_net(mode)
    client = net.sim.create_lora_training_client("base")
    report = asyncio.run(async_rl_loop(net, client, dict(schedule), steps=STEPS, every=EVERY))
    check_exactly_once_and_on_policy(net.sim.lineage(report.guard.run_id), STEPS, max_steps_off_policy=1)


def test_rollouts_in_flight_from_ahead_of_the_checkpoint_are_dropped_and_the_sampler_republished() -> None:
    net = memory_net("serve")
    client = net.sim.create_lora_training_client("base")
    report = asyncio.run(async_rl_loop(net, client, {(12, 0): "in_flight"}, steps=STEPS, every=EVERY))
    (recovery,) = report.guard.recoveries
    assert recovery.resumed_at == 10
    # The lost run's samplers went on serving; what they served at 11 and 12 is the lost run's future.
    assert report.dropped >= 1
    after = report.trained_versions[12:]
    assert after[0].run_id == recovery.new_run_id or after[0].step <= 10
    check_exactly_once_and_on_policy(net.sim.lineage(report.guard.run_id), STEPS, max_steps_off_policy=1)


def test_staleness_follows_the_lineage_through_recoveries() -> None:
    net = memory_net()
    client = net.sim.create_lora_training_client("base")
    versions: dict[tuple[int, int], WeightsVersion] = {}
    with recovery_guard(client.model_id, net.service, policy=net.policy, client=client, clock=net.clock) as guard:
        for step in guard.steps(range(12)):
            with step:
                versions[(step.index, len(guard.recoveries))] = guard.weights_version()
                guard.client.forward_backward([(step.index, 0)]).result()
                guard.client.optim_step().result()
                if step.index == 5:
                    guard.save_state("five")  # holds steps 0..5: resume at 6
                if (step.index, len(guard.recoveries)) in {(8, 0), (7, 1)}:
                    net.sim.corrupt(guard.run_id)
        assert [r.resumed_at for r in guard.recoveries] == [6, 6]
        assert guard.staleness(versions[(4, 0)], at=6) == 2  # before the checkpoint: still the lineage's
        assert guard.staleness(versions[(6, 0)], at=6) == 0
        assert guard.staleness(versions[(7, 0)], at=9) is None  # the first run's future
        assert guard.staleness(versions[(7, 1)], at=9) is None  # the second run's, lost too
        assert guard.staleness(versions[(7, 2)], at=9) == 2
        assert guard.staleness(versions[(9, 2)], at=8) is None  # ahead of the step asked about
        with pytest.raises(ValueError, match="lineage"):
            guard.staleness(WeightsVersion(3, "elsewhere:train:0", 0), at=4)
        with pytest.raises(TypeError):
            guard.staleness((3, 0), at=4)  # type: ignore[arg-type]


def test_a_sampler_error_on_a_healthy_run_propagates_unchanged_and_nothing_is_recovered() -> None:
    net = memory_net()
    client = net.sim.create_lora_training_client("base")
    net.sim.fail_samples(1, category="server")  # as cookbook#372: the sampler fails, the run is not corrupted
    with pytest.raises(SimulatedRequestFailedError, match="simulated sampler failure"):
        sync_rl_loop(net, client, {}, steps=STEPS, every=EVERY)
    assert net.sim.run_ids == [client.model_id] and net.sim.restore_calls == []
    assert net.sim.poll_count == 1  # the failure was judged: one poll, which found the run healthy
