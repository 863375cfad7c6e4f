"""RecoveryEngine with the real tinker SDK on both sides: the ServiceClient restores, the SDK's RestClient polls
(derived from the ServiceClient with no wrapper and no deprecation warning, or passed in), over loopback HTTP.
Polls are driven by ``check_now()``; the poller's interval is an hour."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import tinker
from pytest_mock import MockerFixture

from tinkex_recovery import BUDGET_KEYS, LINEAGE_KEYS, EventKind, FakeClock, RecoveryEngine, RecoveryPolicy, RunState
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT, EventLog
from .sdk_support import ADAM, SdkNet, datum, sdk_service

pytestmark = pytest.mark.sdk

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, jitter=0, attempt_timeout=30)


@pytest.fixture(scope="module")
def net() -> Iterator[SdkNet]:
    with sdk_service(SimulatedTinker()) as net:
        yield net


def train(client: tinker.TrainingClient, steps: range, save_every: int = 0) -> list[str]:
    """One datum and optim step per index; a checkpoint (metadata ``step``) after every ``save_every`` steps."""
    paths = []
    for i in steps:
        client.forward_backward([datum(i)], "cross_entropy").result()
        client.optim_step(ADAM).result()
        if save_every and (i + 1) % save_every == 0:
            paths.append(client.save_state(f"step-{i + 1:04d}", user_metadata={"step": str(i + 1)}).result().path)
    return paths


def test_a_corrupted_run_is_restored_through_the_sdk_twice_with_the_status_source_derived(
    net: SdkNet, events: EventLog, mocker: MockerFixture
) -> None:
    client = net.lora(user_metadata={"owner": "me"})
    first_path, second_path = train(client, range(4), save_every=2)
    restores = mocker.spy(net.service, "create_training_client_from_state_with_optimizer")
    with RecoveryEngine(POLICY) as engine:  # no status=: the engine derives the SDK's own RestClient
        engine.subscribe(events)
        handle = engine.watch(client.model_id, net.service, metadata={"experiment": "sdk"})
        assert handle.check_now() is False

        net.sim.corrupt(client.model_id)
        assert handle.check_now() is True
        first = handle.wait_for_recovery(timeout=WAIT)
        assert isinstance(first.client, tinker.TrainingClient)
        assert (first.old_run_id, first.checkpoint.tinker_path) == (client.model_id, second_path)
        assert first.new_run_id == first.client.model_id and first.new_run_id.startswith(f"{net.session_id}:train:")
        assert net.sim.lineage(first.new_run_id) == [(0,), (1,), (2,), (3,)]
        run = net.rest.get_training_run(first.new_run_id).result()
        assert run.user_metadata == {
            "owner": "me",
            "experiment": "sdk",
            LINEAGE_KEYS[0]: client.model_id,
            LINEAGE_KEYS[1]: second_path,
            LINEAGE_KEYS[2]: "1",
            LINEAGE_KEYS[3]: run.user_metadata[LINEAGE_KEYS[3]],  # the recovery's id
            LINEAGE_KEYS[4]: run.user_metadata[LINEAGE_KEYS[4]],  # when the restore call was sent
            BUDGET_KEYS[0]: run.user_metadata[BUDGET_KEYS[0]],  # the wall-clock time of this recovery
            BUDGET_KEYS[1]: "0",
            BUDGET_KEYS[2]: "4",  # the restored checkpoint's step
        }

        # The recovered client trains on; its run is lost before it saves: restored from the same checkpoint.
        train(first.client, range(4, 6))
        net.sim.corrupt(first.new_run_id)
        assert handle.check_now() is True
        second = handle.wait_for_recovery(timeout=WAIT)
        assert second.checkpoint.tinker_path == second_path
        assert len({client.model_id, first.new_run_id, second.new_run_id}) == 3
        assert (handle.run_id, handle.client, handle.state) == (second.new_run_id, second.client, RunState.WATCHING)
        train(second.client, range(4, 6))
        assert net.sim.lineage(second.new_run_id) == [(i,) for i in range(6)]
    assert [c.args[0] for c in restores.call_args_list] == [second_path, second_path]
    assert events.kinds().count(EventKind.COMPLETED.value) == 2
    assert first_path != second_path


def test_a_checkpoint_the_server_rejects_falls_back_and_an_outage_is_retried(net: SdkNet, events: EventLog) -> None:
    client = net.lora()
    older, newer = train(client, range(4), save_every=2)
    net.sim.break_checkpoint(newer)  # RequestFailedError(category=user): the checkpoint is to blame
    net.sim.fail_restores(1, status_code=503, from_run=client.model_id)  # then category=server: retried
    with RecoveryEngine(POLICY, status=net.rest) as engine:  # the SDK's RestClient, passed in
        engine.subscribe(events)
        handle = engine.watch(client.model_id, net.service)
        net.sim.corrupt(client.model_id)
        handle.check_now()
        recovery = handle.wait_for_recovery(timeout=WAIT)
    assert recovery.checkpoint.tinker_path == older
    assert net.sim.lineage(recovery.new_run_id) == [(0,), (1,)]
    failed = events.of(EventKind.FAILED)
    assert [e.error.split(":")[0] if e.error else "" for e in failed] == ["RequestFailedError"] * 2
    assert recovery.attempts == 3


def test_the_engine_asks_the_service_client_for_its_rest_client_without_the_deprecated_call(
    net: SdkNet, mocker: MockerFixture
) -> None:
    deprecated = mocker.spy(net.service, "create_rest_client")
    client = net.lora()
    with RecoveryEngine(POLICY) as engine:
        handle = engine.watch(client.model_id, net.service)
        handle.check_now()  # a warning here would be an error: pyproject turns warnings into errors
        status: Any = engine._status_for(net.service)
    assert isinstance(status, tinker.RestClient)
    assert deprecated.call_count == 0


def test_an_sdk_restore_outstanding_at_attempt_timeout_is_waited_for_and_adopted_never_sent_twice(
    net: SdkNet, events: EventLog
) -> None:
    """The server has the request: the run will be made although the attempt was abandoned. The engine does not
    cancel the SDK's future nor send a second restore: the next attempt waits for the late answer and adopts it;
    one run on the server, which the listing, read through the SDK's RestClient, agrees with."""
    client = net.lora()
    train(client, range(2), save_every=2)
    clock = FakeClock()
    reached = threading.Event()
    net.sim.on_restore(lambda path: reached.set())
    net.sim.hang_restores(1, then="succeed")  # the server holds the first restore request until release()
    before, calls = set(net.sim.run_ids), len(net.sim.restore_calls)
    try:
        with RecoveryEngine(POLICY, clock=clock) as engine:
            engine.subscribe(events)
            handle = engine.watch(client.model_id, net.service)
            net.sim.corrupt(client.model_id)
            assert handle.check_now() is True
            assert reached.wait(WAIT)
            clock.advance(30.0)  # attempt_timeout: abandoned; retried at once (backoff 0), waiting for the call
            events.wait_for(EventKind.STARTED, count=2)
            net.sim.release()  # the held request is served now: its run is made, and adopted
            recovery = handle.wait_for_recovery(WAIT)
            assert recovery.attempts == 2
    finally:
        net.sim.on_restore(None)
        net.sim.release()
    made = set(net.sim.run_ids) - before
    assert made == {recovery.new_run_id} and len(net.sim.restore_calls) == calls + 1
    assert not events.of(EventKind.CLIENT_DISCARDED) and not events.of(EventKind.RUN_ORPHANED)
    listed = {r.training_run_id: r for r in net.rest.list_training_runs(limit=100).result().training_runs}
    assert (listed[recovery.new_run_id].user_metadata or {})[LINEAGE_KEYS[3]]  # stamped by its recovery
