"""The safety budgets judge progress by steps, and a clock that runs ahead does not stretch them.

Progress means the restored run saved a checkpoint holding more steps than the one it came from: an eval
snapshot or a "checkpoint on resume" at the restored step is none. The restored step is stamped on the new run
(``tinkex_recovery.restored_step``), so a restarted process judges as the one before it did. Recovery times ahead
of this clock count as now. Time is a FakeClock; polls are driven by ``poll_once()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from tinkex_recovery import (
    BUDGET_KEYS,
    ExhaustedReason,
    FakeClock,
    Recovery,
    RecoveryEngine,
    RecoveryExhausted,
    RunHandle,
)
from tinkex_recovery._recovery import checkpoint_step
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT, run_with_checkpoints, train


@pytest.fixture
def make_engine(make_engine: Callable[..., RecoveryEngine]) -> Callable[..., RecoveryEngine]:
    return functools.partial(make_engine, backoff=0.0, max_backoff=0.0)


def lose(sim: SimulatedTinker, engine: RecoveryEngine, handle: RunHandle) -> Recovery:
    sim.corrupt(handle.run_id)
    engine.poll_once()
    return handle.wait_for_recovery(WAIT)


def snapshot(recovery: Recovery, name: str, step: int) -> None:
    """The restored run saves a checkpoint recording ``step`` (an eval snapshot when it is the restored step)."""
    recovery.client.save_state(name, user_metadata={"step": str(step)}).result()


def test_snapshots_at_the_restored_step_are_no_progress(sim: SimulatedTinker, make_engine: Any) -> None:
    engine = make_engine(max_no_progress=2)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)  # checkpoints at steps 2 and 4
    first = lose(sim, engine, handle)
    assert first.checkpoint.path.name == "0004"
    snapshot(first, "eval-1", 4)  # an eval snapshot at the step it came from
    second = lose(sim, engine, handle)  # streak 1
    snapshot(second, "resume-2", 4)  # a "checkpoint on resume": the same step again
    with pytest.raises(RecoveryExhausted) as info:
        lose(sim, engine, handle)
    assert info.value.reason is ExhaustedReason.NO_PROGRESS and "more steps" in str(info.value.__cause__)


def test_a_checkpoint_holding_more_steps_is_progress(sim: SimulatedTinker, make_engine: Any) -> None:
    engine = make_engine(max_no_progress=2)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)
    recovery = lose(sim, engine, handle)
    for n in range(3):  # each restored run gets one step further before it is lost
        train(recovery.client, [4 + n])
        snapshot(recovery, f"s{n}", 5 + n)
        recovery = lose(sim, engine, handle)
    assert len(handle.recoveries) == 4


def test_a_restarted_process_judges_progress_by_the_stamped_step(sim: SimulatedTinker, make_engine: Any) -> None:
    first_engine = make_engine(max_no_progress=2)
    handle = first_engine.watch(run_with_checkpoints(sim).model_id, sim)
    first = lose(sim, first_engine, handle)
    metadata = sim.get_training_run(first.new_run_id).user_metadata or {}
    assert metadata[BUDGET_KEYS[2]] == "4"
    snapshot(first, "eval-1", 4)
    second = lose(sim, first_engine, handle)  # streak 1, recorded on the new run
    snapshot(second, "eval-2", 4)
    first_engine.close()
    restarted = make_engine(max_no_progress=2)  # another process: nothing but the run's metadata
    again = restarted.watch(second.new_run_id, sim)
    with pytest.raises(RecoveryExhausted) as info:
        lose(sim, restarted, again)
    assert info.value.reason is ExhaustedReason.NO_PROGRESS


def test_the_step_is_read_from_either_key() -> None:
    from tinkex_recovery import Checkpoint

    def ck(metadata: dict[str, str] | None) -> Checkpoint:
        return Checkpoint(
            checkpoint_id="weights/a",
            checkpoint_type="training",
            time="2026-01-01T00:00:00Z",  # type: ignore[arg-type]
            tinker_path="tinker://r/weights/a",
            user_metadata=metadata,
        )

    assert checkpoint_step(ck({"step": "7"})) == 7
    assert checkpoint_step(ck({"tinkex_recovery.step": "8"})) == 8
    assert checkpoint_step(ck({"step": "x", "tinkex_recovery.step": "9"})) == 9
    assert checkpoint_step(ck({"step": "-1"})) is None and checkpoint_step(ck(None)) is None


def test_recovery_times_ahead_of_this_clock_count_as_now(
    sim: SimulatedTinker, make_engine: Any, clock: FakeClock
) -> None:
    """A run recovered by a host whose clock is an hour ahead: its recovery counts as now, so it leaves the
    window recovery_window after now, not an hour later."""
    ahead = (clock.now() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    client = sim.create_lora_training_client(base_model="m", user_metadata={BUDGET_KEYS[0]: ahead})
    train(client, [0, 1])
    client.save_state("0002", user_metadata={"step": "2"}).result()
    engine = make_engine(max_recoveries=2, recovery_window=600.0, max_no_progress=None)
    handle = engine.watch(client.model_id, sim)
    lose(sim, engine, handle)  # t=0: the skewed one and this one are in the window
    clock.advance(601.0)
    lose(sim, engine, handle)  # t=601: both have left the window
    third = lose(sim, engine, handle)  # t=601: one in the window, one more allowed
    assert len(handle.recoveries) == 3 and third.number == 3


def test_without_max_recoveries_the_last_ten_times_are_kept(sim: SimulatedTinker, make_engine: Any) -> None:
    engine = make_engine(max_recoveries=None, max_no_progress=None)
    handle = engine.watch(run_with_checkpoints(sim).model_id, sim)
    for _ in range(12):
        recovery = lose(sim, engine, handle)
    times = (sim.get_training_run(recovery.new_run_id).user_metadata or {})[BUDGET_KEYS[0]].split()
    assert len(times) == 10
