"""The account's training-runs listing, as recovery reads it, and the one rule that says which run continues.

Tinker offers no compare-and-set and no lease: two processes restoring the same lost run make two runs, and
``user_metadata`` is written once, at creation. So the listing is the truth: every recovered run says in its
user_metadata which run it came from (``tinkex_recovery.recovered_from_run``), which recovery made it
(``tinkex_recovery.recovery_id``, unique per recovery) and when that recovery's restore call was sent
(``tinkex_recovery.created_at``, the sender's UTC wall clock). The engine and ``tinkex-recovery status``
apply the same rule, :func:`continuing`, to the runs recovered from one run: the earliest ``created_at``
continues (ties, and runs without the key, by ``last_request_time``, then by run id). The listing has no
creation time of its own, so the sender's clock stands in for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from ._futures import resolve
from ._models import TrainingRun, TrainingRunList
from ._names import CREATED_AT_KEY, FROM_RUN_KEY, RECOVERY_ID_KEY

__all__ = ["CREATED_AT_KEY", "FROM_RUN_KEY", "RECOVERY_ID_KEY", "all_runs", "children", "continuing", "lists_runs"]


PAGE = 100  # runs per listing page, as the SDK's own `tinker run list` asks
MAX_PAGES = 1000


def lists_runs(source: Any) -> bool:
    """Whether ``source`` (a status source: TinkerRest, the SDK's RestClient, ...) can list the account's runs."""
    return callable(getattr(source, "list_training_runs", None))


def all_runs(source: Any, wait: Callable[[Any], Any] = resolve) -> list[TrainingRun]:
    """Every training run of the account, every page: ``source.list_training_runs(limit=, offset=)`` is asked
    until the cursor says no more exist (a page given as a bare list: until a page comes back short). ``wait``
    turns a returned future into its value. A run seen on two pages (the list moved under us) is kept once."""
    if not lists_runs(source):
        raise TypeError(f"{type(source).__name__} has no list_training_runs(); the listing cannot be read")
    found: dict[str, TrainingRun] = {}
    offset = 0
    for _ in range(MAX_PAGES):
        page = wait(source.list_training_runs(limit=PAGE, offset=offset))
        if isinstance(page, list | tuple):
            runs, more = [TrainingRun.coerce(r) for r in page], len(page) >= PAGE
        else:
            listing = TrainingRunList.coerce(page)
            runs = listing.training_runs
            cursor = listing.cursor
            more = cursor is not None and offset + len(runs) < cursor.total_count
        for run in runs:
            found.setdefault(run.training_run_id, run)
        offset += len(runs)
        if not runs or not more:
            break
    return list(found.values())


def metadata_of(run: TrainingRun, key: str) -> str | None:
    return (run.user_metadata or {}).get(key)


def children(runs: Iterable[TrainingRun], parent: str) -> list[TrainingRun]:
    """The runs recovered from ``parent``, per their user_metadata."""
    return [r for r in runs if metadata_of(r, FROM_RUN_KEY) == parent]


def _created(run: TrainingRun) -> tuple[datetime, datetime, str]:
    stamp: datetime | None = None
    raw = metadata_of(run, CREATED_AT_KEY)
    if raw is not None:
        try:
            stamp = datetime.fromisoformat(raw)
        except ValueError:
            stamp = None
        if stamp is not None and stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
    last = run.last_request_time if run.last_request_time.tzinfo else run.last_request_time.replace(tzinfo=UTC)
    return (stamp or last, last, run.training_run_id)


def continuing(candidates: Iterable[TrainingRun]) -> TrainingRun:
    """Of runs recovered from one run, the one that continues the lineage: the earliest created (see the module
    docstring). ``candidates`` must not be empty."""
    return min(candidates, key=_created)
