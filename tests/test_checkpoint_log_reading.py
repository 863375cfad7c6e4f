"""The tinker-cookbook ``checkpoints.jsonl`` as the guard writes and reads it: the log directory is created however
deep, and reading a state path's step takes the last good record of that path only, whatever else the file holds
(other paths, blank lines, a torn line anywhere, JSON that is not a record, a batch that is not a step), and says
in the log which line it skipped. Also: a step's repr says whether it is a resumed one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tinkex_recovery.integrations._checkpoint_log import CHECKPOINTS_FILE, CheckpointLog
from tinkex_recovery.integrations._steps import Step

A = "tinker://run-a/weights/0010"
B = "tinker://run-b/weights/0020"


def write(tmp_path: Path, *lines: str) -> CheckpointLog:
    (tmp_path / CHECKPOINTS_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return CheckpointLog(tmp_path)


def record(state_path: str, batch: object, name: str = "x") -> str:
    return json.dumps({"name": name, "batch": batch, "state_path": state_path})


def test_the_log_directory_is_created_however_deep_and_read_back(tmp_path: Path) -> None:
    log = CheckpointLog(tmp_path / "runs" / "exp-1" / "seed-0")
    log.append("000010", 10, A, {"loss": 0.5})
    assert log.step_of(A) == 10
    assert json.loads(log.path.read_text(encoding="utf-8")) == {
        "name": "000010",
        "batch": 10,
        "loss": 0.5,
        "state_path": A,
    }


def test_the_step_of_a_path_is_the_batch_of_its_last_record_and_other_paths_do_not_count(tmp_path: Path) -> None:
    log = write(tmp_path, record(A, 5), record(B, 20), record(A, 10), record(B, 30))
    assert (log.step_of(A), log.step_of(B)) == (10, 30)
    assert log.step_of("tinker://run-c/weights/0001") is None


def test_a_record_at_batch_zero_resumes_at_the_start(tmp_path: Path) -> None:
    assert write(tmp_path, record(A, 0)).step_of(A) == 0


@pytest.mark.parametrize("batch", [-1, True, "12", 3.0, None])
def test_a_batch_that_is_not_a_step_is_ignored(tmp_path: Path, batch: object) -> None:
    log = write(tmp_path, record(A, 7), record(A, batch))
    assert log.step_of(A) == 7


def test_blank_lines_and_json_that_is_not_a_record_hide_nothing_after_them(tmp_path: Path) -> None:
    log = write(tmp_path, record(A, 1), "", "   ", "[1, 2]", '"text"', "42", record(A, 9))
    assert log.step_of(A) == 9


def test_a_torn_line_anywhere_is_skipped_and_named_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = write(tmp_path, record(A, 1), '{"name": "x", "batch": 4, "sta', record(A, 6))
    with caplog.at_level(logging.WARNING, logger="tinkex_recovery"):
        assert log.step_of(A) == 6
    assert [r.getMessage() for r in caplog.records] == [f"{log.path} line 2 is not JSON; skipped"]


def test_a_steps_repr_says_its_index_and_whether_it_was_resumed() -> None:
    def judge(*_: object) -> None:
        return None

    assert repr(Step(judge, 3)) == "<Step index=3>"
    assert repr(Step(judge, 10, resumed=True)) == "<Step index=10 resumed>"
