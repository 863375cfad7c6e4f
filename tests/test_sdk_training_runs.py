"""The account's training-runs listing, ``GET /api/v1/training_runs``, as the simulated server serves it: the
official SDK's ``RestClient.list_training_runs`` pages through it unmodified, and ``TinkerRest`` reads the same
pages; a corrupted run and a recovered run's user_metadata show in the listing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tinker
from tinker import types

from tinkex_recovery import AuthenticationError, TinkerRest, TrainingRunList
from tinkex_recovery.simulated import SimulatedTinker

from .http_support import KEY, WRONG_KEY
from .sdk_support import SdkNet, sdk_service

pytestmark = pytest.mark.sdk


@pytest.fixture(scope="module")
def net() -> Iterator[SdkNet]:
    with sdk_service(SimulatedTinker()) as net:
        yield net


def test_the_sdk_pages_through_every_run_newest_first(net: SdkNet) -> None:
    clients = [net.lora(user_metadata={"n": str(i)}) for i in range(3)]
    net.sim.corrupt(clients[1].model_id)
    path = clients[0].save_state("one", user_metadata={"step": "1"}).result().path
    restored = net.service.create_training_client_from_state_with_optimizer(
        path, user_metadata={"tinkex_recovery.recovered_from_run": clients[0].model_id}
    ).result()

    first = net.rest.list_training_runs().result()  # the SDK's defaults: limit 20, offset 0
    assert isinstance(first, types.TrainingRunsResponse)
    total = first.cursor.total_count
    assert total == len(net.sim.run_ids) and (first.cursor.offset, first.cursor.limit) == (0, 20)

    pages = [net.rest.list_training_runs(limit=2, offset=offset).result() for offset in range(0, total, 2)]
    assert all(p.cursor.limit == 2 and p.cursor.total_count == total for p in pages)
    listed = [run for page in pages for run in page.training_runs]
    assert (
        [r.training_run_id for r in listed] == net.sim.run_ids[::-1] == [r.training_run_id for r in first.training_runs]
    )
    by_id = {r.training_run_id: r for r in listed}
    assert by_id[clients[1].model_id].corrupted and not by_id[clients[0].model_id].corrupted
    assert by_id[restored.model_id].user_metadata == {"tinkex_recovery.recovered_from_run": clients[0].model_id}
    assert by_id[clients[0].model_id].last_checkpoint is not None
    assert by_id[clients[0].model_id].last_checkpoint.tinker_path == path

    past_the_end = net.rest.list_training_runs(limit=5, offset=total).result()
    assert past_the_end.training_runs == [] and past_the_end.cursor.total_count == total


def test_tinker_rest_reads_the_same_pages_as_the_sdk(net: SdkNet) -> None:
    net.lora()
    with TinkerRest(api_key=KEY, base_url=net.server.base_url) as rest:
        mine = rest.list_training_runs(limit=3, offset=1)
    sdk = net.rest.list_training_runs(limit=3, offset=1).result()
    assert isinstance(mine, TrainingRunList) and mine.cursor is not None
    assert (mine.cursor.offset, mine.cursor.limit, mine.cursor.total_count) == (
        sdk.cursor.offset,
        sdk.cursor.limit,
        sdk.cursor.total_count,
    )
    assert [r.training_run_id for r in mine.training_runs] == [r.training_run_id for r in sdk.training_runs]
    request = net.server.requests[-1]
    assert (request.path, request.query) == (
        "/api/v1/training_runs",
        {"limit": "3", "offset": "1", "access_scope": "owned"},  # what the SDK sends
    )


def test_a_wrong_key_is_refused_on_both(net: SdkNet) -> None:
    with TinkerRest(api_key=WRONG_KEY, base_url=net.server.base_url) as rest, pytest.raises(AuthenticationError) as err:
        rest.list_training_runs()
    assert WRONG_KEY not in str(err.value)
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=net.server.base_url, api_key=WRONG_KEY).list_training_runs().result()


def test_bad_paging_arguments_fail_before_any_request() -> None:
    with TinkerRest(api_key=KEY, base_url="http://127.0.0.1:9") as rest:
        for limit, offset in ((0, 0), (1, -1), (True, 0)):
            with pytest.raises(ValueError, match="must be an integer"):
                rest.list_training_runs(limit, offset)
