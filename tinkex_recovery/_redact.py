"""Keeps API keys out of every string the library produces (log lines, events, exception text).

Code that handles a key registers it; :func:`redact` replaces every registered key with ``***``.
"""

from __future__ import annotations

import threading

__all__ = ["RedactedError", "redact", "register_secret", "without_secrets"]

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(secret: str) -> None:
    """Remember ``secret`` so that :func:`redact` hides it. Short strings are ignored (they'd mask words)."""
    if len(secret) >= 8:
        with _lock:
            _secrets.add(secret)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    with _lock:
        secrets = tuple(_secrets)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def mask(secret: str) -> str:
    """How a key is shown in a repr: its prefix only."""
    return f"{secret[:4]}***" if len(secret) > 8 else "***"


class RedactedError(Exception):
    """Stands in for an exception whose text held a secret: its type name and redacted text, its traceback."""


def without_secrets(exc: BaseException) -> BaseException:
    """``exc`` itself when its text holds no registered secret; else a :class:`RedactedError` with the same
    traceback, so chaining it (``raise ... from``) never prints a key."""
    text = str(exc)
    if redact(text) == text and all(redact(str(a)) == str(a) for a in exc.args):
        return exc
    stand_in = RedactedError(f"{type(exc).__name__}: {redact(text)}")
    return stand_in.with_traceback(exc.__traceback__)
