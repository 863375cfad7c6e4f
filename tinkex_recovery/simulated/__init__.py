"""A simulated Tinker for offline examples and tests: :class:`SimulatedTinker` holds runs in memory, and
:func:`serve` puts it behind real loopback HTTP."""

from ._server import ServedRequest, SimulatedServer, serve
from ._tinker import (
    ForwardBackwardResult,
    OptimStepResult,
    SaveStateResult,
    SimulatedAPIError,
    SimulatedRequestFailedError,
    SimulatedRestClient,
    SimulatedTinker,
    SimulatedTrainingClient,
)

__all__ = [
    "ForwardBackwardResult",
    "OptimStepResult",
    "SaveStateResult",
    "ServedRequest",
    "SimulatedAPIError",
    "SimulatedRequestFailedError",
    "SimulatedRestClient",
    "SimulatedServer",
    "SimulatedTinker",
    "SimulatedTrainingClient",
    "serve",
]
