"""Every exception tinkex-recovery raises, in one tree.

    TinkexRecoveryError
    ├── InvalidTinkerPath (also ValueError)     a tinker:// path that cannot be parsed
    ├── RecoveryDisabled                        watch() on an engine whose policy has enabled=False
    ├── EngineClosed                            the engine was used after close()
    ├── RecoveryExhausted                       every attempt or checkpoint was tried; the run stays lost
    ├── MissingAPIKey (also ValueError)         no API key was given and TINKER_API_KEY is unset
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

__all__ = [
    "AuthenticationError",
    "EngineClosed",
    "InvalidTinkerPath",
    "MalformedResponse",
    "MissingAPIKey",
    "PermissionDenied",
    "RecoveryDisabled",
    "RecoveryExhausted",
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


class EngineClosed(TinkexRecoveryError):
    """The engine was closed; it cannot watch runs any more."""


class RecoveryExhausted(TinkexRecoveryError):
    """Recovery of a run gave up: every allowed attempt or checkpoint failed."""

    def __init__(self, run_id: str, attempts: int, last_error: str | None) -> None:
        self.run_id = run_id
        self.attempts = attempts
        self.last_error = last_error
        detail = f": {last_error}" if last_error else ""
        super().__init__(f"recovery of run {run_id} exhausted after {attempts} attempt(s){detail}")


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
