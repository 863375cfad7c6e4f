"""The fault matrix: each fault, injected over the loopback HTTP server, and the outcome it must lead to.

The table in ``docs/fault-matrix.md`` is generated from ``MATRIX`` below; a test keeps it in step
(``UPDATE_DOCS=1 make test`` rewrites it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tinkex_recovery import (
    EngineState,
    EventKind,
    FakeClock,
    RecoveryEngine,
    RecoveryExhausted,
    RecoveryPolicy,
    RunState,
    TinkerRest,
    recovery_guard,
)
from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve

from ..helpers import WAIT, EventLog, Gate, LostAnswers, join_attempt_threads, run_with_checkpoints
from ..http_support import KEY, FakeTime

DOC = Path(__file__).resolve().parents[2] / "docs" / "fault-matrix.md"


@dataclass
class Harness:
    """A corrupted-or-healthy run watched by an engine that polls over loopback HTTP."""

    sim: SimulatedTinker
    server: SimulatedServer
    engine: RecoveryEngine
    events: EventLog
    clock: FakeClock
    run_id: str
    rest: TinkerRest
    client: Any

    def polls(self) -> int:
        return sum(1 for r in self.server.requests if r.path.endswith(self.run_id))

    def recover(self) -> str:
        self.sim.corrupt(self.run_id)
        self.engine.poll_once()
        return self.engine_handle.wait_for_recovery(WAIT).checkpoint.path.name

    engine_handle: object = None  # set by the fixture


@pytest.fixture
def harness(sim: SimulatedTinker, clock: FakeClock, events: EventLog) -> Iterator[Harness]:
    client = run_with_checkpoints(sim, steps=6, every=2)
    policy = RecoveryPolicy(enabled=True, jitter=0.0, attempt_timeout=20.0, degraded_after=3)
    fake_time = FakeTime()
    with (
        serve(sim, api_key=KEY) as server,
        TinkerRest(
            base_url=server.base_url, api_key=KEY, max_retries=2, read_timeout=0.2, sleep=fake_time.sleep
        ) as rest,
        RecoveryEngine(policy, status=rest, clock=clock) as engine,
    ):
        engine.subscribe(events)
        h = Harness(sim, server, engine, events, clock, client.model_id, rest, client)
        h.engine_handle = engine.watch(client.model_id, sim)
        yield h


def poll_5xx(h: Harness) -> None:
    h.server.fail_next(3, 503)
    h.engine.poll_once()
    assert h.events.kinds() == ["poll_error"] and h.polls() == 3
    assert h.engine.watched_runs == [h.run_id] and h.sim.restore_calls == []


def poll_429_retry_after(h: Harness) -> None:
    h.server.fail_next(1, 429, retry_after=1.5)
    h.engine.poll_once()
    assert h.events.kinds() == [] and h.polls() == 2


def poll_read_timeout(h: Harness) -> None:
    h.server.delay_next(1, 1.0)
    h.engine.poll_once()
    assert h.events.kinds() == [] and h.polls() == 2


def poll_dropped_connection(h: Harness) -> None:
    h.server.drop_next(1)
    h.engine.poll_once()
    assert h.events.kinds() == [] and h.polls() == 2


def poll_malformed_json(h: Harness) -> None:
    h.server.malform_next(1)
    h.engine.poll_once()
    assert h.events.kinds() == ["poll_error"] and "MalformedResponse" in str(h.events.events[0].error)
    assert h.polls() == 1


def poll_401(h: Harness) -> None:
    h.server.fail_next(1, 401)
    h.engine.poll_once()
    assert h.events.kinds() == ["poll_error"] and "AuthenticationError" in str(h.events.events[0].error)
    assert h.polls() == 1


def poll_404_run_deleted(h: Harness) -> None:
    h.engine.poll_once()  # read once: then deleted, it is gone, not a run that never was
    h.sim.delete_run(h.run_id)
    h.engine.poll_once()
    assert h.events.kinds() == ["poll_error"] and "RunNotFound" in str(h.events.events[0].error)
    assert h.polls() == 2 and h.sim.restore_calls == []


def poll_404_never_found(h: Harness) -> None:
    h.sim.delete_run(h.run_id)  # as a mistyped run id: the first poll finds nothing
    h.engine.poll_once()
    h.engine.poll_once()
    assert h.events.kinds() == ["exhausted"] and h.events.events[0].reason == "run_not_found"
    assert h.polls() == 1 and h.sim.restore_calls == []
    assert getattr(h.engine_handle, "state", None) is RunState.EXHAUSTED


def server_down_for_several_intervals(h: Harness) -> None:
    h.server.drop_next(3 * 5)
    for _ in range(5):
        h.engine.poll_once()
    assert h.events.kinds().count("poll_degraded") == 1 and "detected" not in h.events.kinds()
    assert h.recover() == "0006"  # the run stayed watched through the outage


def restore_raises(h: Harness) -> None:
    h.sim.fail_restores(1, status_code=503)
    h.sim.corrupt(h.run_id)
    h.engine.poll_once()
    h.events.wait_for(EventKind.FAILED)
    h.clock.advance(5.0)
    assert h.engine_handle.wait_for_recovery(WAIT).attempts == 2  # type: ignore[attr-defined]


def after_backoff(h: Harness, seconds: float) -> None:
    """Once the failed attempt's retry waits out its backoff (so its due time is set), let ``seconds`` pass."""
    h.events.wait_until(lambda: h.engine._executor.delayed == 1)
    h.clock.advance(seconds)


