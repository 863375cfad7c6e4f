"""recovery_guard: the plain-loop integration. Failures judged at step boundaries, rewinding, exhaustion,
pass-through, lifecycle and threads, save_state."""

from __future__ import annotations

import json
import linecache
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from traceback import walk_stack
from typing import Any

import pytest

from tinkex_recovery import (
    RESUME_KEY,
    EventKind,
    ExhaustedReason,
    FakeClock,
    NoRestorableCheckpoint,
    RecoveryEvent,
    RecoveryExhausted,
    RecoveryPolicy,
    ResumeBeforeFirstStep,
    SystemClock,
    recovery_guard,
)
from tinkex_recovery.integrations import GuardRecovery, RecoveryGuard, Step
from tinkex_recovery.integrations._steps import StepCursor
from tinkex_recovery.simulated import SimulatedAPIError, SimulatedRequestFailedError, SimulatedTinker

from .helpers import WAIT

#: Polls only when a test asks for one: no poll may be what makes a test pass.
POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, attempt_timeout=30)

Hook = Callable[[RecoveryGuard, Step, str], None]


def guarded_loop(
    sim: SimulatedTinker,
    clock: FakeClock | SystemClock,
    *,
    steps: Iterable[int] = range(60),
    every: int = 10,
    hook: Hook | None = None,
    policy: RecoveryPolicy = POLICY,
    service: Any = None,
    log_path: Path | None = None,
) -> tuple[RecoveryGuard, list[int]]:
    """The contract's loop: one item per step, a checkpoint every ``every`` steps. ``hook(guard, step, phase)``
    runs at 'before', 'mid' (between forward_backward and optim_step) and 'after' (after any save) of each
    step. Returns the guard and the step indices in the order they ran."""
    client = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    ran: list[int] = []
    with recovery_guard(
        client.model_id, service or sim, policy=policy, client=client, clock=clock, log_path=log_path
    ) as guard:
        for step in guard.steps(steps):
            with step:
                ran.append(step.index)
                if hook:
                    hook(guard, step, "before")
                guard.client.forward_backward([step.index], "cross_entropy").result()
                if hook:
                    hook(guard, step, "mid")
                guard.client.optim_step().result()
                if (step.index + 1) % every == 0:
                    guard.save_state(
                        f"step-{step.index + 1:06d}", step=step.index + 1, metrics={"loss": 1 / (step.index + 2)}
                    )
                if hook:
                    hook(guard, step, "after")
    return guard, ran


def corrupt_at(sim: SimulatedTinker, *points: tuple[int, str] | tuple[int, str, int]) -> Hook:
    """Corrupt the current run at each (step index, phase[, nth time that point is reached, default 1])."""
    wanted = {(p[0], p[1], p[2] if len(p) == 3 else 1) for p in points}
    reached: dict[tuple[int, str], int] = {}

    def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
        n = reached[step.index, phase] = reached.get((step.index, phase), 0) + 1
        if (step.index, phase, n) in wanted:
            sim.corrupt(guard.run_id)

    return hook


# -- the failure is judged inside `with step:` ---------------------------------------------------------------
def test_a_corrupting_failure_rewinds_to_the_checkpoint_step_and_swaps_the_client(
    sim: SimulatedTinker, clock: FakeClock
) -> None:
    guard, ran = guarded_loop(sim, clock, hook=corrupt_at(sim, (24, "mid")))

    assert ran == [*range(25), *range(20, 60)]
    assert sim.lineage(guard.run_id) == list(range(60))
    (rec,) = guard.recoveries
    assert isinstance(rec, GuardRecovery)
    assert rec.new_run_id == guard.run_id == guard.client.model_id != rec.old_run_id
    assert rec.checkpoint.tinker_path.endswith("/weights/step-000020")
    assert (rec.resumed_at, rec.steps_lost, rec.number, rec.attempts) == (20, 4, 1, 1)
    assert rec.seconds >= 0 and rec.waited >= 0


