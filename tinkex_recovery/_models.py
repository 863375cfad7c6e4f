"""Pydantic models of the Tinker wire JSON that recovery reads, and tinker-path parsing.

The models accept what the server sends (unknown fields are ignored, so a newer server does not break an
older client) and also the official SDK's own objects, through :meth:`TrainingRun.coerce` and
:meth:`Checkpoint.coerce`, without importing the SDK.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, field_validator

from ._exceptions import InvalidTinkerPath

__all__ = ["Checkpoint", "CheckpointList", "Cursor", "TinkerPath", "TrainingRun", "TrainingRunList", "validate_run_id"]

_SCHEME = "tinker://"
_RUN_ID = re.compile(r"[^\s/]+")
#: The checkpoint user_metadata key holding its step: how many optimizer steps the checkpoint holds, which is
#: also the index of the next step to run after restoring it.
STEP_KEY = "step"


def validate_run_id(run_id: object) -> str:
    """``run_id`` if it is a run id Tinker could have issued (matched whole: no whitespace, no '/'); else
    :class:`ValueError`."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"invalid run id {run_id!r}: expected a non-empty string without '/' or whitespace")
    return run_id


_KINDS = {"weights": "training", "sampler_weights": "sampler"}


@dataclass(frozen=True, slots=True)
class TinkerPath:
    """A parsed ``tinker://{run_id}/{weights|sampler_weights}/{name}`` path."""

    run_id: str
    kind: Literal["weights", "sampler_weights"]
    name: str

    @classmethod
    def parse(cls, path: str) -> TinkerPath:
        """Parse ``path``; raise :class:`InvalidTinkerPath` saying what is wrong with it."""
        if not isinstance(path, str):
            raise InvalidTinkerPath(f"a tinker path must be a string, not {type(path).__name__}")
        if not path.startswith(_SCHEME):
            raise InvalidTinkerPath(f"invalid tinker path {path!r}: it must start with {_SCHEME!r}")
        parts = path[len(_SCHEME) :].split("/")
        if len(parts) != 3:
            raise InvalidTinkerPath(f"invalid tinker path {path!r}: expected tinker://{{run_id}}/weights/{{name}}")
        run_id, kind, name = parts
        if not run_id or not name or any(c.isspace() for c in path):
            raise InvalidTinkerPath(f"invalid tinker path {path!r}: empty run id or name, or whitespace")
        if kind not in _KINDS:
            raise InvalidTinkerPath(
                f"invalid tinker path {path!r}: the kind must be 'weights' or 'sampler_weights', not {kind!r}"
            )
        return cls(run_id, kind, name)  # type: ignore[arg-type]

    @property
    def restorable(self) -> bool:
        """Only training state (``weights/``) can start a new training run."""
        return self.kind == "weights"

    @property
    def checkpoint_id(self) -> str:
        """The id Tinker's REST URLs use, e.g. ``weights/0001``."""
        return f"{self.kind}/{self.name}"

    def __str__(self) -> str:
        return f"{_SCHEME}{self.run_id}/{self.kind}/{self.name}"


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", from_attributes=True)

    @classmethod
    def coerce(cls, value: Any) -> Self:
        """Accept this model, a JSON dict, or any object with the same attributes (the SDK's models)."""
        if isinstance(value, cls):
            return value
        return cls.model_validate(value, from_attributes=not isinstance(value, dict))


def parse_step(raw: object) -> int | None:
    """A step as user_metadata (str to str) holds it: the non-negative int ``raw`` spells, else None."""
    if not isinstance(raw, str):
        return None
    try:
        step = int(raw)
    except ValueError:
        return None
    return step if step >= 0 else None


class Checkpoint(_Wire):
    """A saved checkpoint of a training run (Tinker's ``Checkpoint``)."""

    checkpoint_id: str
    checkpoint_type: str
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None

    @field_validator("time", "expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        """Naive timestamps are UTC, so checkpoints always compare."""
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    @property
    def path(self) -> TinkerPath:
        """The parsed :attr:`tinker_path`."""
        return TinkerPath.parse(self.tinker_path)

    @property
    def restorable(self) -> bool:
        """True for training state (``weights/``); sampler and external checkpoints cannot be restored."""
        try:
            return self.checkpoint_type == "training" and self.path.restorable
        except InvalidTinkerPath:
            return False

    @property
    def step(self) -> int | None:
        """The non-negative int under ``"step"`` in the user_metadata (optimizer steps this checkpoint holds),
        or None when it records none or an unparsable one."""
        return parse_step((self.user_metadata or {}).get(STEP_KEY))

    def expired(self, now: datetime) -> bool:
        """Whether the checkpoint's TTL has run out at ``now``."""
        return self.expires_at is not None and self.expires_at <= now


class TrainingRun(_Wire):
    """A training run as ``GET /api/v1/training_runs/{id}`` returns it."""

    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class Cursor(_Wire):
    """Pagination state of a list response."""

    offset: int
    limit: int
    total_count: int

    @property
    def has_more(self) -> bool:
        return self.offset + self.limit < self.total_count


class CheckpointList(_Wire):
    """``GET /api/v1/training_runs/{id}/checkpoints``: ``{"checkpoints": [...], "cursor": ... | null}``."""

    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None

    @classmethod
    def coerce(cls, value: Any) -> Self:
        """Also accepts a bare list of checkpoints."""
        if isinstance(value, list | tuple):
            return cls(checkpoints=[Checkpoint.coerce(c) for c in value])
        return super().coerce(value)


class TrainingRunList(_Wire):
    """``GET /api/v1/training_runs``: one page of the account's runs, ``{"training_runs": [...], "cursor": ...}``."""

    training_runs: list[TrainingRun]
    cursor: Cursor | None = None
