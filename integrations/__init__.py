"""Framework wrappers over the core engine, shipped as ``tinkex_recovery.integrations``.

``recovery_guard`` is for plain training loops and asyncio ones; ``lightning.TinkexRecovery`` is a Lightning callback
(needs the ``lightning`` extra, imported only when used); ``opentelemetry.RecoveryInstrumentor`` records
OpenTelemetry metrics from every engine of the process (needs the ``otel`` extra, imported only when used).
"""

from ._guard import GuardRecovery, RecoveryGuard, Steps, recovery_guard
from ._rollouts import WeightsVersion
from ._steps import Step

__all__ = ["GuardRecovery", "RecoveryGuard", "Step", "Steps", "WeightsVersion", "recovery_guard"]
