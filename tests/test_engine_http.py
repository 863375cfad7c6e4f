"""The engine polling over real loopback HTTP: RecoveryEngine + TinkerRest + serve(SimulatedTinker).

Each HTTP fault meets the engine's expected behaviour: transient errors are retried inside a poll, and reported
as ``poll_error`` only when the retries run out; a run stays watched through an outage; a long outage emits
``poll_degraded`` and never a recovery; 401 and 404 are reported clearly, one request per poll. Polls are
driven by ``poll_once()`` / ``check_now()``; retry waits are recorded by FakeTime, never slept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tinkex_recovery import (
    EventKind,
    FakeClock,
    MalformedResponse,
    RecoveryEngine,
    RecoveryPolicy,
    RunHandle,
    RunNotFound,
    RunState,
    TinkerRest,
)
from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve

from .helpers import WAIT, EventLog, run_with_checkpoints, train
from .http_support import KEY, WRONG_KEY, FakeTime

POLICY = {"enabled": True, "jitter": 0.0, "degraded_after": 3, "poll_interval": 30.0}


@dataclass
class Net:
    """What a test here works with: the simulated Tinker behind its loopback server, the recorded retry waits,
    the engine's events, a run with two checkpoints, and factories of clients and engines (closed after)."""

    sim: SimulatedTinker
    server: SimulatedServer
    time: FakeTime
    events: EventLog
    run_id: str
    rest: Callable[..., TinkerRest]
    engine: Callable[..., RecoveryEngine]

    def hits(self, run_id: str | None = None) -> int:
        """Requests for the run itself (not its checkpoints)."""
        path = f"/api/v1/training_runs/{run_id or self.run_id}"
        return sum(r.path == path for r in self.server.requests)

    def watched(self, **rest: Any) -> tuple[RecoveryEngine, RunHandle]:
        """A started engine watching the run through a new client; its clock never moves, so only the
        test's ``poll_once()`` polls."""
        engine = self.engine(self.rest(**rest))
        return engine.start(), engine.watch(self.run_id, self.sim)

    def errors(self) -> list[str]:
        return [e.error or "" for e in self.events.of(EventKind.POLL_ERROR)]


@pytest.fixture
def net(sim: SimulatedTinker, clock: FakeClock, events: EventLog) -> Iterator[Net]:
    fake_time = FakeTime()
    clients: list[TinkerRest] = []
    engines: list[RecoveryEngine] = []
    with serve(sim, KEY) as server:

        def rest(**kwargs: Any) -> TinkerRest:
            options: dict[str, Any] = {
                "api_key": KEY,
                "base_url": server.base_url,
                "jitter": 0.0,
                "max_retries": 2,
                "sleep": fake_time.sleep,
                "monotonic": fake_time.monotonic,
                **kwargs,
            }
            clients.append(TinkerRest(**options))
            return clients[-1]

        def engine(status: TinkerRest, *, start: bool = False, **policy: Any) -> RecoveryEngine:
            engines.append(RecoveryEngine(RecoveryPolicy(**{**POLICY, **policy}), status=status, clock=clock))
            engines[-1].subscribe(events)
            return engines[-1].start() if start else engines[-1]

        run_id = run_with_checkpoints(sim, steps=4, every=2).model_id
        try:
            yield Net(sim, server, fake_time, events, run_id, rest, engine)
        finally:
            for e in engines:
                e.close()
            for c in clients:
                c.close()


# -- transient faults ----------------------------------------------------------------------------------------
def test_transient_errors_are_retried_within_the_poll_and_not_reported(net: Net) -> None:
    engine, _ = net.watched(max_retries=2)
    net.server.fail_next(2, 503)
    engine.poll_once()
    assert net.events.kinds() == []
    assert net.hits() == 3
    assert net.time.waits == [0.5, 1.0]


def test_when_retries_run_out_the_poll_reports_poll_error_and_the_run_stays_watched(net: Net) -> None:
    engine, handle = net.watched(max_retries=2)
    net.server.fail_next(3, 503)
    engine.poll_once()
    [error] = net.events.of(EventKind.POLL_ERROR)
    assert error.run_id == net.run_id
    assert error.error is not None
    assert error.error.startswith("TinkerStatusError: ")
    assert "HTTP 503 Service Unavailable" in error.error and "after 3 attempts" in error.error
    assert handle.state is RunState.WATCHING
    assert engine.watched_runs == [net.run_id]
    engine.poll_once()
    assert net.events.kinds() == ["poll_error"]  # the next poll got its answer: nothing new


