"""Live: recovery against the real Tinker service, with one injected corruption (Tinkex's live example, in Python).

    export TINKER_API_KEY=tml-...                 # required
    export TINKER_BASE_URL=...                    # optional: another Tinker, e.g. `tinkex-recovery serve`
    export TINKER_BASE_MODEL=...                  # optional (default: meta-llama/Llama-3.2-1B)
    python examples/recovery_live.py

It creates a small LoRA run, trains one step and saves a real checkpoint. The server is not asked to corrupt
anything: the status source the engine polls wraps the SDK's RestClient and answers exactly one poll with the
real run marked ``corrupted: true``. The engine then restores a new run from that checkpoint through the real
``create_training_client_from_state_with_optimizer``, and the recovered client trains a step and saves a second
checkpoint, proving the restart path. It needs the ``tinker`` extra (``pip install 'tinkex-recovery[tinker]'``)
and costs a few cents of compute.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from tinkex_recovery import LINEAGE_KEYS, RecoveryEngine, RecoveryEvent, RecoveryPolicy

BASE_MODEL = os.environ.get("TINKER_BASE_MODEL", "meta-llama/Llama-3.2-1B")
RANK = 8
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"{time.monotonic() - T0:7.2f}s  {text}", flush=True)


class CorruptOnce:
    """A status source answering exactly one poll, once armed, with the real run marked corrupted."""

    def __init__(self, rest: Any) -> None:
        self._rest = rest
        self._lock = threading.Lock()
        self._armed = False
        self.injected = 0

    def arm(self) -> None:
        with self._lock:
            self._armed = True

    def get_training_run(self, run_id: str) -> Any:
        run = self._rest.get_training_run(run_id).result()
        with self._lock:
            if not self._armed:
                return run
            self._armed = False
            self.injected += 1
        return run.model_copy(update={"corrupted": True})

    def list_checkpoints(self, run_id: str) -> Any:
        return self._rest.list_checkpoints(run_id)


def train_one_step(client: Any, types: Any, tokens: list[int]) -> float:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    output = client.forward_backward([datum], "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    return float(output.metrics.get("loss:sum", float("nan")))


def show(event: RecoveryEvent) -> None:
    details = [f"attempt {event.attempt}" if event.attempt else "", event.checkpoint or "", event.error or ""]
    say(f"event {event.kind.value:<20} {' '.join(d for d in details if d)}")


def main() -> int:
    if not os.environ.get("TINKER_API_KEY"):
        print(
            "recovery_live.py talks to a real Tinker service and needs TINKER_API_KEY (a key starting with 'tml-').\n"
            "  export TINKER_API_KEY=tml-...          # then run it again\n"
            "To rehearse offline instead, start `tinkex-recovery serve` and export what it prints.",
            file=sys.stderr,
        )
        return 2
    try:
        import tinker
        from tinker import types
    except ImportError:
        print("recovery_live.py needs the tinker SDK: pip install 'tinkex-recovery[tinker]'", file=sys.stderr)
        return 2

    service = tinker.ServiceClient()  # TINKER_API_KEY, and TINKER_BASE_URL if set
    status = CorruptOnce(tinker.RestClient())
    policy = RecoveryPolicy(enabled=True, poll_interval=3600, attempt_timeout=900, backoff=5, max_backoff=30)
    try:
        say(f"creating a LoRA run (rank {RANK}) of {BASE_MODEL}")
        client = service.create_lora_training_client(base_model=BASE_MODEL, rank=RANK).result()
        say(f"run {client.model_id}: one training step, loss {train_one_step(client, types, [1, 2, 3, 4, 5]):.4f}")
        first = client.save_state("recovery-live-1", user_metadata={"step": "1"}).result().path
        say(f"saved checkpoint {first}")

        with RecoveryEngine(policy, status=status) as engine:
            engine.subscribe(show)
            handle = engine.watch(client.model_id, service, metadata={"example": "recovery_live"})
            status.arm()
            say("the next poll answers corrupted: true (injected client-side; the server's run is fine)")
            handle.check_now()
            recovery = handle.wait_for_recovery(timeout=policy.max_attempts * (policy.attempt_timeout + 60))

        if status.injected != 1 or recovery.checkpoint.tinker_path != first:
            say(f"unexpected: {status.injected} injection(s), restored from {recovery.checkpoint.tinker_path}")
            return 1
        say(
            f"recovered: run {recovery.old_run_id} -> {recovery.new_run_id} from {recovery.checkpoint.tinker_path} "
            f"in {recovery.seconds:.2f}s ({recovery.attempts} attempt(s))"
        )
        recovered = recovery.client
        say(f"recovered run: one training step, loss {train_one_step(recovered, types, [5, 4, 3, 2, 1]):.4f}")
        second = recovered.save_state("recovery-live-2", user_metadata={"step": "2"}).result().path
        say(f"saved checkpoint {second}")
        run = tinker.RestClient().get_training_run(recovery.new_run_id).result()
        lineage = (run.user_metadata or {}).get(LINEAGE_KEYS[0])
        say(f"the new run records it was recovered from {lineage}")
        ok = lineage == recovery.old_run_id and second.startswith(f"tinker://{recovery.new_run_id}/")
        print(f"restart path proven: {ok}", flush=True)
        return 0 if ok else 1
    finally:
        service.close("success").result()


if __name__ == "__main__":
    sys.exit(main())
