"""OpenTelemetry metrics from every recovery engine in the process, the instrumentor way::

    from tinkex_recovery.integrations.opentelemetry import RecoveryInstrumentor

    RecoveryInstrumentor().instrument()  # the global MeterProvider, or instrument(meter_provider=...)

From then on, until :meth:`RecoveryInstrumentor.uninstrument`, every engine records, including the private
ones inside ``recovery_guard`` and Lightning's ``TinkexRecovery``; the training loop needs no metrics code.

=====================================  ==============  =====  ==================================================
Metric                                 Instrument      Unit   Attributes, meaning
=====================================  ==============  =====  ==================================================
``tinkex_recovery.recoveries``         Counter                ``outcome``: ``completed`` / ``exhausted``; an
                                                              exhausted one has ``reason`` (``attempts``, ...)
``tinkex_recovery.recovery.duration``  Histogram       s      from detection to the new run's client in hand
``tinkex_recovery.restore.attempts``   Counter                ``result``: ``ok`` / ``error``: restore calls made
                                                              (not an attempt that ended before its restore
                                                              call, nor observe mode, nor a budget refusal)
``tinkex_recovery.polls``              Counter                ``result``: ``ok`` (answered) / ``error``
``tinkex_recovery.steps_lost``         Histogram              ``integration``: ``guard`` / ``lightning``;
                                                              steps trained again after a recovery
``tinkex_recovery.watched_runs``       UpDownCounter          runs the open engines watch (observed when read)
=====================================  ==============  =====  ==================================================

Run ids are never attributes: a fleet has unbounded numbers of them. Only ``opentelemetry-api`` is needed
(``pip install 'tinkex-recovery[otel]'``); the application chooses the SDK and the exporter. Nothing else in
tinkex-recovery imports OpenTelemetry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import ClassVar, Self

from tinkex_recovery import EventKind, RecoveryEvent, __version__
from tinkex_recovery._integration import RecoveryObserver, add_observer, watched_run_count

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
except ImportError as exc:
    raise ImportError(
        "tinkex_recovery.integrations.opentelemetry needs OpenTelemetry: pip install 'tinkex-recovery[otel]'"
    ) from exc

__all__ = ["METER_NAME", "RecoveryInstrumentor"]

logger = logging.getLogger("tinkex_recovery")

METER_NAME = "tinkex_recovery"
"""The instrumentation scope (meter) name the metrics are recorded under."""

_DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_STEPS_BUCKETS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)

_COMPLETED = {"outcome": "completed"}
_EXHAUSTED = {"outcome": "exhausted"}
_OK = {"result": "ok"}
_ERROR = {"result": "error"}


class _Recorder(RecoveryObserver):
    """Turns what the engines report into measurements on one meter."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.active = True
        self._restoring: set[str] = set()  # runs whose attempt selected a checkpoint: a restore call follows
        self._recoveries = meter.create_counter(
            "tinkex_recovery.recoveries", unit="{recovery}", description="Recoveries that ended, by outcome."
        )
        self._duration = meter.create_histogram(
            "tinkex_recovery.recovery.duration",
            unit="s",
            description="Time from detecting a corrupted run to holding the restored run's client.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._attempts = meter.create_counter(
            "tinkex_recovery.restore.attempts", unit="{attempt}", description="Restore attempts, by result."
        )
        self._polls = meter.create_counter(
            "tinkex_recovery.polls", unit="{poll}", description="Polls of watched runs, by result."
        )
        self._steps_lost = meter.create_histogram(
            "tinkex_recovery.steps_lost",
            unit="{step}",
            description="Steps trained again after a recovery (completed after the restored checkpoint).",
            explicit_bucket_boundaries_advisory=_STEPS_BUCKETS,
        )
        meter.create_observable_up_down_counter(
            "tinkex_recovery.watched_runs",
            callbacks=[self._observe_watched],
            unit="{run}",
            description="Runs watched by the open recovery engines of the process.",
        )

    def on_event(self, event: RecoveryEvent) -> None:
        kind = event.kind
        if kind is EventKind.COMPLETED:
            self._recoveries.add(1, _COMPLETED)
            if event.since_detected is not None:
                self._duration.record(event.since_detected)
        elif kind is EventKind.EXHAUSTED:
            self._recoveries.add(1, {**_EXHAUSTED, "reason": event.reason} if event.reason else _EXHAUSTED)
        elif kind is EventKind.CHECKPOINT_SELECTED:
            if event.attempt:  # observe mode reports a selection with no attempt: it restores nothing
                self._restoring.add(event.run_id)
        elif kind is EventKind.CLIENT_CREATED:
            self._restoring.discard(event.run_id)
            self._attempts.add(1, _OK)
        elif kind is EventKind.FAILED and event.run_id in self._restoring:  # the restore call itself failed
            self._restoring.discard(event.run_id)
            self._attempts.add(1, _ERROR)
        if kind is EventKind.EXHAUSTED or kind is EventKind.COMPLETED:
            self._restoring.discard(event.run_id)

    def on_poll(self, ok: bool) -> None:
        self._polls.add(1, _OK if ok else _ERROR)

    def on_steps_lost(self, steps: int, integration: str) -> None:
        self._steps_lost.record(steps, {"integration": integration})

    def _observe_watched(self, options: CallbackOptions) -> Iterable[Observation]:
        # OpenTelemetry cannot unregister a callback: after uninstrument() it reports nothing (until the same
        # meter is instrumented again, which reuses this recorder and its instruments).
        return [Observation(watched_run_count())] if self.active else []


