"""``tinkex-recovery status``, run as a user would (the installed console script, in another process) against the
loopback server: a lineage the engine recovered twice is shown whole from its oldest and from its newest run,
a corrupted newest run exits 3, and every error is one line with exit 2 (or 1), no traceback and no key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tinkex_recovery import FakeClock, RecoveryEngine, RecoveryPolicy
from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve

from .helpers import run_with_checkpoints, train
from .http_support import KEY, WRONG_KEY

COMMAND = [str(Path(sys.executable).parent / "tinkex-recovery"), "status"]
POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0)


@dataclass
class Lineage:
    sim: SimulatedTinker
    server: SimulatedServer
    runs: list[str]  #: oldest first


@pytest.fixture
def lineage() -> Iterator[Lineage]:
    """Run A (checkpoints at steps 2 and 4) lost and recovered as B, B trained on and lost, recovered as C, which
    saves checkpoints at steps 6 and 8 with a loss; two unrelated runs beside them in the account."""
    sim = SimulatedTinker()
    sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")  # an unrelated run, listed before the lineage
    first = run_with_checkpoints(sim)
    with RecoveryEngine(POLICY, clock=FakeClock()) as engine:
        handle = engine.watch(first.model_id, sim)
        runs = [first.model_id]
        for _ in range(2):
            sim.corrupt(handle.run_id)
            engine.poll_once()
            recovery = handle.wait_for_recovery(timeout=10)
            runs.append(recovery.new_run_id)
            client = recovery.client
            train(client, [4, 5])
            if len(runs) == 2:
                client.save_state("0006", user_metadata={"step": "6"}).result()
        for step in (6, 8):
            client.save_state(f"c{step:04d}", user_metadata={"step": str(step), "loss": str(1 / step)}).result()
    sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")  # another unrelated run, listed after
    with serve(sim, KEY) as server:
        server.keep_alive = False  # no server thread outlives the request it serves
        yield Lineage(sim, server, runs)


def status(
    *args: str, env: dict[str, str] | None = None, server: SimulatedServer | None = None
) -> tuple[int, str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
    if server is not None:
        environ |= {"TINKER_BASE_URL": server.base_url, "TINKER_API_KEY": KEY}
    environ |= env or {}
    out = subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environ,
        stdin=subprocess.DEVNULL,
    )
    return out.returncode, out.stdout, out.stderr


def as_json(args: list[str], server: SimulatedServer) -> tuple[int, dict[str, Any]]:
    code, out, err = status(*args, "--json", server=server)
    assert err == "" and len(out.splitlines()) == 1, (out, err)
    return code, json.loads(out)


def test_the_oldest_and_the_newest_run_show_the_same_whole_lineage(lineage: Lineage) -> None:
    a, b, c = lineage.runs
    reports = {}
    for queried in (a, c):
        code, report = as_json([queried], lineage.server)
        assert code == 0
        assert report.pop("queried_run_id") == queried
        reports[queried] = report
    assert reports[a] == reports[c]
    report = reports[a]
    assert report["run_id"] == c and report["corrupted"] is False
    assert report["lineage"] == [a, b, c]
    assert [(r["run_id"], r["corrupted"], r["recovered_from_run"]) for r in report["runs"]] == [
        (a, True, None),
        (b, True, a),
        (c, False, b),
    ]
    assert report["runs"][2]["recovered_from_checkpoint"] == f"tinker://{b}/weights/0006"
    assert [(k["tinker_path"], k["step"], k["metrics"]) for k in report["checkpoints"]] == [
        (f"tinker://{c}/weights/c0008", 8, {"loss": 0.125}),
        (f"tinker://{c}/weights/c0006", 6, {"loss": pytest.approx(1 / 6)}),
    ]


def test_the_middle_run_too_and_the_report_reads_for_a_person(lineage: Lineage) -> None:
    a, b, c = lineage.runs
    code, out, err = status(b, server=lineage.server)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"Lineage of run {b}, oldest first (3 run(s)):"
    assert [line.split()[:2] for line in lines[1:4]] == [[a, "corrupted"], [b, "corrupted"], [c, "healthy"]]
    assert lines[3].endswith(f"recovered from tinker://{b}/weights/0006")
    assert lines[4] == f"Newest run: {c}, healthy"
    assert lines[5] == f"Restorable checkpoints of {c}, newest first:"
    assert lines[6].split() == ["STEP", "SAVED", "(UTC)", "TINKER", "PATH", "METRICS"]
    assert lines[7].split()[0] == "8" and lines[7].split()[3:] == [f"tinker://{c}/weights/c0008", "loss=0.125"]
    assert len(lines) == 9


def test_a_corrupted_newest_run_exits_3(lineage: Lineage) -> None:
    a, _, c = lineage.runs
    lineage.sim.corrupt(c)
    code, report = as_json([a], lineage.server)
    assert code == 3 and report["run_id"] == c and report["corrupted"] is True
    code, out, _ = status(c, server=lineage.server)
    assert code == 3 and f"Newest run: {c}, CORRUPTED" in out


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        ([], {"TINKER_API_KEY": WRONG_KEY}, 2, "HTTP 401 Unauthorized (the API key was rejected)"),
        (["--api-key", WRONG_KEY], {}, 2, "HTTP 401 Unauthorized (the API key was rejected)"),
        ([], {"TINKER_API_KEY": ""}, 2, "no Tinker API key"),
        (["--base-url", "http://127.0.0.1:9"], {}, 1, "ConnectError"),
    ],
    ids=["wrong-key", "wrong-key-flag", "no-key", "unreachable"],
)
def test_errors_are_one_clean_line(
    lineage: Lineage, args: list[str], env: dict[str, str], code: int, message: str
) -> None:
    got, out, err = status(lineage.runs[0], *args, env=env, server=lineage.server)
    assert got == code and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("tinkex-recovery status: error: ") and message in err
    assert "Traceback" not in err and KEY not in err and WRONG_KEY not in err


def test_an_unknown_run_and_a_malformed_run_id_exit_2(lineage: Lineage) -> None:
    code, out, err = status("no-such-run:train:0", server=lineage.server)
    assert (code, out) == (2, "") and "HTTP 404 Not Found" in err and len(err.splitlines()) == 1
    code, out, err = status("not a run id", server=lineage.server)
    assert (code, out) == (2, "") and "invalid run id" in err and len(err.splitlines()) == 1
    code, _, err = status(server=lineage.server)  # no RUN_ID: argparse's usage error
    assert code == 2 and "RUN_ID" in err


@pytest.mark.parametrize("status_code", [401, 400])
def test_a_server_echoing_the_key_does_not_get_it_printed(lineage: Lineage, status_code: int) -> None:
    lineage.server.echo_key_next(5, status_code)
    code, out, err = status(lineage.runs[0], server=lineage.server)
    assert code == (2 if status_code == 401 else 1) and out == "" and len(err.splitlines()) == 1
    assert f"HTTP {status_code}" in err and "***" in err and KEY not in err