def hang_past_attempt_timeout(h: Harness, **hang: Any) -> None:
    """The first restore call hangs past attempt_timeout; the next attempt starts and waits for that call (no
    second restore call while it is outstanding)."""
    h.sim.hang_restores(1, **hang)
    calling = threading.Event()
    h.sim.on_restore(lambda path: calling.set())
    h.sim.corrupt(h.run_id)
    h.engine.poll_once()
    assert calling.wait(WAIT)  # the restore call reached the server
    h.clock.advance(20.0)
    error = str(h.events.wait_for(EventKind.FAILED)[0].error)
    assert "attempt_timeout" in error and "has not answered" in error and "the next attempt waits for it" in error
    after_backoff(h, 5.0)
    h.events.wait_for(EventKind.STARTED, count=2)  # the second attempt is under way, waiting for the first call
    assert len(h.sim.restore_calls) == 1


def created_runs(h: Harness) -> list[str]:
    join_attempt_threads()  # the released call's thread has returned: the server's books are final
    return [r for r in h.sim.run_ids if r != h.run_id]


def restore_hangs_past_attempt_timeout(h: Harness) -> None:
    hang_past_attempt_timeout(h)
    h.sim.release()  # the outstanding call ends in a 504: the waiting attempt fails with it
    assert "504" in str(h.events.wait_for(EventKind.FAILED, count=2)[1].error)
    after_backoff(h, 10.0)  # the backoff: the third attempt restores again
    recovery = h.engine_handle.wait_for_recovery(WAIT)  # type: ignore[attr-defined]
    assert recovery.attempts == 3 and len(h.sim.restore_calls) == 2
    assert created_runs(h) == [recovery.new_run_id] and not h.events.of(EventKind.CLIENT_DISCARDED)


def late_answer_adopted(h: Harness, **hang: Any) -> None:
    hang_past_attempt_timeout(h, then="succeed", **hang)
    h.sim.release()  # the outstanding call answers: its client is the recovery's run
    recovery = h.engine_handle.wait_for_recovery(WAIT)  # type: ignore[attr-defined]
    assert recovery.attempts == 2 and len(h.sim.restore_calls) == 1
    assert created_runs(h) == [recovery.new_run_id] and h.engine_handle.run_id == recovery.new_run_id  # type: ignore[attr-defined]
    assert not h.events.of(EventKind.CLIENT_DISCARDED) and not h.events.of(EventKind.RUN_ORPHANED)


def restore_hangs_then_succeeds_late(h: Harness) -> None:
    late_answer_adopted(h)


def restore_future_pending_past_attempt_timeout(h: Harness) -> None:
    late_answer_adopted(h, future=True)


def restore_never_answers(h: Harness) -> None:
    hang_past_attempt_timeout(h, then="succeed", future=True)
    h.clock.advance(20.0)  # the second attempt's wait ends too
    h.events.wait_for(EventKind.FAILED, count=2)
    after_backoff(h, 10.0)
    h.events.wait_for(EventKind.STARTED, count=3)
    h.clock.advance(20.0)  # max_attempts=3 waited out: the recovery ends, and names the call it leaves
    with pytest.raises(RecoveryExhausted) as raised:
        h.engine_handle.wait_for_recovery(WAIT)  # type: ignore[attr-defined]
    assert raised.value.reason.value == "attempts" and len(h.sim.restore_calls) == 1
    assert "has not answered" in str(raised.value) and "will be closed and named" in str(raised.value)
    h.sim.release()  # it answers at last: its run is closed and named, never adopted
    (discarded,) = h.events.wait_for(EventKind.CLIENT_DISCARDED)
    assert created_runs(h) == [discarded.new_run_id] and len(h.sim.restore_calls) == 1
    assert h.events.kinds().count("started") == 3 and not h.events.of(EventKind.CLIENT_CREATED)


