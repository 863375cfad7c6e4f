"""The recovery policy: what to do when a run is corrupted, validated once, where the user writes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._models import TinkerPath

__all__ = ["RecoveryPolicy"]


class RecoveryPolicy(BaseModel):
    """How runs are watched and restored. Frozen; times are in seconds.

    Build it in code or from a dict (a YAML or JSON config): ``RecoveryPolicy.model_validate(cfg)``; derive
    one with :meth:`replace`. An invalid or unknown field raises :class:`pydantic.ValidationError` naming the
    field; nothing is silently replaced by a default.

    ``max_attempts`` and ``fallback_depth`` bound one recovery together: it ends at whichever is reached first
    (``max_attempts`` restore calls, whatever they failed for, or ``fallback_depth + 1`` checkpoints rejected).
    ``max_recoveries`` (per ``recovery_window``) and ``max_no_progress`` bound the recoveries of a lineage: a
    corruption past either ends the lineage ``exhausted`` instead of restoring it again. ``None`` turns one off.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    enabled: bool = Field(False, description="Recovery is opt-in.")
    mode: Literal["recover", "observe"] = Field(
        "recover",
        description="'observe' detects and selects as 'recover' would, reports it, and never restores a run.",
    )
    max_attempts: int = Field(3, ge=1, description="Restore calls allowed for one recovery.")
    backoff: float = Field(5.0, ge=0, description="Delay before the first retry; doubles each retry.")
    max_backoff: float = Field(60.0, ge=0, description="Cap of the retry delay.")
    jitter: float = Field(0.2, ge=0, le=1, description="Each delay is shortened by up to this fraction.")
    poll_interval: float = Field(30.0, gt=0, description="Seconds between two polls of every watched run.")
    checkpoint_strategy: str = Field(
        "latest",
        description="'latest', 'best' (by a metric in checkpoint user_metadata) or a tinker:// path.",
    )
    best_metric: str = Field("loss", min_length=1, description="The user_metadata key 'best' ranks by.")
    best_mode: Literal["min", "max"] = Field("min", description="Whether 'best' is the lowest or highest.")
    restore_optimizer: bool = Field(True, description="Restore optimizer state along with the weights.")
    attempt_timeout: float = Field(300.0, gt=0, description="A restore call that takes longer is abandoned.")
    setup_timeout: float = Field(
        30.0,
        gt=0,
        description="Making a service's REST client (the SDK contacts Tinker for it) longer than this fails "
        "watch(), and so a guard's entry, with TinkerConnectionError naming the URL to check; so does a read of the "
        "run or a listing by a recovery asked for with request_recovery(), as at a guard's entry (retried as a "
        "transient failure).",
    )
    fallback_depth: int = Field(
        2, ge=0, description="How many older checkpoints may be tried after the chosen one is rejected."
    )
    max_recoveries: int | None = Field(
        10,
        ge=1,
        description="Recoveries of one lineage allowed within any recovery_window seconds; None: no limit.",
    )
    recovery_window: float = Field(
        3600.0, gt=0, description="The sliding window, in seconds (wall clock), that max_recoveries counts over."
    )
    max_no_progress: int | None = Field(
        3,
        ge=1,
        description="Recoveries in a row whose restored run was lost before saving a newer checkpoint, after "
        "which the lineage ends instead of restoring the same checkpoint again; None: no limit.",
    )
    degraded_after: int = Field(
        3, ge=1, description="Consecutive failed polls of a run before poll_degraded is emitted."
    )
    on_recovery: Callable[..., Any] | None = Field(
        None, description="Called with a Recovery after each successful recovery.", exclude=True
    )
    on_failure: Callable[..., Any] | None = Field(
        None, description="Called with a RecoveryExhausted when a recovery gives up.", exclude=True
    )

    @field_validator("checkpoint_strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        if value in ("latest", "best"):
            return value
        if not value.startswith("tinker://"):
            raise ValueError("must be 'latest', 'best' or a tinker://{run_id}/weights/{name} path")
        path = TinkerPath.parse(value)
        if not path.restorable:
            raise ValueError(f"{value!r} is a sampler checkpoint; only weights/ checkpoints can be restored")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> RecoveryPolicy:
        if self.max_backoff < self.backoff:
            raise ValueError(f"max_backoff ({self.max_backoff}) must be >= backoff ({self.backoff})")
        return self

    def replace(self, **changes: Any) -> RecoveryPolicy:
        """A copy with ``changes`` applied, validated like a new policy (``model_copy(update=...)`` is not)."""
        return type(self).model_validate({**dict(self), **changes})

    @property
    def specific_path(self) -> TinkerPath | None:
        """The pinned checkpoint when ``checkpoint_strategy`` is a path, else None."""
        if self.checkpoint_strategy in ("latest", "best"):
            return None
        return TinkerPath.parse(self.checkpoint_strategy)
