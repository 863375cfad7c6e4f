"""tinkex-recovery: keeps Tinker training runs alive.

A :class:`RecoveryEngine` polls watched runs; when Tinker marks one ``corrupted``, it restores a new run from
a checkpoint chosen by the :class:`RecoveryPolicy`, keeps watching the new run, and reports every step as a
:class:`RecoveryEvent`. Framework wrappers live in :mod:`tinkex_recovery.integrations`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# These need the standard library only; every other name is imported on first use (see _HOMES).
from ._clock import Clock, FakeClock, SystemClock
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

if TYPE_CHECKING:
    from ._engine import EngineState, RecoveryEngine, RunHandle, RunState
    from ._events import EventKind, RecoveryEvent
    from ._ledger import RESUME_KEY, Ledger, ObservedClient
    from ._models import Checkpoint, CheckpointList, Cursor, TinkerPath, TrainingRun, TrainingRunList
    from ._policy import RecoveryPolicy
    from ._recovery import BUDGET_KEYS, LINEAGE_KEYS, Recovery
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


# Where each of the other public names lives: imported on first use, so ``import tinkex_recovery`` (and so the
# command line's ``--help``) costs next to nothing; pydantic, httpx, the engine, torch and Lightning are loaded
# by the code that uses them.
_HOMES = {
    "_engine": ("EngineState", "RecoveryEngine", "RunHandle", "RunState"),
    "_events": ("EventKind", "RecoveryEvent"),
    "_ledger": ("RESUME_KEY", "Ledger", "ObservedClient"),
    "_models": ("Checkpoint", "CheckpointList", "Cursor", "TinkerPath", "TrainingRun", "TrainingRunList"),
    "_policy": ("RecoveryPolicy",),
    "_recovery": ("BUDGET_KEYS", "LINEAGE_KEYS", "Recovery"),
    "rest": ("TinkerRest",),
    "integrations": ("recovery_guard",),
    "integrations.lightning": ("TinkexRecovery",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'tinkex_recovery' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