def restored_client_fails_its_first_call(h: Harness) -> None:
    assert h.recover() == "0006"
    new_run = h.engine_handle.run_id  # type: ignore[attr-defined]
    h.sim.corrupt(new_run)  # the new run is lost at once: its first call fails
    h.engine.poll_once()
    second = h.engine_handle.wait_for_recovery(WAIT)  # type: ignore[attr-defined]
    assert second.checkpoint.path.name == "0006" and h.sim.lineage(second.new_run_id) == list(range(6))


def latest_checkpoint_broken(h: Harness) -> None:
    h.sim.break_checkpoint(f"tinker://{h.run_id}/weights/0006")
    assert h.recover() == "0004"


def latest_checkpoint_expired(h: Harness) -> None:
    h.sim.expire_checkpoint(f"tinker://{h.run_id}/weights/0006")
    assert h.recover() == "0004" and len(h.events.of(EventKind.CHECKPOINT_SKIPPED)) == 1
    assert [c[0].rsplit("/", 1)[1] for c in h.sim.restore_calls] == ["0004"]


def latest_is_a_sampler_checkpoint(h: Harness) -> None:
    strategy = f"tinker://{h.run_id}/sampler_weights/0006"
    with pytest.raises(ValueError, match="sampler"):
        RecoveryPolicy(enabled=True, checkpoint_strategy=strategy)
    # As a listed checkpoint it is skipped like an expired one: see test_engine's sampler test.
    assert h.recover() == "0006"


def all_checkpoints_broken(h: Harness) -> None:
    for n in (2, 4, 6):
        h.sim.break_checkpoint(f"tinker://{h.run_id}/weights/{n:04d}")
    h.sim.corrupt(h.run_id)
    h.engine.poll_once()
    with pytest.raises(RecoveryExhausted):
        h.engine_handle.wait_for_recovery(WAIT)  # type: ignore[attr-defined]
    assert len(h.sim.restore_calls) == 3 and h.events.kinds()[-1] == "exhausted"


# -- abandon points: the first read, the listing, the restore; by attempt_timeout, by close(), by a leaving guard --
def every_run_made_is_adopted_or_named(h: Harness, adopted: list[str], made: int) -> None:
    """The server's books, once every attempt's thread has returned: ``made`` new runs, each adopted or named."""
    created = created_runs(h)
    assert len(created) == made, (created, h.events.kinds())

    def named() -> set[str]:
        naming = (EventKind.CLIENT_DISCARDED, EventKind.RUN_ORPHANED)
        return {str(e.new_run_id) for e in h.events.events if e.kind in naming}

    if h.engine.state is not EngineState.CLOSED:  # named on the engine's threads: wait for the delivery
        h.events.wait_until(lambda: set(created) <= set(adopted) | named())
    assert set(created) == set(adopted) | named() and not set(adopted) & named()


def abandon_by_timeout(h: Harness, reached: threading.Event, start: Callable[[], None], *, made: int = 1) -> None:
    """``start`` a recovery, let its attempt be abandoned at attempt_timeout where ``reached`` says it waits; the
    retry completes. ``made``: the runs on the server then (the retry's, and one the abandoned call made)."""
    start()
    assert reached.wait(WAIT)
    h.clock.advance(20.0)
    h.events.wait_for(EventKind.FAILED)
    h.clock.advance(5.0)
    recovery = h.engine_handle.wait_for_recovery(WAIT)  # type: ignore[attr-defined]
    every_run_made_is_adopted_or_named(h, [recovery.new_run_id], made=made)


def abandon_by_close(h: Harness, reached: threading.Event, start: Callable[[], None], *, made: int = 0) -> None:
    start()
    assert reached.wait(WAIT)
    h.engine.close(timeout=0.2)  # whatever it names is delivered before it returns
    every_run_made_is_adopted_or_named(h, [], made=made)


def first_read_by_timeout(h: Harness) -> None:
    with gated(h.sim.on_read) as gate:
        abandon_by_timeout(h, gate.reached, h.engine_handle.request_recovery)  # type: ignore[attr-defined]


def first_read_by_close(h: Harness) -> None:
    with gated(h.sim.on_read) as gate:
        abandon_by_close(h, gate.reached, h.engine_handle.request_recovery)  # type: ignore[attr-defined]


@contextlib.contextmanager
def gated(install: Callable[[Gate], None]) -> Iterator[Gate]:
    """A :class:`Gate` installed as a simulator hook, opened when the block ends (the abandoned call answers)."""
    gate = Gate()
    install(gate)
    try:
        yield gate
    finally:
        gate.open()


