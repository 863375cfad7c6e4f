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
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

import tinkex_recovery
import tinkex_recovery.integrations
from tinkex_recovery import FakeClock, Recovery, RecoveryExhausted, RecoveryPolicy
from tinkex_recovery.integrations.lightning import TinkexRecovery
from tinkex_recovery.simulated import SimulatedRequestFailedError, SimulatedTinker

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
    """No local parameters: each batch is trained on the Tinker client, with a checkpoint every ``save_every``
    steps whose user_metadata ``step`` is the next step to run. ``mid`` actions run between forward_backward and
    optim_step of the batch with that index (once), ``after`` actions after the step."""

    def __init__(
        self,
        sim: SimulatedTinker,
        *,
        save_every: int | None = 2,
        mid: Mapping[int, Action] | None = None,
        after: Mapping[int, Action] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.service_client = sim
        self.training_client: Any = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
        self.save_every = save_every
        self.mid = dict(mid or {})
        self.after = dict(after or {})
        self.used: list[tuple[int, str]] = []  # (batch_idx, run id) of each batch that completed
        self.by_step: dict[int, list[int]] = {}  # global step index -> the batch trained at that step
        self.recoveries: list[Recovery] = []
        self.threads_seen: set[str] = set()
        self.cb: TinkexRecovery | None = None

    def training_step(self, batch: list[int], batch_idx: int) -> dict[str, torch.Tensor]:
        self.threads_seen |= {t.name for t in threading.enumerate()}
        client = self.training_client
        fwd = client.forward_backward(batch, "cross_entropy").result()
        if batch_idx in self.mid:
            self.mid.pop(batch_idx)(self)
        client.optim_step().result()
        self.by_step[self.global_step] = batch
        self.optimizers().step()  # advances global_step
        self.used.append((batch_idx, client.model_id))
        if self.save_every and self.global_step % self.save_every == 0:
            client.save_state(f"{self.global_step:04d}", user_metadata={"step": str(self.global_step)}).result()
        if batch_idx in self.after:
            self.after.pop(batch_idx)(self)
        return {"loss": torch.tensor(fwd.loss)}

    def on_tinker_recovery(self, recovery: Recovery) -> None:
        """Rewind: train again, on the new run, the steps taken after its checkpoint."""
        self.recoveries.append(recovery)
        resume = int((recovery.checkpoint.user_metadata or {})["step"])
        for step in range(resume, self.global_step):
            if step in self.by_step:
                self.training_client.forward_backward(self.by_step[step], "cross_entropy").result()
                self.training_client.optim_step().result()

    def configure_optimizers(self) -> None:
        return None


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
    trainer_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[RemoteModule, TinkexRecovery, pl.Trainer]:
    module_opts = {k: options.pop(k) for k in ("save_every", "mid", "after") if k in options}
    module = RemoteModule(sim, **module_opts)
    cb = TinkexRecovery(policy, clock=clock, **options)
    module.cb = cb
    trainer = make_trainer(tmp_path, cb, **(trainer_kwargs or {}))
    trainer.fit(module, loader(n))
    return module, cb, trainer


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
    # Lost after batch 2: found by a poll, swapped before batch 3. Lost inside batch 5: that batch failed,
    # was recovered, and ran again on the next run.
    assert runs == [first] * 3 + [runs[3]] * 2 + [runs[5]] * 3
    assert len({first, runs[3], runs[5]}) == 3
    assert module.training_client.model_id == runs[5] == cb.run_id
    assert [r.number for r in module.recoveries] == [1, 2]
    assert [r.new_run_id for r in module.recoveries] == [runs[3], runs[5]]
    # The module's rewind made every item trained exactly once on the final run.
    assert sim.lineage(cb.run_id) == list(range(8))

    assert logger.tinker() == [
        (3, {"tinker/recoveries": 1.0, "tinker/seconds_to_recover": 0.0, "tinker/steps_lost": 1.0}),
        (5, {"tinker/recoveries": 2.0, "tinker/seconds_to_recover": 0.0, "tinker/steps_lost": 1.0}),
    ]

    state = cb.state_dict()
    assert json.loads(json.dumps(state)) == state  # ids, paths and numbers only: no client objects
    assert state["run_id"] == runs[5]
    assert [(r["old_run_id"], r["new_run_id"], r["checkpoint"]) for r in state["lineage"]] == [
        (first, runs[3], f"tinker://{first}/weights/0002"),
        (runs[3], runs[5], f"tinker://{runs[3]}/weights/0004"),
    ]
    assert [(r["global_step"], r["resume_step"], r["steps_lost"]) for r in state["lineage"]] == [(3, 2, 1), (5, 4, 1)]

    # The engine's threads ran during the fit and were released at teardown; training_step is the module's again.
    assert "tinkex-recovery-poller" in module.threads_seen
    assert cb.handle is None and "training_step" not in vars(module)


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
        module.mid[2] = lose_every_time

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


def test_a_restarted_trainer_continues_the_lineage(tmp_path: Path, sim: SimulatedTinker, clock: FakeClock) -> None:
    _, cb, trainer = fit_with(tmp_path, sim, clock, n=4, after={1: corrupt_and_poll})
    assert len(cb.lineage) == 1
    ckpt = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(ckpt)
    # Plain values only, so the checkpoint loads with torch's weights_only safety on.
    saved = torch.load(ckpt, weights_only=True)["callbacks"][cb.state_key]
    assert saved == cb.state_dict()

    # A new process: the loop restores its last Tinker checkpoint into a new run and resumes the fit.
    last_path = sim.list_checkpoints(cb.run_id).checkpoints[0].tinker_path
    module2 = RemoteModule(sim, after={1: corrupt_and_poll})
    module2.training_client = sim.create_training_client_from_state_with_optimizer(last_path).result()
    cb2 = TinkexRecovery(clock=clock)
    module2.cb = cb2
    logger = RecordingLogger()
    trainer2 = make_trainer(tmp_path, cb2, max_epochs=2, logger=logger)
    trainer2.fit(module2, loader(4), ckpt_path=ckpt)

    assert trainer2.global_step == 8
    lineage = cb2.lineage
    assert lineage[0] == cb.lineage[0]
    assert [r["number"] for r in lineage] == [1, 2]
    assert lineage[1]["old_run_id"] == module2.used[0][1] and lineage[1]["new_run_id"] == cb2.run_id
    assert [m["tinker/recoveries"] for _, m in logger.tinker()] == [2.0]


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
