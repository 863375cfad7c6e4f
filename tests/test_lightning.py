"""TinkexRecovery with a real ``lightning.pytorch.Trainer`` on CPU, over the simulated Tinker.

Detection is deterministic: a run lost between batches is found by ``cb.handle.check_now()`` (the poll the
background poller would make), a run lost inside a batch by the failing Tinker call itself; the engine runs
on a FakeClock, so its poller polls once at start and never again by itself.
"""

from __future__ import annotations

import importlib
import json
import logging
import runpy
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

import tinkex_recovery
import tinkex_recovery.integrations
from tinkex_recovery import CannotReplay, FakeClock, Recovery, RecoveryExhausted, RecoveryPolicy
from tinkex_recovery._ledger import Ledger
from tinkex_recovery.integrations.lightning import TinkexRecovery
from tinkex_recovery.simulated import SimulatedAPIError, SimulatedRequestFailedError, SimulatedTinker

pytestmark = [
    pytest.mark.lightning,
    # Lightning asks for DataLoader workers on machines with more than 2 cores; these loaders hold a few ints.
    pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers"),
]

REPO = Path(__file__).resolve().parent.parent
Action = Callable[["RemoteModule"], None]


@pytest.fixture(autouse=True)
def quiet_lightning() -> Iterator[None]:
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)
    yield
    lightning_logger.setLevel(level)


