"""Detection latency: from ``corrupt()`` on the server to the ``detected`` event.

By polling (``poll_interval`` = 1 s, many runs corrupted at random moments: expect uniform within the
interval, plus one round trip), and by the guard's immediate poll after a step fails (expect one round trip).
The server runs in this process: at these request rates it is nowhere near a bottleneck, and ``corrupt()``
is then a plain call whose moment is known exactly.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from _util import API_KEY, LATENCY, percentile

from tinkex_recovery import EventKind, RecoveryEngine, RecoveryEvent, RecoveryPolicy, recovery_guard
from tinkex_recovery.rest import TinkerRest
from tinkex_recovery.simulated import SimulatedTinker, serve

POLL_INTERVAL = 1.0


def by_polling(samples: int, spread: float) -> list[float]:
    """Seconds from corruption to detection for ``samples`` runs, corrupted at moments spread evenly over
    ``spread`` seconds (a whole number of intervals) while the engine polls them every second."""
    sim = SimulatedTinker()
    clients = [sim.create_lora_training_client(base_model="bench/model") for _ in range(samples)]
    for client in clients:
        client.save_state("0001", user_metadata={"step": "1"}).result()
    detected: dict[str, float] = {}
    all_detected = threading.Event()

    def on_event(event: RecoveryEvent) -> None:
        if event.kind is EventKind.DETECTED:
            detected.setdefault(event.run_id, time.perf_counter())
            if len(detected) == samples:
                all_detected.set()

    rng = random.Random(7)
    corrupted_at: dict[str, float] = {}
    policy = RecoveryPolicy(enabled=True, poll_interval=POLL_INTERVAL, backoff=0.0, max_backoff=0.0)
    with serve(sim, api_key=API_KEY) as server:
        server.latency = LATENCY
        with (
            TinkerRest(api_key=API_KEY, base_url=server.base_url) as rest,
            RecoveryEngine(policy, status=rest) as engine,
        ):
            engine.subscribe(on_event)
            for client in clients:
                engine.watch(client.model_id, sim)
            # Opens the connections now, so no sample pays for a TCP handshake.
            engine.poll_once()
            start = time.perf_counter()
            # Evenly spaced moments over whole intervals (stratified, so few samples cover the interval evenly),
            # handed to the runs in random order.
            moments = [(i + 0.5) * spread / samples for i in range(samples)]
            rng.shuffle(moments)
            plan = sorted(zip(moments, (client.model_id for client in clients), strict=True))
            for offset, run_id in plan:
                time.sleep(max(0.0, start + offset - time.perf_counter()))
                sim.corrupt(run_id)
                corrupted_at[run_id] = time.perf_counter()
            if not all_detected.wait(timeout=POLL_INTERVAL * 10):
                raise RuntimeError(f"only {len(detected)} of {samples} corruptions were detected")
    return [detected[run_id] - corrupted_at[run_id] for run_id in corrupted_at]


class _DetectedLog(logging.Handler):
    """Timestamps the ``detected`` events logged to ``tinkex_recovery`` (the guard's engine is private)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if ": detected" in record.getMessage():
            self.times.append(time.perf_counter())


def by_error(samples: int) -> list[float]:
    """Seconds from a step failing on a corrupted run to the ``detected`` event, under ``recovery_guard``
    (whose background poll is an hour away: only the guard's own poll after the failure can detect)."""
    sim = SimulatedTinker()
    client = sim.create_lora_training_client(base_model="bench/model")
    policy = RecoveryPolicy(  # one lineage recovered many times on purpose: no budget
        enabled=True, poll_interval=3600.0, backoff=0.0, max_backoff=0.0, max_recoveries=None, max_no_progress=None
    )
    log = _DetectedLog()
    logger = logging.getLogger("tinkex_recovery")
    logger.addHandler(log)
    level = logger.level
    logger.setLevel(logging.INFO)  # `detected` is a step of a recovery: an INFO line
    failed_at: list[float] = []
    every = 3  # a corruption every third step; each step saves a checkpoint, so one step is trained again
    try:
        with (
            serve(sim, api_key=API_KEY) as server,
            TinkerRest(api_key=API_KEY, base_url=server.base_url) as rest,
        ):
            server.latency = LATENCY
            with recovery_guard(client.model_id, sim, client=client, policy=policy, status=rest) as guard:
                corrupt_at = {i * every + 1 for i in range(samples)}
                for step in guard.steps(range(samples * every + 1)):
                    with step:
                        if step.index in corrupt_at:
                            corrupt_at.discard(step.index)
                            sim.corrupt(guard.run_id)
                            failed_at.append(time.perf_counter())
                        guard.client.forward_backward([step.index]).result()
                        guard.client.optim_step().result()
                        guard.save_state(f"{step.index + 1:06d}", step=step.index + 1)
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)
    if len(log.times) != len(failed_at):
        raise RuntimeError(f"{len(failed_at)} failed steps but {len(log.times)} detections")
    return [d - f for d, f in zip(log.times, failed_at, strict=True)]


def bench(quick: bool) -> dict[str, float]:
    samples, spread = (60, 2.0) if quick else (300, 6.0)
    polled = by_polling(samples, spread)
    failed = by_error(15 if quick else 60)
    return {
        "detection_samples": len(polled),
        "detection_latency_p50_s": percentile(polled, 50),
        "detection_latency_p99_s": percentile(polled, 99),
        "detection_latency_max_s": max(polled),
        "detection_by_error_samples": len(failed),
        "detection_by_error_p50_s": percentile(failed, 50),
        "detection_by_error_p99_s": percentile(failed, 99),
    }
