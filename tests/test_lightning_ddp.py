"""TinkexRecovery under real 2-process DDP on CPU (gloo): one poll on rank 0 makes both ranks swap at the same
batch. The ranks are launched here as two plain processes (see lightning_ddp_worker.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lightning

WORKER = Path(__file__).with_name("lightning_ddp_worker.py")
DEADLINE = 90.0  # seconds for both ranks, most of it importing Lightning twice on a shared 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_one_rank0_poll_makes_every_rank_swap_at_the_same_batch(tmp_path: Path) -> None:
    port = free_port()
    procs = []
    logs = [(tmp_path / f"rank{rank}.log").open("w") for rank in (0, 1)]
    for rank in (0, 1):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(tmp_path / f"rank{rank}.json")],
                env=env,
                cwd=tmp_path,
                stdout=logs[rank],
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.monotonic() + DEADLINE
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    output = "\n\n".join((tmp_path / f"rank{rank}.log").read_text()[-3000:] for rank in (0, 1))
    assert [p.returncode for p in procs] == [0, 0], output

    r0, r1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    # Only rank 0 polled (at least the check after the loss); rank 1 never asked the server.
    assert r0["polls"] >= 1 and r1["polls"] == 0
    for r in (r0, r1):
        first = r["used"][0][1]
        new = r["final"]
        assert new != first and r["global_step"] == 8
        # Lost after batch 4 on both ranks; both swapped before batch 5, none sent a batch to the lost run.
        assert r["used"] == [[b, first] for b in range(5)] + [[b, new] for b in range(5, 8)]
        assert r["hook_calls"] == [[5, new, f"tinker://{first}/weights/0004"]]
        assert r["restores"] == [f"tinker://{first}/weights/0004"]
    # The same session id on both simulated services gives the same run ids: each rank restored its own.
    assert r0["final"] == r1["final"]
    for r in (r0, r1):
        # The new run holds checkpoint 0004 (batches 0-3) and then batches 5-7: batch 4 was lost with the run.
        assert r["lineage"] == [item for batch in r["batches"][:4] + r["batches"][5:] for item in batch]
    assert sorted(item for r in (r0, r1) for batch in r["batches"] for item in batch) == list(range(16))
    assert [rec["checkpoint"] for rec in r0["state"]["lineage"]] == r0["restores"]
