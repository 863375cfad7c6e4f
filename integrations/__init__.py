"""Framework wrappers over the core engine, shipped as ``tinkex_recovery.integrations``.

``recovery_guard`` is for plain training loops; ``lightning.TinkexRecovery`` is a Lightning callback
(needs the ``lightning`` extra, imported only when used); ``opentelemetry.RecoveryInstrumentor`` records
OpenTelemetry metrics from every engine of the process (needs the ``otel`` extra, imported only when used).
"""

from ._guard import GuardRecovery, RecoveryGuard, recovery_guard
from ._steps import Step

__all__ = ["GuardRecovery", "RecoveryGuard", "Step", "recovery_guard"]
