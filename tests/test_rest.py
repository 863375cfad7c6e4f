"""TinkerRest over real loopback HTTP (``serve()``): retries, time bounds, typed errors, pagination, pooling.

Retry waits go through an injected :class:`FakeTime`, so they are recorded, not slept. The few real timeouts
are a fraction of a second. Odd JSON that the simulated server cannot produce uses ``httpx.MockTransport``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import pytest

from tinkex_recovery import (
    AuthenticationError,
    ClientClosed,
    EventKind,
    FakeClock,
    MalformedResponse,
    MissingAPIKey,
    PermissionDenied,
    RecoveryEngine,
    RecoveryEvent,
    RecoveryExhausted,
    RecoveryPolicy,
    RunNotFound,
    TinkerConnectionError,
    TinkerRest,
    TinkerStatusError,
)
from tinkex_recovery.rest import DEFAULT_BASE_URL
from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve

from .helpers import WAIT, EventLog, run_with_checkpoints
from .http_support import KEY, WRONG_KEY, FakeTime

MakeRest = Callable[..., TinkerRest]


@pytest.fixture
def server(sim: SimulatedTinker) -> Iterator[SimulatedServer]:
    with serve(sim, KEY) as srv:
        yield srv


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def make_rest(server: SimulatedServer, fake_time: FakeTime) -> Iterator[MakeRest]:
    """TinkerRest on the loopback server; waits recorded in ``fake_time``, no jitter."""
    made: list[TinkerRest] = []

    def make(**kwargs: Any) -> TinkerRest:
        options: dict[str, Any] = {
            "api_key": KEY,
            "base_url": server.base_url,
            "jitter": 0.0,
            "sleep": fake_time.sleep,
            "monotonic": fake_time.monotonic,
            **kwargs,
        }
        rest = TinkerRest(**options)
        made.append(rest)
        return rest

    yield make
    for rest in made:
        rest.close()


@pytest.fixture
def run_id(sim: SimulatedTinker) -> str:
    return run_with_checkpoints(sim, steps=4, every=2).model_id


def mock_rest(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> TinkerRest:
    return TinkerRest(
        api_key=KEY, base_url="http://tinker.test", transport=httpx.MockTransport(handler), jitter=0.0, **kwargs
    )


def run_json(run_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "training_run_id": run_id,
        "base_model": "Qwen/Qwen3-8B",
        "model_owner": "me",
        "is_lora": True,
        "last_request_time": "2026-01-01T00:00:00Z",
        **fields,
    }


def checkpoint_json(run_id: str, name: str) -> dict[str, Any]:
    return {
        "checkpoint_id": f"weights/{name}",
        "checkpoint_type": "training",
        "time": f"2026-01-01T00:00:{name[-2:]}Z",
        "tinker_path": f"tinker://{run_id}/weights/{name}",
    }


# -- construction -------------------------------------------------------------------------------------------
def test_a_missing_key_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    with pytest.raises(MissingAPIKey, match="TINKER_API_KEY"):
        TinkerRest()
    with pytest.raises(MissingAPIKey):
        TinkerRest(api_key="  ")
    with pytest.raises(ValueError, match="whitespace") as bad:
        TinkerRest(api_key=f"{KEY}\n")
    assert KEY not in str(bad.value)
    assert issubclass(MissingAPIKey, ValueError)


def test_key_and_url_come_from_the_environment_else_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)
    with TinkerRest() as rest:
        assert str(rest.base_url) == DEFAULT_BASE_URL
    monkeypatch.setenv("TINKER_BASE_URL", "http://127.0.0.1:9/prefix/")
    with TinkerRest() as rest:
        assert str(rest.base_url) == "http://127.0.0.1:9/prefix"
    with TinkerRest(base_url="https://example.test") as rest:
        assert rest.base_url.host == "example.test"


def test_the_key_goes_in_x_api_key_under_the_base_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=run_json("s:train:0"))

    with TinkerRest(base_url="https://h.test/services/tinker-prod", transport=httpx.MockTransport(handler)) as rest:
        rest.get_training_run("s:train:0")
    assert seen[0].headers["X-API-Key"] == KEY
    assert seen[0].url.raw_path == b"/services/tinker-prod/api/v1/training_runs/s:train:0?access_scope=owned"
    with TinkerRest(base_url="https://h.test/", transport=httpx.MockTransport(handler)) as rest:
        rest.get_training_run("s:train:0")
    assert str(seen[1].url) == "https://h.test/api/v1/training_runs/s:train:0?access_scope=owned"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"read_timeout": -1},
        {"max_retries": -1},
        {"max_connections": 0},
        {"backoff": 2.0, "max_backoff": 1.0},
        {"jitter": 2.0},
        {"base_url": "ftp://x"},
        {"base_url": "https://h.test/services?x=1"},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TinkerRest(api_key=KEY, **kwargs)


def test_repr_masks_the_key_and_close_is_idempotent(make_rest: MakeRest, run_id: str) -> None:
    rest = make_rest()
    assert KEY not in repr(rest) and "tml-***" in repr(rest)
    rest.close()
    rest.close()
    with pytest.raises(ClientClosed, match="closed"):
        rest.get_training_run(run_id)


# -- the two endpoints ----------------------------------------------------------------------------------------
def test_get_training_run_returns_the_model(
    make_rest: MakeRest, sim: SimulatedTinker, server: SimulatedServer, run_id: str
) -> None:
    run = make_rest().get_training_run(run_id)
    assert run == sim.get_training_run(run_id)
    assert [(r.path, r.query) for r in server.requests] == [
        (f"/api/v1/training_runs/{run_id}", {"access_scope": "owned"})
    ]


def test_run_ids_are_validated_and_odd_characters_encoded() -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        return httpx.Response(404, json={"detail": "no"})

    with mock_rest(handler) as rest:
        with pytest.raises(ValueError):
            rest.get_training_run("a/b")
        with pytest.raises(ValueError):
            rest.get_training_run("")
        with pytest.raises(RunNotFound):
            rest.get_training_run("a?b#c")
    assert seen == [b"/api/v1/training_runs/a%3Fb%23c?access_scope=owned"]


def test_list_checkpoints_follows_the_cursor(
    make_rest: MakeRest, sim: SimulatedTinker, server: SimulatedServer
) -> None:
    run_id = run_with_checkpoints(sim, steps=5, every=1).model_id
    server.page_size = 2
    listing = make_rest().list_checkpoints(run_id)
    assert listing.checkpoints == sim.list_checkpoints(run_id).checkpoints
    assert listing.cursor is None
    assert [r.query for r in server.requests] == [{}, {"offset": "2", "limit": "2"}, {"offset": "4", "limit": "2"}]


def test_an_unpaginated_listing_is_one_request(make_rest: MakeRest, server: SimulatedServer, run_id: str) -> None:
    assert len(make_rest().list_checkpoints(run_id).checkpoints) == 2
    assert len(server.requests) == 1


def test_a_checkpoint_seen_on_two_pages_is_kept_once() -> None:
    pages = {
        None: {"checkpoints": [checkpoint_json("r", "0003"), checkpoint_json("r", "0002")], "cursor": [0, 2, 4]},
        "2": {"checkpoints": [checkpoint_json("r", "0002"), checkpoint_json("r", "0001")], "cursor": [2, 2, 4]},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        page = dict(pages[request.url.params.get("offset")])
        offset, limit, total = page["cursor"]
        page["cursor"] = {"offset": offset, "limit": limit, "total_count": total}
        return httpx.Response(200, json=page)

    with mock_rest(handler) as rest:
        listing = rest.list_checkpoints("r")
    assert [c.checkpoint_id for c in listing.checkpoints] == ["weights/0003", "weights/0002", "weights/0001"]


def test_a_cursor_that_does_not_advance_is_malformed_not_an_endless_loop() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)  # the server ignores offset: always the first page
        cursor = {"offset": 0, "limit": 1, "total_count": 5}
        return httpx.Response(200, json={"checkpoints": [checkpoint_json("r", "0001")], "cursor": cursor})

    with mock_rest(handler) as rest, pytest.raises(MalformedResponse, match="does not advance"):
        rest.list_checkpoints("r")
    assert len(calls) == 2


# -- retries ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried_with_backoff(
    make_rest: MakeRest, server: SimulatedServer, fake_time: FakeTime, run_id: str, status: int
) -> None:
    server.fail_next(3, status)
    run = make_rest(max_retries=3, backoff=0.5, max_backoff=4.0).get_training_run(run_id)
    assert run.training_run_id == run_id
    assert fake_time.waits == [0.5, 1.0, 2.0]
    assert [r.status for r in server.requests] == [status, status, status, 200]


def test_when_retries_run_out_the_status_error_says_so(
    make_rest: MakeRest, server: SimulatedServer, fake_time: FakeTime, run_id: str
) -> None:
    server.fail_next(10, 503)
    with pytest.raises(TinkerStatusError) as info:
        make_rest(max_retries=2).get_training_run(run_id)
    assert info.value.status_code == 503
    assert info.value.run_id == run_id
    assert "503 Service Unavailable: simulated HTTP fault (after 3 attempts)" in str(info.value)
    assert len(server.requests) == 3
    assert len(fake_time.waits) == 2


def test_retry_after_is_honoured(
    make_rest: MakeRest, server: SimulatedServer, fake_time: FakeTime, run_id: str
) -> None:
    server.fail_next(2, 429, retry_after=1.5)
    make_rest(backoff=0.1).get_training_run(run_id)
    assert fake_time.waits == [1.5, 1.5]


def test_a_retry_after_beyond_the_time_bound_fails_at_once(
    make_rest: MakeRest, server: SimulatedServer, fake_time: FakeTime, run_id: str
) -> None:
    server.fail_next(1, 503, retry_after=60)
    with pytest.raises(TinkerStatusError, match="no time left in the 10s bound"):
        make_rest(timeout=10.0).get_training_run(run_id)
    assert fake_time.waits == []
    assert len(server.requests) == 1


def test_x_should_retry_overrides_the_status(
    make_rest: MakeRest, server: SimulatedServer, fake_time: FakeTime, run_id: str
) -> None:
    rest = make_rest()
    server.fail_next(1, 503, should_retry=False)
    with pytest.raises(TinkerStatusError):
        rest.get_training_run(run_id)
    assert len(server.requests) == 1
    server.fail_next(1, 400, should_retry=True)
    assert rest.get_training_run(run_id).training_run_id == run_id
    assert [r.status for r in server.requests] == [503, 400, 200]


@pytest.mark.parametrize(
    "case", [(401, AuthenticationError), (403, PermissionDenied), (404, RunNotFound), (400, TinkerStatusError)]
)
def test_client_errors_fail_at_once_with_typed_errors(
    make_rest: MakeRest,
    server: SimulatedServer,
    fake_time: FakeTime,
    run_id: str,
    case: tuple[int, type[TinkerStatusError]],
) -> None:
    status, error = case
    server.fail_next(1, status)
    with pytest.raises(error) as info:
        make_rest(max_retries=5).get_training_run(run_id)
    assert type(info.value) is error
    assert (info.value.status_code, info.value.run_id) == (status, run_id)
    assert f"HTTP {status}" in str(info.value) and run_id in str(info.value)
    assert len(server.requests) == 1
    assert fake_time.waits == []


def test_a_wrong_key_and_an_unknown_run(make_rest: MakeRest, sim: SimulatedTinker, run_id: str) -> None:
    with pytest.raises(AuthenticationError, match="the API key was rejected"):
        make_rest(api_key=WRONG_KEY).get_training_run(run_id)
    sim.delete_run(run_id)
    with pytest.raises(RunNotFound) as info:
        make_rest().list_checkpoints(run_id)
    assert info.value.run_id == run_id


def test_a_dropped_connection_is_retried(
    make_rest: MakeRest, server: SimulatedServer, fake_time: FakeTime, run_id: str
) -> None:
    server.drop_next(1)
    assert make_rest().get_training_run(run_id).training_run_id == run_id
    assert [r.status for r in server.requests] == [None, 200]
    assert fake_time.waits == [0.5]


def test_connections_dropped_every_time_end_as_a_connection_error(
    make_rest: MakeRest, server: SimulatedServer, run_id: str
) -> None:
    server.drop_next(10)
    with pytest.raises(TinkerConnectionError, match=r"RemoteProtocolError.*after 3 attempts") as info:
        make_rest(max_retries=2).get_training_run(run_id)
    assert info.value.run_id == run_id
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)


def test_a_refused_connection_is_retried_then_reported(fake_time: FakeTime) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rest = TinkerRest(
        api_key=KEY, base_url=f"http://127.0.0.1:{port}", jitter=0.0, sleep=fake_time.sleep, max_retries=2
    )
    with rest, pytest.raises(TinkerConnectionError, match="ConnectError"):
        rest.get_training_run("a:train:0")
    assert fake_time.waits == [0.5, 1.0]


def test_a_slow_response_times_out_and_is_retried(
    make_rest: MakeRest, server: SimulatedServer, fake_time: FakeTime, run_id: str
) -> None:
    server.delay_next(1, seconds=5.0)
    started = time.monotonic()
    rest = make_rest(read_timeout=0.2, monotonic=time.monotonic)
    assert rest.get_training_run(run_id).training_run_id == run_id
    assert time.monotonic() - started < 2.0
    assert len(fake_time.waits) == 1


def test_a_whole_call_ends_within_its_time_bound(make_rest: MakeRest, server: SimulatedServer, run_id: str) -> None:
    server.latency = 1.0
    rest = make_rest(timeout=0.3, read_timeout=5.0, monotonic=time.monotonic)
    started = time.monotonic()
    with pytest.raises(TinkerConnectionError, match="ReadTimeout"):
        rest.get_training_run(run_id)
    assert time.monotonic() - started < 0.9  # the answer would have come after 1 s


def test_retries_stop_when_the_time_bound_is_spent(
    make_rest: MakeRest, server: SimulatedServer, fake_time: FakeTime, run_id: str
) -> None:
    server.fail_next(10, 503)
    with pytest.raises(TinkerStatusError, match="after 2 attempts; no time left in the 2s bound"):
        make_rest(timeout=2.0, backoff=1.0, max_backoff=8.0, max_retries=10).get_training_run(run_id)
    assert fake_time.waits == [1.0]  # the next wait (2 s) would end past the bound


def test_close_wakes_a_retry_wait(server: SimulatedServer, run_id: str) -> None:
    server.fail_next(1, 503, retry_after=30)
    rest = TinkerRest(api_key=KEY, base_url=server.base_url, timeout=60.0)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            rest.get_training_run(run_id)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert server.wait_for_requests(1, timeout=WAIT)
    rest.close()
    caller.join(WAIT)
    assert not caller.is_alive()
    assert isinstance(outcome[0], ClientClosed)


# -- malformed answers ---------------------------------------------------------------------------------------
def test_a_cut_off_body_is_malformed_and_not_retried(make_rest: MakeRest, server: SimulatedServer, run_id: str) -> None:
    server.malform_next(1)
    with pytest.raises(MalformedResponse, match="not JSON") as info:
        make_rest().get_training_run(run_id)
    assert info.value.run_id == run_id
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"unexpected": true}', "unexpected JSON, 5 error"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"checkpoints": "none"}', "first at checkpoints"),
    ],
)
def test_json_of_the_wrong_shape_is_malformed(
    make_rest: MakeRest, server: SimulatedServer, run_id: str, body: bytes, message: str
) -> None:
    rest = make_rest()
    server.malform_next(2, body=body)
    method = rest.list_checkpoints if b"checkpoints" in body else rest.get_training_run
    with pytest.raises(MalformedResponse, match=message):
        method(run_id)


def test_an_answer_about_another_run_is_malformed() -> None:
    with (
        mock_rest(lambda request: httpx.Response(200, json=run_json("other:train:0"))) as rest,
        pytest.raises(MalformedResponse, match="instead"),
    ):
        rest.get_training_run("mine:train:0")


def test_unknown_fields_are_ignored_and_corrupted_is_read() -> None:
    body = run_json("r:train:0", corrupted=True, brand_new_field={"x": 1})
    with mock_rest(lambda request: httpx.Response(200, content=json.dumps(body).encode())) as rest:
        assert rest.get_training_run("r:train:0").corrupted is True


# -- one pool shared by threads ------------------------------------------------------------------------------
def test_threads_share_one_keep_alive_pool(make_rest: MakeRest, server: SimulatedServer, run_id: str) -> None:
    rest = make_rest(max_connections=4)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def poll() -> None:
        barrier.wait(WAIT)
        try:
            for _ in range(5):
                rest.get_training_run(run_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert errors == []
    assert len(server.requests) == 40
    assert len({r.connection for r in server.requests}) <= 4


# -- secrets: a server that echoes the key -----------------------------------------------------------------
#: A key no other test uses, so that only the TinkerRest under test can have registered it for redaction.
FRESH_KEY = f"tml-ECHOED-{uuid.uuid4().hex}"


def leaks(key: str, texts: Iterable[str]) -> list[str]:
    """The texts that contain ``key``, or the part of it after its prefix (a key cut in two still leaks)."""
    return [text for text in texts if key in text or key[4:] in text]


def exception_texts(exc: BaseException) -> list[str]:
    """Everything an exception shows: str, repr, args, and the whole traceback with its causes and contexts."""
    return [str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(exc))]


def debug_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    """Capture DEBUG records of every logger, including the third-party ones that set a level of their own
    (importing tinker sets httpx's to WARNING)."""
    for name in (None, "httpx", "httpcore", "tinker"):
        caplog.set_level(logging.DEBUG, logger=name)


def log_lines(records: Iterable[logging.LogRecord]) -> list[str]:
    """Each record as a handler would write it, with its traceback if it has one."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(record) for record in records]


@pytest.mark.parametrize("key", [KEY, FRESH_KEY], ids=["server-key", "fresh-key"])
@pytest.mark.parametrize("status", [400, 401, 403, 404, 503])
def test_a_key_the_server_echoes_is_in_no_error_and_no_log_line(
    *,
    server: SimulatedServer,
    fake_time: FakeTime,
    run_id: str,
    caplog: pytest.LogCaptureFixture,
    key: str,
    status: int,
) -> None:
    debug_everywhere(caplog)
    rest = TinkerRest(
        api_key=key, base_url=server.base_url, max_retries=1, sleep=fake_time.sleep, monotonic=fake_time.monotonic
    )
    errors: list[BaseException] = []
    with rest:
        for call in (rest.get_training_run, rest.list_checkpoints):
            server.echo_key_next(2, status)  # a 503 is retried once: both answers echo the key
            with pytest.raises(TinkerStatusError) as info:
                call(run_id)
            errors.append(info.value)
    assert all("***" in str(error) for error in errors)  # the key was echoed, and redacted
    assert not leaks(key, [text for error in errors for text in exception_texts(error)])
    lines = log_lines(caplog.records)
    assert any(r.name.startswith("httpx") for r in caplog.records)  # the check below is not vacuous
    assert not leaks(key, lines)


def test_a_key_the_server_echoes_in_a_header_is_in_no_httpcore_log_line(
    make_rest: MakeRest, server: SimulatedServer, run_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    debug_everywhere(caplog)
    server.echo_key_next(1, 400)
    with pytest.raises(TinkerStatusError):
        make_rest(max_retries=0).get_training_run(run_id)
    lines = log_lines(r for r in caplog.records if r.name.startswith("httpcore"))
    assert lines  # httpcore did log the exchange
    assert not leaks(KEY, lines)


def test_a_key_the_server_echoes_is_in_no_event_and_no_recovery_error(
    *,
    make_rest: MakeRest,
    server: SimulatedServer,
    sim: SimulatedTinker,
    clock: FakeClock,
    run_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    debug_everywhere(caplog)
    events = EventLog()
    policy = RecoveryPolicy(
        enabled=True, poll_interval=3600, backoff=0, max_backoff=0, max_attempts=2, checkpoint_strategy="best"
    )
    with RecoveryEngine(policy, status=make_rest(max_retries=0), clock=clock) as engine:
        engine.subscribe(events)
        handle = engine.watch(run_id, sim)
        server.echo_key_next(1, 503)
        engine.poll_once()  # poll_error
        events.wait_for(EventKind.POLL_ERROR)
        sim.corrupt(run_id)
        server.delay_next(1, 0.0)  # the poll that detects the corruption is answered as usual,
        server.echo_key_next(10, 503)  # then every listing the recovery makes ('best' lists) echoes the key
        engine.poll_once()
        with pytest.raises(RecoveryExhausted) as info:
            handle.wait_for_recovery(timeout=WAIT)
        events.wait_for(EventKind.EXHAUSTED)
    server.clear_faults()
    failures = [e for e in events.events if e.error]
    assert {e.kind for e in failures} >= {EventKind.POLL_ERROR, EventKind.FAILED}
    assert all("***" in (e.error or "") for e in failures if e.kind is not EventKind.EXHAUSTED)  # echoed, redacted
    event_texts = [repr(e) for e in events.events] + [str(v) for e in events.events for v in vars_of(e)]
    assert not leaks(KEY, event_texts)
    assert not leaks(KEY, exception_texts(info.value))
    assert not leaks(KEY, log_lines(caplog.records))


def vars_of(event: RecoveryEvent) -> list[object]:
    """Every field of an event."""
    return [getattr(event, f.name) for f in dataclasses.fields(event)]


@pytest.mark.sdk
def test_a_key_echoed_to_a_restore_through_the_sdk_is_in_no_event_error_or_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from .sdk_support import ADAM, datum, sdk_service

    debug_everywhere(caplog)
    events = EventLog()
    # One attempt: the SDK's own error (whose message holds the echoed body) is the recovery's last error.
    policy = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, max_attempts=1)
    with sdk_service(SimulatedTinker()) as net:
        client = net.lora()
        client.forward_backward([datum(1)], "cross_entropy").result()
        client.optim_step(ADAM).result()
        client.save_state("0001", user_metadata={"step": "1"}).result()
        with (
            TinkerRest(api_key=KEY, base_url=net.server.base_url) as rest,
            RecoveryEngine(policy, status=rest) as engine,
        ):
            engine.subscribe(events)
            handle = engine.watch(client.model_id, net.service)
            net.sim.corrupt(client.model_id)
            net.server.delay_next(1, 0.0)  # the poll that detects the corruption is answered as usual,
            net.server.echo_key_next(10, 400, header=False)  # then the restore (load_weights) echoes the key
            engine.poll_once()
            with pytest.raises(RecoveryExhausted) as info:
                handle.wait_for_recovery(timeout=WAIT)
            events.wait_for(EventKind.EXHAUSTED)
        net.server.clear_faults()
    failed = events.of(EventKind.FAILED)
    assert failed and all("***" in (e.error or "") for e in failed)  # the key was echoed, and redacted
    event_texts = [repr(e) for e in events.events] + [str(v) for e in events.events for v in vars_of(e)]
    assert not leaks(KEY, event_texts)
    assert not leaks(KEY, exception_texts(info.value))  # its causes' tracebacks included
    assert not leaks(KEY, log_lines(caplog.records))  # the SDK's loggers and httpcore's included


def test_the_training_runs_listing_is_retried_bounded_and_validated_as_the_other_calls(
    make_rest: MakeRest, server: SimulatedServer, fake_time: FakeTime, run_id: str
) -> None:
    rest = make_rest()
    server.fail_next(2, 503)
    page = rest.list_training_runs(limit=1)
    assert [r.training_run_id for r in page.training_runs] == [run_id] and fake_time.waits == [0.5, 1.0]
    assert page.cursor is not None and (page.cursor.limit, page.cursor.total_count) == (1, 1)
    server.malform_next(1, body=b'{"training_runs": 3}')
    with pytest.raises(MalformedResponse, match="first at training_runs") as info:
        rest.list_training_runs()
    assert info.value.run_id is None and KEY not in str(info.value)
