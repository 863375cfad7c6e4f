import asyncio
from collections import deque

import tinker
from tinker import types

from tinkex_recovery import recovery_guard

NUM_STEPS, SUBMIT_AHEAD, SAVE_EVERY = 30, 2, 10


def batch(i: int) -> list[types.Datum]:
    tokens = types.ModelInput.from_ints([i, i + 1])
    return [types.Datum(model_input=tokens, loss_fn_inputs={"target_tokens": [i + 1, i + 2], "weights": [1.0, 1.0]})]


async def main() -> None:
    service = tinker.ServiceClient()
    client = await service.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    adam = types.AdamParams(learning_rate=1e-4)
    in_flight: deque[tuple[tinker.APIFuture, tinker.APIFuture]] = deque()
    async with recovery_guard(client.model_id, service, client=client) as guard:
        async for step in guard.steps(range(NUM_STEPS)):
            async with step:
                if step.resumed:
                    in_flight.clear()  # the lost run's futures: never await them
                in_flight.append(
                    (guard.client.forward_backward(batch(step.index), "cross_entropy"), guard.client.optim_step(adam))
                )
                if (step.index + 1) % SAVE_EVERY == 0:
                    # Submitted after step k's requests, it holds every step up to k: resume at k + 1.
                    await guard.save_state_async(f"step-{step.index + 1:06d}", step=step.index + 1)
                while len(in_flight) > SUBMIT_AHEAD or (step.index == NUM_STEPS - 1 and in_flight):
                    fwd, opt = in_flight.popleft()
                    await fwd
                    await opt
    print(f"{NUM_STEPS} steps on run {guard.run_id}, {len(guard.recoveries)} recovery(ies)")


asyncio.run(main())