def test_retry_after_is_honoured_inside_a_poll(net: Net) -> None:
    engine, _ = net.watched()
    net.server.fail_next(2, 429, retry_after=2.5)
    engine.poll_once()
    assert net.time.waits == [2.5, 2.5]
    assert net.events.kinds() == []


def test_a_dropped_connection_is_retried_and_a_dead_one_reported(net: Net) -> None:
    engine, _ = net.watched(max_retries=2)
    net.server.drop_next(1)
    engine.poll_once()
    assert net.events.kinds() == []
    net.server.drop_next(3)
    engine.poll_once()
    [error] = net.errors()
    assert error.startswith("TinkerConnectionError: ") and "RemoteProtocolError" in error


def test_a_slow_server_is_a_poll_error_within_the_time_bound(net: Net) -> None:
    engine, _ = net.watched(max_retries=0, read_timeout=0.2, monotonic=time.monotonic)
    net.server.delay_next(1, seconds=5.0)
    started = time.monotonic()
    engine.poll_once()
    assert time.monotonic() - started < 2.0
    [error] = net.errors()
    assert "ReadTimeout" in error


# -- a long outage ---------------------------------------------------------------------------------------------
def test_a_long_outage_degrades_once_never_recovers_and_the_run_is_recovered_after_it(net: Net) -> None:
    engine = net.engine(net.rest(max_retries=1), start=True)
    handle = engine.watch(net.run_id, net.sim)
    net.server.fail_next(1000, 503)
    net.sim.corrupt(net.run_id)  # the run is lost during the outage, but nobody can see it yet
    for _ in range(6):
        engine.poll_once()
    assert len(net.errors()) >= 6  # (the engine's own first poll, at start, may add one)
    [degraded] = net.events.of(EventKind.POLL_DEGRADED)
    assert degraded.run_id == net.run_id
    assert degraded.error is not None and "3 polls failed in a row" in degraded.error
    assert net.events.of(EventKind.DETECTED) == []
    assert handle.state is RunState.WATCHING
    assert net.sim.restore_calls == []

    net.server.clear_faults()  # the outage ends: the next poll sees the corruption
    handle.check_now()
    recovery = handle.wait_for_recovery(timeout=WAIT)
    assert recovery.old_run_id == net.run_id
    assert handle.run_id == recovery.new_run_id != net.run_id


# -- client errors: clear, and one request per poll ------------------------------------------------------------
def test_a_rejected_key_is_reported_and_not_retried(net: Net) -> None:
    engine, handle = net.watched(api_key=WRONG_KEY, max_retries=5)
    for _ in range(3):
        engine.poll_once()
    errors = net.errors()
    assert len(errors) == 3
    assert all(e.startswith("AuthenticationError: ") and "HTTP 401" in e for e in errors)
    assert "the API key was rejected" in errors[0]
    assert net.hits() == 3  # one request per poll: no hot loop
    assert net.time.waits == []
    assert len(net.events.of(EventKind.POLL_DEGRADED)) == 1
    assert handle.state is RunState.WATCHING


def test_a_deleted_run_is_reported_as_not_found_one_request_per_poll(net: Net) -> None:
    engine, _ = net.watched(max_retries=5)
    engine.poll_once()  # read once: deleted after that, it is gone rather than never there (see test_run_not_found)
    net.sim.delete_run(net.run_id)
    engine.poll_once()
    engine.poll_once()
    errors = net.errors()
    assert len(errors) == 2
    assert errors[0].startswith("RunNotFound: ") and "HTTP 404" in errors[0] and net.run_id in errors[0]
    assert net.hits() == 3
    with pytest.raises(RunNotFound) as info:  # the listing a recovery would make says the same
        net.rest().list_checkpoints(net.run_id)
    assert (info.value.status_code, info.value.run_id) == (404, net.run_id)


def test_a_malformed_answer_is_a_poll_error_not_a_crash(net: Net) -> None:
    engine, handle = net.watched(max_retries=5)
    net.server.malform_next(1)
    net.server.malform_next(1, body=b'{"training_run_id": 7}')
    engine.poll_once()
    engine.poll_once()
    errors = net.errors()
    assert [e.split(":")[0] for e in errors] == [MalformedResponse.__name__] * 2
    assert "not JSON" in errors[0] and "unexpected JSON" in errors[1]
    assert net.hits() == 2  # not retried: the next poll is the retry
    engine.poll_once()
    assert len(net.errors()) == 2
    assert handle.state is RunState.WATCHING


