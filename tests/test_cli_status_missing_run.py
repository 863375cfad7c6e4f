"""``tinkex-recovery status`` on a lineage whose oldest run is gone (deleted, its polls answer 404): the report
still shows the whole lineage, the gone run as ``not found`` and, in ``--json``, with ``"found": false`` while
every run that answered is ``"found": true``. Run in-process over real HTTP on loopback, through the command's
own argument parser."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tinkex_recovery import FakeClock, RecoveryEngine, RecoveryPolicy
from tinkex_recovery._cli_status import add_status_arguments, run_status
from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve

from .helpers import WAIT, run_with_checkpoints
from .http_support import KEY

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0)


@dataclass
class GoneOrigin:
    server: SimulatedServer
    gone: str  #: the deleted first run
    recovered: str  #: the run it was recovered as


@pytest.fixture
def gone_origin() -> Iterator[GoneOrigin]:
    sim = SimulatedTinker()
    first = run_with_checkpoints(sim)
    with RecoveryEngine(POLICY, clock=FakeClock()) as engine:
        handle = engine.watch(first.model_id, sim)
        sim.corrupt(first.model_id)
        engine.poll_once()
        recovered = handle.wait_for_recovery(timeout=WAIT).new_run_id
    sim.delete_run(first.model_id)
    with serve(sim, KEY) as server:
        server.keep_alive = False
        yield GoneOrigin(server, first.model_id, recovered)


def status(origin: GoneOrigin, *args: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="tinkex-recovery status")
    add_status_arguments(parser)
    parsed = parser.parse_args([*args, "--base-url", origin.server.base_url, "--api-key", KEY])
    out, err = io.StringIO(), io.StringIO()
    code = run_status(parsed, out, err)
    return code, out.getvalue(), err.getvalue()


def test_json_marks_the_gone_run_not_found_and_the_others_found(gone_origin: GoneOrigin) -> None:
    code, out, err = status(gone_origin, gone_origin.recovered, "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["lineage"] == [gone_origin.gone, gone_origin.recovered]
    assert [(r["run_id"], r["found"]) for r in report["runs"]] == [
        (gone_origin.gone, False),
        (gone_origin.recovered, True),
    ]
    assert report["runs"][0]["corrupted"] is None and report["runs"][1]["corrupted"] is False


def test_the_report_shows_the_gone_run_as_not_found(gone_origin: GoneOrigin) -> None:
    code, out, _ = status(gone_origin, gone_origin.recovered)
    assert code == 0
    gone_line = next(line for line in out.splitlines() if line.strip().startswith(gone_origin.gone))
    assert gone_line.split()[1:] == ["not", "found"]
