"""Values that may be futures: Tinker's SDK returns futures of clients and runs; simple fakes return values."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["resolve"]


def resolve(value: Any, timeout: float | None = None) -> Any:
    """Return ``value``, or ``value.result(timeout)`` if it is a future (anything with ``.result()``)."""
    result = getattr(value, "result", None)
    if result is None or not callable(result) or inspect.isclass(value):
        return value
    try:
        return result(timeout=timeout)
    except TypeError as exc:  # a future-like whose result() takes no timeout
        if "timeout" not in str(exc):
            raise
        return result()
