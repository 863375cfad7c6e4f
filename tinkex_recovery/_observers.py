"""Process-wide observers of every engine: the hook a metrics integration attaches to.

Engines are often private (inside ``recovery_guard`` or Lightning's ``TinkexRecovery``), so a metrics system
cannot subscribe to each one. Instead every engine reports here, and each registered
:class:`RecoveryObserver` hears from all of them:

- every event an engine emits (``report_event``, from the engine's event bus),
- the result of every poll, answered or failed (``report_poll``),
- the steps a training loop trains again after a recovery (``report_steps_lost``, from the integrations),
- and, when asked, how many runs the open engines watch (:func:`watched_run_count`; engines are tracked
  weakly from their creation).

With no observer registered each report costs one test of a module global: nothing else runs. Observers are
called on whichever thread reports (engine threads, the training loop's thread); one that raises is logged
and skipped, and never stops an engine. No framework is imported here.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._events import RecoveryEvent

__all__ = [
    "RecoveryObserver",
    "add_observer",
    "report_event",
    "report_poll",
    "report_steps_lost",
    "track_engine",
    "watched_run_count",
]

logger = logging.getLogger("tinkex_recovery")


class RecoveryObserver:
    """Hears what every engine in the process does. Subclass it and override the methods you need; the
    defaults do nothing. Methods are called on the reporting thread: keep them quick and thread-safe."""

    def on_event(self, event: RecoveryEvent) -> None:
        """Any engine emitted ``event``."""

    def on_poll(self, ok: bool) -> None:
        """An engine polled a run: ``ok`` if the server answered (corrupted or not), False if the poll failed."""

    def on_steps_lost(self, steps: int, integration: str) -> None:
        """After a recovery, a training loop trains ``steps`` steps again; ``integration`` says which kind of
        loop (``"guard"`` or ``"lightning"``)."""


_lock = threading.Lock()
_observers: tuple[RecoveryObserver, ...] = ()  # replaced whole under _lock, read without it
_engines: weakref.WeakSet[Any] = weakref.WeakSet()


def add_observer(observer: RecoveryObserver) -> Callable[[], None]:
    """Register ``observer`` for every engine, existing and future; returns the function that removes it."""
    global _observers  # noqa: PLW0603 (replaced whole: readers test one global, without a lock)
    if not isinstance(observer, RecoveryObserver):
        raise TypeError(f"observer must be a RecoveryObserver, got {type(observer).__name__}")
    with _lock:
        _observers = (*_observers, observer)

    def remove() -> None:
        global _observers  # noqa: PLW0603
        with _lock:
            _observers = tuple(o for o in _observers if o is not observer)

    return remove


def _failed(observer: RecoveryObserver, what: str) -> None:
    logger.exception("observer %r raised in %s; ignored", observer, what)


def report_event(event: RecoveryEvent) -> None:
    """An engine emitted ``event``."""
    if not _observers:
        return
    for observer in _observers:
        try:
            observer.on_event(event)
        except Exception:
            _failed(observer, "on_event")


def report_poll(ok: bool) -> None:
    """An engine's poll of a run was answered (``ok``) or failed."""
    if not _observers:
        return
    for observer in _observers:
        try:
            observer.on_poll(ok)
        except Exception:
            _failed(observer, "on_poll")


def report_steps_lost(steps: int, integration: str) -> None:
    """A training loop (``integration``: ``"guard"``, ``"lightning"``) trains ``steps`` steps again."""
    if not _observers:
        return
    for observer in _observers:
        try:
            observer.on_steps_lost(steps, integration)
        except Exception:
            _failed(observer, "on_steps_lost")


def track_engine(engine: Any) -> None:
    """Count ``engine``'s watched runs in :func:`watched_run_count` while it is open (held weakly)."""
    with _lock:
        _engines.add(engine)


def watched_run_count() -> int:
    """How many runs the open engines of this process watch (as their ``watched_runs`` list them)."""
    from ._engine import EngineState  # here, not at the top: the engine imports this module

    with _lock:
        engines = list(_engines)
    return sum(len(e.watched_runs) for e in engines if e.state is EngineState.OPENED)
