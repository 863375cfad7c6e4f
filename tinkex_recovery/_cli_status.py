"""``tinkex-recovery status RUN_ID [--json]``: a run's whole lineage, whether its newest run is corrupted, and
what that run could be restored from.

The lineage is followed back through each run's user_metadata ``tinkex_recovery.recovered_from_run`` (written
on every recovered run), and forward by finding, in the account's training-runs listing, the runs recovered
from the newest one known (when several were, the one that saw a request last). Exit status: 0 when the newest
run is healthy, 3 when it is corrupted, 2 and 1 as in :mod:`._cli_common`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from ._cli_common import EXIT_CORRUPTED, EXIT_OK, add_connection_arguments, connect, fail
from ._exceptions import RunNotFound
from ._models import Checkpoint, TrainingRun, validate_run_id
from ._recovery import LINEAGE_KEYS
from ._rest import TinkerRest

__all__ = ["LineageReport", "add_status_arguments", "lineage_report", "run_status"]

_FROM_RUN, _FROM_CHECKPOINT = LINEAGE_KEYS[0], LINEAGE_KEYS[1]
_PAGE = 100  # runs per listing page, as the SDK's own `tinker run list` asks
_MAX_PAGES = 1000
_MAX_RUNS = 10_000  # a lineage longer than this is a loop in the metadata, not a history


@dataclass(frozen=True, slots=True)
class LineageRun:
    """One run of a lineage. ``run`` is None when the run is named by its successor but not found."""

    run_id: str
    run: TrainingRun | None

    @property
    def corrupted(self) -> bool | None:
        return self.run.corrupted if self.run is not None else None

    def recovered_from(self, key: str) -> str | None:
        return (self.run.user_metadata or {}).get(key) if self.run is not None else None


@dataclass(frozen=True, slots=True)
class LineageReport:
    """What ``status`` found: the lineage oldest first, and the newest run's restorable checkpoints."""

    queried: str
    runs: list[LineageRun]
    checkpoints: list[Checkpoint] = field(default_factory=list)

    @property
    def newest(self) -> LineageRun:
        return self.runs[-1]

    @property
    def corrupted(self) -> bool:
        return bool(self.newest.corrupted)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.newest.run_id,
            "queried_run_id": self.queried,
            "corrupted": self.corrupted,
            "lineage": [r.run_id for r in self.runs],
            "runs": [
                {
                    "run_id": r.run_id,
                    "found": r.run is not None,
                    "corrupted": r.corrupted,
                    "recovered_from_run": r.recovered_from(_FROM_RUN),
                    "recovered_from_checkpoint": r.recovered_from(_FROM_CHECKPOINT),
                }
                for r in self.runs
            ],
            "checkpoints": [
                {
                    "tinker_path": c.tinker_path,
                    "checkpoint_id": c.checkpoint_id,
                    "step": c.step,
                    "time": c.time.isoformat(),
                    "expires_at": c.expires_at.isoformat() if c.expires_at else None,
                    "metrics": _metrics(c),
                }
                for c in self.checkpoints
            ],
        }


def _metrics(checkpoint: Checkpoint) -> dict[str, float]:
    """The numeric user_metadata entries other than the step (what ``recovery_guard.save_state`` records)."""
    out: dict[str, float] = {}
    for key, value in (checkpoint.user_metadata or {}).items():
        if key == "step":
            continue
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def newest_successor(successors: list[TrainingRun]) -> TrainingRun:
    """Of the runs recovered from one run, the one the lineage goes on with: the one that saw a request last."""
    return max(successors, key=lambda r: (r.last_request_time, r.training_run_id))


def successors_by_parent(rest: TinkerRest) -> dict[str, list[TrainingRun]]:
    """Every run of the account that was recovered from another, by the run it was recovered from."""
    children: dict[str, list[TrainingRun]] = defaultdict(list)
    for run in _all_runs(rest):
        if (parent := (run.user_metadata or {}).get(_FROM_RUN)) is not None:
            children[parent].append(run)
    return children


