"""Every exception tinkex-recovery raises, in one tree.

    TinkexRecoveryError
    ├── InvalidTinkerPath (also ValueError)     a tinker:// path that cannot be parsed
    ├── RecoveryDisabled                        watch() on an engine whose policy has enabled=False
    ├── EngineNotStarted                        poll_once() or check_now() before start()
    ├── EngineClosed                            the engine was used after close()
    ├── RecoveryExhausted                       recovery gave up (see .reason); the run stays lost
    ├── NoRestorableCheckpoint                  no checkpoint left to restore from (a RecoveryExhausted's cause)
    ├── RecoveryRefused                         a safety budget refused the next recovery (a RecoveryExhausted's cause)
    ├── ResumeBeforeFirstStep                   a guard's steps() cannot reach the restored checkpoint's step
    ├── CannotReplay                            Lightning: the restored checkpoint lies outside the replay buffer
    ├── MissingAPIKey (also ValueError)         no API key was given and TINKER_API_KEY is unset
    ├── ClientClosed                            a TinkerRest was used after close()
    └── TinkerAPIError                          the REST client could not get an answer
        ├── TinkerConnectionError               connection refused, dropped, or timed out (after retries)
        ├── MalformedResponse                   the body was not the JSON Tinker sends
        └── TinkerStatusError                   an HTTP error status (after retries, where retried)
            ├── AuthenticationError             401
            ├── PermissionDenied                403
            └── RunNotFound                     404

Exceptions never carry the API key: messages are built from status codes, run ids and paths only.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "AuthenticationError",
    "CannotReplay",
    "ClientClosed",
    "EngineClosed",
    "EngineNotStarted",
    "ExhaustedReason",
    "InvalidTinkerPath",
    "MalformedResponse",
    "MissingAPIKey",
    "NoRestorableCheckpoint",
    "PermissionDenied",
    "RecoveryDisabled",
    "RecoveryExhausted",
    "RecoveryRefused",
    "ResumeBeforeFirstStep",
    "RunNotFound",
    "TinkerAPIError",
    "TinkerConnectionError",
    "TinkerStatusError",
    "TinkexRecoveryError",
]


class TinkexRecoveryError(Exception):
    """Base class of every error raised by tinkex-recovery."""


class InvalidTinkerPath(TinkexRecoveryError, ValueError):
    """A string that is not a valid ``tinker://{run_id}/{weights|sampler_weights}/{name}`` path."""


class RecoveryDisabled(TinkexRecoveryError):
    """The policy has ``enabled=False``: recovery is opt-in."""


class EngineNotStarted(TinkexRecoveryError):
    """The engine polls and recovers only between start() and close(); a detection before start would be lost."""


class EngineClosed(TinkexRecoveryError):
    """The engine was closed; it cannot watch runs any more."""


class ExhaustedReason(StrEnum):
    """Why a recovery gave up: each way of giving up is distinct."""

    ATTEMPTS = "attempts"  #: max_attempts restore calls were made
    CHECKPOINTS = "checkpoints"  #: no restorable checkpoint left (none, all rejected, or fallback_depth reached)
    FATAL = "fatal"  #: an error no retry can fix: authentication, or a programming error in the service
    BUDGET = "budget"  #: max_recoveries recoveries of the lineage within recovery_window
    NO_PROGRESS = "no_progress"  #: max_no_progress restored runs in a row were lost before a newer checkpoint
    FORKED = "forked"  #: another process recovered the same run and its run continues the lineage (see .winner)
    INTERNAL = "internal"  #: a bug in tinkex-recovery's own handling of the recovery (logged with its traceback)
    RUN_NOT_FOUND = "run_not_found"  #: the run itself is not there (404): a mistyped id, another account or URL


class RecoveryExhausted(TinkexRecoveryError):
    """Recovery of a run gave up; :attr:`reason` says why. The error that ended it is chained as
    ``__cause__`` (with its traceback) when there was one. For :attr:`ExhaustedReason.FORKED`, :attr:`winner`
    is the run that continues the lineage: train on from it, not from a run of this one."""

    def __init__(
        self,
        run_id: str,
        attempts: int,
        last_error: str | None,
        *,
        reason: ExhaustedReason,
        winner: str | None = None,
    ) -> None:
        self.run_id = run_id
        self.attempts = attempts
        self.last_error = last_error
        self.reason = ExhaustedReason(reason)
        self.winner = winner
        detail = f": {last_error}" if last_error else ""
        super().__init__(
            f"recovery of run {run_id} exhausted ({self.reason.value}) after {attempts} restore call(s){detail}"
        )

    def __reduce__(self) -> tuple[object, ...]:  # picklable (e.g. across processes) despite the keyword
        return (_rebuild_exhausted, (self.run_id, self.attempts, self.last_error, self.reason.value, self.winner))


def _rebuild_exhausted(
    run_id: str, attempts: int, last_error: str | None, reason: str, winner: str | None = None
) -> RecoveryExhausted:
    return RecoveryExhausted(run_id, attempts, last_error, reason=ExhaustedReason(reason), winner=winner)


class NoRestorableCheckpoint(TinkexRecoveryError):
    """Nothing left to restore from: no checkpoint, or every one within the fallback depth was unusable."""


class RecoveryRefused(TinkexRecoveryError):
    """A safety budget of the policy refused to start the next recovery of a lineage: :attr:`reason` is
    :attr:`ExhaustedReason.BUDGET` (``max_recoveries`` within ``recovery_window``) or
    :attr:`ExhaustedReason.NO_PROGRESS` (``max_no_progress`` restored runs in a row lost before saving a newer
    checkpoint). No restore call was made."""

    def __init__(self, message: str, *, reason: ExhaustedReason) -> None:
        self.reason = ExhaustedReason(reason)
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_refused, (str(self), self.reason.value))


def _rebuild_refused(message: str, reason: str) -> RecoveryRefused:
    return RecoveryRefused(message, reason=ExhaustedReason(reason))


class ResumeBeforeFirstStep(TinkexRecoveryError):
    """The restored checkpoint's step lies before the first index of the iterable given to ``guard.steps()``,
    so the loop cannot resume there."""


class CannotReplay(TinkexRecoveryError):
    """The restored checkpoint is one the Lightning callback cannot replay from: it records no step, or it lies
    outside the batches the replay buffer holds. Training on would train some batch twice or never. The engine
    skips such checkpoints when it chooses; this is the backstop for one chosen while the buffer moved."""


class ClientClosed(TinkexRecoveryError):
    """A :class:`~tinkex_recovery.TinkerRest` was used after ``close()``."""


class MissingAPIKey(TinkexRecoveryError, ValueError):
    """No Tinker API key: pass ``api_key=`` or set ``TINKER_API_KEY``. Raised at construction, not on the first call."""


class TinkerAPIError(TinkexRecoveryError):
    """The Tinker REST API could not give an answer."""

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        self.run_id = run_id
        super().__init__(message)


class TinkerConnectionError(TinkerAPIError):
    """Connection refused, dropped or timed out, after the client's bounded retries."""


class MalformedResponse(TinkerAPIError):
    """The server answered, but not with the JSON shape Tinker uses."""


class TinkerStatusError(TinkerAPIError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, *, status_code: int, run_id: str | None = None) -> None:
        self.status_code = status_code
        super().__init__(message, run_id=run_id)


class AuthenticationError(TinkerStatusError):
    """401: the API key is missing or wrong."""


class PermissionDenied(TinkerStatusError):
    """403: the key may not read this run."""


class RunNotFound(TinkerStatusError):
    """404: no such training run (or it was deleted)."""
