"""A simulated Tinker for offline examples and tests: :class:`SimulatedTinker` holds runs in memory."""

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
    "SimulatedAPIError",
    "SimulatedRequestFailedError",
    "SimulatedRestClient",
    "SimulatedTinker",
    "SimulatedTrainingClient",
]
