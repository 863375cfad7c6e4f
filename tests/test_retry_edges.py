"""Retry decisions at their edges: a failure the SDK files under the ``user`` category blames the checkpoint
whatever kind of enum carries the category, a retry after any number of attempts waits the cap (never an
overflow), a 0-based attempt number is refused with a message that says so, and an error is described in one
line of at most 500 characters: its type, then its message's first line when it has one."""

from __future__ import annotations

import enum

import pytest

from tinkex_recovery._retry import FailureKind, backoff_delay, classify, describe


class MixedCategory(str, enum.Enum):  # noqa: UP042  # an older SDK's spelling: str() is "MixedCategory.USER"
    USER = "user"
    SERVER = "server"


class PlainCategory(enum.Enum):  # or as a plain Enum
    USER = "user"
    SERVER = "server"


class StrCategory(enum.StrEnum):  # tinker 0.38.0's RequestErrorCategory
    USER = "user"
    SERVER = "server"


@pytest.mark.parametrize("category", [MixedCategory, PlainCategory, StrCategory])
def test_a_user_category_failure_blames_the_checkpoint_whatever_enum_carries_it(category: type[enum.Enum]) -> None:
    user, server = RuntimeError("bad checkpoint"), RuntimeError("busy")
    user.category = category["USER"]  # type: ignore[attr-defined]
    server.category = category["SERVER"]  # type: ignore[attr-defined]
    assert classify(user) is FailureKind.CHECKPOINT
    assert classify(server) is FailureKind.TRANSIENT


@pytest.mark.parametrize("attempt", [1024, 1025, 10**6])
def test_a_retry_after_any_number_of_attempts_waits_the_cap(attempt: int) -> None:
    assert backoff_delay(attempt, base=5.0, cap=60.0, jitter=0.0, u=0.0) == 60.0


def test_a_zero_based_attempt_number_is_refused_saying_attempts_count_from_one() -> None:
    with pytest.raises(ValueError, match=r"^attempt is 1-based$"):
        backoff_delay(0, base=5.0, cap=60.0, jitter=0.0, u=0.0)


def test_an_error_without_a_message_is_described_by_its_type_alone() -> None:
    assert describe(RuntimeError()) == "RuntimeError"
    assert describe(RuntimeError("   ")) == "RuntimeError"


def test_an_error_is_described_by_the_first_line_of_its_message_cut_at_500_characters() -> None:
    assert describe(RuntimeError("first line\nsecond line")) == "RuntimeError: first line"
    long = describe(RuntimeError("x" * 1000))
    assert len(long) == 500 and long.startswith("RuntimeError: xxx")
