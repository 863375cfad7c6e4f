"""Keeps API keys out of every string the library produces (log lines, events, exception text).

Code that handles a key registers it; :func:`redact` replaces every registered key with ``***``.
"""

from __future__ import annotations

import threading

__all__ = ["redact", "register_secret"]

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
