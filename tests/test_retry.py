"""Failure classification by duck typing, and the backoff schedule's properties."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinkex_recovery._retry import FailureKind, backoff_delay, classify


def status_error(code: int) -> Exception:
    exc = Exception(f"Error code: {code}")
    exc.status_code = code  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize("code", [400, 403, 404, 409, 410, 422])
def test_4xx_other_than_401_408_429_belongs_to_the_checkpoint(code: int) -> None:
    assert classify(status_error(code)) is FailureKind.CHECKPOINT


def test_401_never_blames_the_checkpoint_and_no_retry_fixes_it() -> None:
    assert classify(status_error(401)) is FailureKind.FATAL
    error = Exception("unauthorized")
    error.response = SimpleNamespace(status_code=401)  # type: ignore[attr-defined]
    assert classify(error) is FailureKind.FATAL


@pytest.mark.parametrize("exc", [TypeError("unexpected keyword 'user_metadata'"), AttributeError("no attribute 'x'")])
def test_programming_errors_from_the_service_are_fatal(exc: Exception) -> None:
    assert classify(exc) is FailureKind.FATAL


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
def test_408_429_5xx_are_transient(code: int) -> None:
    assert classify(status_error(code)) is FailureKind.TRANSIENT


def test_status_on_the_response_attribute_counts() -> None:
    exc = Exception("x")
    exc.response = SimpleNamespace(status_code=404)  # type: ignore[attr-defined]
    assert classify(exc) is FailureKind.CHECKPOINT


@pytest.mark.parametrize(
    ("category", "kind"),
    [("user", FailureKind.CHECKPOINT), ("User", FailureKind.CHECKPOINT), ("server", FailureKind.TRANSIENT)],
)
def test_request_failed_category(category: str, kind: FailureKind) -> None:
    exc = Exception("failed")
    exc.category = category  # type: ignore[attr-defined]
    assert classify(exc) is kind


@pytest.mark.parametrize("exc", [ConnectionError(), TimeoutError(), RuntimeError("who knows")])
def test_connection_errors_timeouts_and_unknown_errors_are_transient(exc: Exception) -> None:
    assert classify(exc) is FailureKind.TRANSIENT


def test_backoff_doubles_then_caps() -> None:
    delays = [backoff_delay(n, base=5, cap=60, jitter=0, u=0.5) for n in range(1, 7)]
    assert delays == [5, 10, 20, 40, 60, 60]


policies = st.tuples(
    st.floats(0, 100, allow_nan=False), st.floats(0, 1000, allow_nan=False), st.floats(0, 1), st.floats(0, 0.999)
).filter(lambda t: t[1] >= t[0])


@given(policies, st.integers(1, 200))
def test_backoff_is_monotone_capped_and_inside_its_jitter_band(p: tuple[float, float, float, float], n: int) -> None:
    base, cap, jitter, u = p
    delay = backoff_delay(n, base=base, cap=cap, jitter=jitter, u=u)
    nominal = min(base * 2 ** (n - 1), cap)
    assert delay <= cap
    assert nominal * (1 - jitter) - 1e-9 <= delay <= nominal + 1e-9
    assert backoff_delay(n + 1, base=base, cap=cap, jitter=jitter, u=u) >= delay - 1e-9
