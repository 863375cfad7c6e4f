"""Where a checkpoint resumes: the ``step`` in its user_metadata, or its line in a tinker-cookbook
``checkpoints.jsonl``.

The log is the cookbook's format (``{"name", "batch", ..., "state_path"}``, one JSON object per line, appended
after each save), so the guard and a cookbook loop can read each other's records. ``batch`` is the index of
the next batch to train, the same meaning as the user_metadata ``step``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tinkex_recovery._integration import STEP_KEY

__all__ = ["CHECKPOINTS_FILE", "RESERVED_KEYS", "CheckpointLog", "metadata_for"]

logger = logging.getLogger("tinkex_recovery")

#: The file name tinker-cookbook uses under its ``log_path``.
CHECKPOINTS_FILE = "checkpoints.jsonl"
#: Keys a metric may not use: they hold the step and the cookbook record's own fields.
RESERVED_KEYS = frozenset({STEP_KEY, "name", "batch", "state_path"})


def validate_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int (the index of the next step to run), got {step!r}")
    return step


def validate_metrics(metrics: Mapping[str, Any] | None) -> dict[str, int | float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of str to numbers, got {type(metrics).__name__}")
    out: dict[str, int | float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metric names must be non-empty strings, got {key!r}")
        if key in RESERVED_KEYS:
            raise ValueError(f"metric name {key!r} is reserved (used for {', '.join(sorted(RESERVED_KEYS))})")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TypeError(f"metric {key!r} must be a finite int or float, got {value!r}")
        out[key] = value
    return out


def metadata_for(step: int, metrics: Mapping[str, int | float]) -> dict[str, str]:
    """The checkpoint user_metadata (Tinker's is str to str) recording ``step`` and the metrics."""
    return {STEP_KEY: str(step), **{k: str(v) for k, v in metrics.items()}}


class CheckpointLog:
    """``{log_path}/checkpoints.jsonl``: appended by :meth:`append`, read back by state path."""

    def __init__(self, log_path: str | os.PathLike[str]) -> None:
        self.path = Path(log_path) / CHECKPOINTS_FILE

    def append(self, name: str, step: int, state_path: str, metrics: Mapping[str, int | float]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"name": name, "batch": step, **metrics, "state_path": state_path}
        line = (json.dumps(record) + "\n").encode("utf-8")
        with self.path.open("a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # a torn last line from a killed writer: never glue onto it
                    line = b"\n" + line
            f.write(line)

    def step_of(self, state_path: str) -> int | None:
        """The ``batch`` of the last record of ``state_path``; None if the log has none (or no file)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return None
        found: int | None = None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A process killed mid-write leaves a torn last line; the others still hold.
                logger.warning("%s line %d is not JSON; skipped", self.path, number)
                continue
            if not isinstance(record, dict) or record.get("state_path") != state_path:
                continue
            batch = record.get("batch")
            if isinstance(batch, int) and not isinstance(batch, bool) and batch >= 0:
                found = batch
        return found
