"""TinkexRecovery with a real Lightning ``Trainer`` and the real tinker SDK over loopback HTTP: the callback follows
the SDK ``TrainingClient``'s own ``save_state`` (its replay buffer drains at each checkpoint), recovers through
the SDK's ``create_training_client_from_state_with_optimizer``, and replays, so the simulated Tinker's books
show every batch trained exactly once. Detection comes from the failing SDK calls; the poller is an hour away."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import tinker
import torch
from torch.utils.data import DataLoader

from tinkex_recovery import RecoveryPolicy
from tinkex_recovery.integrations.lightning import TinkexRecovery
from tinkex_recovery.simulated import SimulatedTinker

from .sdk_support import ADAM, SdkNet, datum, sdk_service
from .test_lightning import make_trainer

pytestmark = [
    pytest.mark.sdk,
    pytest.mark.lightning,
    pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers"),
]

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, attempt_timeout=30)
BATCHES, SAVE_EVERY = 14, 4


@pytest.fixture(scope="module")
def net() -> Iterator[SdkNet]:
    with sdk_service(SimulatedTinker()) as net:
        yield net


class SdkModule(pl.LightningModule):
    """The README's module on the real SDK; the server loses the run inside batch 6's optim_step and at the save
    after batch 11's step."""

    def __init__(self, net: SdkNet) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.service_client = net.service
        self.training_client: Any = net.lora()
        self.losses = {(6, "mid"), (11, "stepped")}
        self.buffered: list[int] = []
        self.cb: TinkexRecovery | None = None

    def lose(self, batch_idx: int, moment: str) -> None:
        if (batch_idx, moment) in self.losses:
            self.losses.discard((batch_idx, moment))
            self.net.sim.corrupt(self.training_client.model_id)

    def training_step(self, batch: list[int], batch_idx: int) -> dict[str, torch.Tensor]:
        assert self.cb is not None
        self.buffered.append(self.cb.buffered)
        self.training_client.forward_backward([datum(i) for i in batch], "cross_entropy").result()
        self.lose(batch_idx, "mid")
        self.training_client.optim_step(ADAM).result()
        self.optimizers().step()
        self.lose(batch_idx, "stepped")
        if self.global_step % SAVE_EVERY == 0:
            # positional user_metadata, as the SDK's signature allows
            self.training_client.save_state(
                f"step-{self.global_step:04d}", None, False, {"step": str(self.global_step)}
            ).result()
        return {"loss": torch.tensor(0.0)}

    def configure_optimizers(self) -> None:
        return None


def test_a_lightning_fit_on_the_sdk_trains_every_batch_once(net: SdkNet, tmp_path: Path) -> None:
    module = SdkModule(net)
    first = module.training_client.model_id
    cb = module.cb = TinkexRecovery(POLICY)
    trainer = make_trainer(tmp_path, cb)
    trainer.fit(module, DataLoader(list(range(BATCHES)), batch_size=1, collate_fn=list))

    assert not module.losses
    final = module.training_client.model_id
    assert isinstance(module.training_client, tinker.TrainingClient) and final == cb.run_id != first
    assert net.sim.lineage(final) == [(i,) for i in range(BATCHES)]
    assert trainer.global_step == BATCHES
    assert [(r["resume_step"], r["steps_lost"]) for r in cb.lineage] == [(4, 2), (8, 3)]
    runs = net.sim.run_ids
    assert runs[runs.index(first) :] == [first, cb.lineage[0]["new_run_id"], final]  # one new run per loss
    # The SDK client's saves were followed: the buffer never held more than the save intervals a fallback may need.
    assert max(module.buffered) < SAVE_EVERY * (POLICY.fallback_depth + 1)
    assert "save_state" not in vars(module.training_client)
