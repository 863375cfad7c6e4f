"""Must show 4: examples/custom_loop.py runs offline, survives two corruptions and says what each cost."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_loop.py"
RECOVERY = re.compile(
    r"^recovery (\d): run (\S+) -> (\S+) from step-(\d{6}) after (\d+) attempt\(s\), resumed at step (\d+), "
    r"steps lost: (\d+), time to recover: (\d+\.\d{3})s \(loop waited (\d+\.\d{3})s\)$"
)


def test_custom_loop_example_recovers_twice_and_reports_steps_lost_and_time_to_recover() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    recoveries = [m.groups() for line in lines if (m := RECOVERY.match(line))]
    assert len(recoveries) == 2, out.stdout
    (n1, old1, new1, ck1, att1, at1, lost1, secs1, _), (n2, old2, new2, ck2, att2, at2, lost2, _, _) = recoveries
    assert (n1, ck1, at1, lost1, att1) == ("1", "000040", "40", "7", "2")  # failed mid-step 47; one 503 retried
    assert (n2, ck2, at2, lost2, att2) == ("2", "000060", "60", "14", "1")  # 60..73 done, then lost
    assert old2 == new1 != old1 and new2 != old2
    assert float(secs1) >= 0.03  # the retry's backoff (0.05s, less up to 20% jitter) is in the time to recover
    assert lines[-1].startswith("finished 100 steps") and lines[-1].endswith("every step trained exactly once: True")
    assert new2 in lines[-1]
