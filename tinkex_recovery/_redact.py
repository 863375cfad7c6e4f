"""Keeps API keys out of every string the library produces (log lines, events, exception text).

Code that handles a key registers it; :func:`redact` replaces every registered key with ``***``. Once a key is
registered, the records of our loggers and of the HTTP stack's (``tinkex_recovery``, httpx, httpcore, the tinker
SDK, and every logger below them) are redacted before any handler sees them: the message, the attached
traceback (a guard's "step failed" WARNING carries the SDK's error, which may echo the key) and the stack.

A :class:`logging.Filter` on those loggers does it, not a global log-record factory: nothing another library
does to the factory (``logging.setLogRecordFactory``) can undo it, and records of every other logger cost not
one instruction more. Loggers are found by name when a key is registered and when an engine starts, so the
filter reaches those the HTTP stack creates at import; a record whose traceback held a key is handed on with
the redacted text as ``exc_text`` and no ``exc_info`` (a handler that formats exc_info itself sees none).
"""

from __future__ import annotations

import logging
import sys
import threading

__all__ = ["RedactedError", "redact", "redact_loggers", "register_secret", "without_secrets"]

_lock = threading.Lock()
_secrets: set[str] = set()


_REDACTED_LOGGERS = ("httpx", "httpcore", "tinker", "tinkex_recovery")


def register_secret(secret: str) -> None:
    """Remember ``secret`` so that :func:`redact` hides it. Short strings are ignored (they'd mask words)."""
    if len(secret) >= 8:
        with _lock:
            _secrets.add(secret)
        redact_loggers()


class _Redacting(logging.Filter):
    """Rewrites a record's message, traceback and stack without the registered secrets; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:  # no key registered: nothing to look for
            _scrub(record)
        return True


def _scrub(record: logging.LogRecord) -> None:
    try:
        text = record.getMessage()
    except Exception:  # a malformed record is logging's to report, not ours
        return
    clean = redact(text)
    if clean != text:
        record.msg, record.args = clean, None
    exc_info = record.exc_info
    if exc_info and exc_info[0] is not None:
        shown = record.exc_text or _formatter.formatException(exc_info)
        clean = redact(shown)
        # logging.Formatter prints exc_text as the traceback (and formats none itself once it is set): kept
        # either way, so a traceback is formatted once per record, not once here and once per handler.
        record.exc_text = clean
        if clean != shown:
            record.exc_info = None
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


_filter = _Redacting()
_formatter = logging.Formatter()


def redact_loggers() -> None:
    """Put the redacting filter on our loggers and the HTTP stack's, and on every logger below them that
    exists now. Idempotent and cheap (one pass over the logger names); called when a key is registered and
    when an engine starts."""
    if "httpx" in sys.modules and "httpcore" not in sys.modules:
        # httpx imports httpcore (whose loggers write response headers at DEBUG) at its first client: now, so
        # that its loggers exist to be given the filter, whoever makes the client and whenever.
        import httpcore  # noqa: F401
    names = [
        name
        for name, item in list(logging.Logger.manager.loggerDict.items())
        if isinstance(item, logging.Logger) and name.startswith(_REDACTED_LOGGERS)
    ]
    for name in {*_REDACTED_LOGGERS, *names}:
        if name in _REDACTED_LOGGERS or name.split(".", 1)[0] in _REDACTED_LOGGERS:
            logging.getLogger(name).addFilter(_filter)  # addFilter adds it once


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
