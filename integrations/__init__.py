"""Framework wrappers over the core engine, shipped as ``tinkex_recovery.integrations``.

``recovery_guard`` is for plain training loops; ``lightning.TinkexRecovery`` is a Lightning callback
(needs the ``lightning`` extra, imported only when used).
"""

__all__: list[str] = []
