"""RecoveryPolicy: defaults, building from config, and errors that name the field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tinkex_recovery import RecoveryPolicy


def test_defaults_match_the_contract() -> None:
    p = RecoveryPolicy()
    assert (p.enabled, p.max_attempts, p.backoff, p.max_backoff, p.jitter) == (False, 3, 5.0, 60.0, 0.2)
    assert (p.poll_interval, p.checkpoint_strategy, p.restore_optimizer, p.attempt_timeout) == (
        30.0,
        "latest",
        True,
        300.0,
    )
    assert p.fallback_depth == 2 and p.on_recovery is None and p.on_failure is None
    assert (p.max_recoveries, p.recovery_window, p.max_no_progress, p.mode) == (10, 3600.0, 3, "recover")


def test_budgets_can_be_turned_off() -> None:
    p = RecoveryPolicy.model_validate({"max_recoveries": None, "max_no_progress": None})
    assert p.max_recoveries is None and p.max_no_progress is None


def test_builds_from_a_json_config() -> None:
    cfg = json.loads('{"enabled": true, "max_attempts": 5, "poll_interval": 10, "checkpoint_strategy": "best"}')
    p = RecoveryPolicy.model_validate(cfg)
    assert p.enabled and p.max_attempts == 5 and p.poll_interval == 10.0 and p.checkpoint_strategy == "best"


def test_is_frozen() -> None:
    with pytest.raises(ValidationError):
        RecoveryPolicy().enabled = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", "many"),
        ("backoff", -1),
        ("jitter", 1.5),
        ("poll_interval", 0),
        ("attempt_timeout", -5),
        ("fallback_depth", -1),
        ("max_recoveries", 0),
        ("max_recoveries", "unlimited"),
        ("recovery_window", 0),
        ("recovery_window", -60),
        ("max_no_progress", 0),
        ("mode", "dry-run"),
        ("checkpoint_strategy", "newest"),
        ("checkpoint_strategy", "tinker://run-1/weights"),
        ("checkpoint_strategy", "tinker://run-1/sampler_weights/0001"),
        ("best_mode", "median"),
        ("enabled", "perhaps"),
    ],
)
def test_invalid_value_raises_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        RecoveryPolicy.model_validate({field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_unknown_field_is_an_error_not_ignored() -> None:
    with pytest.raises(ValidationError, match="poll_intervall"):
        RecoveryPolicy.model_validate({"poll_intervall": 5})


def test_max_backoff_below_backoff_is_rejected() -> None:
    with pytest.raises(ValidationError, match="max_backoff"):
        RecoveryPolicy(backoff=10, max_backoff=1)


def test_specific_path_strategy() -> None:
    p = RecoveryPolicy(checkpoint_strategy="tinker://run-1:train:0/weights/0002")
    assert p.specific_path is not None and p.specific_path.run_id == "run-1:train:0"
    assert RecoveryPolicy().specific_path is None


def test_callbacks_are_accepted_and_kept() -> None:
    seen: list[object] = []
    p = RecoveryPolicy(enabled=True, on_recovery=seen.append, on_failure=seen.append)
    assert p.on_recovery is not None and p.on_failure is not None


def test_replace_derives_a_validated_policy_and_keeps_the_rest() -> None:
    calls: list[object] = []
    base = RecoveryPolicy(enabled=True, backoff=2.0, on_recovery=calls.append)
    derived = base.replace(max_attempts=7, mode="observe")
    assert (derived.max_attempts, derived.mode, derived.backoff, derived.on_recovery) == (
        7,
        "observe",
        2.0,
        calls.append,
    )
    assert base.max_attempts == 3  # frozen: the original is unchanged
    with pytest.raises(ValidationError, match="max_attempts"):
        base.replace(max_attempts=0)
    with pytest.raises(ValidationError, match="max_backoff"):
        base.replace(max_backoff=1.0)  # checked against the kept backoff
    with pytest.raises(ValidationError, match="no_such_field"):
        base.replace(no_such_field=1)
