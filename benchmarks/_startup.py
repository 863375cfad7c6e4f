"""Start-up: what a user's first line costs in a fresh interpreter, minus the interpreter's own start-up, and
the whole ``tinkex-recovery --help`` process (the console script, as a shell runs it).

``import tinkex_recovery`` loads each name on first use, so the import figure is taken for the names a loop uses
(``from tinkex_recovery import RecoveryEngine, RecoveryPolicy``). All are timed the same way (wall clock around a
subprocess), alternating, median of each. Beside them: pydantic's floor, importing pydantic and building one
model (what any pydantic user pays, plugin discovery included), and ``-X importtime``'s own figure for the
package's names.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _util import REPO

_USED = "from tinkex_recovery import RecoveryEngine, RecoveryPolicy"
_SCRIPT = str(Path(sys.executable).parent / "tinkex-recovery")


def _wall(code: str) -> float:
    return _wall_of([sys.executable, "-c", code])


def _wall_of(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _importtime_us() -> float:
    """Cumulative microseconds ``-X importtime`` gives the package's modules imported at the top level: the
    package, then each module a name of :data:`_USED` is loaded from on first use."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _USED],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    top = [
        re.match(r"import time:\s+\d+ \|\s+(\d+) \| tinkex_recovery(\.\S+)?$", line)
        for line in done.stderr.splitlines()
    ]
    found = [float(m.group(1)) for m in top if m]
    if not found:
        raise RuntimeError("-X importtime printed no line for tinkex_recovery")
    return sum(found)


_PYDANTIC_FLOOR = "import pydantic\nclass M(pydantic.BaseModel):\n    x: int"


def bench(quick: bool) -> dict[str, float]:
    repeats = 7 if quick else 21
    _wall(_USED)  # warm the file cache and the bytecode
    _wall_of([_SCRIPT, "--help"])
    bare, imported, floor, cli_help = [], [], [], []
    for _ in range(repeats):
        bare.append(_wall("pass"))
        imported.append(_wall(_USED))
        floor.append(_wall(_PYDANTIC_FLOOR))
        cli_help.append(_wall_of([_SCRIPT, "--help"]))
    cumulative = [_importtime_us() for _ in range(max(3, repeats // 2))]
    startup = statistics.median(bare)
    return {
        "interpreter_startup_ms": startup * 1e3,
        "cli_help_ms": statistics.median(cli_help) * 1e3,  # the whole process, the interpreter's start included
        "import_time_ms": (statistics.median(imported) - startup) * 1e3,
        "import_time_pydantic_floor_ms": (statistics.median(floor) - startup) * 1e3,
        "import_time_ms_importtime": statistics.median(cumulative) / 1e3,
    }
