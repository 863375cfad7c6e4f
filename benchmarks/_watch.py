"""``tinkex-recovery watch`` of many runs: how soon the first event is printed.

200 runs on the loopback server (in this process, 20 ms added to every response), the last one corrupted; the
console script in a subprocess, from its start to its first stdout line (the ``detected`` of that run), median
of several, less the baseline timed the same way and alternating: the interpreter starting and importing the
CLI, ``tinkex-recovery --help`` (on a loaded machine that start alone can take more than a second).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tinkex_recovery.simulated import SimulatedTinker, serve

API_KEY = "tml-benchmark-watch-key-0000"
COMMAND = str(Path(sys.executable).parent / "tinkex-recovery")


def _first_line_s(runs: list[str], base_url: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
    env |= {"TINKER_BASE_URL": base_url, "TINKER_API_KEY": API_KEY}
    start = time.perf_counter()
    with subprocess.Popen(
        [COMMAND, "watch", *runs, "--interval", "3600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        took = time.perf_counter() - start
        proc.terminate()
        proc.wait(30)
    if "detected" not in line:
        raise RuntimeError(f"unexpected first line: {line!r}")
    return took


def _help_s() -> float:
    start = time.perf_counter()
    subprocess.run([COMMAND, "--help"], check=True, capture_output=True)
    return time.perf_counter() - start


def bench(quick: bool) -> dict[str, float]:
    sim = SimulatedTinker()
    runs = [sim.create_lora_training_client(base_model="bench/model").model_id for _ in range(200)]
    sim.corrupt(runs[-1])
    firsts, helps = [], []
    with serve(sim, api_key=API_KEY) as server:
        server.latency = 0.020
        for _ in range(2 if quick else 7):
            firsts.append(_first_line_s(runs, server.base_url))
            helps.append(_help_s())
    first, cli = statistics.median(firsts), statistics.median(helps)
    return {
        "watch_first_event_s_200_runs": first - cli,  # beyond the interpreter's and the CLI's own start
        "watch_first_line_wall_s_200_runs": first,
        "watch_cli_start_s": cli,
    }