def test_the_step_after_a_corrupting_failure_runs_without_waiting_for_the_poll_interval() -> None:
    """Must show 2. The real clock and an hour-long interval: only the error can have triggered the poll."""
    policy = POLICY.replace(poll_interval=3600.0)
    sim_real = SimulatedTinker()
    started = time.monotonic()
    guard, ran = guarded_loop(sim_real, SystemClock(), policy=policy, hook=corrupt_at(sim_real, (33, "before")))
    elapsed = time.monotonic() - started

    assert elapsed < 3.0, f"the loop took {elapsed:.2f}s"
    assert ran[33:35] == [33, 30]
    assert sim_real.lineage(guard.run_id) == list(range(60))
    assert guard.recoveries[0].waited < 3.0


def test_a_recovery_found_by_the_background_poller_between_steps_rewinds_the_iterator(
    sim: SimulatedTinker, clock: FakeClock, mocker: Any
) -> None:
    recovered = threading.Event()
    policy = POLICY.replace(poll_interval=30.0, on_recovery=lambda r: recovered.set())

    def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
        if (step.index, phase) == (14, "after") and not recovered.is_set():
            sim.corrupt(guard.run_id)
            clock.advance(30.0)  # the poller's next tick finds the corruption; no training call fails
            assert recovered.wait(WAIT)

    judge = mocker.spy(RecoveryGuard, "_judge")
    guard, ran = guarded_loop(sim, clock, policy=policy, hook=hook)
    assert ran == [*range(15), *range(10, 60)]
    assert sim.lineage(guard.run_id) == list(range(60))
    (rec,) = guard.recoveries
    assert (rec.resumed_at, rec.steps_lost) == (10, 5)
    assert judge.call_count == 0  # no step failed, so none was judged


def test_an_exception_that_is_not_about_corruption_propagates_unchanged(
    sim: SimulatedTinker, clock: FakeClock, mocker: Any
) -> None:
    bug = ValueError("a bug in the user's loop")

    def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
        if step.index == 12 and phase == "mid":
            raise bug

    with pytest.raises(ValueError) as info:
        guarded_loop(sim, clock, hook=hook)
    assert info.value is bug

    client = sim.create_lora_training_client(base_model="m")
    sim.fail_next_calls(client.model_id, 1)  # a passing 503: the run is healthy
    with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
        check = mocker.spy(guard._handle, "check_now")
        with pytest.raises(SimulatedAPIError, match="503"):
            for step in guard.steps(range(5)):
                with step:
                    guard.client.forward_backward([step.index]).result()
        assert check.call_count == 1  # the failure was judged by one immediate poll
        assert guard.recoveries == () and guard.run_id == client.model_id


def test_keyboard_interrupt_in_a_step_is_not_judged(sim: SimulatedTinker, clock: FakeClock, mocker: Any) -> None:
    client = sim.create_lora_training_client(base_model="m")
    with (
        pytest.raises(KeyboardInterrupt),
        recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard,
    ):
        check = mocker.spy(guard._handle, "check_now")
        for step in guard.steps(range(5)):
            with step:
                raise KeyboardInterrupt
    assert check.call_count == 0


def test_corruption_after_the_last_step_is_caught_before_the_loop_ends(sim: SimulatedTinker, clock: FakeClock) -> None:
    guard, ran = guarded_loop(sim, clock, steps=range(25), hook=corrupt_at(sim, (24, "after")))
    assert ran == [*range(25), 20, 21, 22, 23, 24]
    assert len(guard.recoveries) == 1
    assert sim.lineage(guard.run_id) == list(range(25))


def test_a_run_recovered_already_corrupted_is_recovered_again_from_the_inherited_checkpoint(
    sim: SimulatedTinker, clock: FakeClock
) -> None:
    guard, ran = guarded_loop(sim, clock, hook=corrupt_at(sim, (25, "before"), (23, "mid", 2)))
    assert ran == [*range(26), 20, 21, 22, 23, *range(20, 60)]
    first, second = guard.recoveries
    assert first.checkpoint == second.checkpoint  # the second run saved nothing: its parent's checkpoint
    assert second.old_run_id == first.new_run_id
    assert (second.resumed_at, second.steps_lost) == (20, 3)
    assert sim.lineage(guard.run_id) == list(range(60))


