"""The examples run offline and end the way they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_recovery_simulated_prints_a_timeline_and_the_recovered_run() -> None:
    out = run_example("recovery_simulated.py")
    kinds = [line.split()[1] for line in out.splitlines() if line.startswith("  ") and line.split()[0].endswith("s")]
    assert kinds[0] == "detected" and kinds[-1] == "completed" and "failed" in kinds
    last = out.strip().splitlines()[-1]
    assert last.startswith("recovered run id: ") and last.endswith(":train:1")


def test_async_loop_recovers_twice_with_requests_in_flight_and_keeps_its_checkpoint_manager_current() -> None:
    out = run_example("async_loop.py")
    lines = out.splitlines()
    recoveries = [line for line in lines if line.startswith("recovery ")]
    assert len(recoveries) == 2, out
    assert "from 000020, resumed at batch 20" in recoveries[0]
    assert "from 000040, resumed at batch 40" in recoveries[1]
    dropped = [line for line in lines if "future(s) dropped" in line]
    assert len(dropped) == 2 and all(" 0 future(s)" not in line for line in dropped)  # requests were in flight
    assert "the checkpoint manager holds the current client: True" in lines
    assert lines[-1].startswith("finished 60 batches") and lines[-1].endswith("every batch trained exactly once: True")


def test_rl_loop_recovers_twice_with_rollouts_in_flight_and_stays_on_policy() -> None:
    out = run_example("rl_loop.py")
    lines = out.splitlines()
    assert any("rollouts in flight; the server marks run" in line for line in lines), out
    resumed = [line for line in lines if "sampler republished" in line]
    assert [line.split()[1] for line in resumed] == ["15:", "25:"], out
    assert len([line for line in lines if line.startswith("recovery ")]) == 2
    assert "the checkpoint manager holds the current client: True" in lines
    assert "every optimizer step trained once: True" in lines
    assert lines[-1] == "every group trained at step k was sampled from weights holding k-1..k steps: True"
