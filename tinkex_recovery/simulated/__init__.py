"""A simulated Tinker for offline examples and tests: :class:`SimulatedTinker` holds runs in memory, and
:func:`serve` puts it behind real loopback HTTP that the official ``tinker`` SDK can talk to
(``tinker.ServiceClient(base_url=server.base_url, api_key=...)``). ``python -m tinkex_recovery.simulated``
serves one for your own loop."""

from . import _sdk_routes as _sdk_routes  # registers the tinker SDK's protocol into the server's routes
from . import _sdk_sampling as _sdk_sampling  # and its sampling protocol
from ._sampling import SampledSequence, SampleResult, SaveWeightsForSamplerResult, SimulatedSamplingClient
from ._server import ServedRequest, SimulatedServer, serve
from ._tinker import (
    ForwardBackwardResult,
    OptimStepResult,
    SaveStateResult,
    SimulatedAPIError,
    SimulatedAPIFuture,
    SimulatedRequestFailedError,
    SimulatedRestClient,
    SimulatedTinker,
    SimulatedTrainingClient,
)

__all__ = [
    "ForwardBackwardResult",
    "OptimStepResult",
    "SampleResult",
    "SampledSequence",
    "SaveStateResult",
    "SaveWeightsForSamplerResult",
    "ServedRequest",
    "SimulatedAPIError",
    "SimulatedAPIFuture",
    "SimulatedRequestFailedError",
    "SimulatedRestClient",
    "SimulatedSamplingClient",
    "SimulatedServer",
    "SimulatedTinker",
    "SimulatedTrainingClient",
    "serve",
]
