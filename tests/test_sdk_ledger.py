"""The ledger's proxy with the real tinker SDK (0.38) over loopback HTTP: ``guard.client`` is usable wherever the SDK's
``TrainingClient`` is, and a bare ``save_state(name)`` through it is a checkpoint a loop resumes from, in this
process (sync and async) and in a new one (a real subprocess that dies mid-run).

The SDK's whole public ``TrainingClient`` surface is pinned below: each name is either observed (counted by the
ledger, then the SDK's own call) or passed through (the SDK's own bound method, the very same). Those the loopback
server simulates are also called for real through the proxy."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import tinker

from tinkex_recovery import RESUME_KEY, ObservedClient, RecoveryPolicy, recovery_guard
from tinkex_recovery import _ledger as ledger_module
from tinkex_recovery._ledger import Ledger
from tinkex_recovery.simulated import SimulatedTinker

from .http_support import KEY
from .sdk_support import ADAM, BASE_MODEL, SdkNet, datum, sdk_service

pytestmark = pytest.mark.sdk

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, attempt_timeout=30)

#: tinker 0.38's public TrainingClient methods the proxy observes (then calls the SDK's own)
OBSERVED = {
    "optim_step",
    "optim_step_async",
    "save_state",
    "save_state_async",
    "load_state",
    "load_state_async",
    "load_state_with_optimizer",
    "load_state_with_optimizer_async",
}
#: ... and those it passes through untouched: the SDK's own bound methods
PASSED = {
    "create_sampling_client",
    "create_sampling_client_async",
    "forward",
    "forward_async",
    "forward_backward",
    "forward_backward_async",
    "forward_backward_custom",
    "forward_backward_custom_async",
    "get_console_url",
    "get_info",
    "get_info_async",
    "get_telemetry",
    "get_tokenizer",
    "save_weights_and_get_sampling_client",
    "save_weights_and_get_sampling_client_async",
    "save_weights_external",
    "save_weights_external_async",
    "save_weights_for_sampler",
    "save_weights_for_sampler_async",
}


@pytest.fixture(scope="module")
def net() -> Iterator[SdkNet]:
    with sdk_service(SimulatedTinker()) as net:
        yield net


def metadata_of(net: SdkNet, path: str) -> dict[str, str] | None:
    run_id = path.split("/")[2]
    (found,) = [c for c in net.sim.list_checkpoints(run_id).checkpoints if c.tinker_path == path]
    return found.user_metadata


def test_every_public_method_of_the_sdks_training_client_is_observed_or_passed_through_untouched(
    net: SdkNet,
) -> None:
    public = {n for n in dir(tinker.TrainingClient) if not n.startswith("_")}
    assert public == OBSERVED | PASSED, "the SDK's surface changed: decide for each new name, then pin it here"
    raw = net.lora()
    client = Ledger().adopt(raw)
    assert isinstance(client, tinker.TrainingClient) and isinstance(client, ObservedClient)
    for name in PASSED:
        assert getattr(client, name) == getattr(raw, name), name  # the same function bound to the same client
    assert set(ledger_module.OBSERVED) == OBSERVED
    for name in OBSERVED:
        ours, theirs = getattr(client, name), getattr(raw, name)
        assert ours != theirs and inspect.signature(ours) == inspect.signature(theirs), name
        assert ours.__doc__ == theirs.__doc__ and ours.__name__ == theirs.__name__, name
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(inspect.unwrap(theirs)), name
    assert client.model_id == raw.model_id and client.holder is raw.holder  # attributes too
    assert client.get_console_url() == raw.get_console_url()


def test_the_methods_the_server_simulates_work_through_the_proxy_as_on_the_client(net: SdkNet) -> None:
    ledger = Ledger(position=lambda: 0)
    client = ledger.adopt(net.lora())
    assert client.get_info().model_id == client.model_id
    assert client.forward([datum(1)], "cross_entropy").result().loss_fn_outputs
    client.forward_backward([datum(1)], "cross_entropy").result()
    client.optim_step(ADAM).result()
    client.optim_step(adam_params=ADAM).result()  # the SDK's legacy keyword, passed on as given
    with pytest.raises(TypeError, match="AdamParams"):
        client.optim_step({"learning_rate": 1e-4})  # refused by the SDK before sending: not counted
    assert ledger.sent == 2
    path = client.save_state("surface", ttl_seconds=None, overwrite=False, user_metadata={"k": "v"}).result().path
    assert metadata_of(net, path) == {RESUME_KEY: "1", "k": "v"}
    with pytest.warns(FutureWarning, match="load_state"), pytest.raises(tinker.RequestFailedError):
        client.load_state(path).result()  # into an existing run: not simulated, but sent, so observed
    assert ledger.step is None  # what the run holds is no longer the ledger's to say
    assert net.sim.lineage(client.model_id) == [(1,)]


def test_the_deprecated_async_methods_are_observed_and_still_warn(net: SdkNet) -> None:
    ledger = Ledger(position=lambda: 4)
    client = ledger.adopt(net.lora())

    async def main() -> str:
        with pytest.warns(FutureWarning, match="forward_backward_async"):
            fwd = await client.forward_backward_async([datum(2)], "cross_entropy")
        with pytest.warns(FutureWarning, match="optim_step_async"):
            opt = await client.optim_step_async(ADAM)
        with pytest.warns(FutureWarning, match="save_state_async"):
            saved = await client.save_state_async("async-save")
        await fwd
        await opt
        with pytest.warns(FutureWarning, match="get_info_async"):
            assert (await client.get_info_async()).model_id == client.model_id
        return str((await saved).path)

    path = asyncio.run(main())
    assert metadata_of(net, path) == {RESUME_KEY: "5"} and ledger.sent == 1


def test_a_save_sent_after_unread_optim_steps_holds_them(net: SdkNet) -> None:
    steps = iter(range(3))
    at = [0]
    ledger = Ledger(position=lambda: at[0])
    client = ledger.adopt(net.lora())
    for i in steps:
        at[0] = i
        client.forward_backward([datum(i)], "cross_entropy")
        client.optim_step(ADAM)  # neither future read
    saved = client.save_state("unread")
    path = saved.result().path
    assert metadata_of(net, path) == {RESUME_KEY: "3"}
    restored = net.service.create_training_client_from_state_with_optimizer(path).result()
    assert net.sim.lineage(restored.model_id) == [(0,), (1,), (2,)]  # what the step says it holds


def bare_sync_loop(net: SdkNet, client: Any, corrupt: set[tuple[int, str]], ran: list[int], steps: int) -> Any:
    with recovery_guard(client.model_id, net.service, policy=POLICY, client=client) as guard:
        for step in guard.steps(range(steps)):
            with step:
                ran.append(step.index)
                guard.client.forward_backward([datum(step.index)], "cross_entropy").result()
                if (step.index, "mid") in corrupt:
                    corrupt.discard((step.index, "mid"))
                    net.sim.corrupt(guard.run_id)
                guard.client.optim_step(ADAM).result()
                if (step.index + 1) % 5 == 0:
                    guard.client.save_state(f"bare-{step.index + 1:04d}").result()  # bare: a name, nothing else
                if (step.index, "after_save") in corrupt:
                    corrupt.discard((step.index, "after_save"))
                    net.sim.corrupt(guard.run_id)
                guard.client.forward([datum(step.index)], "cross_entropy").result()  # an eval after the save
    return guard


def test_a_guarded_sdk_loop_that_saves_bare_recovers_each_step_exactly_once(net: SdkNet) -> None:
    client = net.lora()
    ran: list[int] = []
    corrupt = {(17, "mid"), (24, "after_save")}
    guard = bare_sync_loop(net, client, corrupt, ran, 30)
    assert not corrupt
    first, second = guard.recoveries
    assert (first.resumed_at, first.steps_lost, second.resumed_at, second.steps_lost) == (15, 2, 25, 0)
    assert [r.checkpoint.tinker_path.rsplit("/", 1)[-1] for r in guard.recoveries] == ["bare-0015", "bare-0025"]
    assert isinstance(guard.client, tinker.TrainingClient) and guard.client.model_id == guard.run_id
    assert ran == [*range(18), *range(15, 25), *range(25, 30)]
    assert net.sim.lineage(guard.run_id) == [(i,) for i in range(30)]


def test_an_async_guarded_sdk_loop_that_saves_bare_recovers_each_step_exactly_once(net: SdkNet) -> None:
    client = net.lora()
    ran: list[int] = []
    corrupt = {(12, "mid"), (19, "after_save")}

    async def main() -> Any:
        async with recovery_guard(client.model_id, net.service, policy=POLICY, client=client) as guard:
            async for step in guard.steps(range(30)):
                async with step:
                    ran.append(step.index)
                    fwd = guard.client.forward_backward([datum(step.index)], "cross_entropy")
                    if (step.index, "mid") in corrupt:
                        corrupt.discard((step.index, "mid"))
                        net.sim.corrupt(guard.run_id)
                    opt = guard.client.optim_step(ADAM)
                    await fwd
                    await opt
                    if (step.index + 1) % 5 == 0:
                        await guard.client.save_state(f"bare-{step.index + 1:04d}")  # awaited APIFuture
                    if (step.index, "after_save") in corrupt:
                        corrupt.discard((step.index, "after_save"))
                        net.sim.corrupt(guard.run_id)
                    await guard.client.forward([datum(step.index)], "cross_entropy")
        return guard

    guard = asyncio.run(main())
    assert not corrupt
    assert [(r.resumed_at, r.steps_lost) for r in guard.recoveries] == [(10, 2), (20, 0)]
    assert ran == [*range(13), *range(10, 20), *range(20, 30)]
    assert net.sim.lineage(guard.run_id) == [(i,) for i in range(30)]


FIRST_PROCESS = textwrap.dedent(
    """
    import os, sys
    import tinker
    from tinker import types
    from tinkex_recovery import RecoveryPolicy, recovery_guard

    base_url, key = sys.argv[1], sys.argv[2]
    service = tinker.ServiceClient(base_url=base_url, api_key=key)
    client = service.create_lora_training_client(base_model=sys.argv[3]).result()
    print(client.model_id, flush=True)
    adam = types.AdamParams(learning_rate=1e-4)
    policy = RecoveryPolicy(enabled=True, poll_interval=3600)
    with recovery_guard(client.model_id, service, policy=policy, client=client) as guard:
        for step in guard.steps(range(30)):
            with step:
                datum = types.Datum(
                    model_input=types.ModelInput.from_ints([step.index]),
                    loss_fn_inputs={"target_tokens": [step.index + 1], "weights": [1.0]},
                )
                guard.client.forward_backward([datum], "cross_entropy").result()
                guard.client.optim_step(adam).result()
                if (step.index + 1) % 5 == 0:
                    guard.client.save_state(f"bare-{step.index + 1:04d}").result()
                if step.index == 13:
                    os._exit(3)  # killed: no exit of the guard, no close of anything
    """
)


def test_a_bare_saved_loop_killed_mid_run_resumes_in_a_new_process_from_the_step_in_its_metadata(net: SdkNet) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")} | {"TINKER_TELEMETRY": "0"}
    done = subprocess.run(
        [sys.executable, "-c", FIRST_PROCESS, net.server.base_url, KEY, BASE_MODEL],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    run_id = done.stdout.split()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with recovery_guard(run_id, net.service, policy=POLICY, status=net.rest) as resumed:
            assert resumed.start_step == 10 and resumed.resumed_from is not None
            assert resumed.resumed_from.user_metadata == {RESUME_KEY: "10"}  # all the new process had to go on
            for step in resumed.steps(range(resumed.start_step, 20)):
                with step:
                    resumed.client.forward_backward([datum(step.index)], "cross_entropy").result()
                    resumed.client.optim_step(ADAM).result()
    assert net.sim.lineage(run_id)[:14] == [(i,) for i in range(14)]  # the dead process trained 0..13
    assert net.sim.lineage(resumed.run_id) == [(i,) for i in range(20)]  # 10..13 again on the new run, once
