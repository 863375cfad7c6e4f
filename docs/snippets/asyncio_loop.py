import asyncio

import tinker
from tinker import types

from tinkex_recovery import RecoveryPolicy, recovery_guard


def batch(i: int) -> list[types.Datum]:
    tokens = types.ModelInput.from_ints([i, i + 1])
    return [types.Datum(model_input=tokens, loss_fn_inputs={"target_tokens": [i + 1, i + 2], "weights": [1.0, 1.0]})]


async def main() -> None:
    service = tinker.ServiceClient()  # reads TINKER_API_KEY and TINKER_BASE_URL
    client = await service.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    adam = types.AdamParams(learning_rate=1e-4)
    policy = RecoveryPolicy(enabled=True, poll_interval=30)
    async with recovery_guard(client.model_id, service, policy=policy, client=client) as guard:
        async for step in guard.steps(range(30)):
            async with step:
                fwd = guard.client.forward_backward(batch(step.index), "cross_entropy")  # a future, at once
                opt = guard.client.optim_step(adam)  # submitted before waiting for the first
                await fwd
                await opt
                if (step.index + 1) % 10 == 0:
                    await guard.save_state_async(f"step-{step.index + 1:06d}", step=step.index + 1)
    print(f"30 steps on run {guard.run_id}, {len(guard.recoveries)} recovery(ies)")


asyncio.run(main())
