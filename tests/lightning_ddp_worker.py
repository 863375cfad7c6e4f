"""One rank of the 2-process DDP test in test_lightning_ddp.py; run as a script, never collected by pytest.

The launcher sets LOCAL_RANK, NODE_RANK, MASTER_ADDR and MASTER_PORT, so Lightning joins an externally
launched gloo group instead of spawning. Each process is a separate "client machine" with its own simulated
Tinker; the same session id makes the run ids the same on both ranks. After batch ``LOSE_AFTER`` the run is
lost on both ranks (the server's verdict), but only rank 0 polls (``check_now``, what its poller would do).
The rank writes what it saw as JSON to the path given as its one argument.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from tinkex_recovery import FakeClock, Recovery, RecoveryPolicy
from tinkex_recovery.integrations.lightning import TinkexRecovery
from tinkex_recovery.simulated import SimulatedTinker

ITEMS, SAVE_EVERY, LOSE_AFTER = 16, 2, 4


class RemoteModule(pl.LightningModule):
    def __init__(self, sim: SimulatedTinker, cb: TinkexRecovery) -> None:
        super().__init__()
        self.automatic_optimization = False
        # DDP refuses a module without a trainable parameter; this one is never used.
        self.ddp_placeholder = torch.nn.Parameter(torch.zeros(1))
        self.service_client = sim
        self.training_client: Any = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
        self.cb = cb
        self.used: list[tuple[int, str]] = []
        self.batches: list[list[int]] = []
        self.hook_calls: list[tuple[int, str, str]] = []

    def training_step(self, batch: list[int], batch_idx: int) -> None:
        client = self.training_client
        client.forward_backward(batch, "cross_entropy").result()
        client.optim_step().result()
        self.optimizers().step()
        self.used.append((batch_idx, client.model_id))
        self.batches.append(batch)
        if self.global_step % SAVE_EVERY == 0:
            client.save_state(f"{self.global_step:04d}", user_metadata={"step": str(self.global_step)}).result()
        if batch_idx == LOSE_AFTER:
            self.service_client.corrupt(client.model_id)
            if self.cb.handle is not None:  # rank 0 only
                self.cb.handle.check_now()

    def on_tinker_recovery(self, recovery: Recovery) -> None:
        self.hook_calls.append((self.global_step, recovery.new_run_id, recovery.checkpoint.tinker_path))

    def configure_optimizers(self) -> None:
        return None


def main(out: str) -> None:
    warnings.simplefilter("ignore")  # Lightning's notices about this toy setup; the test reads the JSON only
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    sim = SimulatedTinker(clock=FakeClock(), session_id="ddp-test")
    cb = TinkexRecovery(RecoveryPolicy(enabled=True), clock=FakeClock())
    module = RemoteModule(sim, cb)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        num_nodes=1,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[cb],
    )
    trainer.fit(module, DataLoader(list(range(ITEMS)), batch_size=1, collate_fn=list))
    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "used": module.used,
        "batches": module.batches,
        "hook_calls": module.hook_calls,
        "polls": sim.poll_count,
        "restores": [path for path, _, _ in sim.restore_calls],
        "final": module.training_client.model_id,
        "lineage": sim.lineage(module.training_client.model_id),
        "state": cb.state_dict(),
    }
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
    sys.exit(0)
