"""``python -m tinkex_recovery.simulated [--host H] [--port P] [--api-key tml-...]``: serve a simulated Tinker."""

from __future__ import annotations

import argparse
import sys

from ._cli import add_serve_arguments, run_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tinkex_recovery.simulated",
        description="Serve a simulated Tinker on loopback for the tinker SDK, to rehearse a corruption.",
    )
    add_serve_arguments(parser)
    return run_server(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
