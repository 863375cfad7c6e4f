"""The ``tinkex-recovery`` command. ``tinkex-recovery serve`` serves a simulated Tinker on loopback, so a
training loop on the official SDK can rehearse a corruption and its recovery offline."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from .simulated._cli import add_serve_arguments, run_server

    parser = argparse.ArgumentParser(prog="tinkex-recovery", description="Keeps Tinker training runs alive.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a simulated Tinker for your own loop",
        description="Serve a simulated Tinker on loopback; point TINKER_BASE_URL at it and corrupt runs with curl.",
    )
    add_serve_arguments(serve)
    args = parser.parse_args(argv)
    return run_server(args, serve)


if __name__ == "__main__":
    sys.exit(main())
