"""TinkexRecovery on the edges of the user's code, with a real ``lightning.pytorch.Trainer`` on CPU over the
simulated Tinker: a Tinker call failing after a save in the same step, two runs trained in one step, a loss in
validation, in the last batch, under automatic optimization, a resume with ``ckpt_path=``, bare saves, a step
that mutates its batch; and the property over corruption schedules. Each asserts the simulator's lineage (every
batch exactly once on the final run) and the true step counter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tinkex_recovery import FakeClock, Recovery, RecoveryPolicy
from tinkex_recovery.integrations.lightning import TinkexRecovery
from tinkex_recovery.simulated import SimulatedTinker

from .test_lightning import loader, make_trainer, quiet_lightning  # noqa: F401 (an autouse fixture)

pytestmark = [
    pytest.mark.lightning,
    pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*`training_step` returned `None`.*"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]


class Module(pl.LightningModule):
    """A cookbook-style module: per batch, a forward_backward and an optim_step on each client, then
    ``optimizers().step()`` (manual optimization), then every ``save_every`` steps a bare ``save_state(name)``
    followed by an eval ``forward`` and a ``save_weights_for_sampler``. ``lose`` holds (batch_idx, moment) pairs:
    the run of ``victim`` is corrupted at that moment, once (``"poll"`` moments also make the poll that finds it).
    Moments: before, mid (between forward_backward and optim_step), saved (after the save), eval (after the eval
    forward), end, poll (after the batch, found by a poll), val (in validation_step), again (the batch's second
    run)."""

    def __init__(
        self,
        sim: SimulatedTinker,
        *,
        clients: tuple[str, ...] = ("training_client",),
        save_every: int = 2,
        lose: set[tuple[int, str]] | None = None,
        victim: str = "training_client",
        automatic: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = automatic
        self.sim = self.service_client = sim
        self.clients = clients
        for name in clients:
            setattr(self, name, sim.create_lora_training_client(base_model="m"))
        self.save_every, self.victim = save_every, victim
        self.lose = set(lose or ())
        self.cbs: list[TinkexRecovery] = []
        self.evals: list[int] = []  # batch_idx of each eval forward that returned
        self.val_runs: list[str] = []
        self.runs_of_batch: dict[int, int] = {}
        self.lost_runs: set[str] = set()

    def maybe_lose(self, batch_idx: int, moment: str) -> None:
        if (batch_idx, moment) not in self.lose:
            return
        self.lose.discard((batch_idx, moment))
        run = getattr(self, self.victim).model_id
        if not self.sim.get_training_run(run).corrupted:
            self.lost_runs.add(run)
        self.sim.corrupt(run)
        if moment == "poll":
            for cb in self.cbs:
                assert cb.handle is not None
                cb.handle.check_now()

    def training_step(self, batch: list[int], batch_idx: int) -> Any:
        batch_idx = self.global_step  # the batch's index over the whole fit (one optimizer step a batch)
        self.runs_of_batch[batch_idx] = self.runs_of_batch.get(batch_idx, 0) + 1
        if self.runs_of_batch[batch_idx] == 2:
            self.maybe_lose(batch_idx, "again")
        self.maybe_lose(batch_idx, "before")
        for name in self.clients:
            getattr(self, name).forward_backward(batch, "cross_entropy").result()
        self.maybe_lose(batch_idx, "mid")
        for name in self.clients:
            getattr(self, name).optim_step().result()
        step = batch_idx + 1  # the steps this batch ends with
        if not self.automatic_optimization:
            self.optimizers().step()
        if step % self.save_every == 0:
            for name in self.clients:
                getattr(self, name).save_state(f"{name}-{step:04d}").result()  # bare: the ledger knows its step
            self.maybe_lose(batch_idx, "saved")
            client = getattr(self, self.clients[0])
            client.forward(batch, "cross_entropy").result()
            self.evals.append(batch_idx)
            self.maybe_lose(batch_idx, "eval")
            client.save_weights_for_sampler(f"sampler-{step:04d}").result()
        self.maybe_lose(batch_idx, "end")
        self.maybe_lose(batch_idx, "poll")
        if self.automatic_optimization:
            return torch.tensor(0.0, requires_grad=True)
        return None

    def validation_step(self, batch: list[int], batch_idx: int) -> None:
        self.maybe_lose(batch_idx + 1000 * self.global_step, "val")
        client = getattr(self, self.clients[0])
        client.forward(batch, "cross_entropy").result()
        self.val_runs.append(client.model_id)

    def configure_optimizers(self) -> None:
        return None


def fit(
    tmp_path: Path,
    module: Module,
    n: int = 8,
    *,
    val: int = 0,
    policy: RecoveryPolicy | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> pl.Trainer:
    cbs = [TinkexRecovery(policy, client_attr=name, clock=FakeClock(), **options) for name in module.clients]
    module.cbs = cbs
    kwargs: dict[str, Any] = {"callbacks": cbs, **(trainer_kwargs or {})}
    if val:
        kwargs.update(val_check_interval=val, limit_val_batches=2)
    trainer = make_trainer(tmp_path, None, **kwargs)
    trainer.fit(module, loader(n), loader(2) if val else None)
    return trainer


def exactly_once(module: Module, trainer: pl.Trainer, n: int, epochs: int = 1) -> None:
    for name in module.clients:
        run = getattr(module, name).model_id
        assert module.sim.lineage(run) == list(range(n)) * epochs, name
    assert trainer.global_step == n * epochs


# -- a Tinker call failing after a save in the same step -------------------------------------------------------
@pytest.mark.parametrize("moment", ["saved", "eval"])
def test_a_call_failing_after_a_save_in_the_same_step_recovers(
    tmp_path: Path, sim: SimulatedTinker, moment: str
) -> None:
    # Batch 3 saves (4 steps), then its eval forward ("saved") or its save_weights_for_sampler ("eval") fails: the
    # engine restores that very checkpoint; batch 3 runs again, its calls up to the save answered from what the
    # lost run served, the rest sent to the new run. No batch is trained twice, nothing raises CannotReplay.
    module = Module(sim, lose={(3, moment)})
    trainer = fit(tmp_path, module)
    exactly_once(module, trainer, 8)
    (record,) = module.cbs[0].lineage
    assert (record["resume_step"], record["steps_lost"]) == (4, 0)
    final = module.training_client.model_id
    assert module.evals == [1, 3, 5, 7] if moment == "saved" else [1, 3, 3, 5, 7]
    assert sim.sampler_weights(record["new_run_id"])["sampler-0004"] == [0, 1, 2, 3]  # saved on the new run
    assert sim.run_ids == [record["old_run_id"], final]


# -- two runs in one step ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "moment"), [(4, "mid"), (4, "poll"), (5, "saved"), (5, "eval")])
def test_two_runs_in_one_step_only_the_lost_one_is_trained_again(
    tmp_path: Path, sim: SimulatedTinker, batch: int, moment: str
) -> None:
    module = Module(sim, clients=("policy_client", "value_client"), victim="value_client", lose={(batch, moment)})
    policy_run = module.policy_client.model_id
    trainer = fit(tmp_path, module, 9)
    exactly_once(module, trainer, 9)  # the value run's batches replayed; the policy run never trained twice
    assert module.policy_client.model_id == policy_run and module.cbs[0].lineage == ()
    (record,) = module.cbs[1].lineage
    assert (record["resume_step"], record["steps_lost"]) == {"mid": (4, 0), "poll": (4, 1)}.get(moment, (6, 0))


def test_two_runs_both_lost_in_one_step(tmp_path: Path, sim: SimulatedTinker) -> None:
    module = Module(sim, clients=("policy_client", "value_client"), victim="value_client", lose={(5, "mid")})
    module.maybe_lose = _also_lose_policy(module, module.maybe_lose)  # type: ignore[method-assign]
    trainer = fit(tmp_path, module, 9)
    exactly_once(module, trainer, 9)
    assert len(module.cbs[0].lineage) == len(module.cbs[1].lineage) == 1


def _also_lose_policy(module: Module, lose: Callable[[int, str], None]) -> Callable[[int, str], None]:
    def both(batch_idx: int, moment: str) -> None:
        if (batch_idx, moment) in module.lose:
            sim = module.sim
            sim.corrupt(module.policy_client.model_id)
        lose(batch_idx, moment)

    return both


# -- validation, the last batch ------------------------------------------------------------------------------------
def test_a_loss_during_validation_is_recovered(tmp_path: Path, sim: SimulatedTinker) -> None:
    # Validation after 4 batches (global_step 4): its 2nd batch finds the run lost. The batches since the last
    # checkpoint are replayed on the new run, then validation goes on there.
    module = Module(sim, save_every=3, lose={(1 + 4000, "val")})
    trainer = fit(tmp_path, module, 8, val=4)
    exactly_once(module, trainer, 8)
    new = module.cbs[0].lineage[0]["new_run_id"]
    assert module.cbs[0].lineage[0]["steps_lost"] == 1
    assert module.val_runs[1:] == [new] * 3 and module.val_runs[0] != new


@pytest.mark.parametrize("moment", ["poll", "end"])
def test_a_loss_in_the_last_batch_is_recovered_before_fit_returns(
    tmp_path: Path, sim: SimulatedTinker, moment: str
) -> None:
    # Found by a poll during the last batch, or by the callback's own check at the end of the fit.
    module = Module(sim, save_every=3, lose={(7, moment)})
    trainer = fit(tmp_path, module, 8)
    exactly_once(module, trainer, 8)
    (record,) = module.cbs[0].lineage
    assert (record["resume_step"], record["steps_lost"]) == (6, 2)
    assert module.training_client.model_id == record["new_run_id"] == module.cbs[0].run_id


# -- automatic optimization ----------------------------------------------------------------------------------------
class Rewinding(Module):
    """Replays on its own (``replay=False``), in the hook, with raw Tinker calls."""

    def __init__(self, sim: SimulatedTinker, **kwargs: Any) -> None:
        super().__init__(sim, **kwargs)
        self.hooks: list[tuple[range, int]] = []

    def on_tinker_recovery(self, recovery: Recovery, steps: range) -> None:
        self.hooks.append((steps, self.global_step))
        for step in steps:
            self.training_client.forward_backward([step], "cross_entropy").result()
            self.training_client.optim_step().result()


@pytest.mark.parametrize("replay", [True, False])
@pytest.mark.parametrize("moment", ["mid", "poll"])
def test_automatic_optimization_keeps_the_true_step_count(
    tmp_path: Path, sim: SimulatedTinker, replay: bool, moment: str
) -> None:
    module = (Module if replay else Rewinding)(sim, save_every=3, automatic=True, lose={(4, moment)})
    trainer = fit(tmp_path, module, 8, replay=replay)
    exactly_once(module, trainer, 8)
    (record,) = module.cbs[0].lineage
    lost = {"mid": 1, "poll": 2}[moment]
    assert (record["resume_step"], record["steps_lost"]) == (3, lost)
    if isinstance(module, Rewinding):
        assert module.hooks == [(range(3, 3 + lost), 3 + lost)]


# -- resume from a Lightning checkpoint -----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resuming_with_ckpt_path_restores_the_tinker_run_to_that_checkpoint(
    tmp_path: Path, sim: SimulatedTinker
) -> None:
    # Fit 1 runs 3 epochs of 4 batches, a Lightning checkpoint at each epoch's end, and loses its run once in epoch
    # 1; the process "dies". Fit 2 resumes from the checkpoint after epoch 1 (global_step 4) though the run had
    # trained 12 batches: the callback restores the Tinker checkpoint saved with that Lightning checkpoint.
    first = Module(sim, save_every=2, lose={(3, "mid")})
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    first.cbs = [TinkexRecovery(clock=FakeClock())]
    trainer = make_trainer(tmp_path, None, callbacks=[*first.cbs, saver], max_epochs=3, enable_checkpointing=True)
    trainer.fit(first, loader(4))
    assert sim.lineage(first.training_client.model_id) == [0, 1, 2, 3] * 3
    (lost,) = first.cbs[0].lineage

    second = Module(sim, save_every=2, lose={(6, "mid")})  # and fit 2 loses its run too
    unused = second.training_client.model_id
    second.cbs = [TinkexRecovery(clock=FakeClock())]
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="again-{epoch}")
    trainer = make_trainer(tmp_path, None, callbacks=[*second.cbs, again], max_epochs=3, enable_checkpointing=True)
    trainer.fit(second, loader(4), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert trainer.global_step == 12
    final = second.training_client.model_id
    assert sim.lineage(final) == [0, 1, 2, 3] * 3
    assert unused not in {final, *[r["new_run_id"] for r in second.cbs[0].lineage]}
    assert sim.lineage(unused) == []  # the run the module was built with was never trained
    records = second.cbs[0].lineage
    assert records[0] == lost and [r["number"] for r in records] == [1, 2]
    restored = sim.restore_calls[len(sim.restore_calls) - 2][0]  # fit 2's first restore: the resume
    assert restored.endswith("/weights/lightning-00000004") and lost["new_run_id"] in restored


def test_resuming_from_a_checkpoint_without_a_tinker_checkpoint_is_refused(
    tmp_path: Path, sim: SimulatedTinker
) -> None:
    first = Module(sim)
    trainer = make_trainer(tmp_path, None, callbacks=[])
    trainer.fit(first, loader(2))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    second = Module(sim)
    with pytest.raises(MisconfigurationException, match="names no Tinker checkpoint"):
        make_trainer(tmp_path, TinkexRecovery(clock=FakeClock())).fit(
            second, loader(2), ckpt_path=tmp_path / "plain.ckpt"
        )
    assert sim.restore_calls == []


# -- a step that mutates its batch ----------------------------------------------------------------------------------
class Popping(Module):
    def training_step(self, batch: dict[str, list[int]], batch_idx: int) -> Any:  # type: ignore[override]
        labels = batch.pop("labels")
        batch["ids"].append(-1)  # mutates the list inside too
        assert labels == batch["ids"][:-1]
        return super().training_step(labels, batch_idx)


def test_a_step_that_mutates_its_batch_is_replayed_as_first_given(tmp_path: Path, sim: SimulatedTinker) -> None:
    module = Popping(sim, save_every=3, lose={(4, "mid"), (7, "poll")})
    module.cbs = [TinkexRecovery(clock=FakeClock())]
    data = DataLoader(list(range(8)), batch_size=1, collate_fn=lambda items: {"ids": list(items), "labels": items})
    trainer = make_trainer(tmp_path, None, callbacks=module.cbs)
    trainer.fit(module, data)
    exactly_once(module, trainer, 8)
    assert len(module.cbs[0].lineage) == 2


# -- what Lightning saves is what a fit that never lost its run saves ------------------------------------------------
@pytest.mark.parametrize("automatic", [False, True])
def test_the_loop_state_lightning_saves_is_untouched_by_a_recovery(
    tmp_path: Path, sim: SimulatedTinker, automatic: bool
) -> None:
    def loops(lose: set[tuple[int, str]]) -> dict[str, Any]:
        module = Module(sim, save_every=4, lose=lose, automatic=automatic)
        trainer = fit(tmp_path, module, 6, trainer_kwargs={"max_epochs": 2})
        exactly_once(module, trainer, 6, epochs=2)
        trainer.save_checkpoint(tmp_path / "x.ckpt")
        state = torch.load(tmp_path / "x.ckpt", weights_only=False)["loops"]["fit_loop"]
        key = (
            "epoch_loop.automatic_optimization.optim_progress"
            if automatic
            else "epoch_loop.manual_optimization.optim_step_progress"
        )
        return state[key]

    # Lost in epoch 2's second batch: the replay (from step 4) crosses the epoch's start.
    clean = loops(set())
    assert loops({(7, "mid")}) == clean and loops({(5, "poll")}) == clean


# -- the property ------------------------------------------------------------------------------------------------
N = 8
MOMENTS = ("before", "mid", "saved", "eval", "end", "poll", "again")


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, set[tuple[int, str]]]:
    """A save interval and up to 3 losses: anywhere in a batch (before, between or after its calls, after its
    save), between batches (a poll), in its second run (a replay or a rerun), in the last batch, in validation
    (after 4 and after 8 batches); none before the first checkpoint."""
    save_every = draw(st.sampled_from([1, 2, 3]))
    in_batch = st.tuples(st.integers(save_every, N - 1), st.sampled_from(MOMENTS))
    in_val = st.tuples(st.sampled_from([4000, 4001, 8000, 8001]), st.just("val"))
    return save_every, set(draw(st.lists(st.one_of(in_batch, in_val), max_size=3, unique=True)))


@pytest.mark.parametrize("automatic", [False, True])
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(schedule=schedules())
def test_exactly_once_for_any_schedule_of_losses(
    tmp_path_factory: pytest.TempPathFactory, automatic: bool, schedule: tuple[int, set[tuple[int, str]]]
) -> None:
    save_every, losses = schedule
    sim = SimulatedTinker(clock=FakeClock())
    module = Module(sim, save_every=save_every, lose=losses, automatic=automatic)
    trainer = fit(tmp_path_factory.mktemp("fit"), module, N, val=4)
    exactly_once(module, trainer, N)
    assert len(sim.run_ids) == 1 + len(module.lost_runs) == 1 + len(module.cbs[0].lineage)
    # every loss happened, but in a second run that never came, or after a save in a batch that saves nothing
    assert all(m == "again" or (m in ("saved", "eval") and (b + 1) % save_every) for b, m in module.lose)
