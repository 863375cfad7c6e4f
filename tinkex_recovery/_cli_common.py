"""What the operator commands (``status``, ``watch``) share: credentials, the REST client, and turning an error
into one line and an exit code.

Exit codes: 0 all is well, 1 Tinker could not be read (unreachable, a server error, an unexpected answer),
2 a usage, authentication or not-found error, 3 the run is corrupted (``status``), 4 the lineage forked: two
recoveries of one run each made a run (``status``; it names the one that continues). A message is one line,
never a traceback, and never contains the API key.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ._exceptions import (
    AuthenticationError,
    MissingAPIKey,
    PermissionDenied,
    RunNotFound,
    TinkerAPIError,
)
from ._redact import redact
from ._rest import DEFAULT_BASE_URL, TinkerRest

__all__ = [
    "EXIT_CORRUPTED",
    "EXIT_FORKED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "add_connection_arguments",
    "connect",
    "fail",
]

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2  # also argparse's own
EXIT_CORRUPTED = 3
EXIT_FORKED = 4


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        default=None,
        help="the Tinker API key (default: $TINKER_API_KEY; prefer the variable: arguments show in process lists)",
    )
    parser.add_argument(
        "--base-url", default=None, help=f"Tinker's URL (default: $TINKER_BASE_URL, else {DEFAULT_BASE_URL})"
    )


def connect(args: argparse.Namespace) -> TinkerRest:
    """The REST client the arguments (or the environment) describe; raises what :func:`fail` reports."""
    return TinkerRest(api_key=args.api_key, base_url=args.base_url)


def fail(command: str, error: BaseException, err: TextIO = sys.stderr) -> int:
    """Print ``error`` as one redacted line and return its exit code."""
    if isinstance(error, MissingAPIKey | AuthenticationError | PermissionDenied | RunNotFound):
        code = EXIT_USAGE
    elif isinstance(error, TinkerAPIError):
        code = EXIT_UNAVAILABLE
    elif isinstance(error, ValueError):  # a malformed run id or URL
        code = EXIT_USAGE
    else:
        code = EXIT_UNAVAILABLE
    message = " ".join(redact(str(error) or type(error).__name__).split())
    print(f"tinkex-recovery {command}: error: {message}", file=err, flush=True)
    return code
