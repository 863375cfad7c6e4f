import tinker
from tinker import types

from tinkex_recovery import RecoveryPolicy, recovery_guard


def rollout_datum(prompt: list[int], sampled: list[int]) -> types.Datum:
    tokens = prompt + sampled  # your RL loss (and its advantages) goes here; cross-entropy keeps the demo short
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def main() -> None:
    service = tinker.ServiceClient()  # reads TINKER_API_KEY and TINKER_BASE_URL
    client = service.create_lora_training_client(base_model="Qwen/Qwen3-8B").result()
    adam = types.AdamParams(learning_rate=1e-5)
    params = types.SamplingParams(max_tokens=8, temperature=1.0)
    policy = RecoveryPolicy(enabled=True, poll_interval=30)
    with recovery_guard(client.model_id, service, policy=policy, client=client) as guard:
        for step in guard.steps(range(30)):
            with step:
                # A sampler of the weights this step trains (after a recovery: the restored ones).
                sampler = guard.client.save_weights_and_get_sampling_client().result()
                prompt = [step.index, step.index + 1]
                sample = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result()
                data = [rollout_datum(prompt, list(seq.tokens)) for seq in sample.sequences]
                guard.client.forward_backward(data, "cross_entropy").result()
                guard.client.optim_step(adam).result()
                if (step.index + 1) % 10 == 0:
                    guard.save_state(f"step-{step.index + 1:06d}")
    print(f"30 steps on run {guard.run_id}, {len(guard.recoveries)} recovery(ies)")


if __name__ == "__main__":
    main()
