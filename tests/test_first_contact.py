"""What a newcomer meets before a loop starts, and when it ends: a mistyped run id fails at once as
``run_not_found`` (at a guard's entry and on an engine's first poll), a dead server cannot hang the making of
a REST client past ``setup_timeout``, an exhausted recovery names each checkpoint it passed over and the fix,
with true restore-call counts, HTTP errors name the URL, log lines are one per event at the right level, and
``str(event)`` is one line."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import tinker

from tinkex_recovery import (
    EventKind,
    ExhaustedReason,
    FakeClock,
    RecoveryEngine,
    RecoveryEvent,
    RecoveryExhausted,
    RecoveryPolicy,
    RunNotFound,
    RunState,
    TinkerConnectionError,
    TinkerRest,
    recovery_guard,
)
from tinkex_recovery.integrations.lightning import TinkexRecovery
from tinkex_recovery.simulated import SimulatedTinker, serve

from .helpers import WAIT, run_with_checkpoints, train
from .http_support import KEY
from .sdk_support import sdk_service

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, attempt_timeout=30)
MISTYPED = "no-such-run:train:0"


class Events(list[RecoveryEvent]):
    def of(self, kind: EventKind) -> list[RecoveryEvent]:
        return [e for e in self if e.kind is kind]


# -- a mistyped run id ----------------------------------------------------------------------------------------
def test_a_guard_resuming_a_mistyped_run_fails_at_once_as_run_not_found(sim: SimulatedTinker) -> None:
    restores: list[str] = []
    sim.on_restore(restores.append)
    slow = POLICY.replace(backoff=60, max_backoff=60)  # a single retry would cost a minute, and a second read
    with pytest.raises(RecoveryExhausted) as info, recovery_guard(MISTYPED, sim, policy=slow):
        pass
    error = info.value
    assert error.reason is ExhaustedReason.RUN_NOT_FOUND and error.attempts == 0 and restores == []
    assert isinstance(error.__cause__, RunNotFound) and error.__cause__.run_id == MISTYPED
    message = str(error)
    assert "exhausted (run_not_found) after 0 restore call(s)" in message and "check the run id" in message
    assert sim.poll_count == 1  # read once, never retried as a checkpoint error


@pytest.mark.sdk
def test_the_same_with_the_real_sdk() -> None:
    with (
        sdk_service(SimulatedTinker()) as net,
        pytest.raises(RecoveryExhausted) as info,
        recovery_guard(MISTYPED, net.service, policy=POLICY),
    ):
        pass
    assert info.value.reason is ExhaustedReason.RUN_NOT_FOUND and info.value.attempts == 0
    assert "check the run id" in str(info.value)


def test_watching_a_mistyped_run_ends_its_handle_on_the_first_poll(sim: SimulatedTinker, clock: FakeClock) -> None:
    events = Events()
    with RecoveryEngine(POLICY, clock=clock) as engine:
        engine.subscribe(events.append)
        handle = engine.watch(MISTYPED, sim)
        engine.poll_once()
        assert handle.state is RunState.EXHAUSTED
        with pytest.raises(RecoveryExhausted) as info:
            handle.wait_for_recovery(timeout=WAIT)
        engine.poll_once()  # not polled again
    assert info.value.reason is ExhaustedReason.RUN_NOT_FOUND
    (ended,) = events.of(EventKind.EXHAUSTED)
    assert ended.reason == "run_not_found" and "check the run id" in (ended.error or "")
    assert events.of(EventKind.POLL_ERROR) == [] and sim.poll_count == 1


def test_a_run_deleted_after_a_poll_read_it_is_a_poll_error_not_the_end(sim: SimulatedTinker, clock: FakeClock) -> None:
    events = Events()
    run = run_with_checkpoints(sim)
    with RecoveryEngine(POLICY, clock=clock) as engine:
        engine.subscribe(events.append)
        handle = engine.watch(run.model_id, sim)
        engine.poll_once()
        sim.delete_run(run.model_id)
        engine.poll_once()
        assert handle.state is RunState.WATCHING
    assert len(events.of(EventKind.POLL_ERROR)) == 1 and events.of(EventKind.EXHAUSTED) == []


# -- a dead server ---------------------------------------------------------------------------------------------
class StuckService:
    """A service whose REST client takes until ``release`` is set to make, as the SDK's does with no server."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = threading.Event()
        self._base_url = "http://tinker.invalid:1"

    def _rest_client(self) -> Any:
        self.release.wait(WAIT)
        return self

    def close(self) -> None:
        self.closed.set()

    def get_training_run(self, run_id: str) -> Any:
        raise AssertionError("not reached")

    list_checkpoints = get_training_run
    create_training_client_from_state = create_training_client_from_state_with_optimizer = get_training_run


