"""RL time to resume: a guarded RL step over loopback HTTP, from the failing call to the next step's first sample
on the restored weights.

The loop is the cookbook's sync RL loop on the official ``tinker`` SDK against the loopback server (20 ms added to
every response), under ``recovery_guard``: each step makes a sampler of the current weights
(``save_weights_and_get_sampling_client``), samples from it, trains on the sample and saves a checkpoint with its
step. Before every other step the run is corrupted server-side, so that step's first call, the sampler's
``save_weights_for_sampler``, fails: a sampling call judged like a training call. A sample is the wall time from
that exception reaching the loop to the moment the next step (on the new run) has its sampler of the restored
weights and sends its first sample; ``rl_time_to_first_sample_p50_s`` runs on to that sample's answer.

Baseline, in the same process on the same server: the guard's own time to resume (``benchmarks/_resume.py``'s
loop, whose failing call is a ``forward_backward``) and one ``GET /training_runs/{id}`` round trip. Target:
``rl_time_to_resume_p50_s`` <= the guard's time to resume + 2 round trips (the new sampler's
``save_weights_for_sampler`` and its ``retrieve_future``) + 10 ms.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

from _resume import BASE_MODEL, POLICY, guarded_loop, round_trip
from _util import API_KEY, LATENCY, percentile

from tinkex_recovery import recovery_guard
from tinkex_recovery.simulated import SimulatedTinker, serve


def rl_loop(sim: SimulatedTinker, service: Any, samples: int) -> list[tuple[float, float]]:
    """``samples`` recoveries (plus one warm-up, not kept) of a guarded SDK RL loop: for each, the seconds from the
    failing call to the next step's sampler being ready, and to its first sample's answer."""
    from tinker import types

    adam = types.AdamParams(learning_rate=1e-4)
    params = types.SamplingParams(max_tokens=4)
    client = service.create_lora_training_client(base_model=BASE_MODEL).result()
    corrupt_at = {2 * (i + 1) for i in range(samples + 1)}
    measured: list[tuple[float, float]] = []
    failed: float | None = None
    with recovery_guard(client.model_id, service, policy=POLICY, client=client) as guard:
        for step in guard.steps(range(2 * (samples + 1) + 1)):
            with step:
                if step.index in corrupt_at:
                    corrupt_at.discard(step.index)
                    sim.corrupt(guard.run_id)
                try:
                    sampler = guard.client.save_weights_and_get_sampling_client().result()
                except Exception:
                    failed = time.perf_counter()
                    raise
                ready = time.perf_counter()
                response = sampler.sample(types.ModelInput.from_ints([step.index]), 1, params).result()
                token = int(response.sequences[0].tokens[0])
                if failed is not None:
                    if token != step.index:
                        raise RuntimeError(f"step {step.index} sampled weights holding {token} steps")
                    measured.append((ready - failed, time.perf_counter() - failed))
                    failed = None
                datum = types.Datum(
                    model_input=types.ModelInput.from_ints([step.index, token]),
                    loss_fn_inputs={"target_tokens": [token, token], "weights": [1.0, 1.0]},
                )
                guard.client.forward_backward([datum], "cross_entropy").result()
                guard.client.optim_step(adam).result()
                guard.save_state(f"step-{step.index + 1:06d}", step=step.index + 1)
    if corrupt_at or len(measured) != samples + 1:
        raise RuntimeError(f"{len(measured)} recoveries measured, {samples + 1} expected")
    return measured[1:]  # the first recovery opens the restore path's connections


def bench(quick: bool) -> dict[str, float]:
    if importlib.util.find_spec("tinker") is None:
        return {}
    os.environ["TINKER_TELEMETRY"] = "0"
    import tinker

    samples = 10 if quick else 40
    sim = SimulatedTinker()
    with serve(sim, api_key=API_KEY) as server:
        server.latency = LATENCY
        service = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
        try:
            rl = rl_loop(sim, service, samples)
            plain = guarded_loop(sim, server, service, samples)
            baseline = round_trip(tinker.RestClient(base_url=server.base_url, api_key=API_KEY), sim.run_ids[0], 30)
        finally:
            service.close("success").result(timeout=30)
    return {
        "rl_time_to_resume_samples": len(rl),
        "rl_time_to_resume_p50_s": percentile([ready for ready, _ in rl], 50),
        "rl_time_to_resume_p99_s": percentile([ready for ready, _ in rl], 99),
        "rl_time_to_first_sample_p50_s": percentile([sampled for _, sampled in rl], 50),
        "rl_guard_time_to_resume_p50_s": percentile([seconds for seconds, _ in plain], 50),
        "rl_round_trip_s": baseline,
    }


if __name__ == "__main__":  # python benchmarks/_rl.py
    print(bench(quick=True))
