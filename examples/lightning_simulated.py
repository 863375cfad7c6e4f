"""Offline demo: a remote LightningModule keeps training while its Tinker run is lost twice mid-fit.

Run with `.venv/bin/python examples/lightning_simulated.py` (needs the lightning extra). The module trains 24
batches on a simulated Tinker run under manual optimization and saves a checkpoint every 4 steps. The server
loses the run twice: once in the middle of a batch, once between two batches (whichever comes first, the
background poll or the next failing call, sets off the recovery). `TinkexRecovery` restores each lost run
from its newest checkpoint, swaps the new client into the module, sets the trainer's step counter back to that
checkpoint's step and replays, through the module's own `training_step`, the batches the checkpoint lacks. The
module has no recovery code (its optional `on_tinker_recovery` hook only prints); the final run holds every
item exactly once, and `trainer.global_step` equals the batches run.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from tinkex_recovery import Recovery, RecoveryPolicy
from tinkex_recovery.integrations.lightning import TinkexRecovery
from tinkex_recovery.simulated import SimulatedTinker

ITEMS, BATCH, SAVE_EVERY = 48, 2, 4
LOST_MID_BATCH, LOST_AFTER_BATCH = 10, 18  # where the simulated server loses the run


class RemoteModule(pl.LightningModule):
    """The model lives on Tinker: a step sends the batch and commits it; nothing is trained locally."""

    def __init__(self, service_client: Any, base_model: str) -> None:
        super().__init__()
        self.automatic_optimization = False  # Tinker's optim_step is the optimizer
        self.service_client = service_client
        self.training_client = service_client.create_lora_training_client(base_model=base_model)
        self.losses = {LOST_MID_BATCH: "mid", LOST_AFTER_BATCH: "after"}  # each happens once (not on replays)

    def training_step(self, batch: list[int], batch_idx: int) -> dict[str, torch.Tensor]:
        fwd = self.training_client.forward_backward(batch, "cross_entropy").result()
        if self.losses.get(batch_idx) == "mid":
            del self.losses[batch_idx]
            self.service_client.corrupt(self.training_client.model_id)  # the server fails in the middle
        self.training_client.optim_step().result()
        self.optimizers().step()  # no local parameters; this advances trainer.global_step
        if self.global_step % SAVE_EVERY == 0:
            name = f"step-{self.global_step:04d}"
            self.training_client.save_state(name, user_metadata={"step": str(self.global_step)}).result()
        if self.losses.get(batch_idx) == "after":
            del self.losses[batch_idx]
            self.service_client.corrupt(self.training_client.model_id)  # the server fails between batches
        return {"loss": torch.tensor(fwd.loss)}

    def on_tinker_recovery(self, recovery: Recovery, steps: range) -> None:
        """Optional: called after the swap, before TinkexRecovery replays ``steps`` on the new run."""
        print(
            f"  recovery {recovery.number}: {recovery.old_run_id} -> {recovery.new_run_id} "
            f"from {recovery.checkpoint.checkpoint_id}; replaying steps {steps.start}..{steps.stop - 1}"
        )

    def configure_optimizers(self) -> None:
        return None


def main() -> int:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # Lightning's two known notices for a module with no local optimizer (see pyproject's filterwarnings).
    warnings.filterwarnings("ignore", message=r".*configure_optimizers.*returned `None`")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    timeline = logging.StreamHandler(sys.stdout)
    timeline.setFormatter(logging.Formatter("  %(levelname)-7s %(message)s"))
    events = logging.getLogger("tinkex_recovery")
    events.addHandler(timeline)
    events.setLevel(logging.INFO)
    try:
        return run()
    finally:
        events.removeHandler(timeline)
        events.setLevel(logging.NOTSET)


def run() -> int:
    sim = SimulatedTinker()
    module = RemoteModule(sim, base_model="Qwen/Qwen3-8B")
    first = module.training_client.model_id
    policy = RecoveryPolicy(enabled=True, poll_interval=0.05, backoff=0.1, max_backoff=0.4, attempt_timeout=5)
    recovery = TinkexRecovery(policy)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recovery],
    )
    print(f"training run {first}: {ITEMS // BATCH} batches, a checkpoint every {SAVE_EVERY} steps")
    trainer.fit(module, DataLoader(list(range(ITEMS)), batch_size=BATCH, collate_fn=list))

    final = module.training_client.model_id
    print(f"fit finished: {len(recovery.lineage)} recoveries, global step {trainer.global_step}, final run {final}")
    for record in recovery.lineage:
        print(
            f"  #{record['number']} at global step {record['global_step']}: restored {record['checkpoint']}, "
            f"{record['steps_lost']} step(s) replayed, {record['seconds']:.3f}s to recover"
        )
    exact = sim.lineage(final) == list(range(ITEMS))
    print(f"every item trained exactly once on the final run: {exact}")
    steps = trainer.global_step == ITEMS // BATCH
    print(f"global step equals the batches run: {steps}")
    return 0 if exact and steps and final != first else 1


if __name__ == "__main__":
    sys.exit(main())
