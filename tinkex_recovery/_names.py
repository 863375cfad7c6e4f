"""Names tinkex-recovery shares with Tinker and with the runs it makes: where Tinker is, and the user_metadata
keys written on recovered runs, and what a run id may be. It imports nothing heavy, so the command line can
show its help and refuse a bad run id without loading httpx or pydantic."""

from __future__ import annotations

import re

__all__ = ["CREATED_AT_KEY", "DEFAULT_BASE_URL", "FROM_RUN_KEY", "LINEAGE_KEYS", "RECOVERY_ID_KEY", "validate_run_id"]

DEFAULT_BASE_URL = "https://tinker.thinkingmachines.dev/services/tinker-prod"
"""The production Tinker service: the base URL when neither ``base_url=`` nor ``TINKER_BASE_URL`` is given."""

FROM_RUN_KEY = "tinkex_recovery.recovered_from_run"
RECOVERY_ID_KEY = "tinkex_recovery.recovery_id"
CREATED_AT_KEY = "tinkex_recovery.created_at"

LINEAGE_KEYS = (
    FROM_RUN_KEY,
    "tinkex_recovery.recovered_from_checkpoint",
    "tinkex_recovery.recovery_number",
    RECOVERY_ID_KEY,
    CREATED_AT_KEY,
)
"""user_metadata keys written on every recovered run, naming what made it: the lost run, the checkpoint it was
restored from, its place in the lineage (1, 2, ...), the recovery that made it (an id unique to that recovery,
shared by every run its attempts made) and when that recovery's restore call was sent (UTC, the sender's clock;
see ``_lineage``)."""

_RUN_ID = re.compile(r"[^\s/]+")


def validate_run_id(run_id: object) -> str:
    """``run_id`` if it is a run id Tinker could have issued; else :class:`ValueError`, whose message shows the
    id escaped (``repr``), so a control character in it is seen, never acted on by a terminal.

    Refused: a non-string, an empty string, whitespace, '/', any other unprintable character, and the path
    segments ``.`` and ``..`` (in a URL they name another resource: ``/training_runs/.`` is the account's listing).
    """
    if (
        not isinstance(run_id, str)
        or not _RUN_ID.fullmatch(run_id)
        or not run_id.isprintable()
        or run_id in (".", "..")
    ):
        raise ValueError(
            f"invalid run id {run_id!r}: expected a run id as Tinker prints it (no whitespace, '/', control "
            "characters, and not '.' or '..')"
        )
    return run_id
