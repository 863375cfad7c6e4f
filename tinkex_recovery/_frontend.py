"""What a replaying front-end reports and restores, framework-free: the lineage record of a recovery, the user's
recovery hook, and the restore of exactly one checkpoint when a loop resumes from a saved state of its own
(the Lightning callback's ``fit(ckpt_path=...)``)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, TypedDict, cast

from ._futures import resolve
from ._observers import report_steps_lost
from ._policy import RecoveryPolicy
from ._recovery import Recovery, lineage_metadata, restore_from

__all__ = [
    "LineageRecord",
    "as_record",
    "call_hook",
    "checked_options",
    "lineage_record",
    "restore_exactly",
    "wait_limit",
]

logger = logging.getLogger("tinkex_recovery")


class LineageRecord(TypedDict):
    """One recovery as a front-end keeps it (and checkpoints it): ids, paths and numbers only."""

    number: int  #: 1, 2, ... over the whole lineage, across restarts from a saved state
    old_run_id: str
    new_run_id: str
    checkpoint: str  #: the tinker:// path restored from
    attempts: int
    seconds: float  #: from detection to the new client in hand
    global_step: int  #: the steps (batches) the lost run had completed
    resume_step: int | None  #: the restored checkpoint's step (the steps it holds)
    steps_lost: int | None  #: global_step - resume_step: the steps trained again


def lineage_record(number: int, recovery: Recovery, steps: range, integration: str, who: str) -> LineageRecord:
    """The record of ``recovery`` (``steps``: the step indices trained again), logged (as ``who``) and counted as
    steps lost (``integration``: the metric's label)."""
    logger.info(
        "%s: run %s recovered as %s from %s (step %s); %d step(s) to train again",
        who,
        recovery.old_run_id,
        recovery.new_run_id,
        recovery.checkpoint.tinker_path,
        recovery.step,
        len(steps),
    )
    report_steps_lost(len(steps), integration)
    return LineageRecord(
        number=number,
        old_run_id=recovery.old_run_id,
        new_run_id=recovery.new_run_id,
        checkpoint=recovery.checkpoint.tinker_path,
        attempts=recovery.attempts,
        seconds=recovery.seconds,
        global_step=steps.stop,
        resume_step=recovery.step,
        steps_lost=len(steps),
    )


def as_record(value: Any) -> LineageRecord:
    """A record read back from a saved state, checked."""
    missing = set(LineageRecord.__annotations__) - set(value) if isinstance(value, dict) else {"all"}
    if missing:
        raise ValueError(f"lineage state: a record lacks {sorted(missing)}")
    return cast(LineageRecord, {k: value[k] for k in LineageRecord.__annotations__})


def call_hook(hook: Callable[..., Any] | None, recovery: Recovery, steps: range) -> None:
    """The user's ``on_tinker_recovery(recovery[, steps])``, if callable: ``steps`` only if it takes a second."""
    if not callable(hook):
        return
    try:
        params = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    two = (
        any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
        or sum(p.kind in positional for p in params) >= 2
    )
    hook(recovery, steps) if two else hook(recovery)


def wait_limit(policy: RecoveryPolicy) -> float:
    """How long a front-end waits for a recovery under way: every restore call is bounded by attempt_timeout and
    every retry delay by max_backoff; the rest is slack for the listing calls (the engine ends it long before)."""
    return policy.max_attempts * (policy.attempt_timeout + policy.max_backoff) + 120.0


def restore_exactly(service: Any, path: str, policy: RecoveryPolicy, from_run: str | None) -> Any:
    """A new run restored from the checkpoint at ``path``, that one and no other (a resume must hold exactly the
    steps its saved state says): the training client, once the service has answered."""
    meta = lineage_metadata(from_run or "", path)
    future = restore_from(service, path, with_optimizer=policy.restore_optimizer, metadata=meta)
    return resolve(future, policy.attempt_timeout)


def checked_options(policy: Any, *, client_attr: str, service_attr: str, on_exhausted: str) -> RecoveryPolicy:
    """A front-end's options, refused at construction when wrong; the policy (default: recovery enabled)."""
    policy = RecoveryPolicy(enabled=True) if policy is None else policy
    if not isinstance(policy, RecoveryPolicy):
        raise TypeError(f"policy must be a RecoveryPolicy, got {type(policy).__name__}")
    for name, value in (("client_attr", client_attr), ("service_attr", service_attr)):
        if not isinstance(value, str) or not value.isidentifier():
            raise ValueError(f"{name} must name an attribute of the module, got {value!r}")
    if on_exhausted not in ("raise", "stop"):
        raise ValueError(f"on_exhausted must be 'raise' or 'stop', got {on_exhausted!r}")
    return policy
