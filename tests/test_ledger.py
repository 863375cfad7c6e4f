"""The ledger on its own (no guard, no Lightning): the step each save holds, the one rule of which checkpoint a
loop resumes from, and the proxy that observes the client. The client is the in-memory simulated Tinker."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import pytest

from tinkex_recovery import RESUME_KEY, Checkpoint, ObservedClient, RecoveryEngine
from tinkex_recovery._ledger import REMEMBERED, Ledger
from tinkex_recovery._replay import Recording, Tape
from tinkex_recovery.simulated import SimulatedTinker
from tinkex_recovery.simulated._tinker import SimulatedTrainingClient

from .helpers import WAIT


class Loop:
    """The step under way, as a front-end tells the ledger."""

    def __init__(self) -> None:
        self.at: int | None = None

    def __call__(self) -> int | None:
        return self.at


def checkpoint_of(sim: SimulatedTinker, run_id: str, name: str) -> Checkpoint:
    return next(c for c in sim.list_checkpoints(run_id).checkpoints if c.tinker_path.endswith(f"/{name}"))


def train(client: Any, loop: Loop, index: int) -> None:
    loop.at = index
    client.forward_backward([index]).result()
    client.optim_step().result()


def test_a_bare_save_holds_the_steps_sent_before_it_and_says_so_in_its_metadata(sim: SimulatedTinker) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    for i in range(3):
        train(client, loop, i)
    client.save_state("end-of-2").result()  # at the end of step 2: a loop restored from it starts at 3
    loop.at = 3
    client.save_state("start-of-3").result()  # at the start of step 3, as tinker-cookbook saves: also 3
    client.forward_backward([3]).result()
    client.optim_step().result()
    end, start = checkpoint_of(sim, client.model_id, "end-of-2"), checkpoint_of(sim, client.model_id, "start-of-3")
    assert end.user_metadata == {RESUME_KEY: "3"} and start.user_metadata == {RESUME_KEY: "3"}
    assert ledger.step_of(end) == ledger.step_of(start) == 3 == len(sim.lineage(client.model_id)) - 1
    assert ledger.step == 4 and ledger.sent == 4


def test_a_fresh_new_ledger_knows_a_bare_save_from_its_metadata_alone(sim: SimulatedTinker) -> None:
    loop = Loop()
    client = Ledger(position=loop).adopt(sim.create_lora_training_client(base_model="m"))
    for i in range(5):
        train(client, loop, i)
    client.save_state("five").result()
    assert Ledger().step_of(checkpoint_of(sim, client.model_id, "five")) == 5  # a new process's ledger


def test_the_futures_need_not_be_read_the_order_of_sending_decides(sim: SimulatedTinker) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    loop.at = 0
    client.forward_backward([0])
    client.optim_step()  # neither future read
    saved = client.save_state("one")
    assert ledger.step_of(checkpoint_of(sim, client.model_id, "one")) == 1 and saved.result().path


def test_the_step_the_user_records_wins_over_the_ledgers_own_and_a_mismatch_is_logged(
    sim: SimulatedTinker, caplog: pytest.LogCaptureFixture
) -> None:
    loop = Loop()
    ledger = Ledger(position=loop, recorded=lambda path: 7 if path.endswith("/logged") else None)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    train(client, loop, 0)
    with caplog.at_level(logging.WARNING, "tinkex_recovery"):
        client.save_state("agrees", user_metadata={"step": "1"}).result()
        assert not caplog.records
        client.save_state("mine", user_metadata={"step": "40", "loss": "0.5"}).result()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "checkpoint mine records step 40, but the steps sent before it make it 1" in line
    client.save_state("logged").result()
    mine = checkpoint_of(sim, client.model_id, "mine")
    assert mine.user_metadata == {RESUME_KEY: "1", "step": "40", "loss": "0.5"}
    assert ledger.step_of(mine) == 40
    assert ledger.step_of(checkpoint_of(sim, client.model_id, "logged")) == 7


def test_a_users_own_resume_key_is_never_overwritten(sim: SimulatedTinker) -> None:
    loop = Loop()
    client = Ledger(position=loop).adopt(sim.create_lora_training_client(base_model="m"))
    train(client, loop, 0)
    client.save_state("x", None, False, {RESUME_KEY: "9"}).result()  # the SDK's positional order
    assert checkpoint_of(sim, client.model_id, "x").user_metadata == {RESUME_KEY: "9"}


def test_an_adopted_restored_run_counts_on_from_its_checkpoints_step(sim: SimulatedTinker) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    for i in range(4):
        train(client, loop, i)
    path = client.save_state("four").result().path
    train(client, loop, 4)
    restored = ledger.adopt(sim.create_training_client_from_state(path).result(), step=4)
    loop.at = 3  # the loop rewound: the last step it finished is the one before the resume
    restored.save_state("again-four").result()  # before any optim_step on the new run: what it was restored at
    assert ledger.step_of(checkpoint_of(sim, restored.model_id, "again-four")) == 4
    train(restored, loop, 4)
    restored.save_state("five").result()
    assert ledger.step_of(checkpoint_of(sim, restored.model_id, "five")) == 5 and ledger.sent == 1
    assert sim.lineage(restored.model_id) == [0, 1, 2, 3, 4]


def test_calls_through_a_lost_runs_proxy_are_not_counted(sim: SimulatedTinker) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    old = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    train(old, loop, 0)
    new = ledger.adopt(sim.create_lora_training_client(base_model="m"), step=0)
    loop.at = 0
    old.optim_step()
    old.save_state("stale").result()
    assert ledger.sent == 0 and ledger.step == 0
    assert checkpoint_of(sim, old.model_id, "stale").user_metadata is None
    assert new.model_id != old.model_id


def test_a_save_between_two_optim_steps_of_one_step_is_never_resumed_from(
    sim: SimulatedTinker, caplog: pytest.LogCaptureFixture
) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    loop.at = 0
    client.optim_step()
    client.save_state("half").result()
    client.optim_step()
    client.save_state("whole").result()
    loop.at = 1
    client.optim_step()
    with caplog.at_level(logging.WARNING, "tinkex_recovery"):
        half = checkpoint_of(sim, client.model_id, "half")
    assert ledger.step_of(half) is None  # its metadata says 1, but it holds half of step 0
    assert ledger.step_of(checkpoint_of(sim, client.model_id, "whole")) == 1
    assert any("between two optim_steps of step 0" in r.getMessage() for r in caplog.records)


def test_the_window_refuses_what_the_front_end_cannot_train_again(sim: SimulatedTinker) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    for i in range(6):
        train(client, loop, i)
        client.save_state(f"s{i + 1}")
    steps = [ledger.step_of(checkpoint_of(sim, client.model_id, f"s{i}")) for i in range(1, 7)]
    assert steps == [1, 2, 3, 4, 5, 6]
    ledger.window(floor=3, ceiling=5)
    assert [ledger.step_of(checkpoint_of(sim, client.model_id, f"s{i}")) for i in range(1, 7)] == [
        None,
        None,
        3,
        4,
        5,
        None,
    ]
    assert ledger.to_train_again(3) == range(3, 6) and ledger.to_train_again(3, position=3) == range(3, 4)
    with pytest.raises(ValueError, match="above ceiling"):
        ledger.window(floor=5, ceiling=4)
    with pytest.raises(ValueError, match="floor must be"):
        ledger.window(floor=-1)


def test_no_step_is_claimed_where_the_ledger_cannot_know(
    sim: SimulatedTinker, caplog: pytest.LogCaptureFixture
) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    client.save_state("before-the-loop").result()  # a run the ledger did not see start, no step under way
    assert checkpoint_of(sim, client.model_id, "before-the-loop").user_metadata is None
    train(client, loop, 0)
    path = client.save_state("one").result().path
    with caplog.at_level(logging.WARNING, "tinkex_recovery"):
        client.load_state = sim.create_training_client_from_state  # a stand-in: the call is what is observed
        client.load_state(path)
    client.save_state("after-load").result()
    assert checkpoint_of(sim, client.model_id, "after-load").user_metadata is None and ledger.step is None
    assert any("load_state" in r.getMessage() for r in caplog.records)


class NoMetadata:
    """A client whose save_state takes no user_metadata (an older SDK, or a user's own wrapper)."""

    def __init__(self, inner: SimulatedTrainingClient) -> None:
        self.inner = inner
        self.model_id = inner.model_id

    def optim_step(self) -> Any:
        return self.inner.optim_step()

    def save_state(self, name: str) -> Any:
        return self.inner.save_state(name)


def test_a_client_without_metadata_is_remembered_by_name_for_its_own_run_only(sim: SimulatedTinker) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(NoMetadata(sim.create_lora_training_client(base_model="m")))
    for i in range(REMEMBERED + 2):
        loop.at = i
        client.optim_step()
        client.save_state(f"s{i + 1}")
    assert ledger.step_of(checkpoint_of(sim, client.model_id, f"s{REMEMBERED + 2}")) == REMEMBERED + 2
    assert ledger.step_of(checkpoint_of(sim, client.model_id, "s1")) is None  # beyond the newest REMEMBERED
    assert len(ledger.book.saved) == REMEMBERED
    for i in range(REMEMBERED + 2, 20 * REMEMBERED):  # a long run's book does not grow
        loop.at = i
        client.optim_step()
        client.save_state(f"s{i + 1}")
    assert len(ledger.book.saved) == REMEMBERED and len(ledger._saves) == REMEMBERED
    elsewhere = Checkpoint(
        checkpoint_id="weights/s3",
        checkpoint_type="training",
        time=datetime.now(UTC),
        tinker_path="tinker://another-run/weights/s3",
    )
    assert ledger.step_of(elsewhere) is None


def test_the_proxy_passes_everything_else_through_and_passes_for_the_client(sim: SimulatedTinker) -> None:
    raw = sim.create_lora_training_client(base_model="m")
    client = Ledger().adopt(raw)
    assert isinstance(client, SimulatedTrainingClient) and isinstance(client, ObservedClient)
    assert type(client) is ObservedClient and client.__wrapped__ is raw
    assert client.model_id == raw.model_id and repr(client) == repr(raw)
    assert client.forward.__self__ is raw  # not intercepted: the client's own bound method
    client.tag = "x"
    assert raw.tag == "x"  # type: ignore[attr-defined]
    assert "forward_backward" in dir(client)
    bare = Ledger().adopt(NoMetadata(raw))
    assert hasattr(bare, "optim_step") and not hasattr(bare, "optim_step_async")  # exactly the client's attributes
    assert not hasattr(bare, "save_state_async") and not hasattr(bare, "load_state")
    assert Ledger().adopt(client).__wrapped__ is raw  # a proxy is never wrapped twice


def test_a_method_replaced_on_the_client_is_the_one_called_and_still_counted(sim: SimulatedTinker) -> None:
    """The proxy builds an observed method once per client method (a call through it costs no new wrapper), and
    a method the user replaces on the client afterwards (a patch, a test double) is the one it calls."""
    loop = Loop()
    ledger = Ledger(position=loop)
    raw = sim.create_lora_training_client(base_model="m")
    client = ledger.adopt(raw)
    loop.at = 0
    assert client.optim_step is client.optim_step  # one observed form while the client's method stays the same
    client.optim_step().result()
    original, calls = raw.optim_step, []

    def patched(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    recording = Recording()
    tape = Tape(client, recording)  # what Lightning's callback puts in front of the proxy: built once as well
    assert tape.optim_step is tape.optim_step
    raw.optim_step = patched  # type: ignore[method-assign]
    loop.at = 1
    client.optim_step().result()
    loop.at = 2
    tape.optim_step().result()
    assert calls == [(), ()] and ledger.sent == 3 and [name for name, _ in recording.calls] == ["optim_step"]


def test_a_replaced_method_is_told_apart_by_identity_not_by_its_own_eq(sim: SimulatedTinker) -> None:
    class Op:
        """A callable that says it equals any other of its name (as a dataclass-style wrapper may)."""

        def __init__(self, tag: str, calls: list[str], method: Any) -> None:
            self.tag, self.calls, self.method = tag, calls, method

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(self.tag)
            return self.method(*args, **kwargs)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Op)

        __hash__ = None  # type: ignore[assignment]

    raw, calls = sim.create_lora_training_client(base_model="m"), []
    original = raw.optim_step
    client = Ledger().adopt(raw, step=0)
    tape = Tape(client, Recording())
    for tag in ("v1", "v2"):
        raw.optim_step = Op(tag, calls, original)  # type: ignore[method-assign]
        client.optim_step().result()
        tape.optim_step().result()
    assert calls == ["v1", "v1", "v2", "v2"]


def test_optim_steps_from_many_threads_are_all_counted(sim: SimulatedTinker) -> None:
    ledger = Ledger()
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"), step=0)
    threads = [threading.Thread(target=lambda: [client.optim_step() for _ in range(200)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.sent == 800 and ledger.step == 800


def test_the_async_methods_are_observed_and_a_save_in_another_task_sees_the_step(sim: SimulatedTinker) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))

    async def main() -> None:
        loop.at = 0
        await (await client.forward_backward_async([0]))
        step = asyncio.ensure_future(client.optim_step_async())  # yields to the loop before it returns
        save = asyncio.ensure_future(client.save_state_async("one"))
        await (await step)
        await (await save)

    asyncio.run(main())
    assert ledger.step_of(checkpoint_of(sim, client.model_id, "one")) == 1 == len(sim.lineage(client.model_id))


def test_bad_input_is_refused_at_once(sim: SimulatedTinker) -> None:
    with pytest.raises(TypeError, match="position must be callable"):
        Ledger(position=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="recorded must be callable"):
        Ledger(recorded="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_change must be callable, got str"):
        Ledger(on_change="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be"):
        Ledger().adopt(sim.create_lora_training_client(base_model="m"), step=-1)


def test_keep_from_names_the_oldest_step_a_fallback_can_restore_and_forgets_a_lost_runs_later_saves(
    sim: SimulatedTinker,
) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    assert ledger.keep_from() is None  # nothing saved: a replaying front-end keeps everything
    paths = {}
    for i in range(9):
        train(client, loop, i)
        if (i + 1) % 3 == 0:
            paths[i + 1] = client.save_state(f"s{i + 1}").result().path
    assert [ledger.keep_from(d) for d in range(4)] == [9, 6, 3, 3]
    # restored from step 6 (9 was unusable): 9 is gone for good; the new run's saves come on top
    restored = ledger.adopt(sim.create_training_client_from_state(paths[6]).result(), step=6)
    assert [ledger.keep_from(d) for d in range(3)] == [6, 3, 3]
    for i in range(6, 8):
        train(restored, loop, i)
    restored.save_state("s8")
    assert [ledger.keep_from(d) for d in range(3)] == [8, 6, 3]
    with pytest.raises(ValueError, match="depth must be"):
        ledger.keep_from(-1)


def test_a_split_checkpoint_stays_refused_once_its_run_is_lost(sim: SimulatedTinker) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    loop.at = 0
    client.optim_step()
    half = client.save_state("half").result().path
    client.optim_step()
    train(client, loop, 1)
    whole = client.save_state("two").result().path
    ledger.adopt(sim.create_training_client_from_state(whole).result(), step=2)
    inherited = checkpoint_of(sim, half.split("/")[2], "half")
    assert ledger.step_of(inherited) is None and ledger.keep_from(1) == 2  # never the split one


class Deferred:
    """A client whose saves are answered later, by the test (a slow server)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.pending: list[Future[Any]] = []

    def optim_step(self) -> Future[Any]:
        done: Future[Any] = Future()
        done.set_result(None)
        return done

    def save_state(self, name: str, ttl_seconds: int | None = None, user_metadata: Any = None) -> Future[Any]:
        self.pending.append(Future())
        return self.pending[-1]


def test_keep_from_counts_only_saves_that_succeeded(sim: SimulatedTinker) -> None:
    """A save sent to a run that is already lost fails: it holds nothing, so it never raises the floor a replaying
    front-end keeps batches from (the engine would then refuse every checkpoint that does exist)."""
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    for i in range(4):
        train(client, loop, i)
        if i in (1, 3):
            if i == 3:
                sim.corrupt(client.model_id)
            client.save_state(f"s{i + 1}")
    assert ledger.keep_from() == 2
    deferred = Deferred("run-x")
    slow = ledger.adopt(deferred, step=2)
    loop.at = 2
    slow.optim_step()
    slow.save_state("s3")
    assert ledger.keep_from() == 2  # not answered yet: not counted
    deferred.pending[-1].set_result(None)
    assert ledger.keep_from() == 3
    slow.save_state("s3-again")
    deferred.pending[-1].set_exception(RuntimeError("lost"))
    assert ledger.keep_from() == 3 and ledger.keep_from(1) == 2
    loop.at = 3
    slow.optim_step()
    slow.save_state("s4")
    deferred.pending[-1].set_exception(RuntimeError("lost"))
    assert [ledger.keep_from(), ledger.keep_from()] == [3, 3]  # a failed save stays failed, however often read


def test_the_version_moves_with_every_save_and_adopted_checkpoint_and_unanswered_saves_are_told(
    sim: SimulatedTinker,
) -> None:
    """What a replaying front-end looks at to know whether its floor may have moved: the ledger's version (a
    save sent, a run adopted at a checkpoint's step), told to ``on_change`` at each move, and whether a newest
    save is still unanswered."""
    loop, changes = Loop(), []
    ledger = Ledger(position=loop, on_change=lambda: changes.append(ledger.version))
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    start = ledger.version
    train(client, loop, 0)
    assert ledger.version == start and not ledger.unanswered()  # an optim_step moves no floor
    client.save_state("s1").result()
    assert ledger.version == start + 1 and not ledger.unanswered()
    deferred = Deferred("run-x")
    slow = ledger.adopt(deferred, step=1)
    assert ledger.version == start + 2
    slow.save_state("s1-again")
    assert ledger.version == start + 3 and ledger.unanswered()
    deferred.pending[-1].set_result(None)
    assert not ledger.unanswered()
    slow.save_state("s1-once-more")
    client.save_state("through-the-lost-runs-proxy")  # not counted: no save of this run, no version
    assert ledger.version == start + 4 and ledger.unanswered() and not ledger.unanswered(newest=0)
    assert changes == [start + 1, start + 2, start + 3, start + 4]  # told after each move, once each


def test_a_recovery_reports_the_step_its_checkpoint_was_chosen_on_though_the_book_changes_meanwhile(
    sim: SimulatedTinker, make_engine: Callable[..., RecoveryEngine]
) -> None:
    """step_of runs on the engine's threads while the loop's thread goes on: the window moves during the restore
    (the loop pruned its buffer). The recovery keeps the answer it chose by; it never reports a step of None."""
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    for i in range(3):
        train(client, loop, i)
    client.save_state("three").result()
    sim.on_restore(lambda path: ledger.window(floor=10))
    handle = make_engine(status=sim).watch(client.model_id, sim, step_of=ledger.step_of)
    sim.corrupt(client.model_id)
    assert handle.check_now()
    recovery = handle.wait_for_recovery(timeout=WAIT)
    assert recovery.step == 3 and recovery.checkpoint.tinker_path.endswith("/three")
    assert ledger.step_of(recovery.checkpoint) is None  # what the book says now


def test_a_save_whose_call_raises_or_is_cancelled_is_not_counted_as_saved(sim: SimulatedTinker) -> None:
    loop = Loop()
    ledger = Ledger(position=loop)
    client = ledger.adopt(sim.create_lora_training_client(base_model="m"))
    train(client, loop, 0)
    client.save_state("one").result()
    train(client, loop, 1)
    with pytest.raises(TypeError):
        client.save_state("two", user_metadata={"k": 3})  # refused by the client before sending

    async def cancelled() -> None:
        task = asyncio.ensure_future(client.save_state_async("three"))
        await asyncio.sleep(0)  # the save is stamped and its call started
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert ledger.keep_from() == 1  # neither two nor three holds anything the ledger can count on
