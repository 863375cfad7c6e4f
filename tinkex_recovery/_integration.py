"""The one internal seam between the core and :mod:`tinkex_recovery.integrations`.

Framework wrappers import the public API from :mod:`tinkex_recovery` and, for the few helpers that are not
public API but that every wrapper needs, from this module only, never from the core's other private modules.
"""

from __future__ import annotations

from ._engine import SERVICE_METHODS, STATUS_METHODS, RunHandle, require_methods, rest_client_of
from ._events import EventKind
from ._frontend import (
    LineageRecord,
    as_record,
    call_hook,
    checked_options,
    lineage_record,
    restore_exactly,
    wait_limit,
)
from ._futures import resolve
from ._ledger import RESUME_KEY, Book, Ledger, ObservedClient
from ._models import STEP_KEY, validate_run_id
from ._observers import RecoveryObserver, add_observer, report_steps_lost, watched_run_count
from ._replay import Lane, Replayer, Tape
from ._retry import describe

__all__ = [
    "RESUME_KEY",
    "SERVICE_METHODS",
    "STATUS_METHODS",
    "STEP_KEY",
    "Book",
    "Lane",
    "Ledger",
    "LineageRecord",
    "ObservedClient",
    "RecoveryObserver",
    "Replayer",
    "Tape",
    "add_observer",
    "as_record",
    "call_hook",
    "checked_options",
    "describe",
    "lineage_record",
    "report_steps_lost",
    "require_methods",
    "resolve",
    "rest_client_of",
    "restore_exactly",
    "validate_run_id",
    "wait_limit",
    "watched_run_count",
    "would_do",
]


def would_do(handle: RunHandle, timeout: float) -> str:
    """Observe mode: what recover mode would do about the run ``handle`` observed corrupted, in words for a log
    line (waiting up to ``timeout`` seconds for the engine's check of it)."""
    event = handle.observation(timeout)
    if event is None:
        return "what a recovery would do is not known yet"
    if event.kind is EventKind.CHECKPOINT_SELECTED:
        return f"recover mode would restore a new run from {event.checkpoint}"
    reason = f" ({event.reason})" if event.reason else ""
    return f"recover mode would not recover it{reason}: {event.error}"
