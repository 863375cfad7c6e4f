"""Lightning: the cost of ``TinkexRecovery`` per batch of a ``Trainer.fit`` while all is well.

A module with no parameters trains each batch on the simulated Tinker (manual optimization, as a remote
client needs). Each fit is timed from ``on_train_start`` to ``on_train_end`` in CPU time of the training
thread; fits with and without the callback alternate, and the best of each is kept. Beside the difference of
fits, the callback's own per-batch hook is timed inside a fit (``_TimedRecovery``).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from tinkex_recovery import RecoveryPolicy
from tinkex_recovery.integrations.lightning import TinkexRecovery
from tinkex_recovery.simulated import SimulatedTinker


class RemoteModule(pl.LightningModule):
    """Zero local parameters; every batch is a forward_backward and an optim_step on the Tinker client."""

    def __init__(self, sim: SimulatedTinker) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.service_client = sim
        self.training_client: Any = sim.create_lora_training_client(base_model="bench/model")

    def training_step(self, batch: list[int], batch_idx: int) -> None:
        self.training_client.forward_backward(batch, "cross_entropy").result()
        self.training_client.optim_step().result()
        self.optimizers().step()  # advances global_step

    def configure_optimizers(self) -> None:
        return None


class _Timer(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.thread_time_ns()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.elapsed = time.thread_time_ns() - self.start


class _TimedRecovery(TinkexRecovery):
    """TinkexRecovery with the training-thread CPU time of its per-batch hook counted: its own cost, free of the
    fit-to-fit noise that the difference of two fits carries."""

    hook_ns = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        start = time.thread_time_ns()
        super().on_train_batch_start(trainer, pl_module, batch, i)
        self.hook_ns += time.thread_time_ns() - start


class _Noop(pl.Callback):
    """A callback that does nothing: what Lightning itself charges for one more callback."""


def _fit(batches: int, extra: pl.Callback | None) -> float:
    """Microseconds of training-thread CPU per batch."""
    timer = _Timer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer] if extra is None else [timer, extra],
    )
    loader = DataLoader(list(range(batches)), batch_size=1, collate_fn=list)
    trainer.fit(RemoteModule(SimulatedTinker()), loader)
    return timer.elapsed / batches / 1e3


def bench(quick: bool) -> dict[str, float]:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")  # no optimizer, few DataLoader workers: on purpose
    policy = RecoveryPolicy(enabled=True, poll_interval=3600.0)
    variants = {
        "bare": lambda: None,
        "noop": _Noop,
        "recovery": lambda: TinkexRecovery(policy),
        "timed": lambda: _TimedRecovery(policy),
    }
    batches, repeats = (1000, 6) if quick else (2000, 9)
    for make in variants.values():
        _fit(50, make())  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    hooks: list[float] = []
    for _ in range(repeats):
        for name, make in variants.items():
            callback = make()
            times[name].append(_fit(batches, callback))
            if isinstance(callback, _TimedRecovery):
                hooks.append(callback.hook_ns / batches / 1e3)
    best = {name: min(values) for name, values in times.items()}
    return {
        "lightning_bare_us_per_batch": best["bare"],
        "lightning_noop_callback_us_per_batch": best["noop"] - best["bare"],
        "lightning_overhead_us_per_batch": best["recovery"] - best["bare"],
        "lightning_hook_us_per_batch": min(hooks),
    }
