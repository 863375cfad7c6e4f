"""OpenTelemetry metrics through ``RecoveryInstrumentor``, read with the OpenTelemetry SDK's
``InMemoryMetricReader``: a guarded SDK loop over loopback HTTP and a Lightning fit are recovered with no
metrics code in either, and the figures say what happened. Run ids never appear as attributes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint

from tinkex_recovery import FakeClock, RecoveryEngine, RecoveryPolicy, recovery_guard
from tinkex_recovery.integrations.opentelemetry import METER_NAME, RecoveryInstrumentor
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import run_with_checkpoints
from .sdk_support import ADAM, SdkNet, datum, sdk_service

Figures = dict[tuple[str, tuple[tuple[str, Any], ...]], Any]

POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, attempt_timeout=30)


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    RecoveryInstrumentor().instrument(meter_provider=provider)
    try:
        yield reader
    finally:
        RecoveryInstrumentor().uninstrument()
        provider.shutdown()


def figures(reader: InMemoryMetricReader) -> Figures:
    """{(metric name, sorted attributes): value}; a histogram's value is (count, sum)."""
    out: Figures = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            assert scope.scope.name == METER_NAME
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, tuple(sorted((point.attributes or {}).items())))
                    if isinstance(point, HistogramDataPoint):
                        out[key] = (point.count, point.sum)
                    else:
                        assert isinstance(point, NumberDataPoint)
                        out[key] = point.value
    return out


def attribute_values(found: Figures) -> set[Any]:
    return {value for _, attributes in found for _, value in attributes}


# -- a guarded loop on the real SDK, over loopback HTTP ------------------------------------------------------
@pytest.fixture(scope="module")
def net() -> Iterator[SdkNet]:
    with sdk_service(SimulatedTinker()) as net:
        yield net


@pytest.mark.sdk
def test_a_guarded_sdk_loop_records_its_recoveries_with_no_metrics_code(
    net: SdkNet, reader: InMemoryMetricReader
) -> None:
    client = net.lora()
    # Lost inside step 7 (5 and 6 are trained again from the checkpoint at 5), and after step 12 (10 to 12 are).
    pending = {(7, "mid"), (12, "after")}
    watched_during: list[Any] = []

    # The loop is the user's, unchanged: nothing in it knows about metrics.
    with recovery_guard(client.model_id, net.service, policy=POLICY, client=client) as guard:
        for step in guard.steps(range(15)):
            with step:
                guard.client.forward_backward([datum(step.index)], "cross_entropy").result()
                if (step.index, "mid") in pending:
                    pending.discard((step.index, "mid"))
                    net.sim.corrupt(guard.run_id)
                guard.client.optim_step(ADAM).result()
                if (step.index + 1) % 5 == 0:
                    guard.save_state(f"step-{step.index + 1:04d}", step=step.index + 1)
                if (step.index, "after") in pending:
                    pending.discard((step.index, "after"))
                    net.sim.corrupt(guard.run_id)
            if step.index == 3:  # the test looks, once, while the guard's engine watches
                watched_during.append(figures(reader)[("tinkex_recovery.watched_runs", ())])

    assert not pending and [r.steps_lost for r in guard.recoveries] == [2, 3]
    found = figures(reader)
    durations = found.pop(("tinkex_recovery.recovery.duration", ()))
    assert durations[0] == 2 and durations[1] == pytest.approx(sum(r.seconds for r in guard.recoveries))
    assert found == {
        ("tinkex_recovery.recoveries", (("outcome", "completed"),)): 2,
        ("tinkex_recovery.restore.attempts", (("result", "ok"),)): 2,
        # Each failed step polled at once (found corrupted), and the end of the steps polls once more.
        ("tinkex_recovery.polls", (("result", "ok"),)): 3,
        ("tinkex_recovery.steps_lost", (("integration", "guard"),)): (2, 5),
        ("tinkex_recovery.watched_runs", ()): 0,  # the guard's engine closed with the loop
    }
    assert watched_during == [1]
    run_ids = {client.model_id, *(r.new_run_id for r in guard.recoveries)}
    assert not run_ids & attribute_values(found)


# -- a Lightning fit ------------------------------------------------------------------------------------------
@pytest.mark.lightning
@pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers")
def test_a_lightning_fit_records_its_recoveries_with_no_metrics_code(
    tmp_path: Path, sim: SimulatedTinker, clock: FakeClock, reader: InMemoryMetricReader
) -> None:
    from tinkex_recovery.integrations.lightning import TinkexRecovery

    from .test_lightning import RemoteModule, corrupt, corrupt_and_poll, loader, make_trainer

    # Lost after batch 2 (found by a poll), and inside batch 5 (found by the failing call): as in test_lightning.
    module = RemoteModule(sim, mid={5: corrupt}, after={2: corrupt_and_poll})
    cb = TinkexRecovery(RecoveryPolicy(enabled=True), clock=clock)
    module.cb = cb
    make_trainer(tmp_path, cb).fit(module, loader(8))

    assert [r["steps_lost"] for r in cb.lineage] == [1, 1]
    found = figures(reader)
    assert found == {
        ("tinkex_recovery.recoveries", (("outcome", "completed"),)): 2,
        ("tinkex_recovery.recovery.duration", ()): (2, 0.0),  # the engine's FakeClock never moved
        ("tinkex_recovery.restore.attempts", (("result", "ok"),)): 2,
        # the two checks that found the run corrupted, and the callback's check of the run when the training ends
        ("tinkex_recovery.polls", (("result", "ok"),)): 3,
        ("tinkex_recovery.steps_lost", (("integration", "lightning"),)): (2, 2),
        ("tinkex_recovery.watched_runs", ()): 0,
    }


