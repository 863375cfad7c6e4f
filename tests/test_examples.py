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
