"""The arguments of ``tinkex-recovery serve`` (and ``python -m tinkex_recovery.simulated``), apart from the
simulator itself, so that ``serve --help`` does not load it. What serving does: :mod:`.simulated._cli`."""

from __future__ import annotations

import argparse

__all__ = ["KEY_PREFIX", "SERVE_EXIT_CODES", "add_serve_arguments"]

KEY_PREFIX = "tml-"  # the SDK refuses to send any other API key

SERVE_EXIT_CODES = (
    "Exit status: 0 after Ctrl-C or SIGTERM, 1 when it cannot listen (the port is busy or the address is not "
    "this machine's), 2 usage error."
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"the key clients must send; must start with {KEY_PREFIX!r} (default: a random one)",
    )
