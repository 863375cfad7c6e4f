"""End to end with the real tinker SDK: a custom loop under ``recovery_guard`` trains over loopback HTTP, its run
is corrupted server-side twice, the guard recovers through the SDK's
``create_training_client_from_state_with_optimizer``, and the simulated Tinker's books show every step trained
exactly once. Detection comes from the failing SDK calls; the poller's interval is an hour."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tinker
from pytest_mock import MockerFixture

from tinkex_recovery import RecoveryPolicy, recovery_guard
from tinkex_recovery.simulated import SimulatedTinker

from .sdk_support import ADAM, SdkNet, datum, sdk_service

pytestmark = pytest.mark.sdk

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, attempt_timeout=30)
STEPS = 30
SAVE_EVERY = 5


@pytest.fixture(scope="module")
def net() -> Iterator[SdkNet]:
    with sdk_service(SimulatedTinker()) as net:
        yield net


def test_a_guarded_sdk_loop_survives_two_corruptions_and_trains_each_step_once(
    net: SdkNet, mocker: MockerFixture
) -> None:
    client = net.lora()
    restores = mocker.spy(net.service, "create_training_client_from_state_with_optimizer")
    pending = {(17, "mid"), (24, "after")}  # between forward_backward and optim_step; right after a step
    failures: list[BaseException] = []
    ran: list[int] = []

    def maybe_corrupt(index: int, moment: str, run_id: str) -> None:
        if (index, moment) in pending:
            pending.discard((index, moment))
            net.sim.corrupt(run_id)

    # No status=: the guard polls through the ServiceClient's own REST client, with no wrapper and no warning.
    with recovery_guard(client.model_id, net.service, policy=POLICY, client=client) as guard:
        for step in guard.steps(range(STEPS)):
            with step:
                ran.append(step.index)
                try:
                    guard.client.forward_backward([datum(step.index)], "cross_entropy").result()
                    maybe_corrupt(step.index, "mid", guard.run_id)
                    guard.client.optim_step(ADAM).result()
                except Exception as exc:
                    failures.append(exc)
                    raise
                if (step.index + 1) % SAVE_EVERY == 0:
                    guard.save_state(f"step-{step.index + 1:04d}", step=step.index + 1)
                maybe_corrupt(step.index, "after", guard.run_id)

    assert not pending
    assert [type(e) for e in failures] == [tinker.RequestFailedError] * 2  # the SDK's own error, both times
    first, second = guard.recoveries
    assert (first.resumed_at, first.steps_lost, second.resumed_at, second.steps_lost) == (15, 2, 25, 0)
    assert first.old_run_id == client.model_id and second.old_run_id == first.new_run_id
    assert guard.run_id == second.new_run_id != first.new_run_id
    assert isinstance(guard.client, tinker.TrainingClient) and guard.client.model_id == guard.run_id
    assert [c.args[0] for c in restores.call_args_list] == [r.checkpoint.tinker_path for r in guard.recoveries]
    assert [r.checkpoint.tinker_path.rsplit("/", 1)[-1] for r in guard.recoveries] == ["step-0015", "step-0025"]
    assert ran == [*range(18), *range(15, 26), *range(25, STEPS)]  # 15, 16 trained again; 25 failed untrained
    assert net.sim.lineage(guard.run_id) == [(i,) for i in range(STEPS)]  # each step once, through two restores


def test_a_new_process_resumes_an_sdk_run_from_its_checkpoint_metadata(net: SdkNet) -> None:
    client = net.lora()
    with recovery_guard(client.model_id, net.service, policy=POLICY, client=client, status=net.rest) as guard:
        for step in guard.steps(range(12)):
            with step:
                guard.client.forward_backward([datum(step.index)], "cross_entropy").result()
                guard.client.optim_step(ADAM).result()
                if (step.index + 1) % SAVE_EVERY == 0:
                    guard.save_state(f"step-{step.index + 1:04d}", step=step.index + 1)

    # A restart: no client, only the old run id; the guard restores a new run at the last checkpoint's step.
    with recovery_guard(client.model_id, net.service, policy=POLICY, status=net.rest) as resumed:
        assert resumed.start_step == 10 and resumed.run_id != client.model_id
        assert isinstance(resumed.client, tinker.TrainingClient)
        for step in resumed.steps(range(resumed.start_step, 15)):
            with step:
                resumed.client.forward_backward([datum(step.index)], "cross_entropy").result()
                resumed.client.optim_step(ADAM).result()
    assert net.sim.lineage(resumed.run_id) == [(i,) for i in range(15)]