class RecoveryInstrumentor:
    """Records OpenTelemetry metrics from every :class:`~tinkex_recovery.RecoveryEngine` of the process.

    As OpenTelemetry's instrumentors, it is one object per process: ``RecoveryInstrumentor()`` always returns
    the same instance, so any part of the program can ``uninstrument()`` it. Instrumenting twice logs a
    warning and changes nothing; uninstrumenting when not instrumented does nothing.
    """

    _instance: ClassVar[RecoveryInstrumentor | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()
    _lock: threading.Lock
    _recorder: _Recorder | None
    _remove: Callable[[], None]
    #: One recorder per meter, kept: a meter's instruments are made once (OpenTelemetry keeps the first of a
    #: name, and an observable's callback for good), so instrumenting again reuses them, and every metric reports.
    _recorders: dict[int, tuple[metrics.Meter, _Recorder]]

    def __new__(cls) -> Self:
        with cls._instance_lock:
            if cls._instance is None:
                instance = super().__new__(cls)
                instance._lock = threading.Lock()
                instance._recorder = None
                instance._remove = lambda: None
                instance._recorders = {}
                cls._instance = instance
            return cls._instance  # type: ignore[return-value]

    @property
    def is_instrumented_by_opentelemetry(self) -> bool:
        """Whether engines are recording now."""
        return self._recorder is not None

    def instrument(self, *, meter_provider: MeterProvider | None = None) -> None:
        """Start recording, on ``meter_provider`` (default: the global one, ``metrics.get_meter_provider()``)."""
        with self._lock:
            if self._recorder is not None:
                logger.warning("RecoveryInstrumentor: already instrumented; call uninstrument() first")
                return
            meter = metrics.get_meter(METER_NAME, __version__, meter_provider=meter_provider)
            kept = self._recorders.get(id(meter))
            recorder = kept[1] if kept is not None and kept[0] is meter else _Recorder(meter)
            self._recorders[id(meter)] = (meter, recorder)  # holds the meter: its id is not reused meanwhile
            recorder.active = True
            self._remove = add_observer(recorder)
            self._recorder = recorder

    def uninstrument(self) -> None:
        """Stop recording: no measurement is taken afterwards (what was recorded stays with the provider)."""
        with self._lock:
            recorder, self._recorder = self._recorder, None
            if recorder is None:
                return
            recorder.active = False
            self._remove()
