"""``tinkex-recovery watch RUN_ID... [--interval S] [--json]``: an observe-only engine over the runs, printing
one line per event as it happens (JSON lines with ``--json``), until Ctrl-C or SIGTERM (exit 0), or until
stdout's reader leaves (``| head -1``: exit 141, silently).

The engine runs with ``RecoveryPolicy(mode="observe")``: it polls, detects and selects the checkpoint it would
restore, and restores nothing. The runs are read once before watching starts (concurrently, as the engine
polls them), so a wrong key or an unknown run is a one-line error (exit 2), not a stream of poll errors.
Status lines go to stderr; stdout holds only events.

Each lineage is followed: while a watched run is corrupted, the account's training-runs listing is read every
interval for the run recovered from it (by the training process's guard or callback, which stamps
``tinkex_recovery.recovered_from_run``); once there, a ``completed`` event names it, and it is watched in turn,
so the next loss of the same job is reported too.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from ._cli_common import EXIT_OK, STEPLESS, add_connection_arguments, closed_pipe, connect, fail, step_of
from ._cli_status import continuing_successor, successors_by_parent
from ._names import LINEAGE_KEYS, validate_run_id
from ._redact import redact

if TYPE_CHECKING:  # imported where used: `watch --help` loads neither pydantic nor httpx
    from ._engine import RecoveryEngine, RunHandle
    from ._events import RecoveryEvent
    from ._models import Checkpoint
    from ._rest import TinkerRest

__all__ = ["add_watch_arguments", "run_watch"]

_MAX_POLL_WORKERS = 16
_MIN_INTERVAL, _MAX_INTERVAL = 0.01, 86400.0  # from a busy loop against Tinker to once a day
_READER_CHECK = 0.5  # seconds between two looks at whether stdout's reader has left


class _NoRestore:
    """The engine's service slot: an observe-only engine never restores, and this makes sure of it."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("tinkex-recovery watch observes only; it never restores a run")

    create_training_client_from_state = create_training_client_from_state_with_optimizer = _refuse


class EventPrinter:
    """Prints each event as one line, from whichever engine thread emits it."""

    def __init__(self, out: TextIO, *, as_json: bool, now: Callable[[], datetime] | None = None) -> None:
        self._out = out
        self._json = as_json
        self._now = now or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        #: set once ``out``'s reader has left (``| head -1``): there is no one left to print for
        self.closed = threading.Event()
        self._stepless: set[str] = set()

    def step_of(self, checkpoint: Checkpoint) -> int:
        """The engine's ``step_of``: every checkpoint stays a candidate (the watch reports what a recovery would
        restore), and those that record no step are remembered, so that a line naming one says a loop could not
        resume from it."""
        step = step_of(checkpoint)
        if step is None:
            self._stepless.add(checkpoint.tinker_path)
        return step or 0

    def __call__(self, event: RecoveryEvent) -> None:
        time = self._now().isoformat(timespec="milliseconds")
        if self._json:
            fields = {k: v for k, v in asdict(event).items() if v is not None and k not in ("kind", "run_id")}
            if event.checkpoint is not None:
                fields["resumable"] = event.checkpoint not in self._stepless
            line = json.dumps({"time": time, "kind": event.kind.value, "run_id": event.run_id, **fields})
        else:
            line = f"{time} {event.message}"
            if event.checkpoint in self._stepless:
                line += f" ({STEPLESS})"
        with self._lock:
            if self.closed.is_set():
                return
            try:
                print(redact(line), file=self._out, flush=True)
            except BrokenPipeError:  # a closed pipe (| head) is not an error, but it ends the watch
                self.closed.set()


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not _MIN_INTERVAL <= value <= _MAX_INTERVAL:  # NaN and inf too: an infinite wait overflows the poller's
        raise argparse.ArgumentTypeError(f"must be between {_MIN_INTERVAL:g} and {_MAX_INTERVAL:g} seconds, got {text}")
    return value


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="the runs to watch")
    parser.add_argument(
        "--interval", type=_positive_seconds, default=30.0, help="seconds between two polls (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines (each has kind, run_id, time)")
    add_connection_arguments(parser)


