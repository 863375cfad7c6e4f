"""Lightning: the cost of ``TinkexRecovery`` per batch of a ``Trainer.fit`` while all is well, and of one replay.

A module with no parameters trains each batch on the simulated Tinker (manual optimization, as a remote
client needs) and saves a checkpoint every 10 steps, so the callback's replay buffer fills and is released as
in real use. Each fit is timed from ``on_train_start`` to ``on_train_end`` in CPU time of the training thread;
fits with and without the callback alternate, and the best of each is kept. Beside the difference of fits, the
callback's own per-batch cost is timed inside a fit (``_TimedRecovery``): the CPU time of its wrapper around
``training_step`` minus that of the module's own step, less the same measure of the module's step alone
(``_TimedBare``: what the timing itself charges), plus what its proxy (the ledger's observed client, recording
for replay) adds to the module's own Tinker calls in the fit. That is a paired measure: in the timed fits each
call is made again on a raw client of another run right after (the module's ``twin``), and the proxy's cost is
the difference of the two, less the same difference in fits without the proxy (median of the fits). The replay
figure is the wall time of replaying 10 buffered batches after a loss found by a poll (``_TimedReplay``), median
over several recoveries.
``ledger_bytes_per_buffered_batch`` is what the callback holds per kept batch (batches of 8 items): the
containers of its record (references), never the items.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from tinkex_recovery import RecoveryPolicy
from tinkex_recovery.integrations.lightning import TinkexRecovery
from tinkex_recovery.simulated import SimulatedTinker

SAVE_EVERY = 10


class RemoteModule(pl.LightningModule):
    """Zero local parameters; every batch is a forward_backward and an optim_step on the Tinker client, and a
    checkpoint every ``save_every`` steps. ``own_ns`` is the training-thread CPU time of its own steps. With a
    ``twin`` (a raw client of another run), each call is made on the twin too, right after, and the two are timed
    apart: ``calls_ns`` is the time of the module's own calls (through the callback's proxy when the callback is
    there), ``twin_ns`` that of the same calls on the raw twin, under the same conditions of the same fit."""

    def __init__(
        self,
        sim: SimulatedTinker,
        save_every: int = SAVE_EVERY,
        lose_after: frozenset[int] = frozenset(),
        twin: bool = False,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.service_client = sim
        self.training_client: Any = sim.create_lora_training_client(base_model="bench/model")
        self.twin = sim.create_lora_training_client(base_model="bench/model") if twin else None
        self.save_every = save_every
        self.lose_after = set(lose_after)  # batch indices after which the run is lost (once each)
        self.cb: TinkexRecovery | None = None
        # own, calls, twin: a list, as setting a module's attribute costs ~1.4 µs (torch's __setattr__)
        self._ns = [0, 0, 0]

    @property
    def own_ns(self) -> int:
        return self._ns[0]

    @property
    def calls_ns(self) -> int:
        return self._ns[1]

    @property
    def twin_ns(self) -> int:
        return self._ns[2]

    def training_step(self, batch: list[int], batch_idx: int) -> None:
        clock, ns, twin = time.thread_time_ns, self._ns, self.twin
        start = clock()
        client = self.training_client
        if twin is None:
            client.forward_backward(batch, "cross_entropy").result()
            client.optim_step().result()
        else:  # each call, then the same on the twin, each timed: a clock read falls half on either side
            client.forward_backward(batch, "cross_entropy").result()
            t1 = clock()
            twin.forward_backward(batch, "cross_entropy").result()
            t2 = clock()
            client.optim_step().result()
            t3 = clock()
            twin.optim_step().result()
            t4 = clock()
            ns[1] += t1 - start + t3 - t2
            ns[2] += t2 - t1 + t4 - t3
        self.optimizers().step()  # advances global_step
        if self.global_step % self.save_every == 0:
            name, metadata = f"step-{self.global_step:06d}", {"step": str(self.global_step)}
            if twin is None:
                client.save_state(name, user_metadata=metadata).result()
            else:
                t0 = clock()
                client.save_state(name, user_metadata=metadata).result()
                t1 = clock()
                twin.save_state(name, user_metadata=metadata).result()
                ns[1] += t1 - t0
                ns[2] += clock() - t1
        ns[0] += clock() - start
        if batch_idx in self.lose_after:
            self.lose_after.discard(batch_idx)
            self.service_client.corrupt(client.model_id)
            assert self.cb is not None and self.cb.handle is not None
            self.cb.handle.check_now()  # the poll that finds it (the background poller is an hour away)

    def configure_optimizers(self) -> None:
        return None


class _Timer(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.thread_time_ns()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.elapsed = time.thread_time_ns() - self.start


def _timed(counter: Any, step: Any) -> Any:
    """``step`` with the training-thread CPU time of each call added to ``counter.outer_ns``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time_ns()
        try:
            return step(*args, **kwargs)
        finally:
            counter.outer_ns += time.thread_time_ns() - start

    return timed