# -- end to end ------------------------------------------------------------------------------------------------
def test_a_corrupted_run_is_recovered_end_to_end_over_http(net: Net) -> None:
    engine = net.engine(net.rest(), start=True)
    handle = engine.watch(net.run_id, net.sim)
    net.sim.corrupt(net.run_id)
    assert handle.check_now()
    recovery = handle.wait_for_recovery(timeout=WAIT)
    assert recovery.checkpoint.tinker_path == f"tinker://{net.run_id}/weights/0004"
    assert net.sim.lineage(recovery.new_run_id) == [0, 1, 2, 3]
    assert net.events.of(EventKind.COMPLETED)[0].new_run_id == recovery.new_run_id

    train(handle.client, [4])  # the recovered run trains on, and is watched over HTTP under its new id
    engine.poll_once()
    assert net.server.requests[-1].path == f"/api/v1/training_runs/{recovery.new_run_id}"
    assert net.sim.lineage(recovery.new_run_id) == [0, 1, 2, 3, 4]


def test_a_rejected_checkpoint_falls_back_through_a_paginated_listing(net: Net) -> None:
    client = run_with_checkpoints(net.sim, steps=6, every=2)
    net.sim.break_checkpoint(f"tinker://{client.model_id}/weights/0006")
    net.server.page_size = 1
    engine = net.engine(net.rest(), start=True)
    handle = engine.watch(client.model_id, net.sim)
    net.sim.corrupt(client.model_id)
    handle.check_now()
    recovery = handle.wait_for_recovery(timeout=WAIT)
    assert recovery.checkpoint.tinker_path == f"tinker://{client.model_id}/weights/0004"
    listing = [r.query for r in net.server.requests if r.path.endswith("/checkpoints")]
    assert listing == [{}, {"offset": "1", "limit": "1"}, {"offset": "2", "limit": "1"}]


def test_many_runs_are_polled_concurrently_through_one_pool(net: Net) -> None:
    run_ids = [run_with_checkpoints(net.sim, steps=2, every=2).model_id for _ in range(12)]
    net.server.latency = 0.02
    engine = net.engine(net.rest(max_connections=4), start=True)
    for run_id in run_ids:
        engine.watch(run_id, net.sim)
    engine.poll_once()
    assert all(net.hits(run_id) >= 1 for run_id in run_ids)
    assert net.errors() == []
    assert 1 < len({r.connection for r in net.server.requests}) <= 4  # side by side, within the pool's bound


# -- the key never shows -----------------------------------------------------------------------------------------
def test_the_api_key_never_appears_in_logs_events_reprs_or_errors(net: Net, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "tinkex_recovery"):
        caplog.set_level(logging.DEBUG, logger=name)
    rest = net.rest(max_retries=2)
    wrong = net.rest(api_key=WRONG_KEY, max_retries=2)
    engine = net.engine(rest).start()
    handle = engine.watch(net.run_id, net.sim)
    texts: list[str] = [repr(rest), str(rest), repr(wrong), repr(net.server), repr(engine), repr(handle)]

    net.server.fail_next(2, 503, retry_after=0.1)  # retried within a poll: debug log lines
    net.server.fail_next(3, 502)  # a status error, reported
    net.server.drop_next(3)  # a connection error, reported
    net.server.malform_next(1)  # a malformed body, reported
    for _ in range(4):
        engine.poll_once()
    for call in (wrong.get_training_run, wrong.list_checkpoints):
        try:
            call(net.run_id)
        except Exception as exc:
            texts += [str(exc), repr(exc), repr(exc.__cause__)]
    net.sim.corrupt(net.run_id)
    handle.check_now()
    recovery = handle.wait_for_recovery(timeout=WAIT)
    texts += [repr(recovery), repr(handle)]

    assert {"poll_error", "poll_degraded", "detected", "completed"} <= set(net.events.kinds())
    texts += [e.message for e in net.events.events] + [repr(e) for e in net.events.events]
    texts += [caplog.text] + [r.getMessage() for r in caplog.records]
    loggers = {r.name.split(".")[0] for r in caplog.records}
    assert {"httpx", "httpcore", "tinkex_recovery"} <= loggers  # the scan saw every library's lines
    for text in texts:
        assert KEY not in text
        assert WRONG_KEY not in text
