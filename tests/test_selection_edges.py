"""Checkpoint choice at its edges: a checkpoint listed twice is offered once, a metric that is NaN ranks nowhere,
any finite metric ranks (even at the end of the float range), 'best' with no metric at all falls back to the
latest and says so in the log, and a pinned path the listing does not show stands in as the oldest checkpoint,
of the kind its path names."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from tinkex_recovery import Checkpoint, RecoveryPolicy
from tinkex_recovery._models import TinkerPath
from tinkex_recovery._selection import dedupe, rank, synthetic, walk

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def checkpoint(name: str, minutes: int, **metadata: str) -> Checkpoint:
    return Checkpoint(
        checkpoint_id=f"weights/{name}",
        checkpoint_type="training",
        time=T0 + timedelta(minutes=minutes),
        tinker_path=f"tinker://run-a/weights/{name}",
        user_metadata=metadata or None,
    )


def test_a_checkpoint_listed_twice_is_offered_once() -> None:
    a, b = checkpoint("0002", 2), checkpoint("0004", 4)
    assert dedupe([b, a, b, a]) == [b, a]


def test_a_checkpoint_whose_metric_is_nan_is_never_ranked_best() -> None:
    policy = RecoveryPolicy(checkpoint_strategy="best", best_metric="loss", best_mode="min")
    nan, high, low = (
        checkpoint("0006", 6, loss="nan"),
        checkpoint("0004", 4, loss="0.5"),
        checkpoint("0002", 2, loss="0.3"),
    )
    assert rank(policy, [nan, high, low]) == [low, high]
    assert rank(policy.replace(best_mode="max"), [nan, high, low]) == [high, low]


def test_a_pinned_training_path_the_listing_does_not_show_is_the_oldest_candidate() -> None:
    pinned = synthetic(TinkerPath.parse("tinker://run-a/weights/0001"))
    listed = checkpoint("0002", 2)
    assert pinned.restorable and pinned.tinker_path == "tinker://run-a/weights/0001"
    assert rank(RecoveryPolicy(), [pinned, listed]) == [listed, pinned]  # aware times: it sorts, it is oldest


def test_a_pinned_sampler_path_is_skipped_as_not_training_state_before_any_restore() -> None:
    pinned = synthetic(TinkerPath.parse("tinker://run-a/sampler_weights/0002"))
    skipped: list[tuple[str, str]] = []
    rejected: set[str] = set()
    offered = list(walk([pinned], rejected=rejected, now=T0, skip=lambda c, why: skipped.append((c.tinker_path, why))))
    assert offered == []
    assert skipped == [("tinker://run-a/sampler_weights/0002", "not a training checkpoint (sampler)")]
    assert rejected == {"tinker://run-a/sampler_weights/0002"}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_ranks_any_finite_metric_even_at_the_end_of_the_float_range(mode: str) -> None:
    policy = RecoveryPolicy(checkpoint_strategy="best", best_metric="loss", best_mode=mode)
    older, newer = checkpoint("0002", 2, loss="1e308"), checkpoint("0004", 4, loss="1.5e308")
    assert rank(policy, [older, newer]) == ([older, newer] if mode == "min" else [newer, older])
    small, tiny = checkpoint("0002", 2, loss="-1e308"), checkpoint("0004", 4, loss="-1.5e308")
    assert rank(policy, [small, tiny]) == ([tiny, small] if mode == "min" else [small, tiny])


def test_best_without_any_numeric_metric_falls_back_to_the_latest_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = RecoveryPolicy(checkpoint_strategy="best", best_metric="reward", best_mode="max")
    old, new = checkpoint("0002", 2, loss="0.3"), checkpoint("0004", 4, reward="high")
    with caplog.at_level(logging.WARNING, logger="tinkex_recovery"):
        assert rank(policy, [old, new]) == [new, old]
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint_strategy='best': no checkpoint has a numeric 'reward' in its user_metadata; using the latest"
    ]
