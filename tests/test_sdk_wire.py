"""The official tinker SDK, unmodified, over real loopback HTTP against the simulated server: start, LoRA runs,
training futures, checkpoints with metadata, the REST client, restores into new runs, and a corrupted run
failing with the SDK's own error type, at once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import tinker
from tinker import types

from tinkex_recovery import TrainingRun
from tinkex_recovery._retry import FailureKind, classify
from tinkex_recovery.simulated import SimulatedTinker

from .http_support import KEY
from .sdk_support import ADAM, BASE_MODEL, SdkNet, datum, sdk_service

pytestmark = pytest.mark.sdk

#: A failed request must reach the loop fast: the SDK retries some statuses for minutes.
FAST = 2.0


@pytest.fixture(scope="module")
def net() -> Iterator[SdkNet]:
    with sdk_service(SimulatedTinker()) as net:
        yield net


def trained(net: SdkNet, *steps: int) -> tinker.TrainingClient:
    """A new LoRA run, one optim step per item."""
    client = net.lora()
    for step in steps:
        client.forward_backward([datum(step)], "cross_entropy").result()
        client.optim_step(ADAM).result()
    return client


def test_the_service_client_starts_a_session_and_names_runs_after_it(net: SdkNet) -> None:
    client = net.lora(rank=8, user_metadata={"team": "recovery"})
    session, kind, seq = client.model_id.split(":")
    assert (session, kind) == (net.session_id, "train") and seq.isdigit()
    assert client.model_id in net.sim.run_ids
    paths = [r.path for r in net.server.requests]
    assert paths.count("/api/v1/create_session") == 1  # one session for every run of the client
    assert paths.index("/api/v1/client/config") < paths.index("/api/v1/create_session")
    run = net.rest.get_training_run(client.model_id).result()
    assert isinstance(run, types.TrainingRun)
    assert (run.base_model, run.lora_rank, run.user_metadata) == (BASE_MODEL, 8, {"team": "recovery"})
    assert run.corrupted is False and run.last_checkpoint is None


def test_training_futures_commit_each_datum_once_in_order(net: SdkNet) -> None:
    client = net.lora()
    first = client.forward_backward([datum(1, 2), datum(3)], "cross_entropy")
    second = client.forward_backward([datum(4)], "cross_entropy")  # queued before the first is awaited
    step = client.optim_step(ADAM)
    output = first.result()
    assert isinstance(output, types.ForwardBackwardOutput)
    assert [len(o["logprobs"].tolist()) for o in output.loss_fn_outputs] == [2, 1]
    assert set(output.metrics) == {"loss:sum"} and output.metrics["loss:sum"] > 0
    assert second.result().metrics["loss:sum"] > 0
    assert step.result().metrics == {"step:max": 1.0}
    client.forward([datum(99)], "cross_entropy").result()  # forward only: not trained on
    assert net.sim.lineage(client.model_id) == [(1, 2), (3,), (4,)]


def test_save_state_keeps_user_metadata_and_the_rest_client_lists_it(net: SdkNet) -> None:
    client = trained(net, 0, 1)
    first = client.save_state("step-0002", user_metadata={"step": "2"}).result().path
    client.forward_backward([datum(2)], "cross_entropy").result()
    client.optim_step(ADAM).result()
    second = client.save_state("step-0003", user_metadata={"step": "3", "loss": "0.5"}).result().path
    assert first == f"tinker://{client.model_id}/weights/step-0002"

    run = net.rest.get_training_run(client.model_id).result()
    assert run.last_checkpoint is not None
    assert (run.last_checkpoint.tinker_path, run.last_checkpoint.user_metadata) == (
        second,
        {"step": "3", "loss": "0.5"},
    )
    listed = net.rest.list_checkpoints(client.model_id).result()
    assert isinstance(listed, types.CheckpointsListResponse)
    assert [c.tinker_path for c in listed.checkpoints] == [second, first]
    assert [c.checkpoint_type for c in listed.checkpoints] == ["training", "training"]
    assert TrainingRun.coerce(run).last_checkpoint is not None  # the engine reads the SDK's models as they are

    with pytest.raises(tinker.RequestFailedError, match="already exists") as taken:
        client.save_state("step-0002").result()
    assert taken.value.category == types.RequestErrorCategory.User


def test_create_rest_client_still_answers_but_is_deprecated(net: SdkNet) -> None:
    client = trained(net, 0)
    with pytest.warns(FutureWarning, match="create_rest_client"):
        rest = net.service.create_rest_client()
    assert rest.get_training_run(client.model_id).result().training_run_id == client.model_id


def test_every_restore_is_a_new_run_holding_the_checkpoint(net: SdkNet) -> None:
    client = trained(net, 10, 11)
    path = client.save_state("two", user_metadata={"step": "2"}).result().path
    restored = [
        net.service.create_training_client_from_state(path).result(),
        net.service.create_training_client_from_state_with_optimizer(path, user_metadata={"k": "v"}).result(),
        net.service.create_training_client_from_state_with_optimizer(path).result(),
    ]
    ids = [c.model_id for c in restored]
    assert len({client.model_id, *ids}) == 4
    assert all(i.startswith(f"{net.session_id}:train:") for i in ids)
    assert [net.sim.lineage(i) for i in ids] == [[(10,), (11,)]] * 3
    assert [(p, opt) for p, opt, _ in net.sim.restore_calls[-3:]] == [(path, False), (path, True), (path, True)]
    assert net.rest.get_training_run(ids[1]).result().user_metadata == {"k": "v"}
    restored[0].forward_backward([datum(12)], "cross_entropy").result()
    restored[0].optim_step(ADAM).result()
    assert net.sim.lineage(ids[0]) == [(10,), (11,), (12,)]
    assert net.sim.lineage(client.model_id) == [(10,), (11,)]  # the source run is untouched


def test_a_corrupted_run_fails_each_training_call_with_the_sdks_error_at_once(net: SdkNet) -> None:
    client = trained(net, 0)
    path = client.save_state("one", user_metadata={"step": "1"}).result().path
    healthy = trained(net, 0)
    net.sim.corrupt(client.model_id)
    calls = {
        "forward_backward": lambda: client.forward_backward([datum(1)], "cross_entropy").result(),
        "optim_step": lambda: client.optim_step(ADAM).result(),
        "save_state": lambda: client.save_state("two").result(),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(tinker.RequestFailedError, match="corrupted") as failed:
            call()
        assert time.monotonic() - started < FAST, name
        assert failed.value.category == types.RequestErrorCategory.Server
        assert classify(failed.value) is FailureKind.TRANSIENT  # never blamed on a checkpoint
    assert net.rest.get_training_run(client.model_id).result().corrupted is True
    healthy.forward_backward([datum(1)], "cross_entropy").result()  # other runs train on
    recovered = net.service.create_training_client_from_state_with_optimizer(path).result()
    assert net.sim.lineage(recovered.model_id) == [(0,)]


def test_restore_failures_carry_the_category_the_engine_decides_by(net: SdkNet) -> None:
    client = trained(net, 0)
    good = client.save_state("good").result().path
    broken = client.save_state("broken").result().path
    expired = client.save_state("expired").result().path
    net.sim.break_checkpoint(broken)
    net.sim.expire_checkpoint(expired)
    net.sim.fail_restores(1, status_code=503)
    cases = [
        (good, types.RequestErrorCategory.Server, FailureKind.TRANSIENT),  # a passing outage
        (broken, types.RequestErrorCategory.User, FailureKind.CHECKPOINT),
        (expired, types.RequestErrorCategory.User, FailureKind.CHECKPOINT),
        (f"tinker://{client.model_id}/weights/missing", types.RequestErrorCategory.User, FailureKind.CHECKPOINT),
    ]
    for path, category, kind in cases:
        started = time.monotonic()
        with pytest.raises(tinker.RequestFailedError) as failed:
            net.service.create_training_client_from_state_with_optimizer(path).result()
        assert time.monotonic() - started < FAST, path
        assert (failed.value.category, classify(failed.value)) == (category, kind), path
    assert net.service.create_training_client_from_state_with_optimizer(good).result().model_id in net.sim.run_ids


def test_an_unknown_run_is_the_sdks_not_found_error_asked_once(net: SdkNet) -> None:
    missing = f"{net.session_id}:train:9999"
    started = time.monotonic()
    with pytest.raises(tinker.NotFoundError):
        net.rest.get_training_run(missing).result()
    assert time.monotonic() - started < FAST
    assert sum(r.path == f"/api/v1/training_runs/{missing}" for r in net.server.requests) == 1


def test_closing_a_service_client_finishes_its_session(net: SdkNet) -> None:
    with tinker.ServiceClient(base_url=net.server.base_url, api_key=KEY) as service:
        run_id = service.create_lora_training_client(base_model=BASE_MODEL).result().model_id
    session = run_id.rsplit(":train:", 1)[0]
    assert f"/api/v1/sessions/{session}/finish" in [r.path for r in net.server.requests]
    with httpx.Client(base_url=net.server.base_url, headers={"X-API-Key": KEY}) as http:
        beat = http.post("/api/v1/session_heartbeat", json={"session_id": session, "type": "session_heartbeat"})
        live = http.post("/api/v1/session_heartbeat", json={"session_id": net.session_id, "type": "session_heartbeat"})
    assert (beat.status_code, live.status_code) == (410, 200)  # a 410 stops the SDK's heartbeat loop


def test_admin_routes_corrupt_a_run_and_show_its_lineage(net: SdkNet) -> None:
    client = trained(net, 5, 6)
    with httpx.Client(base_url=net.server.base_url, headers={"X-API-Key": KEY}) as http:
        assert client.model_id in http.get("/_sim/runs").json()["runs"]
        assert http.get(f"/_sim/lineage/{client.model_id}").json()["lineage"] == [[5], [6]]
        assert http.post(f"/_sim/corrupt/{client.model_id}").json() == {"run_id": client.model_id, "corrupted": True}
        assert http.post("/_sim/corrupt/no-such-run").status_code == 404
        assert httpx.post(f"{net.server.base_url}/_sim/corrupt/{client.model_id}").status_code == 401
    with pytest.raises(tinker.RequestFailedError):
        client.optim_step(ADAM).result()
    connections = [r.connection for r in net.server.requests]
    assert len(set(connections)) == len(connections)  # keep_alive = False: no connection outlives its request
