"""Must show 3: a restarted process resumes at the right step from checkpoint user_metadata alone, and from
a tinker-cookbook checkpoints.jsonl alone.

"Restarted" means a new guard given only the run id (and, for the cookbook case, the log directory): no
client, no state of the first process. The simulated Tinker plays the server both processes talk to.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tinkex_recovery import LINEAGE_KEYS, ExhaustedReason, FakeClock, RecoveryExhausted, RecoveryPolicy, recovery_guard
from tinkex_recovery.integrations import RecoveryGuard
from tinkex_recovery.simulated import SimulatedTinker, SimulatedTrainingClient

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0)
STEPS = 60


class Crash(Exception):
    """The first process dies here."""


def train(client: SimulatedTrainingClient, index: int) -> None:
    client.forward_backward([index], "cross_entropy").result()
    client.optim_step().result()


def first_process_with_the_guard(sim: SimulatedTinker, clock: FakeClock, crash_at: int) -> str:
    """A guarded loop (one recovery on the way) that dies at ``crash_at``; returns its last run id."""
    client = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    with pytest.raises(Crash), recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock) as guard:
        for step in guard.steps(range(STEPS)):
            with step:
                if step.index == 17 and not guard.recoveries:
                    sim.corrupt(guard.run_id)
                if step.index == crash_at:
                    raise Crash
                train(guard.client, step.index)
                if (step.index + 1) % 10 == 0:
                    guard.save_state(f"step-{step.index + 1:06d}", step=step.index + 1, metrics={"loss": 0.5})
    assert len(guard.recoveries) == 1
    return guard.run_id


def first_process_cookbook_style(sim: SimulatedTinker, log_path: Path, crash_at: int) -> str:
    """tinker-cookbook's way: plain save_state (no user_metadata), then a checkpoints.jsonl line."""
    client = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    log = log_path / "checkpoints.jsonl"
    for batch in range(crash_at):
        train(client, batch)
        if (batch + 1) % 10 == 0:
            name = f"{batch + 1:06d}"
            path = client.save_state(name).result().path
            with log.open("a") as f:
                f.write(json.dumps({"name": name, "epoch": 0, "batch": batch + 1, "state_path": path}) + "\n")
                # a sampler-only save shares the file; it has no state_path
                f.write(json.dumps({"name": name, "batch": batch + 1, "sampler_path": path + "-sampler"}) + "\n")
    with log.open("a") as f:
        f.write('{"name": "000040", "batch": 4')  # killed mid-write
    return client.model_id


def second_process(sim: SimulatedTinker, clock: FakeClock, run_id: str, log_path: Path | None = None) -> RecoveryGuard:
    """Resume from nothing but the run id (and the log directory); corrupt the resumed run once before it
    saves anything, so the checkpoint it resumed from is also what it must fall back on."""
    with recovery_guard(run_id, sim, policy=POLICY, clock=clock, log_path=log_path) as guard:
        assert guard.start_step is not None
        for step in guard.steps(range(guard.start_step, STEPS)):
            with step:
                if step.index == guard.start_step + 3 and not guard.recoveries:
                    sim.corrupt(guard.run_id)
                train(guard.client, step.index)
                if (step.index + 1) % 10 == 0:
                    guard.save_state(f"step-{step.index + 1:06d}", step=step.index + 1)
    return guard


def test_a_restarted_process_resumes_from_checkpoint_user_metadata_alone(
    sim: SimulatedTinker, clock: FakeClock
) -> None:
    last_run = first_process_with_the_guard(sim, clock, crash_at=34)

    guard = second_process(sim, clock, last_run)

    assert guard.start_step == 30
    assert (
        guard.resumed_from is not None and guard.resumed_from.tinker_path == f"tinker://{last_run}/weights/step-000030"
    )
    assert guard.recoveries[0].checkpoint == guard.resumed_from  # lost before saving: its own origin restored
    assert sim.lineage(guard.run_id) == list(range(STEPS))


