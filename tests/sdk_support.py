"""Shared pieces of the tests that drive the official ``tinker`` SDK (pinned: 0.38.0) against the loopback server.

The SDK keeps one event-loop thread for the life of the process, and ``ServiceClient.close()`` does not stop
it. :func:`sdk_service` starts that thread before a module's first test (so no test is blamed for it) and
:func:`stop_sdk_threads` stops it after the module, through private SDK state read from tinker 0.38.0's source.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import tinker
from tinker import types

from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve

from .http_support import KEY

#: The SDK version these tests, and the private state :func:`stop_sdk_threads` touches, were written against.
PINNED = "0.38.0"
BASE_MODEL = "Qwen/Qwen3-8B"


@dataclass
class SdkNet:
    """A simulated Tinker behind a loopback server, a real ServiceClient on it and a real RestClient."""

    sim: SimulatedTinker
    server: SimulatedServer
    service: tinker.ServiceClient
    rest: tinker.RestClient
    session_id: str = ""  #: the ServiceClient's session: every run it creates is ``{session_id}:train:{n}``

    def lora(self, **kwargs: Any) -> tinker.TrainingClient:
        return self.service.create_lora_training_client(base_model=BASE_MODEL, **kwargs).result()


def datum(*tokens: int) -> types.Datum:
    """A datum the simulation records as ``tokens`` (its input token ids)."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(tokens)),
        loss_fn_inputs={"target_tokens": [t + 1 for t in tokens], "weights": [1.0] * len(tokens)},
    )


ADAM = types.AdamParams(learning_rate=1e-4)


@contextlib.contextmanager
def sdk_service(sim: SimulatedTinker) -> Iterator[SdkNet]:
    """Serve ``sim``, open a ServiceClient and a RestClient on it (telemetry off), and afterwards close the
    client, stop the server and stop the SDK's threads."""
    assert tinker.__version__ == PINNED, f"these tests are pinned to tinker {PINNED}, found {tinker.__version__}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")  # read as each client starts; telemetry adds ~100 ms to every error
        for name in ("TINKER_BASE_URL", "TINKER_API_KEY", "TINKER_CREDENTIAL_CMD", "TINKER_PROJECT_ID"):
            env.delenv(name, raising=False)
        try:
            with serve(sim, KEY) as server:
                # The SDK's pools open connections as a test needs them; a kept-alive one would hold a server
                # thread past the test that opened it.
                server.keep_alive = False
                service = tinker.ServiceClient(base_url=server.base_url, api_key=KEY)
                try:
                    net = SdkNet(sim, server, service, tinker.RestClient(base_url=server.base_url, api_key=KEY))
                    first = net.lora()  # starts the SDK's event-loop thread now, before any test runs
                    net.session_id = first.model_id.rsplit(":train:", 1)[0]
                    yield net
                finally:
                    service.close("success").result(timeout=30)  # before the server stops: it retries for minutes
        finally:
            assert stop_sdk_threads(), "the tinker SDK's event-loop thread did not stop"


async def _drain(holders: list[Any], timeout: float) -> None:
    for holder in holders:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(holder.aclose(), timeout)
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current]
    if pending:
        await asyncio.wait(pending, timeout=timeout)  # cleanups the holders' __del__ scheduled
    await asyncio.get_running_loop().shutdown_default_executor()  # joins the 'asyncio_N' thread


def stop_sdk_threads(timeout: float = 5.0) -> bool:
    """Stop the SDK's event-loop thread and its executor thread; True if they are gone. Private SDK state of
    tinker 0.38.0: the loop singleton, the cache of session-less holders (``tinker.RestClient(...)``, which the
    SDK never closes) and the custom-loss loop. Call it after every ServiceClient was closed."""
    from tinker.lib import internal_client_holder as holders_module
    from tinker.lib.public_interfaces import training_client as training_module

    singleton = holders_module._internal_client_holder_thread_singleton
    cache = holders_module.sessionless_holder_cache
    with cache._lock:
        holders = list(cache._holders.values())
        cache._holders.clear()
    with holders_module._shadow_holder_singleton._lock:
        holders_module._shadow_holder_singleton._cache.clear()
    stopped = True
    with singleton._lifecycle_lock:
        loop, thread = singleton._loop, singleton._thread
        if loop is not None and thread is not None and thread.is_alive():
            gc.collect()  # unreachable holders schedule their cleanup on this loop as they are collected
            holders += [
                h
                for h in gc.get_objects()
                if type(h) is holders_module.InternalClientHolder and not getattr(h, "_closed", True)
                if h not in holders
            ]  # a ServiceClient a failed test never closed: close its pools (no session finish is sent)
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_drain(holders, timeout), loop).result(timeout * 3)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            stopped = not thread.is_alive()
            if stopped:
                loop.close()
        if stopped:
            singleton._loop = None
            singleton._thread = None
            singleton._started = False
    del holders
    with training_module._custom_loss_loop_lock:
        custom = training_module._custom_loss_loop
        if custom is not None:
            custom.call_soon_threadsafe(custom.stop)
            training_module._custom_loss_loop = None
    return stopped
