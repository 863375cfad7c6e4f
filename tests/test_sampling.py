"""Sampling in the simulated Tinker, in memory: samplers tied to the weights they were made from (a sample's first
token is the number of optimizer steps its weights hold), and the sampling fault controls."""

from __future__ import annotations

import asyncio

import pytest

from tinkex_recovery.simulated import (
    SimulatedAPIError,
    SimulatedRequestFailedError,
    SimulatedSamplingClient,
    SimulatedTinker,
    SimulatedTrainingClient,
)

PROMPT = [11, 12, 13]


def train(client: SimulatedTrainingClient, *items: object) -> None:
    for item in items:
        client.forward_backward([item]).result()
        client.optim_step().result()


def first(sampler: SimulatedSamplingClient, prompt: list[int] = PROMPT) -> int:
    return sampler.sample(prompt, 1, {"max_tokens": 3}).result().sequences[0].tokens[0]


@pytest.fixture
def sim() -> SimulatedTinker:
    return SimulatedTinker()


def test_the_first_token_is_the_optimizer_steps_of_the_weights_and_a_snapshot_keeps_its_weights(
    sim: SimulatedTinker,
) -> None:
    client = sim.create_lora_training_client("base")
    at0 = client.save_weights_and_get_sampling_client().result()
    train(client, "a", "b")
    at2 = client.save_weights_and_get_sampling_client().result()
    train(client, "c")
    assert (first(at0), first(at2), first(client.save_weights_and_get_sampling_client().result())) == (0, 2, 3)
    assert sim.sampler_steps(at2.sampler_id) == 2


def test_the_other_tokens_derive_from_the_prompt_and_the_sample_index_only(sim: SimulatedTinker) -> None:
    client = sim.create_lora_training_client("base")
    before = client.save_weights_and_get_sampling_client().result().sample(PROMPT, 3, {"max_tokens": 5}).result()
    train(client, "a")
    after = client.save_weights_and_get_sampling_client().result().sample(PROMPT, 3, {"max_tokens": 5}).result()
    other = client.save_weights_and_get_sampling_client().result().sample([7], 1, None).result()
    assert [s.tokens[1:] for s in before.sequences] == [s.tokens[1:] for s in after.sequences]
    assert len({tuple(s.tokens[1:]) for s in before.sequences}) == 3  # each index its own
    assert all(len(s.tokens) == 5 and s.stop_reason == "length" for s in before.sequences)
    assert len(other.sequences[0].tokens) == 4 and other.sequences[0].tokens[1:] != before.sequences[0].tokens[1:]
    assert len({s.sequence_id for s in (*before.sequences, *after.sequences)}) == 6


def test_an_inflight_sampler_follows_its_runs_newest_inflight_weights(sim: SimulatedTinker) -> None:
    client = sim.create_lora_training_client("base")
    inflight = client.save_weights_and_get_sampling_client(kind="inflight").result()
    train(client, "a", "b")
    assert first(inflight) == 0  # nothing published since
    client.save_weights_and_get_sampling_client(kind="inflight").result()
    assert first(inflight) == 2
    with pytest.raises(SimulatedAPIError, match="kind"):
        client.save_weights_and_get_sampling_client(kind="other").result()


def test_a_restored_run_holds_its_checkpoints_steps_and_so_do_its_samplers(sim: SimulatedTinker) -> None:
    client = sim.create_lora_training_client("base")
    train(client, "a", "b", "c")
    path = client.save_state("three").result().path
    train(client, "d")
    restored = sim.create_training_client_from_state_with_optimizer(path).result()
    assert first(restored.save_weights_and_get_sampling_client().result()) == 3
    assert restored.optim_step().result().step == 4  # the restored run goes on counting from its checkpoint
    assert first(sim.create_sampling_client(model_path=path).result()) == 3  # a training checkpoint serves too


def test_sampler_weights_are_a_listed_sampler_checkpoint_that_never_restores(sim: SimulatedTinker) -> None:
    client = sim.create_lora_training_client("base")
    train(client, "a")
    training = client.save_state("w1").result().path
    sampler_path = client.save_weights_for_sampler("s1").result().path
    assert sampler_path == f"tinker://{client.model_id}/sampler_weights/s1"
    assert first(client.create_sampling_client(sampler_path).result()) == 1
    run = sim.get_training_run(client.model_id)
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == training  # still the training one
    assert run.last_sampler_checkpoint is not None and run.last_sampler_checkpoint.tinker_path == sampler_path
    listed = {c.tinker_path: c for c in sim.list_checkpoints(client.model_id).checkpoints}
    assert listed[sampler_path].checkpoint_type == "sampler" and not listed[sampler_path].restorable
    assert listed[training].restorable
    with pytest.raises(SimulatedAPIError, match="sampler checkpoint"):
        sim.create_training_client_from_state(sampler_path).result()
    with pytest.raises(SimulatedAPIError, match="already exists"):
        client.save_weights_for_sampler("s1").result()
    client.save_state("s1").result()  # the same name as a training checkpoint is another path


