"""``tinkex-recovery watch``, run as a user would (the installed console script, in another process) against the
loopback server: it streams a ``detected`` JSON line when a watched run is corrupted, restores nothing, and
Ctrl-C ends it with exit 0 and no traceback. Waits are on the process's output lines, bounded in time."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import pytest

from tinkex_recovery import EventKind, FakeClock, RecoveryEngine, RecoveryEvent, RecoveryPolicy
from tinkex_recovery._cli_watch import EventPrinter
from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve

from .helpers import WAIT, run_with_checkpoints
from .http_support import KEY, WRONG_KEY

COMMAND = [str(Path(sys.executable).parent / "tinkex-recovery"), "watch"]


class Lines:
    """The lines a pipe yields, read by a thread that ends when the pipe closes."""

    def __init__(self, pipe: IO[str]) -> None:
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), name="test-pipe-reader")
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._lines.put(line)
        self._lines.put("")

    def next(self, timeout: float = WAIT) -> str:
        line = self._lines.get(timeout=timeout)
        self.seen.append(line)
        return line

    def until(self, predicate: object, timeout: float = WAIT) -> str:
        assert callable(predicate)
        while True:
            line = self.next(timeout)
            assert line, f"the process closed the pipe; lines so far: {self.seen}"
            if predicate(line):
                return line

    def rest(self) -> list[str]:
        self._thread.join(WAIT)
        out = []
        while not self._lines.empty():
            out.append(self._lines.get())
        return [line for line in out if line]


@pytest.fixture
def server(sim: SimulatedTinker) -> Iterator[SimulatedServer]:
    with serve(sim, KEY) as server:
        server.keep_alive = False
        yield server


@contextlib.contextmanager
def start(*args: str, server: SimulatedServer, key: str = KEY) -> Iterator[subprocess.Popen[str]]:
    """``tinkex-recovery watch ARGS`` against ``server``; killed if still running when the block ends."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
    environ |= {"TINKER_BASE_URL": server.base_url, "TINKER_API_KEY": key}
    with subprocess.Popen(
        [*COMMAND, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=environ,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)


def test_watch_streams_detected_when_the_run_is_corrupted_and_stops_cleanly_on_ctrl_c(
    sim: SimulatedTinker, server: SimulatedServer
) -> None:
    healthy = run_with_checkpoints(sim)
    lost = run_with_checkpoints(sim)
    with start(healthy.model_id, lost.model_id, "--interval", "0.05", "--json", server=server) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        assert err.next().startswith("watching 2 run(s), polling every 0.05s")
        sim.corrupt(lost.model_id)
        detected = json.loads(out.until(lambda line: json.loads(line)["kind"] == "detected"))
        assert detected["run_id"] == lost.model_id and datetime.fromisoformat(detected["time"]).tzinfo is not None
        selected = json.loads(out.until(lambda line: json.loads(line)["kind"] == "checkpoint_selected"))
        assert selected["checkpoint"] == f"tinker://{lost.model_id}/weights/0004"  # what it would restore
        # Three more polls of each run: time enough for a restore to show, had one been tried.
        assert server.wait_for_requests(len(server.requests) + 6, timeout=WAIT)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0
        lines = [json.loads(line) for line in [*out.seen, *out.rest()]]
        stderr = "".join([*err.seen, *err.rest()])
    assert all({"time", "kind", "run_id"} <= set(line) for line in lines)
    assert {line["run_id"] for line in lines} == {lost.model_id}  # the healthy run has nothing to report
    # Observe only: it said what it would restore, and never started a restore.
    assert {line["kind"] for line in lines} <= {"detected", "checkpoint_selected"}
    assert stderr.endswith("stopped\n") and "Traceback" not in stderr and KEY not in stderr


def test_sigterm_stops_it_too_and_text_lines_read_as_the_log_does(
    sim: SimulatedTinker, server: SimulatedServer
) -> None:
    run = run_with_checkpoints(sim)
    sim.corrupt(run.model_id)  # already lost: reported by the first poll, at start
    with start(run.model_id, "--interval", "3600", server=server) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        out = Lines(proc.stdout)
        line = out.until(lambda line: ": detected" in line)
        assert line.split(" ", 1)[1].startswith(f"run {run.model_id}: detected")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        out.rest()
        assert "Traceback" not in proc.stderr.read()


@pytest.mark.parametrize(
    ("run_id", "key", "message"),
    [
        (None, WRONG_KEY, "HTTP 401 Unauthorized (the API key was rejected)"),
        ("no-such-run:train:0", KEY, "HTTP 404 Not Found"),
    ],
    ids=["wrong-key", "unknown-run"],
)
def test_a_run_that_cannot_be_read_is_one_line_and_exit_2(
    sim: SimulatedTinker, server: SimulatedServer, run_id: str | None, key: str, message: str
) -> None:
    run_id = run_id or run_with_checkpoints(sim).model_id
    with start(run_id, server=server, key=key) as proc:
        out, err = proc.communicate(timeout=WAIT * 3)
    assert proc.returncode == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("tinkex-recovery watch: error: ") and message in err
    assert KEY not in err and WRONG_KEY not in err


def test_bad_arguments_are_usage_errors(server: SimulatedServer) -> None:
    for args in (["--interval", "0", "run:train:0"], ["not a run id"], []):
        with start(*args, server=server) as proc:
            _, err = proc.communicate(timeout=WAIT * 3)
        assert proc.returncode == 2 and "usage:" in err and "Traceback" not in err


def test_json_lines_carry_every_field_an_event_has() -> None:
    out = io.StringIO()
    printer = EventPrinter(out, as_json=True, now=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    printer(RecoveryEvent(EventKind.POLL_ERROR, "r:train:0", error="HTTP 503"))
    printer(
        RecoveryEvent(EventKind.CHECKPOINT_SELECTED, "r:train:0", attempt=1, checkpoint="tinker://r:train:0/weights/a")
    )
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"time": "2026-01-01T00:00:00.000+00:00", "kind": "poll_error", "run_id": "r:train:0", "attempt": 0,
         "error": "HTTP 503"},
        {"time": "2026-01-01T00:00:00.000+00:00", "kind": "checkpoint_selected", "run_id": "r:train:0", "attempt": 1,
         "checkpoint": "tinker://r:train:0/weights/a", "resumable": True},
    ]  # fmt: skip


