"""``TinkerRest.list_training_runs`` asks for the page the way the SDK does (20 runs by default, the caller's own
runs), refuses a bad page argument by name, and names the page in every error; every error of
``list_checkpoints`` names the run and the call, and a listing that never ends is malformed after 1000 pages;
the client and its auth show the base URL and only a masked key in their reprs. And ``steps()`` refuses a
repeated index, saying which follows which."""

from __future__ import annotations

import httpx
import pytest

from tinkex_recovery import AuthenticationError, MalformedResponse, TinkerAPIError, TinkerRest
from tinkex_recovery._redact import mask
from tinkex_recovery._rest import _APIKeyAuth
from tinkex_recovery.integrations._steps import StepCursor

from .http_support import KEY

RUNS_PAGE = {"training_runs": [], "cursor": {"offset": 0, "limit": 20, "total_count": 0}}


def rest_answering(answer: httpx.Response, seen: list[httpx.Request]) -> TinkerRest:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    return TinkerRest(api_key=KEY, base_url="http://tinker.test", transport=httpx.MockTransport(handler), jitter=0.0)


def test_a_page_of_runs_is_asked_for_as_the_sdk_asks_twenty_of_the_callers_own_by_default() -> None:
    seen: list[httpx.Request] = []
    with rest_answering(httpx.Response(200, json=RUNS_PAGE), seen) as rest:
        rest.list_training_runs()
        rest.list_training_runs(limit=5, offset=40)
    assert [dict(r.url.params) for r in seen] == [
        {"limit": "20", "offset": "0", "access_scope": "owned"},
        {"limit": "5", "offset": "40", "access_scope": "owned"},
    ]
    assert {r.url.path for r in seen} == {"/api/v1/training_runs"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, "limit must be an integer >= 1, got 0"),
        ({"offset": -1}, "offset must be an integer >= 0, got -1"),
    ],
)
def test_a_bad_page_argument_is_refused_by_name_before_any_request(kwargs: dict[str, int], message: str) -> None:
    seen: list[httpx.Request] = []
    with rest_answering(httpx.Response(200, json=RUNS_PAGE), seen) as rest, pytest.raises(ValueError) as info:
        rest.list_training_runs(**kwargs)
    assert str(info.value) == message and seen == []


def test_an_error_listing_runs_names_the_page_it_was_asking_for() -> None:
    with (
        rest_answering(httpx.Response(401, json={"detail": "bad key"}), []) as rest,
        pytest.raises(AuthenticationError) as refused,
    ):
        rest.list_training_runs(limit=20, offset=40)
    assert "GET training runs (offset 40, limit 20)" in str(refused.value)
    with (
        rest_answering(httpx.Response(200, json={"training_runs": "no"}), []) as rest,
        pytest.raises(MalformedResponse) as malformed,
    ):
        rest.list_training_runs(limit=20, offset=40)
    assert "GET training runs (offset 40, limit 20)" in str(malformed.value)


def test_the_client_and_its_auth_show_the_base_url_and_only_a_masked_key() -> None:
    with TinkerRest(api_key=KEY, base_url="http://tinker.test") as rest:
        assert repr(rest) == f"<TinkerRest base_url='http://tinker.test/' api_key={mask(KEY)!r}>"
    assert repr(_APIKeyAuth(KEY)) == f"<APIKeyAuth {mask(KEY)}>"
    assert KEY not in repr(rest) + repr(_APIKeyAuth(KEY)) and mask(KEY) != "***"


@pytest.mark.parametrize(("indices", "message"), [([1, 1], "1 follows 1"), ([1, 5, 3], "3 follows 5")])
def test_steps_refuse_an_index_that_does_not_rise_saying_which_follows_which(indices: list[int], message: str) -> None:
    cursor = StepCursor(indices)
    for _ in indices[:-1]:
        next(cursor)
    with pytest.raises(ValueError, match=f"^step indices must be strictly increasing; {message}$"):
        next(cursor)


def checkpoint_page(request: httpx.Request, total: int) -> httpx.Response:
    """One checkpoint per page, at the offset asked for, of ``total``."""
    offset = int(request.url.params.get("offset", 0))
    checkpoint = {
        "checkpoint_id": f"weights/{offset:06d}",
        "checkpoint_type": "training",
        "time": "2026-01-01T00:00:00Z",
        "tinker_path": f"tinker://run-a/weights/{offset:06d}",
    }
    cursor = {"offset": offset, "limit": 1, "total_count": total}
    return httpx.Response(200, json={"checkpoints": [checkpoint], "cursor": cursor})


def test_every_error_listing_checkpoints_names_the_run_and_the_call() -> None:
    what = "GET checkpoints of run run-a"
    with (
        rest_answering(httpx.Response(401, json={"detail": "bad key"}), []) as rest,
        pytest.raises(AuthenticationError) as refused,
    ):
        rest.list_checkpoints("run-a")
    assert what in str(refused.value) and refused.value.run_id == "run-a"
    assert "after 1 attempt)" in str(refused.value)  # one attempt, said in the singular
    with (
        rest_answering(httpx.Response(200, json={"checkpoints": "no"}), []) as rest,
        pytest.raises(MalformedResponse) as malformed,
    ):
        rest.list_checkpoints("run-a")
    assert what in str(malformed.value) and malformed.value.run_id == "run-a"
    stuck = {"checkpoints": [], "cursor": {"offset": 0, "limit": 0, "total_count": 5}}
    with rest_answering(httpx.Response(200, json=stuck), []) as rest, pytest.raises(MalformedResponse) as loop:
        rest.list_checkpoints("run-a")
    assert str(loop.value).startswith(f"{what}: the pagination cursor does not advance")
    assert loop.value.run_id == "run-a"


def test_a_listing_of_more_than_a_thousand_pages_is_malformed_not_followed_forever() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return checkpoint_page(request, total=10**9)

    transport = httpx.MockTransport(handler)
    with (
        TinkerRest(api_key=KEY, base_url="http://tinker.test", transport=transport, timeout=600.0) as rest,
        pytest.raises(MalformedResponse) as info,
    ):
        rest.list_checkpoints("run-a")
    assert str(info.value) == "GET checkpoints of run run-a: more than 1000 pages"
    assert info.value.run_id == "run-a" and len(requests) == 1000


def test_a_rejected_key_and_a_status_http_does_not_name_are_both_said_plainly() -> None:
    with (
        rest_answering(httpx.Response(401, json={"detail": "no"}), []) as rest,
        pytest.raises(AuthenticationError) as refused,
    ):
        rest.get_training_run("run-a")
    assert "HTTP 401 Unauthorized (the API key was rejected)" in str(refused.value)
    with rest_answering(httpx.Response(499, json={"detail": "odd"}), []) as rest, pytest.raises(TinkerAPIError) as odd:
        rest.get_training_run("run-a")
    assert "HTTP 499" in str(odd.value) and odd.value.run_id == "run-a"
