"""The ``tinkex-recovery`` command.

- ``tinkex-recovery status RUN_ID`` shows a run's lineage, whether its newest run is corrupted, and the
  checkpoints it could be restored from (exit 3 when corrupted);
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
    serve = commands.add_parser(
        "serve",
        help="serve a simulated Tinker for your own loop",
        description="Serve a simulated Tinker on loopback; point TINKER_BASE_URL at it and corrupt runs with curl.",
    )
    add_serve_arguments(serve)
    args = parser.parse_args(argv)
    if args.command == "status":
        return run_status(args)
    return run_server(args, serve)


if __name__ == "__main__":
    sys.exit(main())
