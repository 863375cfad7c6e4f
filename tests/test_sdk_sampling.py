"""The real tinker SDK (0.38) samples from the simulated Tinker over loopback HTTP, unmodified: its own
``SamplingClient`` from ``save_weights_and_get_sampling_client``, ``save_weights_for_sampler`` +
``create_sampling_client(model_path=)`` and ``base_model=``, with ``sample`` and ``compute_logprobs``; the
sampling fault controls reach it as the service's errors would."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import tinker
from tinker import types

from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT
from .sdk_support import ADAM, BASE_MODEL, SdkNet, datum, sdk_service

pytestmark = pytest.mark.sdk

PROMPT = types.ModelInput.from_ints([11, 12, 13])
PARAMS = types.SamplingParams(max_tokens=3)


@pytest.fixture(scope="module")
def net() -> Iterator[SdkNet]:
    with sdk_service(SimulatedTinker()) as net:
        yield net


@pytest.fixture(autouse=True)
def serving(net: SdkNet) -> Iterator[None]:
    yield
    net.sim.lost_run_samplers = "serve"
    net.sim.release_samples()


def train(client: tinker.TrainingClient, n: int) -> None:
    for i in range(n):
        client.forward_backward([datum(i)], "cross_entropy").result()
        client.optim_step(ADAM).result()


def first(sampler: tinker.SamplingClient) -> int:
    return int(sampler.sample(PROMPT, 1, PARAMS).result().sequences[0].tokens[0])


def test_the_sdks_sampler_samples_the_weights_it_was_made_from(net: SdkNet) -> None:
    client = net.lora()
    at0 = client.save_weights_and_get_sampling_client().result()
    train(client, 2)
    at2 = client.save_weights_and_get_sampling_client().result()
    assert isinstance(at2, tinker.SamplingClient)
    response = at2.sample(PROMPT, 2, PARAMS).result()
    assert isinstance(response, types.SampleResponse)
    assert [s.tokens[0] for s in response.sequences] == [2, 2] and first(at0) == 0
    assert all(len(s.tokens) == 3 and s.stop_reason == "length" for s in response.sequences)
    assert len({s.sequence_id for s in response.sequences}) == 2
    assert at2.compute_logprobs(PROMPT).result() == pytest.approx([None, -1 / 3, -1 / 3])


def test_saved_sampler_weights_and_training_weights_make_samplers_through_the_service(net: SdkNet) -> None:
    client = net.lora()
    train(client, 1)
    saved = client.save_weights_for_sampler("rl-0001").result()
    assert saved.path == f"tinker://{client.model_id}/sampler_weights/rl-0001"
    train(client, 1)
    weights = client.save_state("w-0002").result().path
    assert first(net.service.create_sampling_client(model_path=saved.path).result()) == 1
    assert first(client.create_sampling_client(weights).result()) == 2
    base = net.service.create_sampling_client(base_model=BASE_MODEL).result()
    assert first(base) == 0 and base.get_base_model() == BASE_MODEL
    listed = {c.tinker_path: c.checkpoint_type for c in net.rest.list_checkpoints(client.model_id).result().checkpoints}
    assert listed == {saved.path: "sampler", weights: "training"}
    with pytest.raises(tinker.NotFoundError):
        net.service.create_sampling_client(model_path=f"tinker://{client.model_id}/weights/nope").result()


def test_awaited_samples_in_flight_are_long_polled_until_released(net: SdkNet) -> None:
    sampler = net.lora().save_weights_and_get_sampling_client().result()

    async def gather() -> list[int]:
        net.sim.hold_samples(3)
        received = net.sim.sample_count
        futures = [sampler.sample(PROMPT, 1, PARAMS) for _ in range(3)]
        assert await asyncio.to_thread(net.sim.wait_for_samples, received + 3, WAIT)
        assert not any(f.future().done() for f in futures)  # in flight, their results long-polled
        net.sim.release_samples()
        return [int(r.sequences[0].tokens[0]) for r in await asyncio.gather(*futures)]

    assert asyncio.run(gather()) == [0, 0, 0]


def test_a_lost_runs_sampler_serves_its_snapshot_or_fails_with_the_sdks_error(net: SdkNet) -> None:
    client = net.lora()
    train(client, 1)
    sampler = client.save_weights_and_get_sampling_client().result()
    net.sim.hold_samples(1)
    received = net.sim.sample_count
    in_flight = sampler.sample(PROMPT, 1, PARAMS)
    assert net.sim.wait_for_samples(received + 1, WAIT)  # held on the server: the SDK sends from its own thread
    net.sim.corrupt(client.model_id)
    assert first(sampler) == 1  # the default: a snapshot sampler goes on serving
    with pytest.raises(tinker.RequestFailedError, match="corrupted"):
        client.save_weights_and_get_sampling_client().result()
    net.sim.lost_run_samplers = "fail"
    net.sim.release_samples()
    with pytest.raises(tinker.RequestFailedError, match="was lost"):
        in_flight.result()
    with pytest.raises(tinker.RequestFailedError, match="was lost"):
        first(sampler)


def test_sampler_errors_on_a_healthy_run_reach_the_sdk_as_the_services_would(net: SdkNet) -> None:
    sampler = net.lora().save_weights_and_get_sampling_client().result()
    net.sim.fail_samples(1)
    with pytest.raises(tinker.RequestFailedError, match="simulated sampler failure"):
        first(sampler)
    net.sim.fail_samples(1, status_code=400)
    with pytest.raises(tinker.BadRequestError):
        first(sampler)
    net.sim.fail_samples(1, status_code=503)  # the SDK retries a 5xx on its own
    assert first(sampler) == 0
