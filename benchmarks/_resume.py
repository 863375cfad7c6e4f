"""Time to resume: a guarded loop over loopback HTTP, from the failing Tinker call to the next step on the new run.

The loop is the README's: the official ``tinker`` SDK (``ServiceClient``, ``TrainingClient``) on the loopback
server (``simulated.serve``, 20 ms added to every response), under ``recovery_guard`` with no ``status=``, so the
guard polls through the SDK's own ``RestClient`` and restores through ``create_training_client_from_state_with_
optimizer``, as a user's loop does. Each step trains (``forward_backward``, ``optim_step``) and saves a checkpoint
with its step; before every other step the run is corrupted server-side, so that step's ``forward_backward``
fails. A sample is the wall time from that call's exception reaching the loop to the first line of the next step,
which runs on the new client; the requests the server received in between are the recovery's round trips. The
same loop is timed again with ``status=TinkerRest(...)`` for reference.

Baseline, in the same process on the same server: ``resume_round_trip_s``, one ``GET /training_runs/{id}`` through
the SDK's ``RestClient`` (median). The target is ``round_trips_per_recovery`` <= 4 and time to resume <= 4 of those
round trips + 10 ms.

The server runs in this process: ``sim.corrupt()`` and ``server.requests`` are then plain calls, and at these
request rates the server is nowhere near a bottleneck.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from typing import Any

from _util import API_KEY, LATENCY, percentile

from tinkex_recovery import RecoveryPolicy, recovery_guard
from tinkex_recovery.rest import TinkerRest
from tinkex_recovery.simulated import ServedRequest, SimulatedServer, SimulatedTinker, serve

BASE_MODEL = "Qwen/Qwen3-8B"
POLICY = RecoveryPolicy(
    enabled=True, poll_interval=3600.0, backoff=0.0, max_backoff=0.0, max_recoveries=None, max_no_progress=None
)  # a benchmark recovers one lineage many times on purpose
#: The SDK's own housekeeping, on its own timers: never part of a recovery, excluded if one lands in a window.
BACKGROUND = ("/api/v1/session_heartbeat", "/api/v1/telemetry", "/api/v1/client/dynamic_config")
#: Requests made by the recovery's status source (the rest are restore calls).
REST_PREFIX = "/api/v1/training_runs/"


def _datum(token: int) -> Any:
    from tinker import types

    return types.Datum(
        model_input=types.ModelInput.from_ints([token]),
        loss_fn_inputs={"target_tokens": [token + 1], "weights": [1.0]},
    )


def guarded_loop(
    sim: SimulatedTinker, server: SimulatedServer, service: Any, samples: int, status: Any = None
) -> list[tuple[float, tuple[ServedRequest, ...]]]:
    """``samples`` recoveries (plus one warm-up, not kept) in a guarded SDK loop: for each, the seconds from the
    failing call to the next step and the requests the server received in between."""
    from tinker import types

    adam = types.AdamParams(learning_rate=1e-4)
    client = service.create_lora_training_client(base_model=BASE_MODEL).result()
    corrupt_at = {2 * (i + 1) for i in range(samples + 1)}
    measured: list[tuple[float, tuple[ServedRequest, ...]]] = []
    failed: tuple[float, int, str] | None = None  # when, requests so far, on which run
    with recovery_guard(client.model_id, service, policy=POLICY, client=client, status=status) as guard:
        for step in guard.steps(range(2 * (samples + 1) + 1)):
            with step:
                if failed is not None:
                    resumed, seen = time.perf_counter(), len(server.requests)
                    at, before, old_run = failed
                    failed = None
                    if guard.run_id == old_run:
                        raise RuntimeError(f"step {step.index} started on the lost run {old_run}")
                    window = tuple(r for r in server.requests[before:seen] if r.path not in BACKGROUND)
                    measured.append((resumed - at, window))
                if step.index in corrupt_at:
                    corrupt_at.discard(step.index)
                    sim.corrupt(guard.run_id)
                try:
                    guard.client.forward_backward([_datum(step.index)], "cross_entropy").result()
                except Exception:
                    failed = (time.perf_counter(), len(server.requests), guard.run_id)
                    raise
                guard.client.optim_step(adam).result()
                guard.save_state(f"step-{step.index + 1:06d}", step=step.index + 1)
    if corrupt_at or len(measured) != samples + 1:
        raise RuntimeError(f"{len(measured)} recoveries measured, {samples + 1} expected")
    return measured[1:]  # the first recovery opens the restore path's connections


def round_trip(rest: Any, run_id: str, samples: int) -> float:
    """Median seconds of one ``get_training_run`` through ``rest`` (an SDK ``RestClient``)."""
    rest.get_training_run(run_id).result()  # opens its connection
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        rest.get_training_run(run_id).result()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def describe(requests: tuple[ServedRequest, ...]) -> list[str]:
    """Each request as ``METHOD path -> status``, run ids in the path shown as ``{id}``."""
    lines = []
    for r in requests:
        path = r.path
        if path.startswith(REST_PREFIX):
            _, sep, tail = path[len(REST_PREFIX) :].partition("/")
            path = f"{REST_PREFIX}{{id}}{sep}{tail}"
        lines.append(f"{r.method} {path} -> {r.status}")
    return lines


def bench(quick: bool) -> dict[str, float]:
    if importlib.util.find_spec("tinker") is None:
        return {}
    os.environ["TINKER_TELEMETRY"] = "0"  # the SDK would otherwise post telemetry to the server
    import tinker

    samples = 10 if quick else 40
    sim = SimulatedTinker()
    with serve(sim, api_key=API_KEY) as server:
        server.latency = LATENCY
        service = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
        try:
            sdk = guarded_loop(sim, server, service, samples)
            with TinkerRest(api_key=API_KEY, base_url=server.base_url) as rest:
                ours = guarded_loop(sim, server, service, samples, status=rest)
            baseline = round_trip(tinker.RestClient(base_url=server.base_url, api_key=API_KEY), sim.run_ids[0], 30)
        finally:
            service.close("success").result(timeout=30)
    times = [seconds for seconds, _ in sdk]
    trips = [len(window) for _, window in sdk]
    rest_trips = [sum(r.path.startswith(REST_PREFIX) for r in window) for _, window in sdk]
    for line in describe(sdk[-1][1]):
        print(f"one recovery's requests: {line}", file=sys.stderr)
    return {
        "time_to_resume_samples": len(times),
        "time_to_resume_p50_s": percentile(times, 50),
        "time_to_resume_p99_s": percentile(times, 99),
        "time_to_resume_tinkerrest_p50_s": percentile([seconds for seconds, _ in ours], 50),
        "time_to_resume_tinkerrest_p99_s": percentile([seconds for seconds, _ in ours], 99),
        "round_trips_per_recovery": max(trips),
        "round_trips_per_recovery_min": min(trips),
        "round_trips_per_recovery_rest": max(rest_trips),
        "round_trips_per_recovery_tinkerrest": max(len(window) for _, window in ours),
        "resume_round_trip_s": baseline,
    }


if __name__ == "__main__":  # python benchmarks/_resume.py: the figures, and the requests of one recovery
    print(bench(quick=True))
