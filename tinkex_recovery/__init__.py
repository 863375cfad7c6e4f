"""tinkex-recovery: keeps Tinker training runs alive.

A :class:`RecoveryEngine` polls watched runs; when Tinker marks one ``corrupted``, it restores a new run from
a checkpoint chosen by the :class:`RecoveryPolicy`, keeps watching the new run, and reports every step as a
:class:`RecoveryEvent`. Framework wrappers live in :mod:`tinkex_recovery.integrations`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._clock import Clock, FakeClock, SystemClock
from ._engine import EngineState, RecoveryEngine, RunHandle, RunState
from ._events import EventKind, RecoveryEvent
from ._exceptions import (
    AuthenticationError,
    CannotReplay,
    ClientClosed,
    EngineClosed,
    EngineNotStarted,
    ExhaustedReason,
    InvalidTinkerPath,
    MalformedResponse,
    MissingAPIKey,
    NoRestorableCheckpoint,
    PermissionDenied,
    RecoveryDisabled,
    RecoveryExhausted,
    RecoveryRefused,
    ResumeBeforeFirstStep,
    RunNotFound,
    TinkerAPIError,
    TinkerConnectionError,
    TinkerStatusError,
    TinkexRecoveryError,
)
from ._ledger import RESUME_KEY, Ledger, ObservedClient
from ._models import Checkpoint, CheckpointList, Cursor, TinkerPath, TrainingRun, TrainingRunList
from ._policy import RecoveryPolicy
from ._recovery import BUDGET_KEYS, LINEAGE_KEYS, Recovery

if TYPE_CHECKING:
    from .integrations import recovery_guard
    from .integrations.lightning import TinkexRecovery
    from .rest import TinkerRest

__version__ = "0.1.0"

__all__ = [
    "BUDGET_KEYS",
    "LINEAGE_KEYS",
    "RESUME_KEY",
    "AuthenticationError",
    "CannotReplay",
    "Checkpoint",
    "CheckpointList",
    "ClientClosed",
    "Clock",
    "Cursor",
    "EngineClosed",
    "EngineNotStarted",
    "EngineState",
    "EventKind",
    "ExhaustedReason",
    "FakeClock",
    "InvalidTinkerPath",
    "Ledger",
    "MalformedResponse",
    "MissingAPIKey",
    "NoRestorableCheckpoint",
    "ObservedClient",
    "PermissionDenied",
    "Recovery",
    "RecoveryDisabled",
    "RecoveryEngine",
    "RecoveryEvent",
    "RecoveryExhausted",
    "RecoveryPolicy",
    "RecoveryRefused",
    "ResumeBeforeFirstStep",
    "RunHandle",
    "RunNotFound",
    "RunState",
    "SystemClock",
    "TinkerAPIError",
    "TinkerConnectionError",
    "TinkerPath",
    "TinkerRest",
    "TinkerStatusError",
    "TinkexRecovery",
    "TinkexRecoveryError",
    "TrainingRun",
    "TrainingRunList",
    "recovery_guard",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: the REST client pulls in httpx, the Lightning integration torch.
    if name == "TinkerRest":
        from .rest import TinkerRest

        return TinkerRest
    if name == "recovery_guard":
        from .integrations import recovery_guard

        return recovery_guard
    if name == "TinkexRecovery":
        from .integrations.lightning import TinkexRecovery

        return TinkexRecovery
    raise AttributeError(f"module 'tinkex_recovery' has no attribute {name!r}")