def test_a_base_model_sampler_holds_no_steps_and_bad_requests_are_refused(sim: SimulatedTinker) -> None:
    base = sim.create_sampling_client(base_model="Qwen/Qwen3-8B").result()
    assert first(base) == 0 and base.get_base_model() == "Qwen/Qwen3-8B"
    for bad in (
        lambda: base.sample(PROMPT, 0, None),
        lambda: base.sample(PROMPT, 1, {"max_tokens": 0}),
        lambda: base.sample("text", 1, None),
    ):
        with pytest.raises(SimulatedAPIError) as caught:
            bad().result()
        assert caught.value.status_code == 400
    with pytest.raises(SimulatedAPIError) as missing:
        sim.create_sampling_client(model_path="tinker://nope:train:0/weights/x").result()
    assert missing.value.status_code == 404
    with pytest.raises(SimulatedAPIError) as neither:
        sim.create_sampling_client().result()
    assert neither.value.status_code == 400
    with pytest.raises(ValueError, match="serve"):
        sim.lost_run_samplers = "maybe"  # type: ignore[assignment]


def test_samplers_of_a_lost_run_serve_their_snapshot_by_default_or_fail(sim: SimulatedTinker) -> None:
    client = sim.create_lora_training_client("base")
    train(client, "a")
    sampler = client.save_weights_and_get_sampling_client().result()
    sim.corrupt(client.model_id)
    assert sim.lost_run_samplers == "serve" and first(sampler) == 1
    with pytest.raises(SimulatedRequestFailedError, match="corrupted"):
        client.save_weights_and_get_sampling_client().result()  # a call on the lost run, as optim_step
    with pytest.raises(SimulatedRequestFailedError, match="corrupted"):
        client.save_weights_for_sampler("late").result()
    sim.lost_run_samplers = "fail"
    with pytest.raises(SimulatedRequestFailedError, match="was lost") as caught:
        first(sampler)
    assert caught.value.category == "server"
    base = sim.create_sampling_client(base_model="b").result()
    assert first(base) == 0  # a base model's sampler belongs to no run


def test_a_held_sample_is_in_flight_until_released_and_fails_if_its_run_was_lost_meanwhile(
    sim: SimulatedTinker,
) -> None:
    client = sim.create_lora_training_client("base")
    sampler = client.save_weights_and_get_sampling_client().result()
    sim.hold_samples(3)
    kept, lost, cancelled = (sampler.sample(PROMPT, 1, None) for _ in range(3))
    assert not kept.done() and not lost.done() and sim.sample_count == 3
    train(client, "a")  # the weights were fixed when the requests arrived
    cancelled.cancel()
    sim.release_samples()
    assert kept.result().sequences[0].tokens[0] == 0 and cancelled.cancelled()
    sim.hold_samples(1)
    pending = sampler.sample(PROMPT, 1, None)
    sim.corrupt(client.model_id)
    sim.lost_run_samplers = "fail"
    sim.close()  # close releases held samples too
    with pytest.raises(SimulatedRequestFailedError):
        pending.result()
    assert lost.result().sequences[0].tokens[0] == 0


def test_fail_samples_fails_a_healthy_samplers_requests(sim: SimulatedTinker) -> None:
    sampler = sim.create_lora_training_client("base").save_weights_and_get_sampling_client().result()
    sim.fail_samples(1, category="user")
    sim.fail_samples(1, status_code=503)
    with pytest.raises(SimulatedRequestFailedError) as failed:
        first(sampler)
    assert failed.value.category == "user"
    with pytest.raises(SimulatedAPIError) as status:
        first(sampler)
    assert status.value.status_code == 503
    assert first(sampler) == 0
    with pytest.raises(ValueError):
        sim.fail_samples(-1)
    with pytest.raises(ValueError):
        sim.fail_samples(1, category="bogus")


def test_slow_samples_are_delivered_late_and_awaitable(sim: SimulatedTinker) -> None:
    sampler = sim.create_lora_training_client("base").save_weights_and_get_sampling_client().result()
    sim.slow_samples(0.2, n=1)
    slow = sampler.sample(PROMPT, 1, None)
    assert not slow.done()
    assert sampler.sample(PROMPT, 1, None).done()  # only the next one was slow

    async def awaited() -> int:
        return (await slow).sequences[0].tokens[0]

    assert asyncio.run(awaited()) == 0
    sim.slow_samples(30)
    never = sampler.sample(PROMPT, 1, None)
    sim.close()  # delivers it now, and its timer thread is joined
    assert never.result(timeout=0).sequences[0].tokens[0] == 0
    sim.slow_samples(0)
    assert sampler.sample(PROMPT, 1, None).done()


def test_compute_logprobs_scores_every_prompt_token_but_the_first(sim: SimulatedTinker) -> None:
    client = sim.create_lora_training_client("base")
    train(client, "a", "b", "c")
    sampler = client.save_weights_and_get_sampling_client().result()
    assert sampler.compute_logprobs(PROMPT).result() == [None, -0.25, -0.25]
    assert sampler.compute_logprobs(PROMPT, prompt_logprobs_last_n=1).result() == [None, None, -0.25]
