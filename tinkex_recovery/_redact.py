"""Keeps API keys out of every string the library produces (log lines, events, exception text).

Code that handles a key registers it; :func:`redact` replaces every registered key with ``***``. Once a key is
registered, log records of the HTTP stack (httpx, httpcore, the tinker SDK) are redacted as they are made:
httpcore writes response headers at DEBUG, and a server may echo the key in one.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["RedactedError", "redact", "register_secret", "without_secrets"]

_lock = threading.Lock()
_secrets: set[str] = set()


_REDACTED_LOGGERS = ("httpx", "httpcore", "tinker", "tinkex_recovery")
_factory_installed = False


def register_secret(secret: str) -> None:
    """Remember ``secret`` so that :func:`redact` hides it. Short strings are ignored (they'd mask words)."""
    global _factory_installed
    if len(secret) >= 8:
        with _lock:
            _secrets.add(secret)
            install, _factory_installed = not _factory_installed, True
        if install:
            _install_record_factory()


def _install_record_factory() -> None:
    """Redact the records of the HTTP stack's loggers as they are made (whatever handler writes them)."""
    make = logging.getLogRecordFactory()

    def redacting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if record.name.startswith(_REDACTED_LOGGERS):
            try:
                text = record.getMessage()
            except Exception:  # a malformed record is logging's to report, not ours
                return record
            clean = redact(text)
            if clean != text:
                record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(redacting)


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
