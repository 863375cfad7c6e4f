import tinker
from tinker import types

from tinkex_recovery import RecoveryEngine, RecoveryPolicy


def batch(i: int) -> list[types.Datum]:
    tokens = types.ModelInput.from_ints([i, i + 1])
    return [types.Datum(model_input=tokens, loss_fn_inputs={"target_tokens": [i + 1, i + 2], "weights": [1.0, 1.0]})]


service = tinker.ServiceClient()
client = service.create_lora_training_client(base_model="Qwen/Qwen3-8B").result()
adam = types.AdamParams(learning_rate=1e-4)
policy = RecoveryPolicy(enabled=True, poll_interval=30, checkpoint_strategy="latest")
with RecoveryEngine(policy) as engine:  # polls through the service's REST client (or pass status=)
    engine.subscribe(lambda event: print(event.kind.value, event.run_id))  # also logged to "tinkex_recovery"
    handle = engine.watch(client.model_id, service)
    step = 0
    while step < 30:
        if not handle.settled:  # the poller found the run corrupted between steps (lock-free: check every step)
            recovery = handle.wait_for_recovery(timeout=600)
            client, step = recovery.client, int(recovery.checkpoint.user_metadata["step"])
        try:
            client.forward_backward(batch(step), "cross_entropy").result()
            client.optim_step(adam).result()
        except Exception:
            if not handle.check_now():  # poll at once; False: the run is healthy, the error is the loop's own
                raise
            continue  # the next turn collects the recovery and rewinds to its checkpoint
        step += 1
        if step % 10 == 0:
            client.save_state(f"step-{step:06d}", user_metadata={"step": str(step)}).result()
print(f"30 steps on run {handle.run_id}, {len(handle.recoveries)} recovery(ies)")
