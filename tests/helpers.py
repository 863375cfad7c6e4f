"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from tinkex_recovery import EventKind, RecoveryEvent
from tinkex_recovery.simulated import SimulatedRestClient, SimulatedTinker, SimulatedTrainingClient

#: Generous bound for waiting on another thread's progress. Never a sleep: waits end as soon as it happens.
WAIT = 10.0


class EventLog:
    """Records events; lets a test wait (on a condition, not a sleep) until some have arrived."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: list[RecoveryEvent] = []

    def __call__(self, event: RecoveryEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def kinds(self) -> list[str]:
        with self._cond:
            return [e.kind.value for e in self.events]

    def of(self, kind: EventKind | str) -> list[RecoveryEvent]:
        with self._cond:
            return [e for e in self.events if e.kind == kind]

    def wait_for(self, kind: EventKind | str, count: int = 1, timeout: float = WAIT) -> list[RecoveryEvent]:
        with self._cond:
            ok = self._cond.wait_for(lambda: sum(e.kind == kind for e in self.events) >= count, timeout)
        assert ok, f"waited for {count} {kind!s} event(s); got {self.kinds()}"
        return self.of(kind)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), f"condition not met; events: {self.kinds()}"


def train(client: SimulatedTrainingClient, items: range | list[int]) -> None:
    """One optim step per item."""
    for item in items:
        client.forward_backward([item], "cross_entropy").result()
        client.optim_step().result()


def run_with_checkpoints(sim: SimulatedTinker, steps: int = 4, every: int = 2) -> SimulatedTrainingClient:
    """A run trained for ``steps`` steps with a checkpoint (name = step, metadata step/loss) every ``every``."""
    client = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    for step in range(steps):
        train(client, [step])
        if (step + 1) % every == 0:
            n = step + 1
            client.save_state(f"{n:04d}", user_metadata={"step": str(n), "loss": str(1.0 / n)}).result()
    return client


class Gate:
    """Installed as a simulator hook (``sim.on_read``, ``on_list``, ``on_restore``): the first ``armed`` calls
    it sees are held, each setting :attr:`reached`, until :meth:`open` (or ``WAIT`` seconds)."""

    def __init__(self, armed: int = 1) -> None:
        self._lock = threading.Lock()
        self._armed = armed
        self.reached = threading.Event()
        self._open = threading.Event()

    def __call__(self, *args: object) -> None:
        with self._lock:
            if self._armed <= 0:
                return
            self._armed -= 1
        self.reached.set()
        self._open.wait(WAIT)

    def open(self) -> None:
        self._open.set()


def join_attempt_threads() -> None:
    """Wait for every restore attempt's thread to return: the simulator's books are final then."""
    for t in threading.enumerate():
        if t.name.startswith(("tinkex-recovery-attempt", "tinkex-recovery-reconcile")):
            t.join(WAIT)


class LostAnswers:
    """A service on ``sim`` whose first ``n`` restores reach the server (their runs are made) and never answer, as
    when a connection drops after the server acted. :meth:`cancel_all` ends the futures left pending."""

    def __init__(self, sim: SimulatedTinker, n: int = 1) -> None:
        self.sim = sim
        self.n = n
        self.reached = threading.Event()
        self._lost: list[Future[SimulatedTrainingClient]] = []

    def create_training_client_from_state_with_optimizer(
        self, path: str, user_metadata: Mapping[str, str] | None = None
    ) -> Any:
        made = self.sim.create_training_client_from_state_with_optimizer(path, user_metadata=user_metadata)
        if self.n <= 0:
            return made
        self.n -= 1
        made.result()  # the server acted: the run exists
        self._lost.append(Future())
        self.reached.set()
        return self._lost[-1]

    create_training_client_from_state = create_training_client_from_state_with_optimizer

    def create_rest_client(self) -> SimulatedRestClient:
        return self.sim.create_rest_client()

    def cancel_all(self) -> None:
        for f in self._lost:
            f.cancel()


def true_in_a_forked_child(check: Callable[[], bool]) -> bool:
    """Whether ``check()`` returns True when run in a child of ``os.fork()`` (which then leaves without running
    the parent's cleanup); False if it returns False or raises."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = check()
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    return answer == b"1"
