from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tinkex_recovery.integrations.opentelemetry import RecoveryInstrumentor
from tinkex_recovery.simulated import SimulatedTinker

reader = InMemoryMetricReader()  # in production: a Prometheus or OTLP reader
instrumentor = RecoveryInstrumentor()
instrumentor.instrument(meter_provider=MeterProvider(metric_readers=[reader]))  # once, at start-up

from tinkex_recovery import recovery_guard  # noqa: E402  (any engine made from now on records)

service = SimulatedTinker()  # offline; a tinker.ServiceClient records the same
client = service.create_lora_training_client(base_model="Qwen/Qwen3-8B")
with recovery_guard(client.model_id, service, client=client) as guard:
    for step in guard.steps(range(10)):
        with step:
            guard.client.forward_backward([step.index], "cross_entropy").result()
            if step.index == 4:
                guard.save_state("step-000005", step=5)
            if step.index == 7 and not guard.recoveries:
                service.corrupt(guard.run_id)  # the next call fails: the guard recovers from step 5

data = reader.get_metrics_data()
names = sorted({m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics})
print(" ".join(names))
instrumentor.uninstrument()
