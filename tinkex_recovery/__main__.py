"""The ``tinkex-recovery`` command.

- ``tinkex-recovery status RUN_ID`` shows a run's lineage, whether its newest run is corrupted, and the
  checkpoints it could be restored from (exit 3 when corrupted);
- ``tinkex-recovery watch RUN_ID...`` polls runs and prints each event as it happens, restoring nothing;
- ``tinkex-recovery serve`` serves a simulated Tinker on loopback, so a training loop on the official SDK can
  rehearse a corruption and its recovery offline.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from ._cli_status import add_status_arguments, run_status
    from ._cli_watch import add_watch_arguments, run_watch
    from .simulated._cli import add_serve_arguments, run_server

    parser = argparse.ArgumentParser(prog="tinkex-recovery", description="Keeps Tinker training runs alive.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status",
        help="show a run's lineage, health and restorable checkpoints",
        description="Show the whole lineage of RUN_ID (oldest first), whether its newest run is corrupted, and "
        "that run's restorable checkpoints. Exit status: 0 healthy, 3 corrupted, 2 usage, authentication or "
        "not-found error, 1 Tinker unreachable.",
    )
    add_status_arguments(status)
    watch = commands.add_parser(
        "watch",
        help="poll runs and print each event as it happens (observe only)",
        description="Poll the runs and print one line per event (detections, poll errors) until Ctrl-C. "
        "Nothing is restored.",
    )
    add_watch_arguments(watch)
    serve = commands.add_parser(
        "serve",
        help="serve a simulated Tinker for your own loop",
        description="Serve a simulated Tinker on loopback; point TINKER_BASE_URL at it and corrupt runs with curl.",
    )
    add_serve_arguments(serve)
    args = parser.parse_args(argv)
    if args.command == "status":
        return run_status(args)
    if args.command == "watch":
        return run_watch(args, watch)
    return run_server(args, serve)


if __name__ == "__main__":
    sys.exit(main())