def test_watch_follows_the_lineage_to_the_recovered_run_and_reports_its_loss_too(
    sim: SimulatedTinker, server: SimulatedServer, clock: FakeClock
) -> None:
    first = run_with_checkpoints(sim)
    with start(first.model_id, "--interval", "0.05", "--json", server=server) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        assert err.next().startswith("watching 1 run(s)")
        sim.corrupt(first.model_id)
        out.until(lambda line: json.loads(line)["kind"] == "detected")
        # The training process recovers the run (its engine stamps the new run's lineage metadata).
        trainer = RecoveryEngine(RecoveryPolicy(enabled=True, poll_interval=3600), clock=clock)
        with trainer:
            handle = trainer.watch(first.model_id, sim)
            handle.check_now()
            recovery = handle.wait_for_recovery(timeout=WAIT)
        completed = json.loads(out.until(lambda line: json.loads(line)["kind"] == "completed"))
        assert completed["run_id"] == first.model_id and completed["new_run_id"] == recovery.new_run_id
        assert completed["checkpoint"] == recovery.checkpoint.tinker_path
        sim.corrupt(recovery.new_run_id)  # the next loss of the same job is reported too
        detected = json.loads(out.until(lambda line: json.loads(line)["kind"] == "detected"))
        assert detected["run_id"] == recovery.new_run_id
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0
    assert sim.restore_calls == [(recovery.checkpoint.tinker_path, True, sim.restore_calls[0][2])]  # the trainer's


def test_watch_reads_its_runs_concurrently_before_watching(sim: SimulatedTinker, server: SimulatedServer) -> None:
    runs = [sim.create_lora_training_client(base_model="m").model_id for _ in range(200)]
    server.latency = 0.02
    with start(*runs, "--interval", "3600", server=server) as proc:
        assert proc.stderr is not None
        err = Lines(proc.stderr)
        # Printed once every run has been read: ~2 s of a cold CLI process and 200 reads on a quiet machine, so
        # the bound allows for a loaded one, as the other whole-process waits here do.
        assert err.next(timeout=WAIT * 3).startswith("watching 200 run(s)")
        assert server.peak_in_flight >= 8  # the reads overlapped (one by one they took 200 round trips)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0
