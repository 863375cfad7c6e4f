"""What key redaction costs a log record: on another library's logger (nothing, by design: the redacting filter
sits on our loggers only, and no global record factory is installed) and on ours.

Per-record costs are CPU time of the logging thread (``time.thread_time_ns``) for records that reach one
handler which discards them, the best of several alternating repetitions.
"""

from __future__ import annotations

import logging
import time

from tinkex_recovery import _redact
from tinkex_recovery._redact import register_secret

_KEY = "tml-BENCHMARK-0123456789abcdef"


class _Discard(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        pass


def _per_record(logger: logging.Logger, records: int) -> float:
    start = time.thread_time_ns()
    for i in range(records):
        logger.info("step %d done on run %s", i, "run-0")
    return (time.thread_time_ns() - start) / records


def _logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(_Discard())
    return logger


def bench(quick: bool) -> dict[str, float]:
    records, repeats = (10_000, 3) if quick else (100_000, 9)
    other, ours = _logger("app.training"), _logger("tinkex_recovery")
    before, after, mine = [], [], []
    for i in range(repeats):  # alternating, in both orders, so load on a shared machine weighs on both alike
        for registered in (False, True) if i % 2 else (True, False):
            if registered:
                register_secret(_KEY)  # what TinkerRest does with its key
                after.append(_per_record(other, records))
                mine.append(_per_record(ours, records))
            else:
                with _redact._lock:
                    _redact._secrets.discard(_KEY)  # as before any key was registered
                before.append(_per_record(other, records))
    return {
        "log_record_ns": min(before),
        "log_record_overhead_ns": max(min(after) - min(before), 0.0),  # another library's logger
        "log_record_ours_overhead_ns": max(min(mine) - min(after), 0.0),  # ours: the message is checked for a key
    }