class RemoteModule(pl.LightningModule):
    """The README's module, with no recovery code: each batch is a forward_backward and an optim_step on the
    Tinker client, then ``optimizers().step()``, then a checkpoint every ``save_every`` steps whose ``step`` is
    the optimizer steps it holds. Test actions (each runs once) are keyed by batch index: ``before`` runs
    before forward_backward, ``mid`` between forward_backward and optim_step, ``stepped`` right after
    ``optimizers().step()`` (before the checkpoint), ``after`` at the end of the batch."""

    def __init__(
        self,
        sim: SimulatedTinker,
        *,
        save_every: int | None = 2,
        before: Mapping[int, Action] | None = None,
        mid: Mapping[int, Action] | None = None,
        stepped: Mapping[int, Action] | None = None,
        after: Mapping[int, Action] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.service_client = sim
        self.training_client: Any = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
        self.save_every = save_every
        self.actions = {
            name: dict(a or {})
            for name, a in (("before", before), ("mid", mid), ("stepped", stepped), ("after", after))
        }
        self.used: list[tuple[int, str]] = []  # (batch_idx, run id) of each training_step that completed
        self.threads_seen: set[str] = set()
        self.buffered: list[int] = []  # the callback's buffer size at the start of each training_step
        self.cb: TinkexRecovery | None = None

    def act(self, when: str, batch_idx: int) -> None:
        action = self.actions[when].pop(batch_idx, None)
        if action is not None:
            action(self)

    def training_step(self, batch: list[int], batch_idx: int) -> dict[str, torch.Tensor]:
        self.threads_seen |= {t.name for t in threading.enumerate()}
        if self.cb is not None:
            self.buffered.append(self.cb.buffered)
        self.act("before", batch_idx)
        fwd = self.training_client.forward_backward(batch, "cross_entropy").result()
        self.act("mid", batch_idx)
        self.training_client.optim_step().result()
        self.optimizers().step()  # advances global_step
        self.act("stepped", batch_idx)
        if self.save_every and self.global_step % self.save_every == 0:
            self.training_client.save_state(
                f"step-{self.global_step:04d}", user_metadata={"step": str(self.global_step)}
            ).result()
        self.used.append((batch_idx, self.training_client.model_id))
        self.act("after", batch_idx)
        return {"loss": torch.tensor(fwd.loss)}

    def configure_optimizers(self) -> None:
        return None


class RewindingModule(RemoteModule):
    """A module that replays on its own (for ``replay=False``): it keeps what each step trained and, in the
    hook, trains again on the new run the steps the restored checkpoint lacks, with raw Tinker calls."""

    def __init__(self, sim: SimulatedTinker, **kwargs: Any) -> None:
        super().__init__(sim, **kwargs)
        self.by_step: dict[int, list[int]] = {}
        self.hook_calls: list[tuple[Recovery, range, int]] = []

    def training_step(self, batch: list[int], batch_idx: int) -> dict[str, torch.Tensor]:
        self.by_step[self.global_step] = batch
        return super().training_step(batch, batch_idx)

    def on_tinker_recovery(self, recovery: Recovery, steps: range) -> None:
        self.hook_calls.append((recovery, steps, self.global_step))
        for step in steps:
            self.training_client.forward_backward(self.by_step[step], "cross_entropy").result()
            self.training_client.optim_step().result()


class RecordingLogger(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def tinker(self) -> list[tuple[int | None, dict[str, float]]]:
        return [(s, m) for s, m in self.logged if any(k.startswith("tinker/") for k in m)]


def make_trainer(tmp_path: Path, cb: TinkexRecovery | None, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "default_root_dir": tmp_path,
        "callbacks": [cb] if cb else [],
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def loader(n: int) -> DataLoader[int]:
    return DataLoader(list(range(n)), batch_size=1, collate_fn=list)


def corrupt(module: RemoteModule) -> None:
    module.service_client.corrupt(module.training_client.model_id)


def corrupt_and_poll(module: RemoteModule) -> None:
    """The run is lost between two batches and the poller's next poll finds it."""
    corrupt(module)
    assert module.cb is not None and module.cb.handle is not None
    module.cb.handle.check_now()


def fit_with(
    tmp_path: Path,
    sim: SimulatedTinker,
    clock: FakeClock,
    *,
    policy: RecoveryPolicy | None = None,
    n: int = 8,
    module_cls: type[RemoteModule] = RemoteModule,
    trainer_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[RemoteModule, TinkexRecovery, pl.Trainer]:
    module_opts = {k: options.pop(k) for k in ("save_every", "before", "mid", "stepped", "after") if k in options}
    module = module_cls(sim, **module_opts)
    cb = TinkexRecovery(policy, clock=clock, **options)
    module.cb = cb
    trainer = make_trainer(tmp_path, cb, **(trainer_kwargs or {}))
    trainer.fit(module, loader(n))
    return module, cb, trainer


def checkpoints_hold_their_step(sim: SimulatedTinker, runs: list[str]) -> None:
    """Every checkpoint of ``runs`` holds exactly the batches of its first ``step`` optimizer steps (one item a
    batch): restored, its lineage is ``range(step)``. (Restoring creates runs: call it after counting them.)"""
    for run in runs:
        for checkpoint in sim.list_checkpoints(run).checkpoints:
            assert checkpoint.step is not None
            client = sim.create_training_client_from_state(checkpoint.tinker_path).result()
            assert sim.lineage(client.model_id) == list(range(checkpoint.step)), checkpoint.tinker_path


def steps_of_checkpoints(sim: SimulatedTinker, run: str) -> list[int | None]:
    return sorted((c.step for c in sim.list_checkpoints(run).checkpoints), key=lambda s: -1 if s is None else s)


def test_a_run_lost_mid_fit_is_swapped_and_the_fit_finishes(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    logger = RecordingLogger()
    module = RemoteModule(sim, mid={5: corrupt}, after={2: corrupt_and_poll})
    first = module.training_client.model_id
    cb = TinkexRecovery(RecoveryPolicy(enabled=True), clock=clock)
    module.cb = cb
    trainer = make_trainer(tmp_path, cb, logger=logger)

    trainer.fit(module, loader(8))

    assert trainer.state.finished and trainer.global_step == 8
    runs = [run for _, run in module.used]
    # Lost after batch 2: found by a poll, swapped before batch 3, batch 2 replayed (the checkpoint holds 2
    # steps). Lost inside batch 5: that batch failed, was recovered, batch 4 replayed, batch 5 run again.
    assert [b for b, _ in module.used] == [0, 1, 2, 2, 3, 4, 4, 5, 6, 7]
    assert runs == [first] * 3 + [runs[3]] * 3 + [runs[6]] * 4
    assert len({first, runs[3], runs[6]}) == 3
    assert module.training_client.model_id == runs[6] == cb.run_id
    assert sim.lineage(cb.run_id) == list(range(8))
    assert sim.run_ids == [first, runs[3], runs[6]]

    assert logger.tinker() == [
        (3, {"tinker/recoveries": 1.0, "tinker/seconds_to_recover": 0.0, "tinker/steps_lost": 1.0}),
        (5, {"tinker/recoveries": 2.0, "tinker/seconds_to_recover": 0.0, "tinker/steps_lost": 1.0}),
    ]

    state = cb.state_dict()
    assert json.loads(json.dumps(state)) == state  # ids, paths and numbers only: no client objects, no batches
    assert state["run_id"] == runs[6]
    assert [(r["old_run_id"], r["new_run_id"], r["checkpoint"]) for r in state["lineage"]] == [
        (first, runs[3], f"tinker://{first}/weights/step-0002"),
        (runs[3], runs[6], f"tinker://{runs[3]}/weights/step-0004"),
    ]
    assert [(r["global_step"], r["resume_step"], r["steps_lost"]) for r in state["lineage"]] == [(3, 2, 1), (5, 4, 1)]

    # The engine's threads ran during the fit and were released at teardown; the module and its client are
    # as they were, and the callback keeps no batch.
    assert "tinkex-recovery-poller" in module.threads_seen
    assert cb.handle is None and "training_step" not in vars(module)
    assert "save_state" not in vars(module.training_client) and cb.buffered == 0


def test_a_run_found_lost_between_batches_is_swapped_before_the_next_batch_sends_anything(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The poll's finding reaches the callback before the next batch: that batch starts on the new run (no
    request to the lost run, no failed step to recover from)."""
    started: list[str] = []

    def note(module: RemoteModule) -> None:
        started.append(module.training_client.model_id)

    with caplog.at_level(logging.WARNING, logger="tinkex_recovery"):
        _, cb, _ = fit_with(tmp_path, sim, clock, n=6, after={2: corrupt_and_poll}, before={3: note})
    first, final = sim.run_ids
    assert started == [final] and cb.run_id == final != first
    assert sim.lineage(final) == list(range(6))
    assert not [r for r in caplog.records if "failed on a lost run" in r.getMessage()]


LOSSES: dict[str, dict[str, dict[int, Action]]] = {
    # inside forward_backward: the Tinker call itself fails
    "forward_backward": {"before": {5: corrupt}},
    # inside optim_step: forward_backward went to the run before it was lost
    "optim_step": {"mid": {5: corrupt}},
    # after optimizers().step(): the periodic save_state is the call that fails (step 6 is a save step)
    "save_state": {"stepped": {5: corrupt}},
    # between two batches, found by the poller's next poll
    "between batches": {"after": {4: corrupt_and_poll}},
}


@pytest.mark.parametrize("place", list(LOSSES))
def test_every_batch_is_trained_once_and_counted_once_wherever_the_run_is_lost(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock, place: str
) -> None:
    module, cb, trainer = fit_with(tmp_path, sim, clock, n=10, **LOSSES[place])
    first, final = sim.run_ids[0], cb.run_id
    assert final is not None and final == module.training_client.model_id

    assert sim.lineage(final) == list(range(10))  # every batch exactly once on the final run
    assert sim.run_ids == [first, final]  # one loss, one new run
    # The new run holds every checkpoint due after the restored one (step 4), the one due at the failing
    # step (6) included...
    assert steps_of_checkpoints(sim, final) == [6, 8, 10]
    assert trainer.global_step == 10  # ...every optimizer step is counted once...
    checkpoints_hold_their_step(sim, [first, final])  # ...and every checkpoint holds the steps it says


PLACES = ("before", "mid", "stepped", "after")
AGAIN = "again"  # at the start of the batch's second run: in a replay, or in the rerun of a failed batch


@st.composite
def loss_schedules(draw: st.DrawFn) -> tuple[int, list[tuple[int, str]]]:
    """A save interval and up to 3 losses (batch index, place), none before the first checkpoint nor after the
    last batch (a run lost once the fit is over is left for the next fit). A loss "again" happens only if the
    batch runs a second time."""
    save_every = draw(st.sampled_from([1, 2, 3, 5]))
    places = st.tuples(st.integers(save_every, EXACT_N - 2), st.sampled_from((*PLACES, AGAIN)))
    return save_every, draw(st.lists(places, max_size=3, unique=True))


EXACT_N = 12


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=loss_schedules())
def test_exactly_once_for_any_schedule_of_losses(
    tmp_path_factory: pytest.TempPathFactory, schedule: tuple[int, list[tuple[int, str]]]
) -> None:
    save_every, losses = schedule
    clock = FakeClock()
    sim = SimulatedTinker(clock=clock)
    lost: set[str] = set()

    def lose(module: RemoteModule) -> None:
        run = module.training_client.model_id
        if not sim.get_training_run(run).corrupted:  # a second loss of a lost run is no new loss
            lost.add(run)
        corrupt(module)

    def lose_and_poll(module: RemoteModule) -> None:
        lose(module)
        assert module.cb is not None and module.cb.handle is not None
        module.cb.handle.check_now()

    again = {batch_idx for batch_idx, place in losses if place == AGAIN}
    runs: dict[int, int] = {}

    class Rerun(RemoteModule):
        def training_step(self, batch: list[int], batch_idx: int) -> dict[str, torch.Tensor]:
            runs[batch_idx] = runs.get(batch_idx, 0) + 1
            if runs[batch_idx] == 2 and batch_idx in again:
                again.discard(batch_idx)
                lose(self)
            return super().training_step(batch, batch_idx)

    actions: dict[str, dict[int, Action]] = {place: {} for place in PLACES}
    for batch_idx, place in losses:
        if place != AGAIN:
            actions[place][batch_idx] = lose_and_poll if place == "after" else lose
    _, cb, trainer = fit_with(
        tmp_path_factory.mktemp("fit"), sim, clock, n=EXACT_N, save_every=save_every, module_cls=Rerun, **actions
    )
    assert sim.lineage(cb.run_id or "") == list(range(EXACT_N))
    assert trainer.global_step == EXACT_N
    assert len(sim.run_ids) == 1 + len(lost) == 1 + len(cb.lineage)


def test_two_losses_between_two_checkpoints_and_one_during_the_replay(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    replayed: list[int] = []

    def lose_the_new_run_while_it_replays(module: RemoteModule) -> None:
        replayed.append(module.global_step)
        corrupt(module)

    def arm(module: RemoteModule) -> None:  # batch 3's first run; its next run is in the replay
        module.actions["before"][3] = lose_the_new_run_while_it_replays

    # Lost after batch 4 (found by a poll; the checkpoint holds 3 steps), the new run lost in turn while it
    # replays batch 3, and once more inside batch 7: each loss is one new run, every batch is trained once.
    _, cb, trainer = fit_with(
        tmp_path,
        sim,
        clock,
        n=12,
        save_every=3,
        after={4: corrupt_and_poll},
        before={3: arm, 7: corrupt},
    )
    assert replayed == [3]
    assert sim.lineage(cb.run_id) == list(range(12))
    assert trainer.global_step == 12
    assert len(sim.run_ids) == 4 and [r["resume_step"] for r in cb.lineage] == [3, 3, 6]
    checkpoints_hold_their_step(sim, sim.run_ids)


def test_the_hook_learns_which_steps_are_replayed(tmp_path: Path, sim: SimulatedTinker, clock: FakeClock) -> None:
    seen: list[tuple[str, range, int, str]] = []

    class Listening(RemoteModule):
        def on_tinker_recovery(self, recovery: Recovery, steps: range) -> None:
            seen.append((recovery.new_run_id, steps, self.global_step, self.training_client.model_id))

    old_style: list[Recovery] = []

    class OneArgument(RemoteModule):
        def on_tinker_recovery(self, recovery: Recovery) -> None:
            old_style.append(recovery)

    _, cb, trainer = fit_with(tmp_path, sim, clock, n=8, module_cls=Listening, stepped={5: corrupt})
    new = cb.run_id
    # The checkpoint holds 4 steps; batches 4 and 5 (steps 4 and 5) are replayed; the hook runs with the new
    # client in place and the step counter already set back.
    assert seen == [(new, range(4, 5), 4, new)]
    assert trainer.global_step == 8

    fit_with(tmp_path, sim, clock, n=4, module_cls=OneArgument, after={2: corrupt_and_poll})
    assert [r.number for r in old_style] == [1]


def test_replay_false_leaves_the_replay_to_the_module(tmp_path: Path, sim: SimulatedTinker, clock: FakeClock) -> None:
    module, cb, trainer = fit_with(
        tmp_path,
        sim,
        clock,
        n=10,
        module_cls=RewindingModule,
        replay=False,
        stepped={5: corrupt},
        after={7: corrupt_and_poll},
    )
    assert isinstance(module, RewindingModule)
    # The module's own raw replay makes the final run exact; the callback only undid the step the failed batch
    # had counted, so global_step is right too.
    assert sim.lineage(cb.run_id) == list(range(10))
    assert trainer.global_step == 10
    assert [(steps, at) for _, steps, at in module.hook_calls] == [(range(4, 5), 5), (range(8, 8), 8)]
    assert len(sim.run_ids) == 3


@pytest.mark.parametrize(("depth", "most"), [(0, 4), (2, 14)])
def test_the_buffer_holds_the_batches_a_fallback_may_need(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock, depth: int, most: int
) -> None:
    # At each batch start the buffer holds the batches since the (fallback_depth + 1)-th newest checkpoint, so a
    # recovery falling back past rejected checkpoints can still replay; references only, nothing after the fit.
    policy = RecoveryPolicy(enabled=True, fallback_depth=depth)
    module, cb, _ = fit_with(tmp_path, sim, clock, policy=policy, n=30, save_every=5, after={12: corrupt_and_poll})
    assert max(module.buffered) == most and module.buffered[:6] == [0, 1, 2, 3, 4, 0]
    assert sim.lineage(cb.run_id) == list(range(30)) and cb.buffered == 0


def test_a_save_that_fails_for_another_reason_keeps_the_batches(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    # The save at step 4 fails with a transient error the module tolerates: no checkpoint at 4, so the buffer
    # must keep batches 2 and 3 for a restore from the checkpoint at 2.
    tolerated: list[int] = []

    def fail_the_save(module: RemoteModule) -> None:
        sim.fail_next_calls(module.training_client.model_id, 1)
        tolerated.append(module.global_step)

    class TolerantSave(RemoteModule):
        def training_step(self, batch: list[int], batch_idx: int) -> dict[str, torch.Tensor]:
            try:
                return super().training_step(batch, batch_idx)
            except SimulatedAPIError:
                return {"loss": torch.tensor(0.0)}

    _, cb, trainer = fit_with(
        tmp_path,
        sim,
        clock,
        n=7,
        module_cls=TolerantSave,
        stepped={3: fail_the_save},
        after={4: corrupt_and_poll},
    )
    assert tolerated == [4]
    assert cb.lineage[0]["resume_step"] == 2
    assert sim.lineage(cb.run_id) == list(range(7)) and trainer.global_step == 7


def restored_names(sim: SimulatedTinker) -> list[str]:
    return [path.rsplit("/", 1)[-1] for path, _, _ in sim.restore_calls]


def test_a_bare_save_is_a_checkpoint_that_holds_its_step(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    def save_an_eval_snapshot(module: RemoteModule) -> None:  # newer than the checkpoint at step 4, no step given
        module.training_client.save_state("eval").result()

    _, cb, trainer = fit_with(
        tmp_path, sim, clock, n=8, stepped={4: save_an_eval_snapshot}, after={4: corrupt_and_poll}
    )
    # The ledger saw the save after batch 4's optim_step: it holds 5 batches and says so in its user_metadata;
    # the engine restored it, nothing was replayed, and the fit went on, every batch once.
    (snapshot,) = [c for c in sim.list_checkpoints(sim.run_ids[0]).checkpoints if c.tinker_path.endswith("/eval")]
    assert (snapshot.user_metadata or {})["tinkex_recovery.step"] == "5"
    assert restored_names(sim) == ["eval"]
    assert cb.lineage[0]["resume_step"] == 5 and cb.lineage[0]["steps_lost"] == 0
    assert sim.lineage(cb.run_id or "") == list(range(8)) and trainer.global_step == 8


def test_a_checkpoint_ahead_of_the_steps_taken_is_never_restored(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    def save_the_next_step(module: RemoteModule) -> None:  # one more than the optimizer steps it holds
        module.training_client.save_state("next", user_metadata={"step": str(module.global_step + 1)}).result()

    with pytest.raises(RecoveryExhausted, match="no restorable checkpoint"):
        fit_with(
            tmp_path, sim, clock, n=4, save_every=None, stepped={1: save_the_next_step}, after={1: corrupt_and_poll}
        )
    assert restored_names(sim) == [] and len(sim.run_ids) == 1


def break_the_newest_and_lose(module: RemoteModule) -> None:
    sim = module.service_client
    sim.break_checkpoint(sim.list_checkpoints(module.training_client.model_id).checkpoints[0].tinker_path)
    corrupt_and_poll(module)


def lose_the_newest(tmp_path: Path, sim: SimulatedTinker, clock: FakeClock, fallback_depth: int) -> None:
    """An 8-batch fit whose run is lost after batch 4 while the server rejects its newest checkpoint (step 4)."""
    policy = RecoveryPolicy(enabled=True, fallback_depth=fallback_depth)
    fit_with(tmp_path, sim, clock, policy=policy, n=8, after={4: break_the_newest_and_lose})


def test_a_checkpoint_older_than_the_buffer_is_never_restored(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    # The server rejects the checkpoint at step 4; with fallback_depth=0 the buffer holds only the batches since
    # it, and the engine tries no older one: the recovery is exhausted, no run created.
    with pytest.raises(RecoveryExhausted, match="exhausted"):
        lose_the_newest(tmp_path, sim, clock, fallback_depth=0)
    assert restored_names(sim) == ["step-0004"] and len(sim.run_ids) == 1


def test_a_fallback_to_an_older_checkpoint_replays_from_it(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    # With the default fallback_depth the buffer reaches back to the older checkpoint: batches 2 to 4 replayed.
    _, cb, trainer = fit_with(tmp_path, sim, clock, n=8, after={4: break_the_newest_and_lose})
    assert restored_names(sim) == ["step-0004", "step-0002"]
    assert [(r["resume_step"], r["steps_lost"]) for r in cb.lineage] == [(2, 3)]
    assert sim.lineage(cb.run_id or "") == list(range(8)) and trainer.global_step == 8


def test_a_checkpoint_restored_past_the_buffer_ends_the_fit_with_cannot_replay(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Staged: the buffer keeps only the batches since the newest checkpoint while the engine, its window ignored,
    # falls back to the older one. The callback refuses to train on rather than train batches twice or never.
    monkeypatch.setattr(Ledger, "window", lambda self, floor=None, ceiling=None: None)
    monkeypatch.setattr(Ledger, "keep_from", lambda self, depth=0: Ledger.step.fget(self))  # type: ignore[attr-defined]
    with pytest.raises(CannotReplay, match=r"step 2\), older than the steps kept \(from step 4\)"):
        lose_the_newest(tmp_path, sim, clock, fallback_depth=1)
    assert restored_names(sim) == ["step-0004", "step-0002"]


def test_ddp_is_refused_at_fit_start(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real DDP Trainer on 2 CPU devices, this process being rank 0. LOCAL_RANK tells Lightning the ranks are
    launched from outside, so it starts no process; torch's single-process "fake" backend stands for the group
    of 2 (its collectives return at once), so nothing waits for a rank 1 that does not exist."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    for name, value in {"LOCAL_RANK": "0", "NODE_RANK": "0", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        module = RemoteModule(sim)
        cb = TinkexRecovery(clock=clock)
        trainer = make_trainer(tmp_path, cb, strategy="ddp", devices=2)
        assert trainer.world_size == 2
        with pytest.raises(MisconfigurationException, match=r"world_size=2.*one training client"):
            trainer.fit(module, loader(4))
    finally:
        dist.destroy_process_group()
    assert module.used == [] and sim.poll_count == 0 and cb.handle is None
    assert len(sim.run_ids) == 1 and "training_step" not in vars(module)

    # A disabled policy is a no-op and refuses nothing (checked on the hook itself: no second process group).
    TinkexRecovery(RecoveryPolicy(enabled=False)).setup(trainer, module, "fit")


@pytest.mark.parametrize("route", ["poll", "failed-step"])
def test_exhaustion_raises_out_of_fit(tmp_path: Path, sim: SimulatedTinker, clock: FakeClock, route: str) -> None:
    lost = {"after": {1: corrupt_and_poll}} if route == "poll" else {"mid": {2: corrupt}}
    module = RemoteModule(sim, save_every=None, **lost)  # no checkpoint: nothing to restore from
    cb = TinkexRecovery(clock=clock)
    module.cb = cb
    trainer = make_trainer(tmp_path, cb)

    with pytest.raises(RecoveryExhausted) as raised:
        trainer.fit(module, loader(6))

    first = module.training_client.model_id
    assert raised.value.run_id == first and "no restorable checkpoint" in str(raised.value)
    assert cb.exhausted is raised.value
    assert trainer.interrupted
    assert [b for b, _ in module.used] == [0, 1]
    if route == "failed-step":
        assert isinstance(raised.value.__cause__, SimulatedRequestFailedError)
    assert cb.handle is None and "training_step" not in vars(module)


def test_exhaustion_can_stop_the_fit_gracefully(tmp_path: Path, sim: SimulatedTinker, clock: FakeClock) -> None:
    module, cb, trainer = fit_with(
        tmp_path, sim, clock, save_every=None, after={1: corrupt_and_poll}, on_exhausted="stop"
    )
    assert trainer.state.finished and trainer.should_stop
    assert cb.exhausted is not None and cb.exhausted.run_id == module.training_client.model_id
    # Batch 2 was skipped: nothing was sent to the lost run after the stop.
    assert [b for b, _ in module.used] == [0, 1]
    assert cb.handle is None


def test_an_error_in_training_step_propagates_unchanged_and_leaves_no_thread(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    boom = RuntimeError("a bug in the step")

    def fail(module: RemoteModule) -> None:
        raise boom

    polls = sim.poll_count
    module = RemoteModule(sim, mid={1: fail})
    cb = TinkexRecovery(clock=clock)
    module.cb = cb
    trainer = make_trainer(tmp_path, cb)
    with pytest.raises(RuntimeError) as raised:
        trainer.fit(module, loader(4))
    assert raised.value is boom
    assert trainer.interrupted
    assert sim.poll_count > polls  # the failure made the callback look at the run; it was healthy
    assert cb.lineage == () and cb.handle is None and "training_step" not in vars(module)
    assert "tinkex-recovery-poller" in module.threads_seen
    # (the autouse no_thread_left fixture checks that every engine thread is gone)


def test_a_batch_that_keeps_losing_its_run_gives_up_after_three_reruns(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    def lose_every_time(module: RemoteModule) -> None:
        corrupt(module)
        module.actions["mid"][2] = lose_every_time

    module = RemoteModule(sim, mid={2: lose_every_time})
    cb = TinkexRecovery(clock=clock)
    with pytest.raises(SimulatedRequestFailedError):
        make_trainer(tmp_path, cb).fit(module, loader(4))
    assert len(cb.lineage) == 3 and [b for b, _ in module.used] == [0, 1]


def test_without_the_step_wrapper_a_failed_step_ends_the_fit(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    module = RemoteModule(sim, mid={2: corrupt})
    cb = TinkexRecovery(clock=clock, retry_failed_step=False)
    with pytest.raises(SimulatedRequestFailedError):
        make_trainer(tmp_path, cb).fit(module, loader(4))
    assert cb.lineage == () and cb.handle is None


def test_a_disabled_policy_makes_the_callback_a_no_op(tmp_path: Path, sim: SimulatedTinker, clock: FakeClock) -> None:
    module, cb, trainer = fit_with(tmp_path, sim, clock, policy=RecoveryPolicy(enabled=False), n=3)
    assert trainer.state.finished and trainer.global_step == 3
    assert sim.poll_count == 0 and cb.handle is None
    assert not any(name.startswith("tinkex-recovery") for name in module.threads_seen)


def test_state_key_is_distinct_per_watched_client(tmp_path: Path) -> None:
    a = TinkexRecovery()
    b = TinkexRecovery(client_attr="reward_client", service_attr="reward_service")
    assert a.state_key != b.state_key
    make_trainer(tmp_path, None, callbacks=[a, b])  # Lightning refuses two stateful callbacks with one key
    key = b.state_key
    b.client_attr = "training_client"  # the cached key follows the attribute
    assert b.state_key == a.state_key != key


def test_the_callback_is_reexported_lazily() -> None:
    assert tinkex_recovery.TinkexRecovery is TinkexRecovery


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"policy": {"enabled": True}}, TypeError),
        ({"client_attr": ""}, ValueError),
        ({"service_attr": "not an attribute"}, ValueError),
        ({"on_exhausted": "ignore"}, ValueError),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        TinkexRecovery(**kwargs)


def test_a_module_without_the_client_attribute_fails_fit_clearly(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock
) -> None:
    module = RemoteModule(sim)
    cb = TinkexRecovery(clock=clock, client_attr="policy_client")
    with pytest.raises(AttributeError, match="policy_client"):
        make_trainer(tmp_path, cb).fit(module, loader(2))


def test_constructing_without_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "tinkex_recovery.integrations.lightning"
    monkeypatch.setattr(tinkex_recovery.integrations, "lightning", sys.modules[name])  # restored afterwards
    monkeypatch.delitem(sys.modules, name)
    for missing in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks"):
        monkeypatch.setitem(sys.modules, missing, None)  # makes `import lightning...` raise ImportError

    fresh = importlib.import_module(name)  # importing works without Lightning...
    with pytest.raises(ImportError, match=r"pip install 'tinkex-recovery\[lightning\]'"):
        fresh.TinkexRecovery()  # ...constructing says what to install


def test_the_example_recovers_mid_fit(capsys: pytest.CaptureFixture[str]) -> None:
    example = runpy.run_path(str(REPO / "examples" / "lightning_simulated.py"), run_name="lightning_example")
    assert example["main"]() == 0
    out = capsys.readouterr().out
    assert "fit finished: 2 recoveries" in out
    assert "every item trained exactly once on the final run: True" in out
