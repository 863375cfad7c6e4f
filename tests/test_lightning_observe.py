"""TinkexRecovery in observe mode, with a real ``lightning.pytorch.Trainer`` on CPU over the simulated Tinker: a
``training_step`` that fails because the run was corrupted lets its exception out of ``fit`` unchanged, nothing
is restored, and the log says what recover mode would have done."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from tinkex_recovery import FakeClock, RecoveryPolicy
from tinkex_recovery.integrations.lightning import TinkexRecovery
from tinkex_recovery.simulated import SimulatedRequestFailedError, SimulatedTinker

from .test_lightning import make_trainer

pytestmark = [
    pytest.mark.lightning,
    pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers"),
]


class Module(pl.LightningModule):
    """Trains each batch on the Tinker client, saves after batch 1, and loses its run inside batch 3."""

    def __init__(self, sim: SimulatedTinker) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.service_client = sim
        self.training_client: Any = sim.create_lora_training_client(base_model="m")
        self.raised: list[BaseException] = []

    def training_step(self, batch: list[int], batch_idx: int) -> torch.Tensor:
        if batch_idx == 3:
            self.service_client.corrupt(self.training_client.model_id)
        try:
            self.training_client.forward_backward(batch, "cross_entropy").result()
        except Exception as exc:
            self.raised.append(exc)
            raise
        self.training_client.optim_step().result()
        self.optimizers().step()
        if batch_idx == 1:
            self.training_client.save_state("0002", user_metadata={"step": "2"}).result()
        return torch.tensor(0.0)

    def configure_optimizers(self) -> None:
        return None


def test_observe_mode_lets_the_failed_step_through_and_logs_what_it_would_do(
    tmp_path: Any, sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    module = Module(sim)
    run_id = module.training_client.model_id
    policy = RecoveryPolicy(enabled=True, mode="observe", poll_interval=3600)
    trainer = make_trainer(tmp_path, TinkexRecovery(policy, clock=clock))
    with caplog.at_level(logging.INFO, logger="tinkex_recovery"), pytest.raises(SimulatedRequestFailedError) as info:
        trainer.fit(module, DataLoader(list(range(6)), batch_size=1, collate_fn=list))
    assert info.value is module.raised[0]  # the step's own exception, unchanged
    assert sim.restore_calls == [] and module.training_client.model_id == run_id
    (line,) = [r.getMessage() for r in caplog.records if "observe mode" in r.getMessage()]
    assert f"would restore a new run from tinker://{run_id}/weights/0002" in line