# -- failures, exhaustion, the instrumentor's life ------------------------------------------------------------
def test_failed_polls_failed_attempts_and_exhaustion_are_counted(
    sim: SimulatedTinker, clock: FakeClock, reader: InMemoryMetricReader
) -> None:
    client = sim.create_lora_training_client(base_model="Qwen/Qwen3-8B")
    client.save_state("0001", user_metadata={"step": "1"}).result()
    sim.fail_restores(5)  # every attempt fails: the recovery gives up
    with RecoveryEngine(POLICY.model_copy(update={"max_attempts": 2}), clock=clock) as engine:
        handle = engine.watch(client.model_id, sim)
        sim.fail_polls(1)
        engine.poll_once()
        sim.corrupt(client.model_id)
        engine.poll_once()
        with pytest.raises(Exception, match="simulated restore failure"):
            handle.wait_for_recovery(timeout=10)
        assert figures(reader)[("tinkex_recovery.watched_runs", ())] == 1
    found = figures(reader)
    assert found == {
        ("tinkex_recovery.recoveries", (("outcome", "exhausted"), ("reason", "attempts"))): 1,
        ("tinkex_recovery.restore.attempts", (("result", "error"),)): 2,
        ("tinkex_recovery.polls", (("result", "error"),)): 1,
        ("tinkex_recovery.polls", (("result", "ok"),)): 1,
        ("tinkex_recovery.watched_runs", ()): 0,
    }


def test_uninstrument_stops_recording_and_instrument_is_idempotent(
    sim: SimulatedTinker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    instrumentor = RecoveryInstrumentor()
    assert RecoveryInstrumentor() is instrumentor and not instrumentor.is_instrumented_by_opentelemetry
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    client = run_with_checkpoints(sim)
    try:
        with RecoveryEngine(POLICY, clock=clock) as engine:  # an engine that existed before instrument()
            engine.watch(client.model_id, sim)
            instrumentor.instrument(meter_provider=provider)
            instrumentor.instrument(meter_provider=provider)  # a second call changes nothing
            assert "already instrumented" in caplog.text
            engine.poll_once()
            assert figures(reader)[("tinkex_recovery.polls", (("result", "ok"),))] == 1
            instrumentor.uninstrument()
            instrumentor.uninstrument()  # a no-op
            engine.poll_once()
            found = figures(reader)
            assert found[("tinkex_recovery.polls", (("result", "ok"),))] == 1  # the second poll was not recorded
            assert ("tinkex_recovery.watched_runs", ()) not in found
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


def test_without_opentelemetry_the_module_names_the_extra_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "try:\n"
        "    import tinkex_recovery.integrations.opentelemetry\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'tinkex-recovery[otel]'" in out.stdout


def test_restore_attempts_count_restore_calls_only(
    sim: SimulatedTinker, clock: FakeClock, reader: InMemoryMetricReader
) -> None:
    observed = run_with_checkpoints(sim)
    with RecoveryEngine(POLICY.replace(mode="observe"), clock=clock) as engine:  # selects, never restores
        handle = engine.watch(observed.model_id, sim)
        sim.corrupt(observed.model_id)
        engine.poll_once()
        assert handle.observation(timeout=10) is not None
    bare = sim.create_lora_training_client(base_model="m")  # no checkpoint: failed, exhausted, no restore call
    with RecoveryEngine(POLICY, clock=clock) as engine:
        handle = engine.watch(bare.model_id, sim)
        sim.corrupt(bare.model_id)
        engine.poll_once()
        with pytest.raises(Exception, match="checkpoint"):
            handle.wait_for_recovery(timeout=10)
    found = figures(reader)
    assert sim.restore_calls == []
    assert not [key for key in found if key[0] == "tinkex_recovery.restore.attempts"], found
    assert found[("tinkex_recovery.recoveries", (("outcome", "exhausted"), ("reason", "checkpoints")))] == 1


def test_instrument_after_uninstrument_reports_every_metric(sim: SimulatedTinker, clock: FakeClock) -> None:
    instrumentor = RecoveryInstrumentor()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    client = run_with_checkpoints(sim)
    try:
        instrumentor.instrument(meter_provider=provider)
        instrumentor.uninstrument()
        instrumentor.instrument(meter_provider=provider)
        with RecoveryEngine(POLICY, clock=clock) as engine:
            handle = engine.watch(client.model_id, sim)
            sim.corrupt(client.model_id)
            engine.poll_once()
            handle.wait_for_recovery(timeout=10)
            found = figures(reader)
        assert found[("tinkex_recovery.watched_runs", ())] == 1
        assert found[("tinkex_recovery.polls", (("result", "ok"),))] == 1
        assert found[("tinkex_recovery.restore.attempts", (("result", "ok"),))] == 1
        assert found[("tinkex_recovery.recoveries", (("outcome", "completed"),))] == 1
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
