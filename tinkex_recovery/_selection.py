"""Which checkpoints a recovery may restore from, best first.

The order depends on the policy's strategy; the walk over that order skips what cannot work before any
restore call is made (expired, not training state, already rejected) and stops after the policy's depth.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime

from ._models import Checkpoint, TinkerPath
from ._policy import RecoveryPolicy

__all__ = ["NO_STEP", "StepOf", "dedupe", "metric_of", "rank"]

#: Why a checkpoint is passed over by a caller that must know where to resume, and what to do about it. The one
#: place this advice is written: every message, event and the troubleshooting docs quote it.
NO_STEP = (
    "it records no step, so a loop restored from it could not know where to resume (save checkpoints through "
    "recovery_guard's save_state(), which records their step, or with user_metadata={'step': ...})"
)

#: Where a checkpoint resumes a loop: its step (optimizer steps it holds), or None when it records none.
StepOf = Callable[[Checkpoint], int | None]

logger = logging.getLogger("tinkex_recovery")


def dedupe(checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    """Keep the first checkpoint of each path."""
    seen: set[str] = set()
    out: list[Checkpoint] = []
    for c in checkpoints:
        if c.tinker_path not in seen:
            seen.add(c.tinker_path)
            out.append(c)
    return out


def newest_first(checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    return sorted(checkpoints, key=lambda c: c.time, reverse=True)


def metric_of(checkpoint: Checkpoint, key: str) -> float | None:
    """The numeric value stored under ``key`` in a checkpoint's user_metadata, if it parses."""
    raw = (checkpoint.user_metadata or {}).get(key)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def rank(policy: RecoveryPolicy, listed: Iterable[Checkpoint]) -> list[Checkpoint]:
    """Order the listed checkpoints by the policy's strategy ('latest' or 'best')."""
    ordered = newest_first(listed)
    if policy.checkpoint_strategy != "best":
        return ordered
    scored = [(m, c) for c in ordered if (m := metric_of(c, policy.best_metric)) is not None]
    if not scored:
        logger.warning(
            "checkpoint_strategy='best': no checkpoint has a numeric %r in its user_metadata; using the latest",
            policy.best_metric,
        )
        return ordered
    sign = 1.0 if policy.best_mode == "min" else -1.0
    # sorted() is stable, so among equal metrics the newer checkpoint stays first.
    return [c for _, c in sorted(scored, key=lambda mc: sign * mc[0])]


def synthetic(path: TinkerPath) -> Checkpoint:
    """A stand-in for a checkpoint known only by its path (a pinned path the listing does not show)."""
    return Checkpoint(
        checkpoint_id=path.checkpoint_id,
        checkpoint_type="training" if path.restorable else "sampler",
        time=datetime.min.replace(tzinfo=UTC),
        tinker_path=str(path),
    )


def walk(
    candidates: Iterable[Checkpoint],
    *,
    rejected: set[str],
    now: datetime,
    skip: Callable[[Checkpoint, str], None],
    step_of: StepOf | None = None,
) -> Iterator[Checkpoint]:
    """Yield the restorable candidates in order; call ``skip(checkpoint, reason)`` for each one passed over
    because it cannot work, and remember it in ``rejected`` so it is never offered again. With ``step_of``
    (a caller that must know where to resume), a checkpoint that records no step cannot work either."""
    for c in candidates:
        if c.tinker_path in rejected:
            continue
        reason = None
        if not c.restorable:
            reason = f"not a training checkpoint ({c.checkpoint_type})"
        elif c.expired(now):
            reason = f"expired at {c.expires_at}"
        elif step_of is not None and step_of(c) is None:
            reason = NO_STEP
        if reason is not None:
            rejected.add(c.tinker_path)
            skip(c, reason)
            continue
        yield c
