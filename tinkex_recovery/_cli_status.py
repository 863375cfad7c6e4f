"""``tinkex-recovery status RUN_ID [--json]``: a run's whole lineage, whether its newest run is corrupted, and
what that run could be restored from.

The lineage is followed back through each run's user_metadata ``tinkex_recovery.recovered_from_run`` (written
on every recovered run), and forward by finding, in the account's training-runs listing, the runs recovered
from the newest one known. When several were, the one that continues is chosen by the engine's own rule
(:func:`._lineage.continuing`: the earliest created); each other one is shown beside the lineage: an *orphan*
(made by the same recovery, by an attempt it abandoned: never used) or a *fork* (made by another recovery of the
same run: another process; its engine stopped that loop with ``RecoveryExhausted(reason="forked")``).
Exit status: 0 when the newest run is healthy, 3 when it is corrupted, 4 when the lineage forked (whatever the
newest run's health: two processes recovered one run, look), 2 and 1 as in :mod:`._cli_common`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from ._cli_common import (
    EXIT_CORRUPTED,
    EXIT_FORKED,
    EXIT_OK,
    STEPLESS,
    add_connection_arguments,
    closed_pipe,
    connect,
    fail,
    step_of,
)
from ._exceptions import RunNotFound
from ._names import LINEAGE_KEYS, RECOVERY_ID_KEY, validate_run_id

if TYPE_CHECKING:  # imported where used: `status --help` loads neither pydantic nor httpx
    from ._models import Checkpoint, TrainingRun
    from ._rest import TinkerRest

__all__ = ["LineageReport", "add_status_arguments", "lineage_report", "run_status"]

_FROM_RUN, _FROM_CHECKPOINT = LINEAGE_KEYS[0], LINEAGE_KEYS[1]
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
class SideRun:
    """A run recovered from a run of the lineage that does not continue it: ``kind`` is ``"orphan"`` (made by the
    same recovery as the one that continues, by an attempt it abandoned) or ``"fork"`` (made by another
    recovery of the same run); ``continues`` is the run that does."""

    run: TrainingRun
    parent: str
    kind: str
    continues: str

    @property
    def run_id(self) -> str:
        return self.run.training_run_id


@dataclass(frozen=True, slots=True)
class LineageReport:
    """What ``status`` found: the lineage oldest first, the runs beside it (orphans, forks), and the newest
    run's restorable checkpoints."""

    queried: str
    runs: list[LineageRun]
    checkpoints: list[Checkpoint] = field(default_factory=list)
    side: list[SideRun] = field(default_factory=list)

    @property
    def forked(self) -> bool:
        return any(s.kind == "fork" for s in self.side)

    @property
    def newest(self) -> LineageRun:
        return self.runs[-1]

    @property
    def corrupted(self) -> bool:
        return bool(self.newest.corrupted)

    def to_json(self) -> dict[str, Any]:
        from ._lineage import metadata_of

        return {
            "run_id": self.newest.run_id,
            "queried_run_id": self.queried,
            "corrupted": self.corrupted,
            "forked": self.forked,
            "lineage": [r.run_id for r in self.runs],
            "orphans": [
                {
                    "run_id": s.run_id,
                    "kind": s.kind,
                    "recovered_from_run": s.parent,
                    "continues": s.continues,
                    "corrupted": s.run.corrupted,
                    "recovery_id": metadata_of(s.run, RECOVERY_ID_KEY),
                }
                for s in self.side
            ],
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
                    "step": step_of(c),
                    "resumable": step_of(c) is not None,
                    "time": c.time.isoformat(),
                    "expires_at": c.expires_at.isoformat() if c.expires_at else None,
                    "metrics": {k: v if math.isfinite(v) else str(v) for k, v in _metrics(c).items()},
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


def continuing_successor(successors: list[TrainingRun]) -> TrainingRun:
    """Of the runs recovered from one run, the one the lineage goes on with: the engines' own rule
    (:func:`._lineage.continuing`, the earliest created), so ``status`` and ``watch`` follow the run that trains on."""
    from ._lineage import continuing

    return continuing(successors)


def successors_by_parent(rest: TinkerRest) -> dict[str, list[TrainingRun]]:
    """Every run of the account that was recovered from another, by the run it was recovered from."""
    from ._lineage import all_runs

    children: dict[str, list[TrainingRun]] = defaultdict(list)
    for run in all_runs(rest):
        if (parent := (run.user_metadata or {}).get(_FROM_RUN)) is not None:
            children[parent].append(run)
    return children


def lineage_report(rest: TinkerRest, run_id: str, *, now: datetime | None = None) -> LineageReport:
    """Follow ``run_id``'s lineage back and forward, and list its newest run's restorable checkpoints."""
    from ._lineage import metadata_of

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
    side: list[SideRun] = []
    index = 0
    while index < len(runs) < _MAX_RUNS:
        here = runs[index].run_id
        index += 1
        after = runs[index].run_id if index < len(runs) else None  # the lineage's next run, known from metadata
        kids = [k for k in children.get(here, []) if k.training_run_id not in seen or k.training_run_id == after]
        if not kids:
            continue
        successor = continuing_successor(kids)  # the engine's rule: the run the engines let continue
        for other in kids:
            if other is not successor:
                same = metadata_of(other, RECOVERY_ID_KEY) == metadata_of(successor, RECOVERY_ID_KEY) is not None
                side.append(SideRun(other, here, "orphan" if same else "fork", successor.training_run_id))
                seen.add(other.training_run_id)
        if after is None and successor.training_run_id not in seen:  # followed forward from the newest run only
            seen.add(successor.training_run_id)
            runs.append(LineageRun(successor.training_run_id, successor))
    now = now or datetime.now(UTC)
    listed = rest.list_checkpoints(runs[-1].run_id).checkpoints
    restorable = sorted((c for c in listed if c.restorable and not c.expired(now)), key=lambda c: c.time, reverse=True)
    return LineageReport(run_id, runs, restorable, side)


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
    for s in report.side:
        what = "ORPHAN: made by an abandoned attempt" if s.kind == "orphan" else "FORK: made by another recovery"
        state = "corrupted" if s.run.corrupted else "healthy"
        print(f"  {s.run_id}  {state}  {what} from {s.parent}; never used, {s.continues} continues", file=out)
    if report.forked:
        print("The lineage FORKED: two recoveries of one run each made a run (two processes?)", file=out)
    newest = report.newest
    print(f"Newest run: {newest.run_id}, {'CORRUPTED' if report.corrupted else 'healthy'}", file=out)
    if not report.checkpoints:
        print(f"Restorable checkpoints of {newest.run_id}: none", file=out)
        return
    print(f"Restorable checkpoints of {newest.run_id}, newest first:", file=out)
    rows = [("STEP", "SAVED (UTC)", "TINKER PATH", "METRICS")]
    for c in report.checkpoints:
        metrics = " ".join(f"{k}={v:g}" for k, v in sorted(_metrics(c).items()))
        step = "?" if step_of(c) is None else str(step_of(c))
        rows.append((step, c.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"), c.tinker_path, metrics))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(f"  {row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip(), file=out)
    if any(step_of(c) is None for c in report.checkpoints):
        print(f"  ? {STEPLESS}", file=out)


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN_ID", help="any run of the lineage")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one strict JSON object instead of the report (a metric that is not a finite number, such as "
        'metadata "nan" or "1e400", is the string "nan", "inf" or "-inf"; "resumable" is false for a checkpoint '
        "with no step)",
    )
    add_connection_arguments(parser)


def run_status(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The ``status`` command: 0 healthy, 3 corrupted, 4 forked, 2 or 1 on an error (one line on ``err``), 141 if
    ``out`` was closed early (``| head``)."""
    try:
        with connect(args) as rest:
            report = lineage_report(rest, args.run_id)
    except Exception as exc:
        return fail("status", exc, err)
    try:
        if args.json:  # strict JSON: a metric that is not finite ("nan", "1e400") is a string, never NaN/Infinity
            print(json.dumps(report.to_json(), allow_nan=False), file=out, flush=True)
        else:
            render(report, out)
            out.flush()
    except BrokenPipeError:
        return closed_pipe(out)
    if report.forked:
        return EXIT_FORKED
    return EXIT_CORRUPTED if report.corrupted else EXIT_OK
