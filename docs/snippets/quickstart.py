import logging

import tinker
from tinker import types

from tinkex_recovery import recovery_guard

logging.basicConfig(level=logging.WARNING)  # a recovery is one WARNING line on stderr


def batch(i: int) -> list[types.Datum]:
    tokens = types.ModelInput.from_ints([i, i + 1])
    return [types.Datum(model_input=tokens, loss_fn_inputs={"target_tokens": [i + 1, i + 2], "weights": [1.0, 1.0]})]


service = tinker.ServiceClient()  # reads TINKER_API_KEY and TINKER_BASE_URL
client = service.create_lora_training_client(base_model="Qwen/Qwen3-8B").result()
with recovery_guard(client.model_id, service, client=client) as guard:
    for step in guard.steps(range(30)):
        with step:
            guard.client.forward_backward(batch(step.index), "cross_entropy").result()
            guard.client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            if (step.index + 1) % 10 == 0:
                guard.client.save_state(f"step-{step.index + 1:06d}").result()  # records the step it holds
print(f"30 steps on run {guard.run_id}, {len(guard.recoveries)} recovery(ies)")
