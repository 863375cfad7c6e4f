"""The RL guide's sync snippet (``docs/snippets/rl_sync.py``) runs as a user would run it: its own process,
``python -W error``, the real tinker SDK against the loopback server (``TINKER_BASE_URL``/``TINKER_API_KEY``), its
run corrupted part-way through; every step is trained once, each on samples of the weights that step trained."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tinkex_recovery.simulated import SimulatedTinker, serve

from .http_support import KEY

pytestmark = [pytest.mark.sdk, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["serve", "fail"])
def test_the_rl_guides_sync_loop_trains_every_step_once_on_policy_through_a_corruption(mode: str) -> None:
    sim = SimulatedTinker()
    sim.lost_run_samplers = mode  # type: ignore[assignment]
    with serve(sim, KEY) as server:
        server.keep_alive = False
        env = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
        env.update(TINKER_BASE_URL=server.base_url, TINKER_API_KEY=KEY, TINKER_TELEMETRY="0")
        proc = subprocess.Popen(
            [sys.executable, "-W", "error", str(ROOT / "docs" / "snippets" / "rl_sync.py")],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        corrupted: list[str] = []

        def corrupt_after_the_first_checkpoint() -> None:
            seen = len(server.requests)
            while proc.poll() is None:
                if not server.wait_for_requests(seen + 1, timeout=0.2):  # a bound, so an ended process is noticed
                    continue
                seen += 1
                runs = sim.run_ids
                if runs and sim.list_checkpoints(runs[-1]).checkpoints:
                    sim.hold_samples(1)  # corrupted with the next sample in flight
                    assert sim.wait_for_samples(sim.sample_count + 1, 30)
                    sim.corrupt(runs[-1])
                    sim.release_samples()
                    corrupted.append(runs[-1])
                    return

        injector = threading.Thread(target=corrupt_after_the_first_checkpoint, name="snippet-corruptor")
        injector.start()
        try:
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
            injector.join(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    assert "Warning" not in stderr, stderr
    run_id = sim.run_ids[-1]
    assert corrupted and stdout.strip() == f"30 steps on run {run_id}, 1 recovery(ies)"
    lineage = sim.lineage(run_id)  # each datum: the prompt (step, step + 1), then the sample's tokens but the last
    assert [d[0] for d in lineage[::4]] == list(range(30))  # four samples a step, every step once
    assert all(d[2] == d[0] for d in lineage)  # each sampled from weights holding exactly that step's steps
