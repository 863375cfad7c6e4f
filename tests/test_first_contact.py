"""What a newcomer meets before a loop starts, and when it ends: a mistyped run id fails at once as
``run_not_found`` (at a guard's entry and on an engine's first poll), a dead server cannot hang the making of
a REST client past ``setup_timeout``, an exhausted recovery names each checkpoint it passed over and the fix,
with true restore-call counts, HTTP errors name the URL, log lines are one per event at the right level, and
``str(event)`` is one line."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import httpx
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

from .helpers import WAIT, run_with_checkpoints, train, true_in_a_forked_child
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


def test_watching_again_against_a_stuck_server_waits_for_the_same_call(clock: FakeClock) -> None:
    """Each watch() fails after setup_timeout, and none starts another thread while the first call is stuck (five
    at once, then one more); the client it makes at last, wanted by nobody, is closed; the next watch() makes a
    client afresh."""
    service = CountingStuckService()
    with RecoveryEngine(POLICY.replace(setup_timeout=0.2), clock=clock) as engine:
        failed: list[BaseException] = []

        def watch() -> None:
            try:
                engine.watch("run:train:0", service)
            except TinkerConnectionError as exc:
                failed.append(exc)

        watchers = [threading.Thread(target=watch) for _ in range(5)]
        for watcher in watchers:
            watcher.start()
        for watcher in watchers:
            watcher.join(WAIT)
        watch()  # again, once they all gave up
        makers = [t for t in threading.enumerate() if t.name == "tinkex-recovery-rest-client"]
        assert len(failed) == 6 and service.made == 1 and len(makers) == 1
        service.release.set()
        assert service.closed.wait(WAIT), "the client made after every caller gave up was not closed"
        makers[0].join(WAIT)
        assert not makers[0].is_alive()
        engine.watch("run:train:0", service).unwatch()
    assert service.made == 2


def test_a_call_stuck_for_long_is_not_waited_for_again() -> None:
    """A REST-client call stuck for more than four setup timeouts is left to end: the next watch() tries afresh,
    so a server that is back is reached although an old call hangs for good."""
    from tinkex_recovery._engine import _MAKINGS, rest_client_of

    service = CountingStuckService()
    with pytest.raises(TinkerConnectionError):
        rest_client_of(service, timeout=0.05)
    _MAKINGS.by_service[id(service)].started -= 1000.0  # as if it had been stuck for very long
    service.answer_from = 2  # the server is back: a fresh call answers, the first one still hangs
    assert rest_client_of(service, timeout=WAIT) is service and service.made == 2
    service.release.set()
    assert service.closed.wait(WAIT)  # the old call's client, when it comes, is closed


def test_a_forked_child_makes_its_own_client_while_the_parents_is_stuck() -> None:
    from tinkex_recovery._engine import rest_client_of

    service = StuckService()
    with pytest.raises(TinkerConnectionError):
        rest_client_of(service, timeout=0.02)  # the parent's call stays stuck

    def in_the_child() -> bool:
        service.release.set()  # in the child only: its own call answers at once
        return rest_client_of(service, timeout=WAIT) is service

    answered = true_in_a_forked_child(in_the_child)
    service.release.set()
    assert service.closed.wait(WAIT)
    assert answered, "the child waited for the parent's call, whose thread it does not have"


@pytest.mark.parametrize("fails", [False, True], ids=["made", "failed"])
def test_a_caller_interrupted_while_waiting_leaves_no_client_open(fails: bool) -> None:
    """Ctrl-C while a REST client is being made, and the call ends just then: a client made is closed, not kept,
    and the caller sees its interrupt, not the call's error."""
    import signal

    from tinkex_recovery._engine import rest_client_of

    service = FailingStuckService() if fails else StuckService()

    def interrupt(signum: int, frame: Any) -> None:
        service.release.set()
        for maker in [t for t in threading.enumerate() if t.name == "tinkex-recovery-rest-client"]:
            maker.join(WAIT)  # ended before the caller has left
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            rest_client_of(service, timeout=WAIT)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if not fails:
        assert service.closed.wait(WAIT), "the client made while its only caller left was never closed"


class FailingStuckService(StuckService):
    def _rest_client(self) -> Any:
        super()._rest_client()
        raise RuntimeError("no client config")


class CountingStuckService(StuckService):
    def __init__(self) -> None:
        super().__init__()
        self.made = 0
        self.answer_from: int | None = None  # the call from which on it answers at once

    def _rest_client(self) -> Any:
        self.made += 1
        if self.answer_from is not None and self.made >= self.answer_from:
            return self
        return super()._rest_client()


def test_a_dead_url_names_itself_and_what_to_check() -> None:
    with (
        TinkerRest(api_key=KEY, base_url="http://127.0.0.1:9/prefix", max_retries=0) as rest,
        pytest.raises(TinkerConnectionError) as info,
    ):
        rest.get_training_run("run:train:0")
    message = str(info.value)
    assert "http://127.0.0.1:9/prefix/api/v1/training_runs/run:train:0" in message
    assert "is Tinker reachable at http://127.0.0.1:9/prefix?" in message


