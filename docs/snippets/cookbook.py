import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tinker
from tinker import types

from tinkex_recovery import TinkerPath, recovery_guard


@dataclass
class CheckpointManager:  # a stand-in for tinker-cookbook's: it holds its own reference to the client
    training_client: Any


def batch(i: int) -> list[types.Datum]:
    tokens = types.ModelInput.from_ints([i, i + 1])
    return [types.Datum(model_input=tokens, loss_fn_inputs={"target_tokens": [i + 1, i + 2], "weights": [1.0, 1.0]})]


async def main(log_path: Path, num_steps: int) -> None:
    service = tinker.ServiceClient()
    records = log_path / "checkpoints.jsonl"
    if records.exists():  # a restart: resume the run of the newest checkpoint the log records
        newest = json.loads(records.read_text().splitlines()[-1])
        run_id, client = TinkerPath.parse(newest["state_path"]).run_id, None
    else:
        client = await service.create_lora_training_client(base_model="Qwen/Qwen3-8B")
        run_id = client.model_id
    manager = CheckpointManager(client)

    def keep_current(new_client: Any) -> None:
        manager.training_client = new_client

    async with recovery_guard(run_id, service, client=client, log_path=log_path, on_swap=keep_current) as guard:
        manager.training_client = guard.client  # without client=, the guard restored a new run at entry
        async for step in guard.steps(range(guard.start_step or 0, num_steps)):
            async with step:
                fwd = manager.training_client.forward_backward(batch(step.index), "cross_entropy")
                opt = manager.training_client.optim_step(types.AdamParams(learning_rate=1e-4))
                await fwd
                await opt
                if (step.index + 1) % 10 == 0:  # also appends {"name", "batch", "state_path", ...} to the log
                    await guard.save_state_async(f"{step.index + 1:06d}", step=step.index + 1)
    print(
        f"steps {guard.start_step or 0}..{num_steps - 1} on run {guard.run_id}, {len(guard.recoveries)} recovery(ies)"
    )


if __name__ == "__main__":  # python cookbook.py LOG_PATH NUM_STEPS
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
