"""Retry decisions as small pure pieces: classify a failure, compute a backoff delay.

Failures are classified by duck typing (``status_code``, ``response.status_code``, ``category``), so errors
from the official SDK, from httpx or from the simulated Tinker are all understood without importing them.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Any

__all__ = ["FailureKind", "backoff_delay", "classify", "describe", "is_connection_error", "unreachable"]

_TRANSIENT_STATUS = frozenset({408, 429})


class FailureKind(Enum):
    """Who is to blame for a failed restore, and so what helps."""

    TRANSIENT = "transient"  # connection error, timeout, 408/429/5xx, or unknown: retry the same checkpoint
    CHECKPOINT = "checkpoint"  # the checkpoint is invalid (400...), inaccessible (403) or gone (404): never again
    FATAL = "fatal"  # no retry and no other checkpoint can help: a refused key (401) or a programming error


#: Errors that mean the call itself is wrong (a signature, a missing attribute): retrying repeats them.
_PROGRAMMING_ERRORS = (TypeError, AttributeError)


def status_code_of(exc: BaseException) -> int | None:
    """The HTTP status an error carries, if any."""
    for candidate in (exc, getattr(exc, "response", None)):
        code = getattr(candidate, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def classify(exc: BaseException) -> FailureKind:
    """Decide who is to blame for a failed restore: the checkpoint, nobody (retry as it is), or something no
    retry fixes. 401 never blames the checkpoint: a refused key says nothing about the checkpoint."""
    code = status_code_of(exc)
    if code == 401:
        return FailureKind.FATAL
    if code is not None:
        if 400 <= code < 500 and code not in _TRANSIENT_STATUS:
            return FailureKind.CHECKPOINT
        return FailureKind.TRANSIENT
    category: Any = getattr(exc, "category", None)
    if category is not None and str(getattr(category, "value", category)).lower() == "user":
        return FailureKind.CHECKPOINT
    if isinstance(exc, _PROGRAMMING_ERRORS):
        return FailureKind.FATAL
    return FailureKind.TRANSIENT


def backoff_delay(attempt: int, *, base: float, cap: float, jitter: float, u: float) -> float:
    """Delay before retry number ``attempt`` (1-based): ``min(base * 2**(attempt-1), cap)``, shortened by
    up to ``jitter`` of itself (``u`` in [0, 1) picks where). For a fixed ``u`` the schedule is monotone."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    nominal = min(base * 2.0 ** min(attempt - 1, 1023), cap)  # the min keeps 2**n a finite float
    return nominal * (1.0 - jitter * u)


def describe(exc: BaseException) -> str:
    """A one-line description of an error for events and logs (redacted)."""
    from ._redact import redact

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return redact(f"{name}: {text}" if text else name)[:500]


#: Classes (by name, anywhere in an error's MRO) of failures to reach the server at all: the SDK's
#: ``APIConnectionError`` (``APITimeoutError`` is one) and httpx's ``TransportError``; named, not imported.
_CONNECTION_ERRORS = frozenset({"APIConnectionError", "TransportError"})


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the server could not be reached (refused, dropped, timed out), not what it answered."""
    return isinstance(exc, ConnectionError) or any(c.__name__ in _CONNECTION_ERRORS for c in type(exc).__mro__)


def unreachable(what: str, service: Any) -> Exception:
    """A :class:`~tinkex_recovery.TinkerConnectionError` saying ``what`` failed and what to check: the URL
    ``service`` talks to (the SDK's ``base_url``, else ``TINKER_BASE_URL``), the network and the key (redacted)."""
    from ._exceptions import TinkerConnectionError
    from ._redact import redact

    where = getattr(service, "_base_url", None) or os.environ.get("TINKER_BASE_URL") or "the SDK's default URL"
    return TinkerConnectionError(
        redact(
            f"{what}: is Tinker reachable at {where}? Check the service's base_url (or TINKER_BASE_URL), the "
            "network, and TINKER_API_KEY"
        )
    )
