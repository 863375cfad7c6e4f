"""The ``tinkex-recovery`` command.

- ``tinkex-recovery status RUN_ID`` shows a run's lineage, whether its newest run is corrupted, and the
  checkpoints it could be restored from (exit 3 when corrupted);
- ``tinkex-recovery watch RUN_ID...`` polls runs and prints each event as it happens, restoring nothing;
- ``tinkex-recovery serve`` serves a simulated Tinker on loopback, so a training loop on the official SDK can
  rehearse a corruption and its recovery offline.

Only the module of the command being run is imported, and those modules import httpx, pydantic, the engine
and the simulator only when the command runs: ``--help`` costs little more than the interpreter's start.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from ._cli_serve import SERVE_EXIT_CODES

__all__ = ["main"]

_PIPE_CODE = "141 when stdout closes early (| head)."


class _Command(NamedTuple):
    module: str  # where add_arguments lives
    add_arguments: str
    help: str
    description: str
    epilog: str


_COMMANDS = {
    "status": _Command(
        "tinkex_recovery._cli_status",
        "add_status_arguments",
        "show a run's lineage, health and restorable checkpoints",
        "Show the whole lineage of RUN_ID (oldest first), whether its newest run is corrupted, and that run's "
        "restorable checkpoints. A checkpoint that records no step is marked: a guarded loop cannot resume from it.",
        "Exit status: 0 healthy, 3 corrupted, 2 usage, authentication or not-found error or an invalid RUN_ID "
        f"(refused before any request), 1 Tinker unreachable or its answer unexpected, {_PIPE_CODE}",
    ),
    "watch": _Command(
        "tinkex_recovery._cli_watch",
        "add_watch_arguments",
        "poll runs and print each event as it happens (observe only)",
        "Poll the runs and print one line per event (detections, the checkpoint a recovery would restore, poll "
        "errors) until Ctrl-C or SIGTERM. Nothing is restored.",
        "Exit status: 0 stopped by Ctrl-C or SIGTERM, 2 usage, authentication or not-found error (a run is read "
        f"once before watching starts), 1 Tinker unreachable at start, {_PIPE_CODE}",
    ),
    "serve": _Command(
        "tinkex_recovery._cli_serve",
        "add_serve_arguments",
        "serve a simulated Tinker for your own loop",
        "Serve a simulated Tinker on loopback; point TINKER_BASE_URL at it and corrupt runs with curl.",
        SERVE_EXIT_CODES,
    ),
}


def _parser(chosen: str | None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line's parser; only ``chosen``'s arguments are added (and its module imported)."""
    parser = argparse.ArgumentParser(
        prog="tinkex-recovery",
        description="Keeps Tinker training runs alive.",
        epilog="Exit status: 0 all is well, 1 Tinker unreachable, 2 usage, authentication or not-found error, "
        "3 the run is corrupted (status), 141 stdout closed early (| head). Each command's --help says more.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {}
    for name, command in _COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.description, epilog=command.epilog)
        if name == chosen:
            getattr(importlib.import_module(command.module), command.add_arguments)(sub)
        subparsers[name] = sub
    return parser, subparsers


def _chosen(argv: list[str]) -> str | None:
    """The command named on the command line (the first argument that is not an option), if it is one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in _COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    chosen = _chosen(args_list)
    parser, subparsers = _parser(chosen)
    args = parser.parse_args(args_list)
    if args.command == "status":
        from ._cli_status import run_status

        return run_status(args)
    if args.command == "watch":
        from ._cli_watch import run_watch

        return run_watch(args, subparsers["watch"])
    from .simulated._cli import run_server

    return run_server(args, subparsers["serve"])


if __name__ == "__main__":
    sys.exit(main())
