"""Wire models and tinker paths."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from tinkex_recovery import Checkpoint, CheckpointList, InvalidTinkerPath, TinkerPath, TrainingRun

RUN_JSON = {
    "training_run_id": "ecb5f0a6-8447-58dd-8e58-9457709ed2e6:train:0",
    "base_model": "Qwen/Qwen3-8B",
    "model_owner": "me",
    "is_lora": True,
    "corrupted": True,
    "lora_rank": 32,
    "last_request_time": "2026-11-20T10:00:00Z",
    "last_checkpoint": {
        "checkpoint_id": "weights/0001",
        "checkpoint_type": "training",
        "time": "2026-11-20T09:00:00Z",
        "tinker_path": "tinker://ecb5f0a6-8447-58dd-8e58-9457709ed2e6:train:0/weights/0001",
        "size_bytes": 10,
        "public": False,
        "a_field_from_the_future": 1,
    },
    "user_metadata": {"wandb": "x"},
    "another_new_field": [1, 2],
}


def test_training_run_parses_wire_json_and_ignores_unknown_fields() -> None:
    run = TrainingRun.coerce(RUN_JSON)
    assert run.corrupted and run.last_checkpoint is not None
    assert run.last_checkpoint.path.name == "0001" and run.last_checkpoint.restorable
    assert run.user_metadata == {"wandb": "x"}


def test_coerce_accepts_objects_with_the_same_attributes() -> None:
    ckpt = SimpleNamespace(**{k: v for k, v in RUN_JSON["last_checkpoint"].items()})  # type: ignore[union-attr]
    sdk_like = SimpleNamespace(**{**RUN_JSON, "last_checkpoint": ckpt, "last_sampler_checkpoint": None})
    run = TrainingRun.coerce(sdk_like)
    assert run.last_checkpoint is not None and run.last_checkpoint.checkpoint_id == "weights/0001"


def test_checkpoint_list_accepts_response_or_bare_list() -> None:
    c = RUN_JSON["last_checkpoint"]
    assert len(CheckpointList.coerce({"checkpoints": [c], "cursor": None}).checkpoints) == 1
    assert len(CheckpointList.coerce([c, c]).checkpoints) == 2
    paged = CheckpointList.coerce({"checkpoints": [], "cursor": {"offset": 0, "limit": 1, "total_count": 3}})
    assert paged.cursor is not None and paged.cursor.has_more


@pytest.mark.parametrize(
    ("path", "run_id", "kind", "name"),
    [
        ("tinker://run-1/weights/0001", "run-1", "weights", "0001"),
        ("tinker://a:train:0/sampler_weights/final", "a:train:0", "sampler_weights", "final"),
    ],
)
def test_tinker_path_parses(path: str, run_id: str, kind: str, name: str) -> None:
    p = TinkerPath.parse(path)
    assert (p.run_id, p.kind, p.name, str(p)) == (run_id, kind, name, path)
    assert p.restorable == (kind == "weights")


@pytest.mark.parametrize(
    ("path", "complaint"),
    [
        ("s3://run/weights/1", "must start with"),
        ("tinker://run/weights", "expected"),
        ("tinker://run/weights/a/b", "expected"),
        ("tinker:///weights/1", "empty"),
        ("tinker://run/optimizer/1", "kind must be"),
        ("tinker://run/weights/a b", "whitespace"),
        ("", "must start with"),
    ],
)
def test_malformed_tinker_paths_say_what_is_wrong(path: str, complaint: str) -> None:
    with pytest.raises(InvalidTinkerPath, match=complaint):
        TinkerPath.parse(path)


def test_invalid_tinker_path_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        TinkerPath.parse(None)  # type: ignore[arg-type]


def test_sampler_and_expired_checkpoints() -> None:
    base = RUN_JSON["last_checkpoint"]
    sampler = Checkpoint.coerce({**base, "checkpoint_type": "sampler", "tinker_path": "tinker://r/sampler_weights/1"})  # type: ignore[dict-item]
    assert not sampler.restorable
    expiring = Checkpoint.coerce({**base, "expires_at": "2026-01-01T00:00:00"})  # type: ignore[dict-item]
    assert expiring.expires_at is not None and expiring.expires_at.tzinfo is not None  # naive means UTC
    assert expiring.expired(datetime(2026, 6, 1, tzinfo=UTC))
    assert not expiring.expired(datetime(2025, 6, 1, tzinfo=UTC))
