"""The replayer on its own (no Lightning): what it keeps for a replay, and when it lets it go. The client is the
in-memory simulated Tinker; the engine's clock is a fake one nobody advances (no poll runs)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import pytest

from tinkex_recovery import FakeClock, RecoveryPolicy
from tinkex_recovery._ledger import Ledger
from tinkex_recovery._models import Checkpoint
from tinkex_recovery._replay import Lane, Replayer, frozen
from tinkex_recovery.simulated import SimulatedTinker


class Loop:
    """A loop of the shape a front-end drives: each step trains once and saves at the end of ``save_at`` steps,
    through the client the lane installed."""

    def __init__(self, save_at: set[int]) -> None:
        self.client: Any = None
        self.save_at = save_at
        self.steps = 0

    def train(self, index: int) -> None:
        self.client.forward_backward([index]).result()
        self.client.optim_step().result()
        self.steps += 1
        if index in self.save_at:
            self.client.save_state(f"after-{index}")  # not waited for: the answer may come later


def answer_later(raw: Any, name: str) -> list[tuple[Future[Any], Any]]:
    """The save of ``name`` is answered only when the test sets the future it returns (the SDK answers from its own
    thread): the server has the checkpoint at once. Returns the (future, result) pairs to answer."""
    answers: list[tuple[Future[Any], Any]] = []
    save = raw.save_state

    def answered_later(saved: str, *args: Any, **kwargs: Any) -> Any:
        if saved != name:
            return save(saved, *args, **kwargs)
        answers.append((Future(), save(saved, *args, **kwargs).result()))
        return answers[-1][0]

    raw.save_state = answered_later
    return answers


@pytest.fixture
def lane_of(sim: SimulatedTinker, clock: FakeClock) -> Iterator[Any]:
    lanes: list[Lane] = []

    def make(loop: Loop, client: Any, fallback_depth: int = 2, retry: bool = True) -> tuple[Replayer, Lane]:
        replayer = Replayer(
            loop.train, start=0, counter=lambda: loop.steps, set_counter=lambda n: None, retry_failed_step=retry
        )
        lane = Lane.watch(
            replayer,
            client,
            sim,
            policy=RecoveryPolicy(enabled=True, poll_interval=3600.0, fallback_depth=fallback_depth),
            clock=clock,
            install=lambda tape: setattr(loop, "client", tape),
            on_recovery=lambda recovery, steps: None,
            on_exhausted=lambda error, cause: None,
        )
        lanes.append(lane)
        return replayer, lane

    yield make
    for lane in lanes:
        lane.close()


def test_kept_steps_are_let_go_at_the_first_step_after_the_save_that_holds_them_is_answered(
    sim: SimulatedTinker, lane_of: Any
) -> None:
    """A save is answered after the step that sent it (the SDK answers from its own thread): the steps before it
    are kept until the answer is in (the save may yet fail), and let go at the next step's start, not at the
    next save's."""
    raw = sim.create_lora_training_client(base_model="m")
    answers = answer_later(raw, "after-4")
    loop = Loop(save_at={4})
    replayer, lane = lane_of(loop, raw)
    for index in range(6):
        replayer.step(index)
    assert [k.index for k in replayer.kept] == [0, 1, 2, 3, 4, 5]  # the save after step 4 is not answered yet
    future, result = answers[0]
    future.set_result(result)
    replayer.step(6)
    assert [k.index for k in replayer.kept] == [5, 6]
    assert lane in replayer.lanes


def test_nothing_is_let_go_while_a_recovery_is_under_way(sim: SimulatedTinker, lane_of: Any) -> None:
    """A recovery chooses its checkpoint against the floor of the moment; a save answered meanwhile moves the
    floor, but the steps the recovery may replay stay until it is taken in."""
    raw = sim.create_lora_training_client(base_model="m")
    answers = answer_later(raw, "after-3")
    loop = Loop(save_at={1, 3})  # after-1 holds step 2; after-3 holds step 4, answered later
    replayer, lane = lane_of(loop, raw, fallback_depth=0)
    for index in range(5):
        replayer.step(index)
    assert [k.index for k in replayer.kept] == [2, 3, 4]

    restoring, release = threading.Event(), threading.Event()
    sim.on_restore(lambda path: (restoring.set(), release.wait(10)))
    sim.corrupt(raw.model_id)
    try:
        assert lane.handle.check_now() and restoring.wait(10)  # the engine's thread is restoring a checkpoint
        future, result = answers[0]
        future.set_result(result)  # the floor moves to step 4
        replayer._bound(5)
        assert [k.index for k in replayer.kept] == [2, 3, 4]  # kept: the recovery is not taken in yet
    finally:
        release.set()
        sim.on_restore(None)
    replayer.step(5)  # takes the recovery in (from after-3, step 4), replays step 4, runs step 5
    assert sim.lineage(loop.client.model_id) == list(range(6))
    assert [k.index for k in replayer.kept] == [4, 5]