class _TimedRecovery(TinkexRecovery):
    """TinkexRecovery with the training-thread CPU time of its ``training_step`` wrapper counted: its own cost per
    batch (the wrapper's time less the module's), free of the fit-to-fit noise of the difference of two fits."""

    outer_ns = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._wrapper = pl_module.training_step
        pl_module.training_step = _timed(self, self._wrapper)  # type: ignore[method-assign]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.training_step = self._wrapper  # type: ignore[method-assign]  # so the callback can undo its own
        super().teardown(trainer, pl_module, stage)


class _TimedBare(pl.Callback):
    """The same timing around the module's own ``training_step``, no callback's wrapper between: what the timing
    itself charges a wrapper (its frame, the timer's calls, the module's frame outside its own clock)."""

    outer_ns = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.training_step = _timed(self, pl_module.training_step)  # type: ignore[method-assign]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        del pl_module.training_step


class _TimedReplay(TinkexRecovery):
    """TinkexRecovery with the wall time of each recovery's replay recorded (the Replayer's ``_recover``: swap,
    replay of the kept batches)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replays: list[tuple[float, int]] = []  # (seconds, batches replayed)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        assert self._lane is not None
        replayer = self._lane.replayer
        recover = replayer._recover

        def timed(*args: Any, **kwargs: Any) -> None:
            start, before = time.perf_counter(), [k.index for k in replayer.kept]
            recover(*args, **kwargs)
            resume = self._lineage[-1]["resume_step"] if self._lineage else None
            replayed = sum(1 for i in before if resume is not None and i >= resume)
            self.replays.append((time.perf_counter() - start, replayed))

        replayer._recover = timed  # type: ignore[method-assign]


class _Measured(TinkexRecovery):
    """TinkexRecovery that measures, at the end of the training, what its kept batches cost: the bytes of the
    containers the Replayer holds per kept batch (the Kept record, the argument tuple, dict and list copies),
    the batches' items themselves (the DataLoader's) excluded: the buffer holds references, never copies."""

    bytes_per_batch = 0.0
    batches = 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._lane is not None
        replayer = self._lane.replayer
        kept = list(replayer.kept)
        self.batches = len(kept)
        self.bytes_per_batch = sum(_container_bytes(k) for k in kept) / max(len(kept), 1)
        super().on_train_end(trainer, pl_module)


def _container_bytes(kept: Any) -> int:
    """sys.getsizeof of ``kept`` and every list, tuple and dict it holds, recursively (not of their other items)."""
    seen: set[int] = set()

    def size(obj: Any) -> int:
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        total = sys.getsizeof(obj)
        if isinstance(obj, list | tuple):
            total += sum(size(v) for v in obj if isinstance(v, list | tuple | dict))
        elif isinstance(obj, dict):
            total += sum(size(v) for v in obj.values() if isinstance(v, list | tuple | dict))
        return total

    return size(kept) + size(kept.args) + size(kept.kwargs) + size(kept.tapes)


def _ledger_bytes(policy: RecoveryPolicy) -> tuple[float, int]:
    """Bytes per kept batch in a fit of batches of 8 items that saves no checkpoint (every batch stays kept)."""
    sim = SimulatedTinker()
    module = RemoteModule(sim, save_every=10**9)
    cb = module.cb = _Measured(policy)
    loader = DataLoader(list(range(8 * 200)), batch_size=8, collate_fn=list)
    _trainer([cb]).fit(module, loader)
    return cb.bytes_per_batch, cb.batches


class _Noop(pl.Callback):
    """A callback that does nothing: what Lightning itself charges for one more callback."""


def _trainer(callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def _fit(batches: int, extra: pl.Callback | None, twin: bool = False) -> tuple[float, RemoteModule]:
    """Microseconds of training-thread CPU per batch, and the module."""
    timer = _Timer()
    trainer = _trainer([timer] if extra is None else [timer, extra])
    loader = DataLoader(list(range(batches)), batch_size=1, collate_fn=list)
    module = RemoteModule(SimulatedTinker(), twin=twin)
    trainer.fit(module, loader)
    return timer.elapsed / batches / 1e3, module


def _replay_seconds(policy: RecoveryPolicy, fits: int) -> list[float]:
    """Wall time of each replay of 10 buffered batches: with a checkpoint every 20 steps, the run is lost 10
    batches after one, 4 times a fit."""
    batches, save_every, replayed = 100, 20, 10
    lose_after = frozenset(range(save_every + replayed - 1, batches - 1, save_every))  # 29, 49, 69, 89
    seconds: list[float] = []
    for _ in range(fits):
        sim = SimulatedTinker()
        module = RemoteModule(sim, save_every=save_every, lose_after=lose_after)
        cb = module.cb = _TimedReplay(policy)
        trainer = _trainer([cb])
        trainer.fit(module, DataLoader(list(range(batches)), batch_size=1, collate_fn=list))
        assert sim.lineage(module.training_client.model_id) == list(range(batches)), "not exactly once"
        assert trainer.global_step == batches and [n for _, n in cb.replays] == [replayed] * len(lose_after)
        seconds += [s for s, _ in cb.replays]
    return seconds


def bench(quick: bool) -> dict[str, float]:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("tinkex_recovery").setLevel(logging.ERROR)  # the replays log each recovery
    warnings.filterwarnings("ignore", module="lightning")  # no optimizer, few DataLoader workers: on purpose
    policy = RecoveryPolicy(enabled=True, poll_interval=3600.0)
    variants = {
        "bare": lambda: None,
        "noop": _Noop,
        "recovery": lambda: TinkexRecovery(policy),
        "timed": lambda: _TimedRecovery(policy),
        "timed_bare": _TimedBare,
    }
    batches, repeats = (1000, 10) if quick else (2000, 15)
    for make in variants.values():
        _fit(50, make())  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    # The timed fits (their module has a twin): µs per batch the timing counts outside the module's own step, and
    # the module's calls less the same calls on its raw twin in the same batches
    outside: dict[str, list[float]] = {"timed": [], "timed_bare": []}
    proxied: dict[str, list[float]] = {"timed": [], "timed_bare": []}
    for _ in range(repeats):
        for name, make in variants.items():
            callback = make()
            per_batch, module = _fit(batches, callback, twin=name in outside)
            times[name].append(per_batch)
            if name in outside:
                outside[name].append((callback.outer_ns - module.own_ns) / batches / 1e3)  # type: ignore[union-attr]
                proxied[name].append((module.calls_ns - module.twin_ns) / batches / 1e3)
    best = {name: min(values) for name, values in times.items()}
    # The wrapper: what the timing counts outside the module's own step with the callback, less with no wrapper at
    # all (best fit of each). The proxy: what it adds to the module's calls over the raw twin's, less the same
    # difference with no proxy (the order of the calls' own), median of the fits: a paired difference
    wrapper = min(outside["timed"]) - min(outside["timed_bare"])
    observed = statistics.median(proxied["timed"]) - statistics.median(proxied["timed_bare"])
    replays = _replay_seconds(policy, 3 if quick else 8)
    ledger_bytes, kept = _ledger_bytes(policy)
    assert kept == 200, kept
    return {
        "ledger_bytes_per_buffered_batch": ledger_bytes,
        "lightning_bare_us_per_batch": best["bare"],
        "lightning_noop_callback_us_per_batch": best["noop"] - best["bare"],
        "lightning_overhead_us_per_batch": best["recovery"] - best["bare"],
        "lightning_hook_us_per_batch": wrapper + observed,
        "lightning_wrapper_us_per_batch": wrapper,
        "lightning_observed_calls_us_per_batch": observed,
        "lightning_replay_seconds_per_recovery": statistics.median(replays),
        "lightning_replay_samples": float(len(replays)),
    }
