"""The library's own costs: per step of a guarded loop while all is well, and per recovery.

Per-step costs are CPU time of the looping thread (``time.thread_time_ns``), the best of several alternating
repetitions: other processes on a shared machine then neither add to nor blur the difference.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from _util import percentile

from tinkex_recovery import EventKind, RecoveryEngine, RecoveryEvent, RecoveryPolicy, recovery_guard
from tinkex_recovery.simulated import SimulatedTinker

_QUIET = RecoveryPolicy(enabled=True, poll_interval=3600.0)  # no poll during the measurement


def _step(index: int) -> None:
    """A training step that does nothing."""


def _bare(steps: int) -> int:
    start = time.thread_time_ns()
    for index in range(steps):
        _step(index)
    return time.thread_time_ns() - start


def _guarded(steps: int, sim: SimulatedTinker) -> int:
    client = sim.create_lora_training_client(base_model="bench/model")
    with recovery_guard(client.model_id, sim, client=client, policy=_QUIET) as guard:
        start = time.thread_time_ns()
        for step in guard.steps(range(steps)):
            with step:
                _step(step.index)
        return time.thread_time_ns() - start


def guard_overhead(steps: int, repeats: int) -> dict[str, float]:
    sim = SimulatedTinker()
    bare, guarded = [], []
    for _ in range(repeats):
        bare.append(_bare(steps))
        guarded.append(_guarded(steps, sim))
    return {
        "guard_bare_ns_per_step": min(bare) / steps,
        "guard_overhead_ns_per_step": (min(guarded) - min(bare)) / steps,
    }


def observed_calls(chunks: int, steps: int) -> float:
    """Nanoseconds per step that the ledger's proxy (``guard.client``) adds to a step's Tinker calls, a
    ``forward_backward`` and an ``optim_step`` on the in-memory ``SimulatedTinker``, against the raw client; CPU
    time of the looping thread, best of ``chunks`` alternating runs of ``steps`` steps each (short runs side by
    side: the machine's drift falls on both alike). A cost per call, beside a Tinker request (a round trip of
    milliseconds), not per step: context for ``guard_overhead_*``, which makes no call."""

    def run(client: Any) -> int:
        start = time.thread_time_ns()
        for index in range(steps):
            client.forward_backward([index]).result()
            client.optim_step().result()
        return time.thread_time_ns() - start

    raw = SimulatedTinker().create_lora_training_client(base_model="bench/model")
    sim = SimulatedTinker()
    client = sim.create_lora_training_client(base_model="bench/model")
    with recovery_guard(client.model_id, sim, client=client, policy=_QUIET) as guard:
        guard.client.optim_step().result()  # the proxy builds its observed method once: not timed
        raw_ns, observed_ns = [], []
        for _ in range(chunks):
            raw_ns.append(run(raw))
            observed_ns.append(run(guard.client))
    return (min(observed_ns) - min(raw_ns)) / steps


def recovery_overhead(samples: int) -> list[float]:
    """Seconds from the ``detected`` event to ``wait_for_recovery()`` returning the new client, on the in-memory
    simulated Tinker (it answers at once: what is measured is the engine's own work and thread hand-offs)."""
    sim = SimulatedTinker()
    client = sim.create_lora_training_client(base_model="bench/model")
    client.save_state("0001", user_metadata={"step": "1"}).result()
    detected: list[float] = []

    def on_event(event: RecoveryEvent) -> None:
        if event.kind is EventKind.DETECTED:
            detected.append(time.perf_counter())

    policy = RecoveryPolicy(  # one lineage recovered many times on purpose: no budget
        enabled=True, poll_interval=3600.0, backoff=0.0, max_backoff=0.0, max_recoveries=None, max_no_progress=None
    )
    seconds = []
    with RecoveryEngine(policy, status=sim) as engine:
        engine.subscribe(on_event)
        handle = engine.watch(client.model_id, sim)
        for i in range(samples + 1):  # the first is a warm-up
            sim.corrupt(handle.run_id)
            if not handle.check_now():
                raise RuntimeError("the corruption was not detected")
            recovery = handle.wait_for_recovery(timeout=10.0)
            done = time.perf_counter()
            if i > 0:
                seconds.append(done - detected[-1])
            # The new run saves a checkpoint of its own, as a training loop would, so every sample is alike.
            recovery.client.save_state("0001", user_metadata={"step": "1"}).result()
    return seconds


def bare_save_resume_ok(steps: int = 40, every: int = 5) -> float:
    """1.0 if a loop that saves with a bare ``guard.client.save_state(name)`` (no step, no metadata of its own),
    lost once between forward_backward and optim_step and once by a call right after a save, is recovered with
    every step trained exactly once, resuming each time at what the restored checkpoint holds; else 0.0."""
    sim = SimulatedTinker()
    client = sim.create_lora_training_client(base_model="bench/model")
    policy = RecoveryPolicy(enabled=True, poll_interval=3600.0, backoff=0.0, max_backoff=0.0)
    losses = {(13, "mid"), (24, "after_save")}
    held: dict[str, int] = {}
    with recovery_guard(client.model_id, sim, client=client, policy=policy) as guard:
        for step in guard.steps(range(steps)):
            with step:
                guard.client.forward_backward([step.index]).result()
                if (step.index, "mid") in losses:
                    losses.discard((step.index, "mid"))
                    sim.corrupt(guard.run_id)
                guard.client.optim_step().result()
                if (step.index + 1) % every == 0:
                    run_id = guard.run_id
                    held[guard.client.save_state(f"bare-{step.index + 1}").result().path] = len(sim.lineage(run_id))
                    if (step.index, "after_save") in losses:
                        losses.discard((step.index, "after_save"))
                        sim.corrupt(run_id)
                    guard.client.forward([step.index]).result()  # an eval after the save
    resumed_right = all(r.resumed_at == held.get(r.checkpoint.tinker_path) for r in guard.recoveries)
    ok = not losses and len(guard.recoveries) == 2 and resumed_right and sim.lineage(guard.run_id) == list(range(steps))
    return 1.0 if ok else 0.0


def bench(quick: bool) -> dict[str, float]:
    result = guard_overhead(100_000 if quick else 500_000, 9 if quick else 15)
    result["guard_overhead_bare_steps"] = result["guard_overhead_ns_per_step"] / result["guard_bare_ns_per_step"]
    result["guard_observed_calls_ns_per_step"] = observed_calls(20 if quick else 50, 2000)
    recoveries = recovery_overhead(20 if quick else 100)
    return result | {
        "bare_save_resume_ok": bare_save_resume_ok(),
        "recovery_overhead_ms": statistics.median(recoveries) * 1e3,
        "recovery_overhead_p90_ms": percentile(recoveries, 90) * 1e3,
    }