def test_a_loss_the_engine_found_is_taken_in_before_the_next_step_though_its_events_are_late(
    sim: SimulatedTinker, lane_of: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The poller (on its own thread) finds the run lost between two steps; the events are delivered later (a slow
    log handler, here, before every subscriber). The next step still starts on the new run: with
    retry_failed_step=False a step sent to the lost run would end the loop."""
    loop = Loop(save_at={0, 1, 2})
    replayer, lane = lane_of(loop, sim.create_lora_training_client(base_model="m"), retry=False)
    for index in range(3):
        replayer.step(index)
    detected, release = threading.Event(), threading.Event()

    class Slow(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if ": detected" in record.getMessage():
                detected.set()
                release.wait(10)

    slow, lost = Slow(), loop.client.model_id
    logging.getLogger("tinkex_recovery").addHandler(slow)
    sim.corrupt(lost)
    try:
        with caplog.at_level(logging.INFO, logger="tinkex_recovery"):
            checked = lane.handle.check_soon()  # the poll, on the engine's poll worker
            assert detected.wait(10)
            assert replayer.alarm  # told by the poll itself, not by an event
            release.set()
            checked.result(timeout=10)
    finally:
        release.set()
        logging.getLogger("tinkex_recovery").removeHandler(slow)
    replayer.step(3)
    assert loop.client.model_id != lost and sim.lineage(loop.client.model_id) == [0, 1, 2, 3]


def test_a_run_found_lost_during_another_runs_replay_is_taken_in_before_the_next_step(
    sim: SimulatedTinker, clock: FakeClock
) -> None:
    """Two runs trained in one step. A's loss is taken in at step 5 and steps 3 and 4 replayed; between them B's
    poll finds B lost. Step 5 starts on B's new run too (with retry_failed_step=False, a step sent to B's lost
    run would end the loop), and each run holds every step once."""
    clients: dict[str, Any] = {}
    steps, lose_b_after = [0], [3]

    def train(index: int) -> None:
        for name in ("a", "b"):
            clients[name].forward_backward([index]).result()
            clients[name].optim_step().result()
            if index == 2:
                clients[name].save_state(f"{name}-after-2").result()
        steps[0] += 1
        if index in lose_b_after:  # at the end of step 3's replay: B's poll finds B lost
            lose_b_after.clear()
            sim.corrupt(lanes["b"].handle.run_id)
            lanes["b"].handle.check_now()

    replayer = Replayer(train, start=0, counter=lambda: steps[0], set_counter=lambda n: None, retry_failed_step=False)
    lanes: dict[str, Lane] = {}
    try:
        for name in ("a", "b"):
            lanes[name] = Lane.watch(
                replayer,
                sim.create_lora_training_client(base_model="m"),
                sim,
                policy=RecoveryPolicy(enabled=True, poll_interval=3600.0),
                clock=clock,
                install=lambda tape, name=name: clients.__setitem__(name, tape),
                on_recovery=lambda recovery, steps: None,
                on_exhausted=lambda error, cause: None,
            )
        lose_b_after.clear()
        for index in range(5):
            replayer.step(index)
        lose_b_after.append(3)
        sim.corrupt(lanes["a"].handle.run_id)
        lanes["a"].handle.check_now()
        replayer.step(5)
        assert len(sim.run_ids) == 4  # each run lost once, each restored once
        for name in ("a", "b"):
            assert sim.lineage(clients[name].model_id) == list(range(6)), name
    finally:
        for lane in lanes.values():
            lane.close()


def test_a_closed_lane_leaves_its_replayer_and_hands_back_the_raw_client(sim: SimulatedTinker, lane_of: Any) -> None:
    raw = sim.create_lora_training_client(base_model="m")
    loop = Loop(save_at=set())
    replayer, lane = lane_of(loop, raw)
    replayer.step(0)
    assert lane.close() is raw and replayer.lanes == [] and lane.close() is raw  # idempotent


def test_frozen_copies_every_list_tuple_and_dict_and_keeps_their_types() -> None:
    item = object()
    value = [item, (1, [2]), {"a": [3], "b": (4,)}]
    copy = frozen(value)
    assert copy == value and copy is not value and copy[0] is item  # items referenced, never copied
    assert type(copy[1]) is tuple and type(copy[1][1]) is list and copy[1][1] is not value[1][1]
    assert type(copy[2]) is dict and copy[2] is not value[2] and copy[2]["a"] is not value[2]["a"]
    assert type(copy[2]["b"]) is tuple and frozen((item,)) == (item,) and type(frozen((item,))) is tuple


def test_a_step_given_keyword_arguments_is_replayed_with_them_and_one_lane_keeps_no_tapes(
    sim: SimulatedTinker, lane_of: Any
) -> None:
    loop = Loop(save_at={1})
    replayer, lane = lane_of(loop, sim.create_lora_training_client(base_model="m"))
    for index in range(4):
        replayer.step(index=index)
    assert [k.kwargs for k in replayer.kept] == [{"index": 2}, {"index": 3}]
    assert all(k.tapes is None for k in replayer.kept)  # one run: no other run's answers to play back
    sim.corrupt(loop.client.model_id)
    lane.handle.check_now()
    replayer.step(index=4)  # restored from the save after step 1: steps 2 and 3 replayed with their keywords
    assert sim.lineage(loop.client.model_id) == [0, 1, 2, 3, 4]


def test_only_checkpoints_the_kept_steps_can_replay_from_are_resumed_from(sim: SimulatedTinker, lane_of: Any) -> None:
    """The ceiling: a checkpoint may hold every step begun (a save at the end of the step under way), never more.
    The floor: with no fallback allowed, none older than the newest save, whose steps before it are let go."""
    loop = Loop(save_at={0, 2})  # the saves hold steps 1 and 3
    replayer, lane = lane_of(loop, sim.create_lora_training_client(base_model="m"), fallback_depth=0)
    for index in range(4):
        replayer.step(index)
    step_of = replayer.step_of(lane.ledger)

    def checkpoint(step: int) -> Checkpoint:
        return Checkpoint(
            checkpoint_id=f"weights/s{step}",
            checkpoint_type="training",
            time=datetime.now(UTC),
            tinker_path=f"tinker://r/weights/s{step}",
            user_metadata={"step": str(step)},
        )

    assert [step_of(checkpoint(step)) for step in (1, 2, 3, 4, 5)] == [None, None, 3, 4, None]
    assert [k.index for k in replayer.kept] == [3]


def test_a_step_with_no_save_since_the_last_one_looks_at_no_floor(
    sim: SimulatedTinker, lane_of: Any, mocker: Any
) -> None:
    """The common step reads the replayer's own flags only: the floors are computed again after a save."""
    loop = Loop(save_at={1})
    replayer, _ = lane_of(loop, sim.create_lora_training_client(base_model="m"))
    bound, keep_from = mocker.spy(Replayer, "_bound"), mocker.spy(Ledger, "keep_from")
    for index in range(6):
        replayer.step(index)
    assert bound.call_count == keep_from.call_count == 2  # at the first step, and at the step after the save


def test_the_async_methods_of_the_tape_are_observed_not_recorded(sim: SimulatedTinker, lane_of: Any) -> None:
    """A coroutine cannot be awaited twice, so a replay could not play one back: the tape passes them through."""
    loop = Loop(save_at=set())
    replayer, lane = lane_of(loop, sim.create_lora_training_client(base_model="m"))
    replayer.step(0)
    assert [name for name, _ in lane.recording.calls] == ["forward_backward", "optim_step"]
    pending = lane.tape.optim_step_async()
    pending.close()  # never sent: a coroutine not awaited
    assert [name for name, _ in lane.recording.calls] == ["forward_backward", "optim_step"]
