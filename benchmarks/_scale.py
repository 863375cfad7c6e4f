"""Scale: memory and threads while one engine watches (and has polled) many runs.

The status source is the in-memory simulated Tinker (the HTTP client starts no thread of its own, and polling
10,000 runs over a 20 ms round trip would only add waiting). The runs exist before the first measurement, so
what grows is the engine's own state: one lineage and one handle per run, and the garbage of a poll cycle.
"""

from __future__ import annotations

import gc
import threading

from _util import rss_bytes

from tinkex_recovery import RecoveryEngine, RecoveryPolicy
from tinkex_recovery.simulated import SimulatedTinker

_POLICY = RecoveryPolicy(enabled=True, poll_interval=3600.0)
MANY = 10_000


def _threads_watching(sim: SimulatedTinker, run_ids: list[str]) -> int:
    """Threads alive while an engine watches ``run_ids`` and has polled each once."""
    with RecoveryEngine(_POLICY, status=sim) as engine:
        for run_id in run_ids:
            engine.watch(run_id, sim)
        engine.poll_once()
        return threading.active_count()


def bench(quick: bool) -> dict[str, float]:
    sim = SimulatedTinker()
    run_ids = [sim.create_lora_training_client(base_model="bench/model").model_id for _ in range(MANY)]
    threads_before = threading.active_count()
    threads_few = _threads_watching(sim, run_ids[:10])
    gc.collect()
    before = rss_bytes()
    with RecoveryEngine(_POLICY, status=sim) as engine:
        handles = [engine.watch(run_id, sim) for run_id in run_ids]  # kept, as an application would
        engine.poll_once()
        threads_many = threading.active_count()
        gc.collect()
        after = rss_bytes()
        assert len(handles) == MANY
    return {
        "threads_before_engine": threads_before,
        "threads_at_10_runs": threads_few,
        "threads_at_10000_runs": threads_many,
        "rss_mb_per_1000_runs": (after - before) / (MANY / 1000) / 2**20,
    }