def test_making_the_rest_client_is_bounded_by_setup_timeout_and_names_the_url(clock: FakeClock) -> None:
    service = StuckService()
    with RecoveryEngine(POLICY.replace(setup_timeout=0.05), clock=clock) as engine:
        with pytest.raises(TinkerConnectionError) as info:
            engine.watch("run:train:0", service)
        service.release.set()
        assert service.closed.wait(WAIT), "the client made after the bound was not closed"
    message = str(info.value)
    assert "setup_timeout=0.05s" in message and "http://tinker.invalid:1" in message and "TINKER_BASE_URL" in message


def test_a_dead_url_names_itself_and_what_to_check() -> None:
    with (
        TinkerRest(api_key=KEY, base_url="http://127.0.0.1:9/prefix", max_retries=0) as rest,
        pytest.raises(TinkerConnectionError) as info,
    ):
        rest.get_training_run("run:train:0")
    message = str(info.value)
    assert "http://127.0.0.1:9/prefix/api/v1/training_runs/run:train:0" in message
    assert "is Tinker reachable at http://127.0.0.1:9/prefix?" in message


# -- exhausted recoveries say why and what to do ---------------------------------------------------------------
def test_resuming_from_checkpoints_without_a_step_names_each_and_the_fix(sim: SimulatedTinker) -> None:
    client = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    train(client, [0])
    paths = [client.save_state(name).result().path for name in ("a", "b")]
    with pytest.raises(RecoveryExhausted) as info, recovery_guard(client.model_id, sim, policy=POLICY):
        pass
    message = str(info.value)
    assert info.value.reason is ExhaustedReason.CHECKPOINTS and info.value.attempts == 0
    assert "after 0 restore call(s)" in message
    assert f"passed over {paths[1]}, {paths[0]}: it records no step" in message  # newest first, the reason once
    assert message.count("it records no step") == 1 and "through recovery_guard's save_state()" in message


def test_a_checkpoint_tinker_refused_is_named_with_its_error(sim: SimulatedTinker) -> None:
    client = run_with_checkpoints(sim, steps=2, every=2)  # one checkpoint, at step 2
    sim.fail_restores(1, status_code=400)
    with pytest.raises(RecoveryExhausted) as info, recovery_guard(client.model_id, sim, policy=POLICY):
        pass
    message = str(info.value)
    assert info.value.attempts == 1 and "after 1 restore call(s)" in message  # one call made, refused
    assert "/weights/0002: Tinker refused to restore it (SimulatedAPIError: Error code: 400" in message


# -- logging --------------------------------------------------------------------------------------------------
def test_str_of_an_event_is_its_one_line() -> None:
    event = RecoveryEvent(EventKind.COMPLETED, "r:train:0", attempt=1, new_run_id="r:train:1", error="x\ny")
    assert str(event) == event.message and f"{event}" == event.message and "RecoveryEvent(" not in str(event)


def test_a_recovery_logs_one_warning_and_its_steps_at_info(
    sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tinkex_recovery")
    run = run_with_checkpoints(sim)
    with RecoveryEngine(POLICY, clock=clock) as engine:
        handle = engine.watch(run.model_id, sim)
        sim.corrupt(run.model_id)
        engine.poll_once()
        handle.wait_for_recovery(timeout=WAIT)
    ours = [r for r in caplog.records if r.name.startswith("tinkex_recovery")]
    warnings = [r for r in ours if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "completed" in warnings[0].getMessage()
    assert {r.getMessage().split(": ")[1].split(",")[0] for r in ours if r.levelno == logging.INFO} >= {
        "detected",
        "started",
        "checkpoint_selected",
        "client_created",
    }
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in ours)


# -- Lightning ------------------------------------------------------------------------------------------------
def test_lightning_without_a_client_names_client_attr() -> None:
    class Module:
        client = object()  # the module keeps its client under another name
        service_client = object()

    callback = TinkexRecovery(POLICY)
    with pytest.raises(AttributeError, match="client_attr="):
        callback.on_fit_start(SimpleNamespace(ckpt_path=None), Module())  # type: ignore[arg-type]


def test_lightning_without_a_service_names_service_attr() -> None:
    class Module:
        training_client = object()
        service = object()  # the module keeps its service client under another name

    callback = TinkexRecovery(POLICY)
    with pytest.raises(AttributeError, match="service_attr="):
        callback.on_fit_start(SimpleNamespace(ckpt_path=None), Module())  # type: ignore[arg-type]


_ = tinker  # the SDK is a test dependency: imported so its absence fails here, not in a skip
_ = serve