def _all_runs(rest: TinkerRest) -> list[TrainingRun]:
    runs: list[TrainingRun] = []
    for _ in range(_MAX_PAGES):
        page = rest.list_training_runs(limit=_PAGE, offset=len(runs))
        runs += page.training_runs
        cursor = page.cursor
        if not page.training_runs or cursor is None or len(runs) >= cursor.total_count:
            break
    return runs


def lineage_report(rest: TinkerRest, run_id: str, *, now: datetime | None = None) -> LineageReport:
    """Follow ``run_id``'s lineage back and forward, and list its newest run's restorable checkpoints."""
    start = rest.get_training_run(validate_run_id(run_id))
    runs = [LineageRun(start.training_run_id, start)]
    seen = {start.training_run_id}
    while len(runs) < _MAX_RUNS and (parent := runs[0].recovered_from(_FROM_RUN)) and parent not in seen:
        seen.add(parent)
        try:
            runs.insert(0, LineageRun(parent, rest.get_training_run(validate_run_id(parent))))
        except (RunNotFound, ValueError):
            runs.insert(0, LineageRun(parent, None))  # named by its successor, but gone (or never a run id)
            break
    children = successors_by_parent(rest)
    while len(runs) < _MAX_RUNS:
        successors = [r for r in children.get(runs[-1].run_id, []) if r.training_run_id not in seen]
        if not successors:
            break
        successor = newest_successor(successors)
        seen.add(successor.training_run_id)
        runs.append(LineageRun(successor.training_run_id, successor))
    now = now or datetime.now(UTC)
    listed = rest.list_checkpoints(runs[-1].run_id).checkpoints
    restorable = sorted((c for c in listed if c.restorable and not c.expired(now)), key=lambda c: c.time, reverse=True)
    return LineageReport(run_id, runs, restorable)


def render(report: LineageReport, out: TextIO) -> None:
    """The human-readable report."""
    print(f"Lineage of run {report.queried}, oldest first ({len(report.runs)} run(s)):", file=out)
    width = max(len(r.run_id) for r in report.runs)
    for r in report.runs:
        state = {True: "corrupted", False: "healthy", None: "not found"}[r.corrupted]
        line = f"  {r.run_id:<{width}}  {state:<9}"
        if (source := r.recovered_from(_FROM_CHECKPOINT) or r.recovered_from(_FROM_RUN)) is not None:
            line += f"  recovered from {source}"
        print(line.rstrip(), file=out)
    newest = report.newest
    print(f"Newest run: {newest.run_id}, {'CORRUPTED' if report.corrupted else 'healthy'}", file=out)
    if not report.checkpoints:
        print(f"Restorable checkpoints of {newest.run_id}: none", file=out)
        return
    print(f"Restorable checkpoints of {newest.run_id}, newest first:", file=out)
    rows = [("STEP", "SAVED (UTC)", "TINKER PATH", "METRICS")]
    for c in report.checkpoints:
        metrics = " ".join(f"{k}={v:g}" for k, v in sorted(_metrics(c).items()))
        step = "?" if c.step is None else str(c.step)
        rows.append((step, c.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"), c.tinker_path, metrics))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(f"  {row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip(), file=out)


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN_ID", help="any run of the lineage")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    add_connection_arguments(parser)


def run_status(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The ``status`` command: 0 healthy, 3 corrupted, 2 or 1 on an error (one line on ``err``)."""
    try:
        with connect(args) as rest:
            report = lineage_report(rest, args.run_id)
    except Exception as exc:
        return fail("status", exc, err)
    if args.json:
        print(json.dumps(report.to_json()), file=out, flush=True)
    else:
        render(report, out)
        out.flush()
    return EXIT_CORRUPTED if report.corrupted else EXIT_OK