class Unanswered:
    """A status source over Tinker's REST API whose reads fail as ``fail`` says, or never answer (None)."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.reads: list[Future[Any]] = []

    def get_training_run(self, run_id: str) -> Future[Any]:
        read: Future[Any] = Future()
        if self.fail is not None:
            read.set_exception(self.fail)
        self.reads.append(read)
        return read

    list_checkpoints = get_training_run


class Service(SimulatedTinker):
    """The simulated Tinker as the SDK's ServiceClient is made: with the base URL it talks to."""

    _base_url = "http://tinker.example:8000"


def test_a_read_of_the_run_that_never_answers_is_bounded_by_setup_timeout_and_names_the_url() -> None:
    status = Unanswered()
    policy = POLICY.replace(setup_timeout=0.05, max_attempts=2)
    with pytest.raises(RecoveryExhausted) as info, recovery_guard(MISTYPED, Service(), policy=policy, status=status):
        pass
    error = info.value
    assert error.reason is ExhaustedReason.ATTEMPTS and error.attempts == 0
    assert "did not answer within setup_timeout=0.05s" in str(error)
    assert "is Tinker reachable at http://tinker.example:8000?" in str(error) and "TINKER_BASE_URL" in str(error)
    assert isinstance(error.__cause__, TinkerConnectionError)
    assert len(status.reads) == 2 and all(read.cancelled() for read in status.reads)  # given up, not left waiting


def test_a_read_that_cannot_connect_names_the_url_to_check() -> None:
    request = httpx.Request("GET", "http://tinker.example:8000/api/v1/training_runs/x")
    status = Unanswered(fail=tinker.APIConnectionError(request=request))
    with pytest.raises(RecoveryExhausted) as info, recovery_guard(MISTYPED, Service(), policy=POLICY, status=status):
        pass
    message = str(info.value)
    assert info.value.reason is ExhaustedReason.ATTEMPTS and len(status.reads) == POLICY.max_attempts
    assert "failed (APIConnectionError: Connection error.): is Tinker reachable at http://tinker.example:8000?" in (
        message
    )


class SlowListing:
    """A live server that answers the runs' listing late: after ``delay`` real seconds."""

    def __init__(self, sim: SimulatedTinker, delay: float) -> None:
        self.sim, self.delay = sim, delay
        self.reads: list[Future[Any]] = []
        self.timers: list[threading.Timer] = []

    def get_training_run(self, run_id: str) -> Any:
        return self.sim.get_training_run(run_id)

    def list_checkpoints(self, run_id: str) -> Any:
        return self.sim.list_checkpoints(run_id)

    def list_training_runs(self, limit: int = 20, offset: int = 0) -> Future[Any]:
        read: Future[Any] = Future()
        timer = threading.Timer(self.delay, lambda: read.set_result(self.sim.list_training_runs(limit, offset)))
        timer.start()
        self.reads.append(read)
        self.timers.append(timer)
        return read


def test_a_recovery_a_poll_found_waits_out_a_slow_read(sim: SimulatedTinker, clock: FakeClock) -> None:
    """``setup_timeout`` bounds the reads made before the loop runs; mid-run, a slow server (or the SDK retrying a
    503) is waited for up to ``attempt_timeout``, as before."""
    run = run_with_checkpoints(sim)
    status = SlowListing(sim, delay=0.2)
    with RecoveryEngine(POLICY.replace(setup_timeout=0.05), status=status, clock=clock) as engine:
        handle = engine.watch(run.model_id, sim)
        sim.corrupt(run.model_id)
        engine.poll_once()
        recovery = handle.wait_for_recovery(timeout=WAIT)
    for timer in status.timers:
        timer.join(WAIT)
    assert recovery.old_run_id == run.model_id and len(status.reads) >= 1  # the split-brain listing, read late


@pytest.mark.sdk
def test_reads_through_the_sdks_rest_client_that_never_answer_are_bounded_and_named() -> None:
    """The server stops answering after the REST client exists (here: the SDK's own RestClient, given as the
    status source): the guard's entry reads the run ``max_attempts`` times, ``setup_timeout`` each at most, and
    fails naming the server's URL; no restore call is made."""
    policy = POLICY.replace(setup_timeout=0.2, max_attempts=2)
    with sdk_service(SimulatedTinker()) as net:
        client = net.lora()
        client.save_state("s1", user_metadata={"step": "1"}).result()
        restores: list[str] = []
        net.sim.on_restore(restores.append)
        before = len(net.server.requests)
        net.server.delay_next(2, seconds=30.0)  # cut short when the server stops
        with (
            pytest.raises(RecoveryExhausted) as info,
            recovery_guard(client.model_id, net.service, policy=policy, status=net.rest),
        ):
            pass
        reads = [r for r in net.server.requests[before:] if r.path.endswith(client.model_id)]
    message = str(info.value)
    assert info.value.reason is ExhaustedReason.ATTEMPTS and info.value.attempts == 0 and restores == []
    assert f"setup_timeout=0.2s: is Tinker reachable at {net.server.base_url}?" in message
    assert len(reads) == 2


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
