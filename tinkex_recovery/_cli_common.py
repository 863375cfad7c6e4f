"""What the operator commands (``status``, ``watch``) share: credentials, the REST client, and turning an error
into one line and an exit code.

Exit codes: 0 all is well, 1 Tinker could not be read (unreachable, a server error, an unexpected answer),
2 a usage, authentication or not-found error, 3 the run is corrupted (``status``), 4 the lineage forked: two
recoveries of one run each made a run (``status``; it names the one that continues), 141 (128 + SIGPIPE, what a
shell reports for a filter whose reader left) when stdout was closed early (``| head``). A message is one line,
never a traceback, and never contains the API key.

Importing this module is cheap (no httpx, no pydantic): ``--help`` is built from it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TYPE_CHECKING, TextIO

from ._exceptions import (
    AuthenticationError,
    MissingAPIKey,
    PermissionDenied,
    RunNotFound,
    TinkerAPIError,
)
from ._names import DEFAULT_BASE_URL
from ._redact import redact

if TYPE_CHECKING:
    from ._models import Checkpoint
    from ._rest import TinkerRest

__all__ = [
    "EXIT_CLOSED_PIPE",
    "EXIT_CORRUPTED",
    "EXIT_FORKED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "STEPLESS",
    "add_connection_arguments",
    "closed_pipe",
    "connect",
    "fail",
    "step_of",
]

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2  # also argparse's own
EXIT_CORRUPTED = 3
EXIT_FORKED = 4
#: How ``status`` and ``watch`` mark a checkpoint that records no step.
STEPLESS = "no step recorded: a guarded loop or the Lightning callback cannot resume from it"
EXIT_CLOSED_PIPE = 128 + 13  # as a shell reports a process ended by SIGPIPE (13), which Windows lacks


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
    from ._rest import TinkerRest

    try:
        return TinkerRest(api_key=args.api_key, base_url=args.base_url)
    except MissingAPIKey:
        raise MissingAPIKey(
            "no Tinker API key: pass --api-key or set the TINKER_API_KEY environment variable"
        ) from None
    except ValueError as exc:  # the library's words name its arguments; a user of the command has flags
        message = str(exc).replace("base_url must", "--base-url (or TINKER_BASE_URL) must", 1)
        raise ValueError(message) from None


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


def closed_pipe(out: TextIO) -> int:
    """``out``'s reader left (``| head``): point it at the null device, so the interpreter's last flush at exit
    writes nowhere instead of printing a traceback, and return :data:`EXIT_CLOSED_PIPE`."""
    with contextlib.suppress(OSError, ValueError):  # not a file (a test's StringIO), or already closed
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    return EXIT_CLOSED_PIPE


def step_of(checkpoint: Checkpoint) -> int | None:
    """The step a loop restored from ``checkpoint`` resumes at, as its user_metadata records it (``step``, else the
    one the ledger wrote); None: a guarded loop or the Lightning callback could not resume from it."""
    from ._ledger import RESUME_KEY
    from ._models import parse_step

    if checkpoint.step is not None:
        return checkpoint.step
    return parse_step((checkpoint.user_metadata or {}).get(RESUME_KEY))
