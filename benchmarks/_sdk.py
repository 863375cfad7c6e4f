"""Polling against the official SDK: ``tinker.RestClient.get_training_run`` on the same loopback server.

Run last, in its own process, only when ``tinker`` is importable. The SDK is timed the way a monitor loop
uses it (one call at a time, as Tinkex does), and, for reference, with 16 calls in flight (its futures allow
it); the engine is timed again in the same process, so each ratio comes from one run.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections import deque
from typing import Any

from _polling import engine_rate
from _util import API_KEY, run_ids, server_process

IN_FLIGHT = 16


def _sequential(rest: Any, ids: list[str]) -> float:
    start = time.perf_counter()
    for run_id in ids:
        rest.get_training_run(run_id).result()
    return len(ids) / (time.perf_counter() - start)


def _windowed(rest: Any, ids: list[str]) -> float:
    start = time.perf_counter()
    window: deque[Any] = deque()
    for run_id in ids:
        if len(window) == IN_FLIGHT:
            window.popleft().result()
        window.append(rest.get_training_run(run_id))
    for future in window:
        future.result()
    return len(ids) / (time.perf_counter() - start)


def bench(quick: bool) -> dict[str, float]:
    if importlib.util.find_spec("tinker") is None:
        return {}
    os.environ["TINKER_TELEMETRY"] = "0"  # the SDK would otherwise post telemetry to the server
    import tinker

    sample = 100 if quick else 300
    with server_process(1000) as server:
        ids = run_ids(1000)
        rest = tinker.RestClient(base_url=server.base_url, api_key=API_KEY)
        rest.get_training_run(ids[0]).result()  # the SDK's start-up requests, and a connection
        sequential = _sequential(rest, ids[:sample])
        engine = engine_rate(server, ids, 1 if quick else 3)["rate"]
        _windowed(rest, ids[:200])  # opens its connections
        windowed = _windowed(rest, ids)
    return {
        "poll_sdk_runs_per_s": sequential,
        "poll_speedup_vs_sdk": engine / sequential,
        "poll_sdk_16_in_flight_runs_per_s": windowed,
        "poll_speedup_vs_sdk_16_in_flight": engine / windowed,
    }
