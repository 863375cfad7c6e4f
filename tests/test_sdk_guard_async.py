"""End to end with the real tinker SDK (0.38) over loopback HTTP: async loops under ``async with recovery_guard``
survive server-side corruptions, and the simulated Tinker's books show every step trained exactly once.

The loops use the SDK's 0.38 asyncio idiom: ``client.forward_backward(...)`` returns an ``APIFuture`` at once and
is awaited (the ``*_async`` twins are deprecated in 0.38 with a FutureWarning). Detection comes from the failing
calls; the poller's interval is an hour. No SDK call that blocks may run on the event loop's thread: the SDK logs
"Synchronous method ... called from async context" when one does, and every test checks that it never did.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest
import tinker

from tinkex_recovery import RecoveryPolicy, recovery_guard
from tinkex_recovery.integrations import RecoveryGuard
from tinkex_recovery.simulated import SimulatedTinker

from .sdk_support import ADAM, SdkNet, datum, sdk_service
from .test_guard_async import ticking_while

pytestmark = pytest.mark.sdk

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, attempt_timeout=30)
STEPS = 30
SAVE_EVERY = 5


@pytest.fixture(scope="module")
def net() -> Iterator[SdkNet]:
    with sdk_service(SimulatedTinker()) as net:
        yield net


@pytest.fixture
def blocking_calls(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if the SDK saw one of its blocking methods called from a running event loop."""
    caplog.set_level(logging.WARNING, logger="tinker")
    yield
    sync_from_async = [r.getMessage() for r in caplog.records if "called from async context" in r.getMessage()]
    assert not sync_from_async, sync_from_async


async def async_loop(net: SdkNet, client: Any, corrupt: set[tuple[int, str]], ran: list[int]) -> RecoveryGuard:
    """The contract's loop: step by step, each call's future awaited, a checkpoint every SAVE_EVERY steps;
    ``corrupt``: (step, 'mid' | 'after') where the server marks the current run corrupted, once each."""
    async with recovery_guard(client.model_id, net.service, policy=POLICY, client=client) as guard:
        async for step in guard.steps(range(STEPS)):
            async with step:
                ran.append(step.index)
                await guard.client.forward_backward([datum(step.index)], "cross_entropy")
                if (step.index, "mid") in corrupt:
                    corrupt.discard((step.index, "mid"))
                    net.sim.corrupt(guard.run_id)
                await guard.client.optim_step(ADAM).result_async()
                if (step.index + 1) % SAVE_EVERY == 0:
                    await guard.save_state_async(f"step-{step.index + 1:04d}", step=step.index + 1)
                if (step.index, "after") in corrupt:
                    corrupt.discard((step.index, "after"))
                    net.sim.corrupt(guard.run_id)
    return guard


@pytest.mark.usefixtures("blocking_calls")
def test_an_async_sdk_loop_survives_two_corruptions_and_trains_each_step_once(net: SdkNet) -> None:
    client = net.lora()
    ran: list[int] = []
    corrupt = {(17, "mid"), (24, "after")}
    guard = asyncio.run(async_loop(net, client, corrupt, ran))

    assert not corrupt
    first, second = guard.recoveries
    assert (first.resumed_at, first.steps_lost, second.resumed_at, second.steps_lost) == (15, 2, 25, 0)
    assert isinstance(first.cause, tinker.RequestFailedError)  # the SDK's own error, suppressed
    assert isinstance(guard.client, tinker.TrainingClient) and guard.client.model_id == guard.run_id
    assert ran == [*range(18), *range(15, 26), *range(25, STEPS)]
    assert net.sim.lineage(guard.run_id) == [(i,) for i in range(STEPS)]


async def pipelined_loop(
    net: SdkNet, client: Any, *, submit_ahead: int, corrupt: set[tuple[int, int]], steps: int
) -> tuple[RecoveryGuard, list[int]]:
    """tinker-cookbook's supervised loop with ``submit_ahead``: each step submits its requests and then finishes
    the step ``submit_ahead`` back, so when a run is lost its requests are still in flight. A checkpoint submitted
    after step k's requests holds every step up to k (the service runs a run's requests in order): ``step=k + 1``.
    After a recovery (``step.resumed``), the lost run's futures are dropped unawaited. ``corrupt``: (step, run
    number) right after that step's requests were submitted. Returns the guard and the futures dropped."""
    dropped: list[int] = []
    in_flight: deque[tuple[int, Any, Any]] = deque()
    async with recovery_guard(client.model_id, net.service, policy=POLICY, client=client) as guard:
        async for step in guard.steps(range(steps)):
            async with step:
                if step.resumed:
                    dropped.append(len(in_flight))
                    in_flight.clear()
                fwd = guard.client.forward_backward([datum(step.index)], "cross_entropy")
                opt = guard.client.optim_step(ADAM)
                in_flight.append((step.index, fwd, opt))
                if (step.index, len(guard.recoveries)) in corrupt:
                    net.sim.corrupt(guard.run_id)
                if (step.index + 1) % SAVE_EVERY == 0:
                    await guard.save_state_async(f"step-{step.index + 1:04d}", step=step.index + 1)
                while len(in_flight) > submit_ahead or (step.index == steps - 1 and in_flight):
                    _, fwd, opt = in_flight.popleft()
                    await fwd
                    await opt.result_async()
    return guard, dropped