def reader_gone(out: TextIO) -> bool:
    """Whether ``out`` is a pipe whose reader has closed it (its write end polls POLLERR). ``watch | head -1``
    must end once head has its line, though no further event may come to find it out by a failed write."""
    try:
        fd = out.fileno()
    except (OSError, ValueError):  # not a file (a test's StringIO)
        return False
    if not hasattr(select, "poll"):  # Windows: a failed write is the only sign
        return False
    poller = select.poll()
    poller.register(fd, 0)  # no events asked for: POLLERR, POLLHUP and POLLNVAL are always reported
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(0))


class _Lineages:
    """The newest run of each watched lineage; moves a lineage on to the run recovered from its corrupted one."""

    def __init__(self, engine: RecoveryEngine, rest: TinkerRest, printer: EventPrinter) -> None:
        self._engine = engine
        self._rest = rest
        self._printer = printer
        self._service = _NoRestore()
        self._handles: list[RunHandle] = []

    def watch(self, run_id: str) -> RunHandle:
        handle = self._engine.watch(run_id, self._service, step_of=self._printer.step_of)
        self._handles.append(handle)
        return handle

    def follow(self) -> None:
        """For each lineage whose newest run was found corrupted: its successor, if the listing has one now."""
        lost = [h for h in self._handles if h.observed is not None]
        if not lost:
            return  # no listing while every run is healthy
        from ._events import EventKind, RecoveryEvent

        children = successors_by_parent(self._rest)
        for handle in lost:
            run_id, seen = handle.run_id, {handle.run_id}
            while successors := [r for r in children.get(run_id, []) if r.training_run_id not in seen]:
                successor = continuing_successor(successors)  # a lineage recovered more than once meanwhile: walk on
                self._printer(
                    RecoveryEvent(
                        EventKind.COMPLETED,
                        run_id,
                        checkpoint=(successor.user_metadata or {}).get(LINEAGE_KEYS[1]),
                        new_run_id=successor.training_run_id,
                    )
                )
                run_id = successor.training_run_id
                seen.add(run_id)
            if run_id == handle.run_id:
                continue
            handle.unwatch()
            self._handles.remove(handle)
            self.watch(run_id).check_now()  # a successor already corrupted is reported now


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_watch(
    args: argparse.Namespace, parser: argparse.ArgumentParser, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """The ``watch`` command: events until interrupted, then 0; 2 or 1 if the runs cannot be read at start."""
    runs = list(dict.fromkeys(args.run_ids))
    for run_id in runs:
        try:
            validate_run_id(run_id)
        except ValueError as exc:
            parser.error(str(exc))
    from ._engine import RecoveryEngine
    from ._policy import RecoveryPolicy

    policy = RecoveryPolicy(enabled=True, mode="observe", poll_interval=args.interval)
    printer = EventPrinter(out, as_json=args.json)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        workers = min(len(runs), _MAX_POLL_WORKERS)
        with connect(args) as rest:
            # A wrong key or an unknown run: one line now, not a poll error forever. Read as the engine polls.
            with ThreadPoolExecutor(workers, thread_name_prefix="tinkex-recovery-watch-read") as reads:
                list(reads.map(rest.get_training_run, runs))
            with RecoveryEngine(policy, status=rest, poll_concurrency=workers) as engine:
                engine.subscribe(printer)
                lineages = _Lineages(engine, rest, printer)
                for run_id in runs:
                    lineages.watch(run_id)
                print(
                    f"watching {len(runs)} run(s), polling every {args.interval:g}s; Ctrl-C stops",
                    file=err,
                    flush=True,
                )
                engine.poll_once()  # a run already corrupted is reported now, not an interval from now
                follow_at = time.monotonic() + args.interval
                while not printer.closed.wait(min(_READER_CHECK, max(follow_at - time.monotonic(), 0.0))):
                    if reader_gone(out):
                        break
                    if time.monotonic() < follow_at:
                        continue
                    follow_at = time.monotonic() + args.interval
                    try:
                        lineages.follow()
                    except Exception as exc:  # the listing failed this time: the runs are still watched
                        message = " ".join(redact(str(exc) or type(exc).__name__).split())
                        print(f"tinkex-recovery watch: the lineages were not followed: {message}", file=err, flush=True)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        return fail("watch", exc, err)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if printer.closed.is_set() or reader_gone(out):
        return closed_pipe(out)  # `watch --json | grep -m1 detected && alert`: the reader has what it wanted
    print("stopped", file=err, flush=True)
    return EXIT_OK
