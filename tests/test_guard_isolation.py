"""Guards do not stall, wedge or cross one another: a slow service, a cancelled exit, a run guarded again while
its old recovery runs, callbacks on shared engines, a forked child, a closed ``engine=``."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tinkex_recovery import FakeClock, RecoveryPolicy, RunState, recovery_guard
from tinkex_recovery.integrations import _aio
from tinkex_recovery.integrations._guard import RecoveryGuard
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT, true_in_a_forked_child
from .test_guard import POLICY


class SlowRestService:
    """The simulator as a service whose REST client takes as long as the test wants to be made."""

    def __init__(self, sim: SimulatedTinker) -> None:
        self._sim = sim
        self.entered = threading.Event()
        self.go = threading.Event()

    def create_training_client_from_state(self, *args: Any, **kwargs: Any) -> Any:
        return self._sim.create_training_client_from_state(*args, **kwargs)

    def create_training_client_from_state_with_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        return self._sim.create_training_client_from_state_with_optimizer(*args, **kwargs)

    def create_rest_client(self) -> Any:
        self.entered.set()
        assert self.go.wait(WAIT)
        return self._sim.create_rest_client()


def test_a_slow_service_never_delays_another_guards_entry_or_exit(sim: SimulatedTinker, clock: FakeClock) -> None:
    a = sim.create_lora_training_client(base_model="m")
    b = sim.create_lora_training_client(base_model="m")
    slow = SlowRestService(sim)

    async def enter_slowly() -> None:
        async with recovery_guard(a.model_id, slow, policy=POLICY, client=a, clock=clock):
            pass

    async def main() -> None:
        task = asyncio.create_task(enter_slowly())
        assert await asyncio.to_thread(slow.entered.wait, WAIT)
        try:
            async with asyncio.timeout(WAIT):  # an unrelated guard enters and leaves while the slow one waits
                async with recovery_guard(b.model_id, sim, policy=POLICY, client=b, clock=clock) as guard:
                    assert guard.engine is not None
            assert not task.done()
        finally:
            slow.go.set()
        await task

    asyncio.run(main())


def test_off_loop_waits_for_its_call_when_cancelled() -> None:
    """What the call opened must be known to be closed: a cancelled caller still waits for it to return."""
    started, release, returned = threading.Event(), threading.Event(), threading.Event()

    def call() -> None:
        started.set()
        assert release.wait(WAIT)
        returned.set()

    async def main() -> None:
        task = asyncio.create_task(_aio.off_loop(call))
        assert await asyncio.to_thread(started.wait, WAIT)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.2)
        assert not done  # still waiting for the call
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert returned.is_set()

    asyncio.run(main())


def test_a_run_guarded_again_while_its_old_recovery_runs_recovers(sim: SimulatedTinker, clock: FakeClock) -> None:
    """Loop A is cancelled during its restore while guard B keeps the shared engine open; a new guard for A's run
    recovers it (once the old restore has ended), instead of waiting out its wait bound."""
    a = sim.create_lora_training_client(base_model="m")
    a.save_state("ten", user_metadata={"step": "10"}).result()
    b = sim.create_lora_training_client(base_model="m")

    async def loop(guard_for: dict[str, RecoveryGuard]) -> list[int]:
        ran: list[int] = []
        async with recovery_guard(a.model_id, sim, policy=POLICY, client=a, clock=clock) as guard:
            guard_for["guard"] = guard
            async for step in guard.steps(range(10, 13)):
                async with step:
                    ran.append(step.index)
                    if guard.run_id == a.model_id:
                        sim.corrupt(a.model_id)
                    await guard.client.forward_backward([step.index])
        return ran

    async def main() -> tuple[RecoveryGuard, list[int]]:
        restoring = asyncio.Event()
        loop_ = asyncio.get_running_loop()
        sim.on_restore(lambda path: loop_.call_soon_threadsafe(restoring.set))
        async with recovery_guard(b.model_id, sim, policy=POLICY, client=b, clock=clock):
            first: dict[str, RecoveryGuard] = {}
            task = asyncio.create_task(loop(first))
            await asyncio.wait_for(restoring.wait(), WAIT)  # A failed; its restore is held on the server
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            again: dict[str, RecoveryGuard] = {}
            second = asyncio.create_task(loop(again))
            async with asyncio.timeout(WAIT):  # until the new guard's step failed and its recovery waits
                while (
                    "guard" not in again
                    or again["guard"]._handle is None
                    or (again["guard"]._handle.state is not RunState.RECOVERING)
                ):
                    await asyncio.sleep(0.005)
            sim.release()
            ran = await asyncio.wait_for(second, WAIT)
            return again["guard"], ran

    sim.hang_restores(1, then="succeed")
    guard, ran = asyncio.run(main())
    (recovery,) = guard.recoveries
    assert recovery.old_run_id == a.model_id and ran == [10, 10, 11, 12]
    assert len(sim.restore_calls) == 2 and guard.run_id == recovery.new_run_id  # the old restore's run is not used


def test_equal_callbacks_of_two_guards_each_see_their_own_runs(sim: SimulatedTinker, clock: FakeClock) -> None:
    class Seen:
        """Equal to any other Seen (a dataclass-like value): policies holding two of them compare equal."""

        def __init__(self) -> None:
            self.runs: list[str] = []

        def __call__(self, recovery: Any) -> None:
            self.runs.append(recovery.old_run_id)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Seen)

        __hash__ = None  # type: ignore[assignment]  # unhashable, as a dataclass instance with eq

    seen_a, seen_b = Seen(), Seen()
    policy_a, policy_b = POLICY.replace(on_recovery=seen_a), POLICY.replace(on_recovery=seen_b)
    assert policy_a == policy_b
    a, b = sim.create_lora_training_client(base_model="m"), sim.create_lora_training_client(base_model="m")
    for client in (a, b):
        client.save_state("one", user_metadata={"step": "1"}).result()

    def fail_once(guard: RecoveryGuard, client: Any) -> None:
        for step in guard.steps(range(1, 3)):
            with step:
                if guard.run_id == client.model_id:
                    sim.corrupt(client.model_id)
                guard.client.forward_backward([step.index]).result()

    with (
        recovery_guard(a.model_id, sim, policy=policy_a, client=a, clock=clock) as ga,
        recovery_guard(b.model_id, sim, policy=policy_b, client=b, clock=clock) as gb,
    ):
        fail_once(ga, a)
        fail_once(gb, b)
        assert ga.engine is not None and gb.engine is not None
    ga.engine.close()  # already closed by the last guard; on_recovery has run on the notifier before that
    assert seen_a.runs == [a.model_id] and seen_b.runs == [b.model_id]


def test_a_forked_child_gets_an_engine_of_its_own(sim: SimulatedTinker) -> None:
    from tinkex_recovery.integrations._shared import shared_engines

    policy = RecoveryPolicy(enabled=True, poll_interval=3600)
    parent = shared_engines.acquire(policy, None)
    try:

        def in_the_child() -> bool:
            child = shared_engines.acquire(policy, None)
            ok = child is not parent and any(t.name == "tinkex-recovery-poller" for t in threading.enumerate())
            shared_engines.release(child)
            return ok

        assert true_in_a_forked_child(in_the_child), "the child was handed the parent's engine (without its threads)"
    finally:
        shared_engines.release(parent)


def test_a_closed_given_engine_is_named_and_the_steps_own_error_kept(sim: SimulatedTinker, clock: FakeClock) -> None:
    from tinkex_recovery import EngineClosed, RecoveryEngine

    client = sim.create_lora_training_client(base_model="m")
    engine = RecoveryEngine(POLICY, clock=clock).start()
    own = ValueError("the step's own error")
    with (
        pytest.raises(EngineClosed, match="engine passed as engine=") as raised,
        recovery_guard(client.model_id, sim, client=client, engine=engine, clock=clock) as guard,
    ):
        for step in guard.steps(range(3)):
            with step:
                engine.close()  # the user's engine, closed under the running guard
                raise own
    assert raised.value.__cause__ is own
