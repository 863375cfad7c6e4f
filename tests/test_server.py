"""The loopback server on its own, spoken to with plain httpx: Tinker's URLs and JSON, auth, every fault,
and a clean shutdown (no thread survives the ``with``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from pytest_mock import MockerFixture

from tinkex_recovery import Checkpoint
from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve
from tinkex_recovery.simulated._server import HTTPError, Router

from .helpers import WAIT, run_with_checkpoints
from .http_support import KEY, WRONG_KEY


@pytest.fixture
def server(sim: SimulatedTinker) -> Iterator[SimulatedServer]:
    with serve(sim, KEY) as srv:
        yield srv


@pytest.fixture
def http(server: SimulatedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": KEY}, timeout=5.0) as client:
        yield client


def run_url(run_id: str) -> str:
    return f"/api/v1/training_runs/{run_id}"


def test_training_run_json_is_the_model_dump_and_the_run_id_travels_unencoded(
    sim: SimulatedTinker, server: SimulatedServer, http: httpx.Client
) -> None:
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    assert ":" in run_id
    response = http.get(run_url(run_id), params={"access_scope": "owned"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == sim.get_training_run(run_id).model_dump(mode="json")
    assert server.requests[-1].path == run_url(run_id)  # ':' as the SDK sends it
    assert server.requests[-1].query == {"access_scope": "owned"}


def test_checkpoint_listing_is_unpaginated_by_default_and_pages_on_request(
    sim: SimulatedTinker, server: SimulatedServer, http: httpx.Client
) -> None:
    run_id = run_with_checkpoints(sim, steps=5, every=1).model_id
    whole = http.get(f"{run_url(run_id)}/checkpoints").json()
    assert whole == sim.list_checkpoints(run_id).model_dump(mode="json")
    assert whole["cursor"] is None

    server.page_size = 2
    first = http.get(f"{run_url(run_id)}/checkpoints").json()
    assert first["cursor"] == {"offset": 0, "limit": 2, "total_count": 5}
    last = http.get(f"{run_url(run_id)}/checkpoints", params={"offset": 4, "limit": 10}).json()
    assert last["cursor"] == {"offset": 4, "limit": 2, "total_count": 5}  # the server caps the limit
    ids = [Checkpoint.coerce(c).checkpoint_id for c in [*first["checkpoints"], *last["checkpoints"]]]
    assert ids == ["weights/0005", "weights/0004", "weights/0001"]


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": WRONG_KEY}, {"X-API-Key": ""}])
def test_a_missing_or_wrong_key_gets_401_without_echoing_it(
    sim: SimulatedTinker, server: SimulatedServer, headers: dict[str, str]
) -> None:
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    response = httpx.get(f"{server.base_url}{run_url(run_id)}", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid API key"}
    assert WRONG_KEY not in response.text and KEY not in response.text


def test_unknown_runs_paths_and_methods_answer_like_fastapi(http: httpx.Client, sim: SimulatedTinker) -> None:
    missing = http.get(run_url("nope:train:0"))
    assert missing.status_code == 404
    assert "nope:train:0" in missing.json()["detail"]
    assert http.get("/api/v1/no_such_endpoint").json() == {"detail": "Not Found"}
    assert http.post(run_url("nope:train:0")).status_code == 405
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    assert http.get(run_url(run_id), params={"access_scope": "everyone"}).status_code == 422
    sim.delete_run(run_id)
    assert http.get(run_url(run_id)).status_code == 404


def test_the_simulated_tinkers_own_poll_faults_travel_as_http_statuses(
    sim: SimulatedTinker, http: httpx.Client
) -> None:
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    sim.fail_polls(1, status_code=503)
    assert http.get(run_url(run_id)).status_code == 503
    assert http.get(run_url(run_id)).status_code == 200


def test_status_faults_come_in_order_with_their_headers(
    sim: SimulatedTinker, server: SimulatedServer, http: httpx.Client
) -> None:
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    server.fail_next(2, 429, retry_after=1.5)
    server.fail_next(1, 503, should_retry=False)
    answers = [http.get(run_url(run_id)) for _ in range(4)]
    assert [r.status_code for r in answers] == [429, 429, 503, 200]
    assert answers[0].headers["retry-after"] == "1.5"
    assert answers[2].headers["x-should-retry"] == "false"
    assert answers[2].json() == {"detail": "simulated HTTP fault"}
    assert [r.status for r in server.requests] == [429, 429, 503, 200]


def test_faults_come_before_authentication_as_at_a_gateway(sim: SimulatedTinker, server: SimulatedServer) -> None:
    server.fail_next(1, 502)
    assert httpx.get(f"{server.base_url}{run_url('any:train:0')}").status_code == 502
    assert httpx.get(f"{server.base_url}{run_url('any:train:0')}").status_code == 401


def test_malformed_bodies(sim: SimulatedTinker, server: SimulatedServer, http: httpx.Client) -> None:
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    server.malform_next(1)
    server.malform_next(1, body=b'{"unexpected": true}')
    cut = http.get(run_url(run_id))
    assert cut.status_code == 200
    with pytest.raises(ValueError):
        cut.json()
    assert http.get(run_url(run_id)).json() == {"unexpected": True}


def test_a_dropped_connection_gets_no_answer_and_the_next_request_a_new_connection(
    sim: SimulatedTinker, server: SimulatedServer, http: httpx.Client
) -> None:
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    assert http.get(run_url(run_id)).status_code == 200
    server.drop_next(1)
    with pytest.raises(httpx.RemoteProtocolError):
        http.get(run_url(run_id))
    assert http.get(run_url(run_id)).status_code == 200
    assert [(r.status, r.connection) for r in server.requests] == [(200, 1), (None, 1), (200, 2)]


def test_keep_alive_one_connection_carries_many_requests(
    sim: SimulatedTinker, server: SimulatedServer, http: httpx.Client
) -> None:
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    for _ in range(5):
        assert http.get(run_url(run_id)).status_code == 200
    assert {r.connection for r in server.requests} == {1}


def test_delay_and_latency_hold_responses_back(
    sim: SimulatedTinker, server: SimulatedServer, http: httpx.Client
) -> None:
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    server.latency = 0.02
    server.delay_next(1, seconds=0.1)
    started = time.monotonic()
    assert http.get(run_url(run_id)).status_code == 200
    delayed = time.monotonic() - started
    started = time.monotonic()
    assert http.get(run_url(run_id)).status_code == 200
    plain = time.monotonic() - started
    assert delayed >= 0.12
    assert 0.02 <= plain < 0.12
    with pytest.raises(ValueError):
        server.latency = -1.0


def test_leaving_the_with_ends_every_server_thread_even_with_open_connections_and_pending_delays(
    sim: SimulatedTinker,
) -> None:
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    before = set(threading.enumerate())
    client = httpx.Client(headers={"X-API-Key": KEY}, timeout=5.0)
    slow_errors: list[BaseException] = []
    try:
        with serve(sim, KEY) as server:
            assert client.get(f"{server}{run_url(run_id)}").status_code == 200  # a keep-alive connection stays open
            server.delay_next(1, seconds=60.0)
            answered = threading.Event()

            def slow() -> None:
                try:
                    with httpx.Client(headers={"X-API-Key": KEY}, timeout=5.0) as other:
                        other.get(f"{server}{run_url(run_id)}")
                except httpx.HTTPError as exc:
                    slow_errors.append(exc)
                answered.set()

            caller = threading.Thread(target=slow)
            caller.start()
            assert server.wait_for_requests(2, timeout=WAIT)  # the delayed request has arrived
            started = time.monotonic()
        stopped_in = time.monotonic() - started
        caller.join(5.0)
        assert answered.is_set()
        assert stopped_in < 2.0  # the 60 s delay was cut short
        assert set(threading.enumerate()) == before
    finally:
        client.close()
    assert len(slow_errors) == 1  # the delayed request lost its connection


def test_nothing_is_printed_to_stderr(
    sim: SimulatedTinker, server: SimulatedServer, http: httpx.Client, capfd: pytest.CaptureFixture[str]
) -> None:
    run_id = run_with_checkpoints(sim, steps=2, every=2).model_id
    http.get(run_url(run_id))
    http.get("/missing")
    server.drop_next(1)
    with pytest.raises(httpx.RemoteProtocolError):
        http.get(run_url(run_id))
    assert capfd.readouterr().err == ""


def test_a_handler_bug_is_a_logged_500(
    sim: SimulatedTinker,
    server: SimulatedServer,
    http: httpx.Client,
    mocker: MockerFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mocker.patch.object(sim, "get_training_run", side_effect=RuntimeError("bug"))
    with caplog.at_level(logging.ERROR, logger="tinkex_recovery.simulated.server"):
        response = http.get(run_url("x:train:0"))
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal Server Error"}
    assert "raised" in caplog.text


def test_router_path_parameters_may_hold_slashes_and_arrive_decoded() -> None:
    router = Router()

    @router.route("DELETE", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
    def delete(call: object) -> None:
        raise HTTPError(204, "")

    handler, params = router.resolve("DELETE", "/api/v1/training_runs/s:train:0/checkpoints/weights/0001")
    assert handler is delete
    assert params == {"run_id": "s:train:0", "checkpoint_id": "weights/0001"}
    assert router.resolve("DELETE", "/api/v1/training_runs/a%3Ab/checkpoints/x")[1]["run_id"] == "a:b"
    with pytest.raises(HTTPError) as not_found:
        router.resolve("DELETE", "/api/v1/training_runs/s:train:0/checkpoints")
    assert not_found.value.status_code == 404
    with pytest.raises(HTTPError) as wrong_method:
        router.resolve("GET", "/api/v1/training_runs/s:train:0/checkpoints/weights/0001")
    assert wrong_method.value.status_code == 405


def test_server_str_and_repr_are_its_url(server: SimulatedServer) -> None:
    assert str(server) == server.base_url == f"http://127.0.0.1:{server.port}"
    assert KEY not in repr(server)
    with pytest.raises(ValueError):
        server.fail_next(-1)
