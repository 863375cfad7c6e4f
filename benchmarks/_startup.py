"""Start-up: ``import tinkex_recovery`` in a fresh interpreter, minus the interpreter's own start-up.

All are timed the same way (wall clock around a ``python -c`` subprocess), alternating, median of each.
Beside it: pydantic's floor, importing pydantic and building one model (what any pydantic user pays, plugin
discovery included), and ``-X importtime``'s own figure for the package.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time

from _util import REPO


def _wall(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return time.perf_counter() - start


def _importtime_us() -> float:
    """Cumulative microseconds ``-X importtime`` gives ``tinkex_recovery``."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import tinkex_recovery"],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*tinkex_recovery$", line)
        if m:
            return float(m.group(1))
    raise RuntimeError("-X importtime printed no line for tinkex_recovery")


_PYDANTIC_FLOOR = "import pydantic\nclass M(pydantic.BaseModel):\n    x: int"


def bench(quick: bool) -> dict[str, float]:
    repeats = 7 if quick else 21
    _wall("import tinkex_recovery")  # warm the file cache and the bytecode
    bare, imported, floor = [], [], []
    for _ in range(repeats):
        bare.append(_wall("pass"))
        imported.append(_wall("import tinkex_recovery"))
        floor.append(_wall(_PYDANTIC_FLOOR))
    cumulative = [_importtime_us() for _ in range(max(3, repeats // 2))]
    startup = statistics.median(bare)
    return {
        "interpreter_startup_ms": startup * 1e3,
        "import_time_ms": (statistics.median(imported) - startup) * 1e3,
        "import_time_pydantic_floor_ms": (statistics.median(floor) - startup) * 1e3,
        "import_time_ms_importtime": statistics.median(cumulative) / 1e3,
    }