def test_a_restarted_process_resumes_from_a_cookbook_checkpoints_jsonl_alone(
    sim: SimulatedTinker, clock: FakeClock, tmp_path: Path
) -> None:
    run_id = first_process_cookbook_style(sim, tmp_path, crash_at=36)
    assert all(c.user_metadata is None for c in sim.list_checkpoints(run_id).checkpoints)

    guard = second_process(sim, clock, run_id, log_path=tmp_path)

    assert guard.start_step == 30
    assert sim.lineage(guard.run_id) == list(range(STEPS))
    records = [json.loads(line) for line in (tmp_path / "checkpoints.jsonl").read_text().splitlines()[-3:]]
    assert [r["batch"] for r in records] == [40, 50, 60]  # the guard's own saves, same format, same file


def test_without_a_record_of_the_step_there_is_nothing_to_resume_from(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    train(client, 0)
    client.save_state("no-step").result()
    with pytest.raises(RecoveryExhausted, match="no restorable checkpoint") as info:
        recovery_guard(client.model_id, sim, policy=POLICY, clock=clock).__enter__()
    assert info.value.reason is ExhaustedReason.CHECKPOINTS
    empty = sim.create_lora_training_client(base_model="m")
    with pytest.raises(RecoveryExhausted, match="no restorable checkpoint"):
        recovery_guard(empty.model_id, sim, policy=POLICY, clock=clock).__enter__()
    assert len(sim.run_ids) == 2  # nothing was restored


def test_resuming_skips_checkpoints_it_cannot_use(sim: SimulatedTinker, clock: FakeClock, tmp_path: Path) -> None:
    client = sim.create_lora_training_client(base_model="m")
    for i in range(30):
        train(client, i)
        if (i + 1) % 10 == 0:
            client.save_state(f"s{i + 1}", user_metadata={"step": str(i + 1)}).result()
    client.save_state("unknown-step").result()  # newest, but where would the loop start?
    sim.break_checkpoint(f"tinker://{client.model_id}/weights/s30")  # the server rejects it

    with recovery_guard(client.model_id, sim, policy=POLICY, clock=clock) as guard:
        assert guard.start_step == 20
        path = f"tinker://{client.model_id}/weights/s20"
        assert guard.resumed_from is not None and guard.resumed_from.tinker_path == path
        restored_with = sim.restore_calls[-1]
        assert restored_with[:2] == (path, True)
        assert restored_with[2] is not None
        assert restored_with[2][LINEAGE_KEYS[0]] == client.model_id and restored_with[2][LINEAGE_KEYS[1]] == path
        assert sim.lineage(guard.run_id) == list(range(20))


def test_a_disabled_policy_still_resumes_at_entry_but_starts_no_thread(sim: SimulatedTinker, clock: FakeClock) -> None:
    client = sim.create_lora_training_client(base_model="m")
    for i in range(10):
        train(client, i)
    client.save_state("s10", user_metadata={"step": "10"}).result()
    before = threading.active_count()
    with recovery_guard(client.model_id, sim, policy=RecoveryPolicy(enabled=False), clock=clock) as guard:
        assert threading.active_count() == before
        assert guard.start_step == 10 and guard.run_id != client.model_id


def test_a_cookbook_style_loop_recovers_in_process_from_its_checkpoints_jsonl(
    sim: SimulatedTinker, clock: FakeClock, tmp_path: Path
) -> None:
    """The loop keeps saving the cookbook's way; the guard finds the restored checkpoint's step in the log."""
    client = sim.create_lora_training_client(base_model="m")
    ran: list[int] = []
    with recovery_guard(client.model_id, sim, policy=POLICY, client=client, clock=clock, log_path=tmp_path) as guard:
        for step in guard.steps(range(STEPS)):
            with step:
                ran.append(step.index)
                if step.index == 44 and not guard.recoveries:
                    sim.corrupt(guard.run_id)
                train(guard.client, step.index)
                if (step.index + 1) % 10 == 0:
                    name = f"{step.index + 1:06d}"
                    path = guard.client.save_state(name).result().path
                    with (tmp_path / "checkpoints.jsonl").open("a") as f:
                        f.write(json.dumps({"name": name, "batch": step.index + 1, "state_path": path}) + "\n")
    assert guard.recoveries[0].resumed_at == 40
    assert ran == [*range(45), *range(40, STEPS)]
    assert sim.lineage(guard.run_id) == list(range(STEPS))
