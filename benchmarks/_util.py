"""Helpers shared by the benchmarks: the loopback server in a child process, timing, percentiles."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tinkex_recovery.simulated import SimulatedTinker

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
API_KEY = "tml-benchmark-key"
_SESSION = "bench"
LATENCY = 0.020  # added to every response: the round trip to the real service is tens of milliseconds


class Server(Protocol):
    """A loopback server the benchmarks poll."""

    base_url: str

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far."""


@dataclass
class ServerProcess:
    """A :func:`tinkex_recovery.simulated.serve` running in a child process (see ``_sim_server.py``)."""

    base_url: str
    process: subprocess.Popen[str]

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server_process(runs: int, latency: float = LATENCY) -> Iterator[ServerProcess]:
    """Serve ``runs`` simulated runs (ids from :func:`run_ids`) from a child process, so the server's
    threads do not compete with the measured client for this process's GIL."""
    cmd = [sys.executable, str(HERE / "_sim_server.py"), "--runs", str(runs), "--latency", str(latency)]
    cmd += ["--api-key", API_KEY]
    process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().split()
        if line[:1] != ["READY"]:
            raise RuntimeError(f"the benchmark server did not start (said {line!r})")
        yield ServerProcess(line[1], process)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def seeded_sim(runs: int) -> SimulatedTinker:
    """A simulated Tinker holding ``runs`` runs, whose ids are :func:`run_ids`."""
    sim = SimulatedTinker(session_id=_SESSION)
    for _ in range(runs):
        sim.create_lora_training_client(base_model="bench/model")
    return sim


def run_ids(n: int) -> list[str]:
    """The ids of the first ``n`` runs of :func:`seeded_sim`, in order."""
    return [f"{_SESSION}:train:{i}" for i in range(n)]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linearly interpolated between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples")
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def rss_bytes() -> int:
    """This process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")
