"""The process's engines, shared by every guard (sync or async) with the same policy and clock.

A guard leases the engine at entry and returns it at exit; the engine starts with its first lease and closes,
threads and all, when its last lease is returned. So the thread count does not grow with the number of guarded
loops in a process: 16 loops with one policy run on the threads of one.

"The same policy" is equal settings and the *same* callbacks (``on_recovery``, ``on_failure``, by identity): an
engine calls its policy's callbacks for every run it watches, so guards whose callbacks are merely equal (two
instances of one dataclass) must not share one, or the first guard's callback would see the second's runs.
Callbacks need not be hashable. A forked child starts with no engine: the parent's have no threads in it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from tinkex_recovery import Clock, EngineState, RecoveryEngine, RecoveryPolicy

__all__ = ["SharedEngines", "shared_engines"]

#: Poll workers of a shared engine: polls of every guarded run (and the polls a failing step asks for) share them.
POLL_WORKERS = 4
#: Restores a shared engine runs at once (one per lineage at most); the others wait, first come first served.
RESTORES = 2


@dataclass(eq=False)
class _Lease:
    engine: RecoveryEngine
    users: int = 0


#: What makes two guards share an engine: the policy's settings, its callbacks' identities, the clock.
_Key = tuple[RecoveryPolicy, int, int, Clock | None]


def _key(policy: RecoveryPolicy, clock: Clock | None) -> _Key:
    settings = policy.replace(on_recovery=None, on_failure=None)  # hashable whatever the callbacks are
    return settings, id(policy.on_recovery), id(policy.on_failure), clock  # the lease's engine keeps them alive


class SharedEngines:
    """Refcounted engines, one per (policy settings, callbacks, clock). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[_Key, _Lease] = {}
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """In a forked child: the parent's engines have no threads here (nor must their REST clients, which
        share the parent's connections, be closed from here). Start afresh."""
        self._lock = threading.Lock()
        self._leases = {}

    def acquire(self, policy: RecoveryPolicy, clock: Clock | None) -> RecoveryEngine:
        """The started engine for ``policy`` and ``clock`` (None: the system clock), one more user counted."""
        key = _key(policy, clock)
        with self._lock:
            lease = self._leases.get(key)
            if lease is None or lease.engine.state is EngineState.CLOSED:
                engine = RecoveryEngine(policy, poll_concurrency=POLL_WORKERS, max_concurrent=RESTORES, clock=clock)
                lease = self._leases[key] = _Lease(engine.start())
            lease.users += 1
            return lease.engine

    def release(self, engine: RecoveryEngine, timeout: float = 1.0) -> None:
        """One user fewer; the last one closes the engine (waiting up to ``timeout`` for each thread)."""
        with self._lock:
            key = next((k for k, lease in self._leases.items() if lease.engine is engine), None)
            if key is None:
                return
            lease = self._leases[key]
            lease.users -= 1
            if lease.users > 0:
                return
            del self._leases[key]
        engine.close(timeout=timeout)

    def users(self, engine: RecoveryEngine) -> int:
        """How many guards use ``engine`` now (0 if it is not a shared engine)."""
        with self._lock:
            return next((lease.users for lease in self._leases.values() if lease.engine is engine), 0)


shared_engines = SharedEngines()
