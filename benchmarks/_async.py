"""The asyncio face of the guard: its cost per step, the event loop's lag while runs are recovered, and the threads
of one guarded loop against sixteen.

- Per-step cost: CPU time of the looping thread (``time.thread_time_ns``), best of alternating repetitions, of
  ``async for step in guard.steps(range(n)): async with step:`` against a bare ``async for`` over an async
  generator with ``async with`` on a null context; the sync guard's own overhead is measured the same way in the
  same process (``_overhead.guard_overhead``), so the two compare within one run.
- Lag: a task on the same event loop sleeps 5 ms again and again while a guarded loop on the in-memory simulated
  Tinker is corrupted again and again; each restore is held (on the engine's thread) until the ticker has ticked
  a few times, so ticks happen while recoveries are under way. The figure is the worst lateness of a tick.
- Threads: the process's ``threading.active_count()`` at its highest, sampled at every step of every loop, with one
  guarded async loop and with sixteen at once (one policy: one shared engine), each corrupted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

from _overhead import guard_overhead

from tinkex_recovery import RecoveryPolicy, recovery_guard
from tinkex_recovery.simulated import SimulatedTinker

_QUIET = RecoveryPolicy(enabled=True, poll_interval=3600.0)  # no poll during the measurement
_FAST = RecoveryPolicy(enabled=True, poll_interval=3600.0, backoff=0.0, max_backoff=0.0)


def _step(index: int) -> None:
    """A training step that does nothing."""


async def _indices(steps: int) -> AsyncIterator[int]:
    for index in range(steps):
        yield index


async def _bare(steps: int) -> int:
    null = contextlib.nullcontext()
    start = time.thread_time_ns()
    async for index in _indices(steps):
        async with null:
            _step(index)
    return time.thread_time_ns() - start


async def _guarded(steps: int, sim: SimulatedTinker) -> int:
    client = sim.create_lora_training_client(base_model="bench/model")
    async with recovery_guard(client.model_id, sim, client=client, policy=_QUIET) as guard:
        start = time.thread_time_ns()
        async for step in guard.steps(range(steps)):
            async with step:
                _step(step.index)
        return time.thread_time_ns() - start


def async_guard_overhead(steps: int, repeats: int) -> dict[str, float]:
    sim = SimulatedTinker()
    bare, guarded = [], []
    for _ in range(repeats):
        bare.append(asyncio.run(_bare(steps)))
        guarded.append(asyncio.run(_guarded(steps, sim)))
    return {
        "async_guard_bare_ns_per_step": min(bare) / steps,
        "async_guard_overhead_ns_per_step": (min(guarded) - min(bare)) / steps,
    }


async def _lag_during_recoveries(recoveries: int, hold_ticks: int) -> tuple[float, int, int]:
    """The worst lateness (s) of a 5 ms tick while a guarded loop goes through ``recoveries`` recoveries, each
    restore held until ``hold_ticks`` ticks have passed; also the ticks and the recoveries that happened."""
    sim = SimulatedTinker()
    loop = asyncio.get_running_loop()
    held = threading.Event()
    worst, ticks = 0.0, 0
    since_held = 0
    done = False

    def hold(path: str) -> None:  # each restore is held until the ticker lets it go
        sim.hang_restores(1, then="succeed")
        held.set()

    sim.on_restore(hold)

    async def ticker() -> None:
        nonlocal worst, ticks, since_held
        while not done:
            before = loop.time()
            await asyncio.sleep(0.005)
            worst = max(worst, loop.time() - before - 0.005)
            ticks += 1
            if held.is_set():
                since_held += 1
                if since_held >= hold_ticks:
                    since_held = 0
                    held.clear()
                    sim.release()

    task = asyncio.create_task(ticker())
    client = sim.create_lora_training_client(base_model="bench/model")
    every = 4
    steps = every * (recoveries + 1)
    try:
        async with recovery_guard(client.model_id, sim, client=client, policy=_FAST) as guard:
            async for step in guard.steps(range(steps)):
                async with step:
                    await (await guard.client.forward_backward_async([step.index]))
                    await (await guard.client.optim_step_async())
                    if (step.index + 1) % every == 0:
                        await guard.save_state_async(f"s{step.index + 1}", step=step.index + 1)
                        if len(guard.recoveries) < recoveries:
                            sim.corrupt(guard.run_id)  # the next step fails: a recovery, no step lost
    finally:
        done = True
        await task
        sim.release()
    if sim.lineage(guard.run_id) != list(range(steps)):
        raise RuntimeError("the lag benchmark's loop did not train each step once")
    return worst, ticks, len(guard.recoveries)


async def _many_loops(n: int) -> int:
    """The highest thread count seen at any step of ``n`` guarded async loops run at once (each corrupted once)."""
    sim = SimulatedTinker()
    peak = 0

    async def one(i: int) -> None:
        nonlocal peak
        client = await sim.create_lora_training_client_async(base_model="bench/model")
        async with recovery_guard(client.model_id, sim, client=client, policy=_FAST) as guard:
            async for step in guard.steps(range(40)):
                async with step:
                    peak = max(peak, threading.active_count())
                    if step.index == 15 + i % 10 and not guard.recoveries:
                        sim.corrupt(guard.run_id)
                    await (await guard.client.forward_backward_async([step.index]))
                    await (await guard.client.optim_step_async())
                    if (step.index + 1) % 10 == 0:
                        await guard.save_state_async(f"s{step.index + 1}", step=step.index + 1)
        if len(guard.recoveries) != 1 or sim.lineage(guard.run_id) != list(range(40)):
            raise RuntimeError("a loop of the thread benchmark did not recover once, training each step once")

    await asyncio.gather(*(one(i) for i in range(n)))
    return peak


def bench(quick: bool) -> dict[str, float]:
    steps, repeats = (100_000, 5) if quick else (500_000, 9)
    result = async_guard_overhead(steps, repeats)
    sync = guard_overhead(steps, repeats)
    result["async_guard_sync_overhead_ns_per_step"] = sync["guard_overhead_ns_per_step"]
    result["async_guard_overhead_vs_sync"] = (
        result["async_guard_overhead_ns_per_step"] / sync["guard_overhead_ns_per_step"]
    )
    worst, ticks, recoveries = asyncio.run(_lag_during_recoveries(10 if quick else 40, hold_ticks=4))
    result["event_loop_max_lag_ms_during_recovery"] = worst * 1e3
    result["event_loop_ticks_during_lag_benchmark"] = ticks
    result["event_loop_lag_recoveries"] = recoveries
    result["threads_before_guards"] = threading.active_count()
    result["threads_at_1_guard"] = asyncio.run(_many_loops(1))
    result["threads_at_16_guards"] = asyncio.run(_many_loops(16))
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(bench(quick=True), indent=2))
