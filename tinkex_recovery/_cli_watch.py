"""``tinkex-recovery watch RUN_ID... [--interval S] [--json]``: an observe-only engine over the runs, printing
one line per event as it happens (JSON lines with ``--json``), until Ctrl-C or SIGTERM (exit 0).

The engine runs with ``RecoveryPolicy(mode="observe")``: it polls, detects and selects the checkpoint it would
restore, and restores nothing. The runs are read once before watching starts, so a wrong key or an unknown
run is a one-line error (exit 2), not a stream of poll errors. Status lines go to stderr; stdout holds only
events.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from types import FrameType
from typing import Any, NoReturn, TextIO

from ._cli_common import EXIT_OK, add_connection_arguments, connect, fail
from ._engine import RecoveryEngine
from ._events import RecoveryEvent
from ._models import validate_run_id
from ._policy import RecoveryPolicy
from ._redact import redact

__all__ = ["add_watch_arguments", "run_watch"]

_MAX_POLL_WORKERS = 16


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

    def __call__(self, event: RecoveryEvent) -> None:
        time = self._now().isoformat(timespec="milliseconds")
        if self._json:
            fields = {k: v for k, v in asdict(event).items() if v is not None and k not in ("kind", "run_id")}
            line = json.dumps({"time": time, "kind": event.kind.value, "run_id": event.run_id, **fields})
        else:
            line = f"{time} {event.message}"
        with self._lock, contextlib.suppress(BrokenPipeError):  # a closed pipe (| head) is not an error
            print(redact(line), file=self._out, flush=True)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="the runs to watch")
    parser.add_argument(
        "--interval", type=_positive_seconds, default=30.0, help="seconds between two polls (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines (each has kind, run_id, time)")
    add_connection_arguments(parser)


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
    policy = RecoveryPolicy(enabled=True, mode="observe", poll_interval=args.interval)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with connect(args) as rest:
            for run_id in runs:  # a wrong key or an unknown run: one line now, not a poll error forever
                rest.get_training_run(run_id)
            with RecoveryEngine(policy, status=rest, poll_concurrency=min(len(runs), _MAX_POLL_WORKERS)) as engine:
                engine.subscribe(EventPrinter(out, as_json=args.json))
                service = _NoRestore()
                for run_id in runs:
                    engine.watch(run_id, service)
                print(
                    f"watching {len(runs)} run(s), polling every {args.interval:g}s; Ctrl-C stops",
                    file=err,
                    flush=True,
                )
                engine.poll_once()  # a run already corrupted is reported now, not an interval from now
                threading.Event().wait()
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        return fail("watch", exc, err)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("stopped", file=err, flush=True)
    return EXIT_OK