# -- exhaustion ---------------------------------------------------------------------------------------------
def test_exhaustion_inside_a_step_raises_recovery_exhausted_from_the_last_error_and_logs_the_steps_own(
    sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    policy = POLICY.replace(max_attempts=2)
    sim.fail_restores(5)
    with pytest.raises(RecoveryExhausted) as info:
        guarded_loop(sim, clock, policy=policy, hook=corrupt_at(sim, (15, "before")))
    err = info.value
    assert err.attempts == 2 and "503" in (err.last_error or "") and err.reason is ExhaustedReason.ATTEMPTS
    assert err.run_id.endswith(":train:0")
    assert isinstance(err.__cause__, SimulatedAPIError) and err.__cause__.status_code == 503
    assert err.__cause__.__traceback__ is not None  # the restore's own traceback, not only its text
    (suppressed,) = [r for r in caplog.records if "step 15 failed" in r.getMessage()]
    assert suppressed.exc_info is not None and isinstance(suppressed.exc_info[1], SimulatedRequestFailedError)


def test_exhaustion_found_by_the_poller_makes_the_next_step_raise(sim: SimulatedTinker, clock: FakeClock) -> None:
    gave_up = threading.Event()
    policy = POLICY.replace(poll_interval=30.0, on_failure=lambda e: gave_up.set())

    def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
        if (step.index, phase) == (5, "after"):  # before the first checkpoint: nothing to restore
            sim.corrupt(guard.run_id)
            clock.advance(30.0)
            assert gave_up.wait(WAIT)
        assert step.index <= 5, "a step ran after the recovery gave up"

    with pytest.raises(RecoveryExhausted, match="no restorable checkpoint") as info:
        guarded_loop(sim, clock, policy=policy, hook=hook)
    assert info.value.reason is ExhaustedReason.CHECKPOINTS
    assert info.value.attempts == 1 and isinstance(info.value.__cause__, NoRestorableCheckpoint)


# -- rewinding ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [lambda: range(40), lambda: list(range(40)), lambda: (i for i in range(40)), lambda: iter(range(40))],
    ids=["range", "list", "generator", "iterator"],
)
def test_any_iterable_of_step_indices_rewinds(sim: SimulatedTinker, clock: FakeClock, make: Callable[[], Any]) -> None:
    guard, ran = guarded_loop(sim, clock, steps=make(), hook=corrupt_at(sim, (27, "mid")))
    assert ran == [*range(28), *range(20, 40)]
    assert sim.lineage(guard.run_id) == list(range(40))


def test_cursor_continues_at_the_first_index_at_or_after_the_step() -> None:
    cursor = StepCursor(range(0, 20, 4))
    assert [next(cursor) for _ in range(4)] == [0, 4, 8, 12]
    cursor.seek(6)
    assert [next(cursor), next(cursor)] == [8, 12]
    lazy = StepCursor(i for i in range(10, 20))
    assert [next(lazy), next(lazy)] == [10, 11]
    lazy.seek(15)  # ahead of what was consumed: the indices in between were trained (by the checkpoint)
    assert next(lazy) == 15
    lazy.seek(10)
    assert next(lazy) == 10


def test_cursor_refuses_a_step_before_its_start_and_bad_indices() -> None:
    cursor = StepCursor(range(30, 40))
    next(cursor)
    with pytest.raises(ResumeBeforeFirstStep, match="starts at 30"):
        cursor.seek(20)
    with pytest.raises(TypeError, match="step indices"):
        next(StepCursor(["a"]))  # type: ignore[list-item]
    bad = StepCursor([3, 2])
    next(bad)
    with pytest.raises(ValueError, match="strictly increasing"):
        next(bad)
    with pytest.raises(TypeError):
        StepCursor("0123")  # type: ignore[arg-type]
    falling = StepCursor(range(5, 0, -1))  # only a rising range skips the per-index checks
    next(falling)
    with pytest.raises(ValueError, match="strictly increasing"):
        next(falling)


def test_a_range_cursor_rewinds_and_runs_to_its_end() -> None:
    cursor = StepCursor(range(0, 20, 2))
    assert [next(cursor) for _ in range(6)] == [0, 2, 4, 6, 8, 10]
    cursor.seek(5)  # the first index >= 5
    assert list(iter(lambda: next(cursor, None), None)) == [6, 8, 10, 12, 14, 16, 18]


