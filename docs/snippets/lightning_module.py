import lightning.pytorch as pl
import tinker
from tinker import types
from torch.utils.data import DataLoader

from tinkex_recovery import RecoveryPolicy, TinkexRecovery


def datum(i: int) -> types.Datum:
    tokens = types.ModelInput.from_ints([i, i + 1])
    return types.Datum(model_input=tokens, loss_fn_inputs={"target_tokens": [i + 1, i + 2], "weights": [1.0, 1.0]})


class RemoteModule(pl.LightningModule):
    def __init__(self, service_client: tinker.ServiceClient) -> None:
        super().__init__()
        self.automatic_optimization = False  # Tinker's optim_step is the optimizer
        self.service_client = service_client  # restores the run
        self.training_client = service_client.create_lora_training_client(base_model="Qwen/Qwen3-8B").result()

    def training_step(self, batch: list[int], batch_idx: int) -> None:
        self.training_client.forward_backward([datum(i) for i in batch], "cross_entropy").result()
        self.training_client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        self.optimizers().step()  # after the Tinker calls: global_step += 1
        if self.global_step % 5 == 0:  # "step" = the optimizer steps the checkpoint holds
            metadata = {"step": str(self.global_step)}
            self.training_client.save_state(f"step-{self.global_step:06d}", user_metadata=metadata).result()

    def configure_optimizers(self) -> None:
        return None


module = RemoteModule(tinker.ServiceClient())
recovery = TinkexRecovery(RecoveryPolicy(enabled=True, poll_interval=30))
trainer = pl.Trainer(
    max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[recovery]
)
trainer.fit(module, DataLoader(list(range(40)), batch_size=2, collate_fn=list))
print(f"{trainer.global_step} steps on run {module.training_client.model_id}, {len(recovery.lineage)} recovery(ies)")
