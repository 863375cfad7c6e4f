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

from tinkex_recovery import LINEAGE_KEYS, FakeClock, RecoveryEngine, RecoveryPolicy
from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, SimulatedTrainingClient, serve

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


def test_the_lineage_is_followed_across_listing_pages(lineage: Lineage) -> None:
    """One run per page: the runs recovered from A and B are on later pages than the unrelated newest run."""
    a, b, c = lineage.runs
    lineage.server.page_size = 1
    code, report = as_json([a], lineage.server)
    assert code == 0 and report["lineage"] == [a, b, c]
    pages = [r for r in lineage.server.requests if r.path == "/api/v1/training_runs"]
    assert len(pages) == len(lineage.sim.run_ids)


def restore(sim: SimulatedTinker, path: str, parent: str, recovery_id: str, created_at: str) -> str:
    """A run as the engine makes it: restored from ``path``, stamped with what made it."""
    metadata = {
        LINEAGE_KEYS[0]: parent,
        LINEAGE_KEYS[1]: path,
        LINEAGE_KEYS[2]: "1",
        LINEAGE_KEYS[3]: recovery_id,
        LINEAGE_KEYS[4]: created_at,
    }
    return str(sim.create_training_client_from_state(path, user_metadata=metadata).result().model_id)


@pytest.fixture
def forked() -> Iterator[tuple[SimulatedServer, list[str]]]:
    """Run A lost; recovery X made B (and, by an attempt it abandoned, the orphan O); another process's recovery
    Y made F, sent later than B, and F trained on (its last request is the newest)."""
    sim = SimulatedTinker()
    first = run_with_checkpoints(sim)
    a = first.model_id
    path = f"tinker://{a}/weights/0004"
    sim.corrupt(a)
    o = restore(sim, path, a, "x" * 32, "2026-01-01T00:00:01.000000Z")
    f = restore(sim, path, a, "y" * 32, "2026-01-01T00:00:02.000000Z")
    b = restore(sim, path, a, "x" * 32, "2026-01-01T00:00:00.000000Z")  # made last, sent first
    train(sim_client(sim, f), [9])  # F saw the last request: today's rule (the latest request) would pick it
    with serve(sim, KEY) as server:
        server.keep_alive = False
        yield server, [a, o, b, f]


def sim_client(sim: SimulatedTinker, run_id: str) -> SimulatedTrainingClient:
    return SimulatedTrainingClient(sim, run_id)


def test_a_fork_is_shown_and_exits_4_and_the_earliest_made_run_continues(
    forked: tuple[SimulatedServer, list[str]],
) -> None:
    server, (a, o, b, f) = forked
    code, report = as_json([a], server)
    assert code == 4 and report["forked"] is True
    assert report["lineage"] == [a, b]  # the earliest sent of the runs recovered from A continues
    assert sorted((r["run_id"], r["kind"], r["continues"]) for r in report["orphans"]) == sorted(
        [(o, "orphan", b), (f, "fork", b)]
    )
    code, out, err = status(f, server=server)  # asked from the fork's loser: it is told who continues
    assert code == 4 and err == "" and f"{b} continues" in out and "FORKED" in out