def test_a_checkpoint_before_the_iterables_start_is_a_clear_error(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
        for step in guard.steps(range(10)):
            with step:
                guard.client.forward_backward([step.index]).result()
                guard.client.optim_step().result()
        guard.save_state("step-10", step=10)
        with pytest.raises(ResumeBeforeFirstStep, match="starts at 15"):
            for step in guard.steps(range(15, 30)):
                with step:
                    sim.corrupt(guard.run_id)
                    guard.client.forward_backward([step.index]).result()


def test_a_checkpoint_without_a_step_is_never_restored_for_the_loop(sim: SimulatedTinker, clock: FakeClock) -> None:
    """The newest checkpoint is an eval snapshot saved behind the guard's back (on the client itself, not through
    guard.client, with no step): the loop could not know where to resume from it, so the recovery skips it before
    any restore call and uses the older one."""
    skipped: list[str] = []
    policy = POLICY.replace(checkpoint_strategy="latest")

    def note(event: RecoveryEvent) -> None:
        if event.kind is EventKind.CHECKPOINT_SKIPPED:
            skipped.append(event.checkpoint or "")

    def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
        if (step.index, phase) == (24, "after") and not guard.recoveries:
            guard.client.__wrapped__.save_state("eval").result()  # newest, no step, not seen by the guard
            assert guard._engine is not None
            guard._engine.subscribe(note)
        if (step.index, phase) == (26, "mid") and not guard.recoveries:
            sim.corrupt(guard.run_id)

    guard, ran = guarded_loop(sim, clock, policy=policy, hook=hook)
    assert [c[0].rsplit("/", 1)[1] for c in sim.restore_calls] == ["step-000020"]  # never the eval snapshot
    assert skipped and skipped[0].endswith("/weights/eval")
    assert ran == [*range(27), *range(20, 60)]
    assert sim.lineage(guard.run_id) == list(range(60))


def test_a_bare_save_through_guard_client_is_a_checkpoint_the_loop_resumes_from(
    sim: SimulatedTinker, clock: FakeClock
) -> None:
    """tinker-cookbook's way: a plain save_state(name), no step given. The guard saw the save go out after step
    24's optim_step, so the checkpoint records step 25, and the recovery resumes there."""

    def hook(guard: RecoveryGuard, step: Step, phase: str) -> None:
        if (step.index, phase) == (24, "after") and not guard.recoveries:
            guard.client.save_state("bare").result()
        if (step.index, phase) == (26, "mid") and not guard.recoveries:
            sim.corrupt(guard.run_id)

    guard, ran = guarded_loop(sim, clock, hook=hook)
    assert [c[0].rsplit("/", 1)[1] for c in sim.restore_calls] == ["bare"]
    (recovery,) = guard.recoveries
    assert (recovery.resumed_at, recovery.steps_lost) == (25, 1)
    assert recovery.checkpoint.user_metadata == {RESUME_KEY: "25"}
    assert ran == [*range(27), *range(25, 60)]
    assert sim.lineage(guard.run_id) == list(range(60)) and guard.ledger.step == 60


def test_only_checkpoints_without_a_step_exhaust_without_creating_a_run(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    client.save_state("anonymous").result()
    with (
        pytest.raises(RecoveryExhausted, match="no restorable checkpoint") as info,
        recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard,
    ):
        for step in guard.steps(range(10)):
            with step:
                sim.corrupt(guard.run_id)
                guard.client.forward_backward([step.index]).result()
    assert info.value.reason is ExhaustedReason.CHECKPOINTS
    assert sim.restore_calls == [] and len(sim.run_ids) == 1


# -- pass-through, lifecycle, threads -----------------------------------------------------------------------
def test_a_disabled_policy_passes_through_without_a_thread(
    sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    client = sim.create_lora_training_client(base_model="m")
    before = threading.active_count()
    caplog.set_level(logging.INFO, logger="tinkex_recovery")
    with (
        pytest.raises(SimulatedRequestFailedError),
        recovery_guard(client.model_id, sim, policy=RecoveryPolicy(enabled=False), client=client, clock=clock) as guard,
    ):
        assert threading.active_count() == before
        for step in guard.steps(range(30)):
            with step:
                if step.index == 12:
                    sim.corrupt(guard.run_id)
                guard.client.forward_backward([step.index]).result()
                guard.client.optim_step().result()
                if (step.index + 1) % 10 == 0:
                    guard.client.save_state(f"s{step.index + 1}").result()
    # the one thing it adds: the step of each bare save, for a later process that recovers
    assert [c.user_metadata for c in sim.list_checkpoints(client.model_id).checkpoints] == [{RESUME_KEY: "10"}]
    assert [r.message for r in caplog.records if "disabled" in r.message] == [
        f"recovery_guard: recovery is disabled by the policy (enabled=False); run {client.model_id} is not "
        "watched and the guard passes everything through"
    ]
    assert guard.recoveries == () and sim.poll_count == 0


def test_no_policy_means_the_default_policy_enabled(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    guard = recovery_guard(client.model_id, sim, client=client, clock=clock)
    assert guard.policy == RecoveryPolicy(enabled=True)


def test_the_guard_is_single_use_and_its_methods_need_it_open(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    guard = recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock)
    with pytest.raises(RuntimeError, match="inside"):
        guard.steps(range(3))
    with guard, pytest.raises(RuntimeError, match="single-use"), guard:
        pass
    with pytest.raises(RuntimeError, match="single-use"), guard:
        pass
    with pytest.raises(RuntimeError, match="inside"):
        guard.save_state("x", step=1)


def _guard_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("tinkex-recovery")]


@pytest.mark.parametrize("raised", [None, RuntimeError, KeyboardInterrupt], ids=["normally", "exception", "ctrl-c"])
def test_leaving_the_guard_stops_its_threads_within_a_second(
    sim: SimulatedTinker, clock: FakeClock, raised: type[BaseException] | None
) -> None:
    client = sim.create_lora_training_client(base_model="m")
    before = _guard_threads()
    started = 0.0
    try:
        with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock):
            assert len(_guard_threads()) > len(before)
            started = time.monotonic()
            if raised is not None:
                raise raised("leaving")
    except (RuntimeError, KeyboardInterrupt) as exc:
        assert type(exc) is raised
    assert time.monotonic() - started < 1.0
    assert _guard_threads() == before


def test_keyboard_interrupt_while_waiting_for_a_hung_restore_leaves_promptly(
    sim: SimulatedTinker, clock: FakeClock
) -> None:
    """Ctrl-C during a stuck recovery: the wait is interrupted and the guard's threads stop."""

    restoring = threading.Event()
    sim.on_restore(lambda path: restoring.set())  # each restore call announces itself as it starts
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()

    def main_blocked_waiting_for_the_recovery() -> bool:
        frame = sys._current_frames().get(main)
        if frame is None or frame.f_code is not threading.Condition.wait.__code__:
            return False
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        return "waiter.acquire(" in line and any(f.f_code.co_name == "wait_for_recovery" for f, _ in walk_stack(frame))

    def interrupt() -> None:
        # Ctrl-C while the loop is blocked in the wait. (A signal landing at an arbitrary bytecode can strike
        # between a lock's acquire and its `with` block, a CPython hazard that no library code can guard.)
        deadline = time.monotonic() + WAIT
        if restoring.wait(WAIT):
            while not main_blocked_waiting_for_the_recovery() and time.monotonic() < deadline:
                pause.wait(0.002)
            signal.pthread_kill(main, signal.SIGINT)
        sim.release()

    pause = threading.Event()
    interrupter = threading.Thread(target=interrupt)
    sim.hang_restores(1)
    interrupter.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            guarded_loop(sim, clock, hook=corrupt_at(sim, (15, "before")))
        left = time.monotonic() - started
    finally:
        sim.release()
        interrupter.join(WAIT)
    assert restoring.is_set()
    assert left < 2.0
    assert _guard_threads() == []


def test_arguments_are_checked_where_they_are_written(sim: SimulatedTinker) -> None:
    client = sim.create_lora_training_client(base_model="m")
    with pytest.raises(ValueError, match="invalid run id"):
        recovery_guard("a/b", sim, client=client)
    with pytest.raises(ValueError, match="bound to run"):
        recovery_guard("other-run", sim, client=client)
    with pytest.raises(TypeError, match="RecoveryPolicy"):
        recovery_guard(client.model_id, sim, client=client, policy={"enabled": True})  # type: ignore[arg-type]
    pinned = RecoveryPolicy(enabled=True, checkpoint_strategy=f"tinker://{client.model_id}/weights/x")
    with pytest.raises(ValueError, match="needs client="):
        recovery_guard(client.model_id, sim, policy=pinned)


# -- save_state ---------------------------------------------------------------------------------------------
def test_save_state_records_step_and_metrics_in_user_metadata_and_the_cookbook_log(
    sim: SimulatedTinker, clock: FakeClock, tmp_path: Path
) -> None:
    client = sim.create_lora_training_client(base_model="m")
    with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock, log_path=tmp_path) as guard:
        path = guard.save_state("000020", step=20, metrics={"loss": 0.25, "tokens": 81234}, ttl_seconds=3600)
        guard.save_state("000030", step=30)
    (checkpoint, *_) = [c for c in sim.list_checkpoints(client.model_id).checkpoints if c.tinker_path == path]
    assert checkpoint.user_metadata == {"step": "20", "loss": "0.25", "tokens": "81234"}
    assert checkpoint.expires_at is not None
    lines = (tmp_path / "checkpoints.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"name": "000020", "batch": 20, "loss": 0.25, "tokens": 81234, "state_path": path},
        {"name": "000030", "batch": 30, "state_path": path.replace("000020", "000030")},
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step": -1}, ValueError, "non-negative int"),
        ({"step": 1.5}, ValueError, "non-negative int"),
        ({"step": True}, ValueError, "non-negative int"),
        ({"step": "3"}, ValueError, "non-negative int"),
        ({"step": 3, "metrics": {"loss": "low"}}, TypeError, "metric 'loss'"),
        ({"step": 3, "metrics": {"loss": float("nan")}}, TypeError, "finite"),
        ({"step": 3, "metrics": {"ok": True}}, TypeError, "metric 'ok'"),
        ({"step": 3, "metrics": {"step": 4}}, ValueError, "reserved"),
        ({"step": 3, "metrics": [("loss", 1.0)]}, TypeError, "mapping"),
        ({"step": 3, "ttl_seconds": 0}, ValueError, "positive"),
    ],
)
def test_save_state_rejects_what_cannot_be_resumed_from(
    sim: SimulatedTinker, clock: FakeClock, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    client = sim.create_lora_training_client(base_model="m")
    with (
        recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard,
        pytest.raises(error, match=match),
    ):
        guard.save_state("x", **kwargs)
    assert sim.list_checkpoints(client.model_id).checkpoints == []


def test_best_strategy_ranks_by_the_metrics_save_state_stored(sim: SimulatedTinker, clock: FakeClock) -> None:
    policy = POLICY.replace(checkpoint_strategy="best", best_metric="loss", best_mode="min")
    losses = {10: 0.5, 20: 0.1, 30: 0.3}
    client = sim.create_lora_training_client(base_model="m")
    ran: list[int] = []
    with recovery_guard(client.model_id, sim, policy=policy, client=client, clock=clock) as guard:
        for step in guard.steps(range(40)):
            with step:
                ran.append(step.index)
                if step.index == 35 and len(guard.recoveries) == 0:
                    sim.corrupt(guard.run_id)
                guard.client.forward_backward([step.index]).result()
                guard.client.optim_step().result()
                if step.index + 1 in losses:
                    guard.save_state(
                        f"s{step.index + 1}", step=step.index + 1, metrics={"loss": losses[step.index + 1]}
                    )
    assert guard.recoveries[0].resumed_at == 20
    assert ran == [*range(36), *range(20, 40)]
    assert sim.lineage(guard.run_id) == list(range(40))


def test_guard_save_state_records_the_ledgers_step_unless_told_and_refuses_when_none_is_known(
    sim: SimulatedTinker, clock: FakeClock
) -> None:
    client = sim.create_lora_training_client(base_model="m")
    with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
        with pytest.raises(ValueError, match="pass step="):
            guard.save_state("before-the-loop")  # a client passed in: what its run holds is not known yet
        for step in guard.steps(range(3)):
            with step:
                guard.client.forward_backward([step.index]).result()
                guard.client.optim_step().result()
        path = guard.save_state("three", metrics={"loss": 0.25})
    (saved,) = [c for c in sim.list_checkpoints(client.model_id).checkpoints if c.tinker_path == path]
    assert saved.user_metadata == {RESUME_KEY: "3", "step": "3", "loss": "0.25"} and guard.ledger.step == 3