def corrupt_and_poll(h: Harness) -> Callable[[], None]:
    def start() -> None:
        h.sim.corrupt(h.run_id)
        h.engine.poll_once()

    return start


def listing_by_timeout(h: Harness) -> None:
    with gated(h.sim.on_list) as gate:
        abandon_by_timeout(h, gate.reached, corrupt_and_poll(h))


def listing_by_close(h: Harness) -> None:
    with gated(h.sim.on_list) as gate:
        abandon_by_close(h, gate.reached, corrupt_and_poll(h))


def losing_answers(h: Harness) -> LostAnswers:
    """The run watched anew through a service whose next restore makes its run and never answers."""
    service = LostAnswers(h.sim)
    h.engine_handle.unwatch()  # type: ignore[attr-defined]
    h.engine_handle = h.engine.watch(h.run_id, service)
    return service


def restore_answer_lost_by_timeout(h: Harness) -> None:
    service = losing_answers(h)
    corrupt_and_poll(h)()
    assert service.reached.wait(WAIT)
    for n in (1, 2, 3):  # each attempt waits for the one call, none sends another
        h.clock.advance(20.0)
        h.events.wait_for(EventKind.FAILED, count=n)
        if n < 3:
            after_backoff(h, 5.0 * 2 ** (n - 1))
            h.events.wait_for(EventKind.STARTED, count=n + 1)
    with pytest.raises(RecoveryExhausted, match="has not answered"):
        h.engine_handle.wait_for_recovery(WAIT)  # type: ignore[attr-defined]
    every_run_made_is_adopted_or_named(h, [], made=1)  # the lost one named from the listing
    service.cancel_all()


def restore_answer_lost_by_close(h: Harness) -> None:
    service = losing_answers(h)
    abandon_by_close(h, service.reached, corrupt_and_poll(h), made=1)
    service.cancel_all()


def guarded(h: Harness, service: Any, gate: Gate | None) -> Any:
    """A guard on the run (its own engine, its own clock), whose loop gives up while its recovery waits on
    ``gate`` (or on ``service``'s lost restore): the last guard leaves, its engine closes."""
    clock = FakeClock()
    policy = RecoveryPolicy(enabled=True, poll_interval=30.0, attempt_timeout=20.0, jitter=0.0)
    guard = recovery_guard(h.run_id, service, policy=policy, client=h.client, status=h.rest, clock=clock)
    with pytest.raises(RuntimeError, match="gives up"), guard:
        assert guard.engine is not None
        guard.engine.subscribe(h.events)
        h.sim.corrupt(h.run_id)
        clock.advance(30.0)  # a background poll finds it
        assert (gate.reached if gate is not None else service.reached).wait(WAIT)
        raise RuntimeError("the loop gives up")
    return guard


def first_read_by_a_leaving_guard(h: Harness) -> None:
    gate = Gate()
    h.sim.on_read(gate)
    clock = FakeClock()
    policy = RecoveryPolicy(enabled=True, poll_interval=30.0, attempt_timeout=20.0)

    async def resume() -> None:
        async with recovery_guard(h.run_id, h.sim, policy=policy, status=h.rest, clock=clock):
            raise AssertionError("the resume cannot have finished")

    async def main() -> None:
        task = asyncio.ensure_future(resume())  # resumes at entry: its first step is to read the run
        assert await asyncio.to_thread(gate.reached.wait, WAIT)
        task.cancel()  # the task is cancelled (Ctrl-C in asyncio.run): the guard leaves, its engine closes
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    gate.open()
    every_run_made_is_adopted_or_named(h, [], made=0)


def listing_by_a_leaving_guard(h: Harness) -> None:
    with gated(h.sim.on_list) as gate:
        guarded(h, h.sim, gate)
    every_run_made_is_adopted_or_named(h, [], made=0)


def restore_by_a_leaving_guard(h: Harness) -> None:
    service = LostAnswers(h.sim)
    guarded(h, service, None)
    every_run_made_is_adopted_or_named(h, [], made=1)  # named before the guard's exit returned
    service.cancel_all()


