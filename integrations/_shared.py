"""The process's engines, shared by every guard (sync or async) with the same policy and clock.

A guard leases the engine at entry and returns it at exit; the engine starts with its first lease and closes,
threads and all, when its last lease is returned. So the thread count does not grow with the number of guarded
loops in a process: 16 loops with one policy run on the threads of one.
"""

from __future__ import annotations

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


class SharedEngines:
    """Refcounted engines, one per (policy, clock). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[tuple[RecoveryPolicy, Clock | None], _Lease] = {}

    def acquire(self, policy: RecoveryPolicy, clock: Clock | None) -> RecoveryEngine:
        """The started engine for ``policy`` and ``clock`` (None: the system clock), one more user counted."""
        key = (policy, clock)
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
