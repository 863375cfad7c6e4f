"""``tinkex-recovery serve`` / ``python -m tinkex_recovery.simulated``: a simulated Tinker for your own loop.

It serves a fresh :class:`SimulatedTinker` on loopback until Ctrl-C (or SIGTERM), and prints what to export so
the official ``tinker`` SDK talks to it, and how to corrupt a run from another shell.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import signal
import sys
import threading
from types import FrameType
from typing import TextIO

from .._cli_serve import KEY_PREFIX as _KEY_PREFIX
from .._cli_serve import add_serve_arguments
from ._server import serve
from ._tinker import SimulatedTinker

__all__ = ["add_serve_arguments", "run_server"]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_server(
    args: argparse.Namespace, parser: argparse.ArgumentParser, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Serve until interrupted; 0 after a clean stop, 1 (one line on ``err``) if it cannot listen."""
    api_key: str = args.api_key or f"{_KEY_PREFIX}sim-{secrets.token_hex(12)}"
    if not api_key.startswith(_KEY_PREFIX):
        parser.error(f"--api-key must start with {_KEY_PREFIX!r}: the tinker SDK sends no other key")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.ExitStack() as stack:
            try:
                server = stack.enter_context(serve(SimulatedTinker(), api_key, host=args.host, port=args.port))
            except OSError as exc:  # a busy port, an address not this machine's: one line, no traceback
                print(
                    f"{parser.prog}: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc} "
                    "(choose another --port, or leave it out for a free one)",
                    file=err,
                    flush=True,
                )
                return 1
            url = server.base_url
            auth = '-H "X-API-Key: $TINKER_API_KEY"'
            curls = [
                (f"curl -s {auth} $TINKER_BASE_URL/_sim/runs", "the run ids"),
                (f"curl -s -X POST {auth} $TINKER_BASE_URL/_sim/corrupt/RUN_ID", "mark one corrupted"),
                (f"curl -s {auth} $TINKER_BASE_URL/_sim/lineage/RUN_ID", "the data it was trained on"),
            ]
            width = max(len(c) for c, _ in curls)
            print(
                f"Simulated Tinker serving on {url} (Ctrl-C stops it)\n"
                "\n"
                "Point the tinker SDK at it (tinker.ServiceClient() reads these):\n"
                f"  export TINKER_BASE_URL={url}\n"
                f"  export TINKER_API_KEY={api_key}\n"
                "  export TINKER_TELEMETRY=0\n"
                "\n"
                "Rehearse a corruption from another shell:\n" + "\n".join(f"  {c:<{width}}  # {w}" for c, w in curls),
                file=out,
                flush=True,
            )
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("stopped", file=out, flush=True)
    return 0