@pytest.mark.usefixtures("blocking_calls")
@pytest.mark.parametrize("submit_ahead", [1, 2])
def test_a_pipelined_async_sdk_loop_survives_corruptions_with_requests_in_flight(
    net: SdkNet, submit_ahead: int
) -> None:
    client = net.lora()
    guard, dropped = asyncio.run(
        pipelined_loop(net, client, submit_ahead=submit_ahead, corrupt={(12, 0), (23, 1)}, steps=STEPS)
    )
    assert len(guard.recoveries) == 2
    assert [r.resumed_at for r in guard.recoveries] == [10, 20]
    assert len(dropped) == 2 and all(n >= 1 for n in dropped)  # the lost run's futures, dropped unawaited
    assert net.sim.lineage(guard.run_id) == [(i,) for i in range(STEPS)]


@pytest.mark.usefixtures("blocking_calls")
def test_a_5ms_ticker_is_never_delayed_50ms_while_an_sdk_restore_is_under_way(net: SdkNet) -> None:
    """The server holds the restore until a task on the loop has ticked 20 times: the loop gets its recovery only
    if it was never blocked while waiting for it (a watchdog releases a blocked run after 5 s, and fails it)."""
    client = net.lora()
    restoring = threading.Event()
    real = net.sim.create_training_client_from_state_with_optimizer

    def announcing(path: str, *args: Any, **kwargs: Any) -> Any:
        restoring.set()
        return real(path, *args, **kwargs)

    net.sim.create_training_client_from_state_with_optimizer = announcing  # type: ignore[method-assign]
    net.sim.hang_restores(1, then="succeed")
    watchdog = threading.Timer(5.0, net.sim.release)
    watchdog.start()
    ran: list[int] = []
    try:
        guard, worst, ticks = asyncio.run(
            ticking_while(
                async_loop(net, client, {(12, "mid")}, ran),
                release=lambda: restoring.is_set() and net.sim.release(),
                after_ticks=20,
            )
        )
    finally:
        watchdog.cancel()
        watchdog.join()
        del net.sim.create_training_client_from_state_with_optimizer
    assert restoring.is_set() and ticks >= 20
    assert worst < 0.050, f"a 5 ms tick was delayed {worst * 1e3:.1f} ms"
    (rec,) = guard.recoveries
    assert rec.waited >= 20 * 0.005  # the loop waited for the held restore, ticking all along
    assert net.sim.lineage(guard.run_id) == [(i,) for i in range(STEPS)]


@pytest.mark.usefixtures("blocking_calls")
def test_a_new_process_resumes_an_sdk_run_at_entry_in_a_coroutine(net: SdkNet) -> None:
    client = net.lora()

    async def first() -> None:
        async with recovery_guard(client.model_id, net.service, policy=POLICY, client=client) as guard:
            async for step in guard.steps(range(12)):
                async with step:
                    await guard.client.forward_backward([datum(step.index)], "cross_entropy")
                    await guard.client.optim_step(ADAM)
                    if (step.index + 1) % SAVE_EVERY == 0:
                        await guard.save_state_async(f"step-{step.index + 1:04d}", step=step.index + 1)

    async def restarted() -> RecoveryGuard:
        async with recovery_guard(client.model_id, net.service, policy=POLICY) as guard:
            assert guard.start_step == 10 and guard.run_id != client.model_id
            assert guard.start_step is not None
            async for step in guard.steps(range(guard.start_step, 15)):
                async with step:
                    await guard.client.forward_backward([datum(step.index)], "cross_entropy")
                    await guard.client.optim_step(ADAM)
        return guard

    asyncio.run(first())
    guard = asyncio.run(restarted())
    assert isinstance(guard.client, tinker.TrainingClient)
    assert net.sim.lineage(guard.run_id) == [(i,) for i in range(15)]


@pytest.mark.usefixtures("blocking_calls")
def test_sixteen_async_sdk_loops_at_once_each_survive_their_corruption_on_the_threads_of_one(net: SdkNet) -> None:
    """Threads counted are the library's (the loopback server in this process serves 16 clients with threads of
    its own; the SDK keeps one event-loop thread however many clients it has)."""
    steps = 12

    def ours() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("tinkex-recovery")]

    async def loops(n: int, peak: list[int]) -> list[RecoveryGuard]:
        async def one(i: int) -> RecoveryGuard:
            client = await asyncio.to_thread(net.lora)  # the SDK's blocking constructor, off the loop
            async with recovery_guard(client.model_id, net.service, policy=POLICY, client=client) as guard:
                async for step in guard.steps(range(steps)):
                    async with step:
                        peak[0] = max(peak[0], len(ours()))
                        await guard.client.forward_backward([datum(step.index)], "cross_entropy")
                        if step.index == 6 + i % 4 and not guard.recoveries:
                            net.sim.corrupt(guard.run_id)
                        await guard.client.optim_step(ADAM)
                        if (step.index + 1) % SAVE_EVERY == 0:
                            await guard.save_state_async(f"step-{step.index + 1:04d}", step=step.index + 1)
            return guard

        return list(await asyncio.gather(*(one(i) for i in range(n))))

    one_peak, sixteen_peak = [0], [0]
    (single,) = asyncio.run(loops(1, one_peak))
    guards = asyncio.run(loops(16, sixteen_peak))
    for guard in [single, *guards]:
        (rec,) = guard.recoveries
        assert rec.resumed_at == 5
        assert net.sim.lineage(guard.run_id) == [(i,) for i in range(steps)]
    assert len({id(g.engine) for g in guards}) == 1
    assert sixteen_peak[0] <= one_peak[0] + 4, (one_peak, sixteen_peak)
