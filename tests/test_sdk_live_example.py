"""examples/recovery_live.py, pointed (TINKER_BASE_URL) at the local server instead of the real service: one
injected ``corrupted: true`` poll, a restore from the real checkpoint through the SDK, a second checkpoint from
the recovered client. Without a key it says what it needs and fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinkex_recovery import LINEAGE_KEYS
from tinkex_recovery.simulated import SimulatedTinker, serve

from .http_support import KEY

pytestmark = pytest.mark.sdk

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "recovery_live.py"


def run_example(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
    return subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_without_a_key_it_says_what_it_needs_and_fails() -> None:
    out = run_example({})
    assert out.returncode == 2
    assert "needs TINKER_API_KEY" in out.stderr and "tinkex-recovery serve" in out.stderr
    assert out.stdout == ""


def test_against_the_local_server_it_restores_from_its_checkpoint_and_saves_from_the_new_run(
    sim: SimulatedTinker,
) -> None:
    with serve(sim, KEY) as server:
        out = run_example({"TINKER_API_KEY": KEY, "TINKER_BASE_URL": server.base_url, "TINKER_TELEMETRY": "0"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("restart path proven: True")
    assert KEY not in out.stdout + out.stderr

    old, new = sim.run_ids
    first = f"tinker://{old}/weights/recovery-live-1"
    assert sim.get_training_run(old).corrupted is False  # the corruption was injected client-side only
    [(path, with_optimizer, metadata)] = sim.restore_calls
    assert (path, with_optimizer) == (first, True)
    assert metadata is not None and metadata[LINEAGE_KEYS[0]] == old and metadata["example"] == "recovery_live"
    assert [c.tinker_path for c in sim.list_checkpoints(new).checkpoints] == [f"tinker://{new}/weights/recovery-live-2"]
    assert sim.lineage(new) == [(1, 2, 3, 4), (5, 4, 3, 2)]  # the checkpoint's step, then the recovered one's