MATRIX: list[tuple[str, str, Callable[[Harness], None]]] = [
    ("poll: 503 until the client's retries run out", "poll_error; still watched; no recovery", poll_5xx),
    ("poll: 429 with Retry-After", "retried after Retry-After; no event", poll_429_retry_after),
    ("poll: read timeout", "retried; no event", poll_read_timeout),
    ("poll: dropped connection", "retried; no event", poll_dropped_connection),
    ("poll: malformed JSON", "poll_error (MalformedResponse); one request, not retried", poll_malformed_json),
    ("poll: 401", "poll_error (AuthenticationError); one request, not retried", poll_401),
    ("poll: 404, run deleted", "poll_error (RunNotFound); one request; no recovery", poll_404_run_deleted),
    (
        "poll: 404 on the first poll (no such run)",
        "exhausted (run_not_found); one request, never polled again; no recovery",
        poll_404_never_found,
    ),
    (
        "server down for several poll intervals",
        "one poll_degraded, no recovery; the run is still watched and recovers afterwards",
        server_down_for_several_intervals,
    ),
    ("restore raises (503)", "failed, retried after backoff on the same checkpoint, completed", restore_raises),
    (
        "restore hangs past attempt_timeout, then fails (504)",
        "failed (timed out); the next attempt waits for the call, fails with its 504; the one after restores; one "
        "new run",
        restore_hangs_past_attempt_timeout,
    ),
    (
        "restore hangs past attempt_timeout, then succeeds late",
        "the next attempt waits for the call (no second restore call) and adopts its late run; one new run",
        restore_hangs_then_succeeds_late,
    ),
    (
        "restore future still pending at attempt_timeout",
        "the next attempt waits for the future (no second restore call); its late run is adopted; one new run",
        restore_future_pending_past_attempt_timeout,
    ),
    (
        "restore never answers",
        "exhausted (attempts) after max_attempts waits, naming the call; one restore call; its late run is closed "
        "and named in client_discarded",
        restore_never_answers,
    ),
    (
        "restored run fails its first call (corrupted again)",
        "recovered again from the checkpoint it came from; lineage exact",
        restored_client_fails_its_first_call,
    ),
    ("latest checkpoint broken (400)", "next older checkpoint at once", latest_checkpoint_broken),
    ("latest checkpoint expired", "checkpoint_skipped, no restore call for it; next older", latest_checkpoint_expired),
    ("sampler checkpoint", "refused as a pinned path; skipped when listed", latest_is_a_sampler_checkpoint),
    ("all checkpoints broken", "exhausted after 1 + fallback_depth restore calls; never loops", all_checkpoints_broken),
    (
        "first read abandoned at attempt_timeout",
        "retried after backoff; the abandoned read makes no restore call; one new run, adopted",
        first_read_by_timeout,
    ),
    ("first read abandoned by close()", "no restore call after close(); no new run", first_read_by_close),
    (
        "first read abandoned by a leaving guard (task cancelled)",
        "the guard leaves, its engine closes; no restore call; no new run",
        first_read_by_a_leaving_guard,
    ),
    (
        "listing check abandoned at attempt_timeout",
        "retried; the abandoned attempt makes no restore call; one new run, adopted",
        listing_by_timeout,
    ),
    ("listing check abandoned by close()", "no restore call after close(); no new run", listing_by_close),
    (
        "listing check abandoned by a leaving guard",
        "the guard leaves, its engine closes; no restore call; no new run",
        listing_by_a_leaving_guard,
    ),
    (
        "restore made, answer lost, at attempt_timeout",
        "each attempt waits for the call, none sends another; exhausted (attempts); one new run, named in "
        "run_orphaned (from the listing)",
        restore_answer_lost_by_timeout,
    ),
    (
        "restore made, answer lost, close()",
        "one new run, named in run_orphaned before close() returns",
        restore_answer_lost_by_close,
    ),
    (
        "restore made, answer lost, a leaving guard",
        "one new run, named in run_orphaned before the guard's exit returns",
        restore_by_a_leaving_guard,
    ),
]


@pytest.mark.parametrize(("fault", "expected", "scenario"), MATRIX, ids=[row[0] for row in MATRIX])
def test_fault(harness: Harness, fault: str, expected: str, scenario: Callable[[Harness], None]) -> None:
    scenario(harness)


def render() -> str:
    lines = [
        "# Fault matrix",
        "",
        "Generated from `tests/reliability/test_fault_matrix.py`; every row is a test run by `make test`, over",
        "the loopback HTTP server (`tinkex_recovery.simulated.serve`) with the engine polling through `TinkerRest`.",
        "",
        "| fault | outcome asserted |",
        "|---|---|",
        *(f"| {fault} | {expected} |" for fault, expected, _ in MATRIX),
        "",
    ]
    return "\n".join(lines)


def test_the_documented_matrix_is_the_tested_one() -> None:
    if os.environ.get("UPDATE_DOCS"):
        DOC.write_text(render())
    assert DOC.read_text() == render(), "docs/fault-matrix.md is stale: run UPDATE_DOCS=1 make test"
