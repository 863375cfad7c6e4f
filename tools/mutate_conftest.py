"""Staged by tools/mutate.py as the root conftest.py of mutmut's copy (`.mutate/mutants/conftest.py`); never
loaded by `make test`.

While mutmut tests a mutant it runs, with ``-x``, every test that executed the mutated function; it names them in
no useful order. This runs the quickest first (by the durations mutmut recorded), so a mutant that a 10 ms unit
test kills is not first put through a 10 s property test. The order of the suite is otherwise irrelevant: every
test is independent (the suite's conftest enforces that no thread or state outlives a test).

A mutant that makes a wait block forever (a lost wake-up) uses no CPU, so mutmut's CPU-time limit never ends it;
pytest-timeout does, after 120 s per test in the suite's settings. Here the bound is 60 s: the slowest test takes
under 10 s on a quiet machine, so 60 still leaves a loaded one room, and halves what each such mutant costs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

#: Tests that bound wall-clock time (an event loop's lag under 50 ms): on a loaded machine, with every function
#: behind mutmut's trampoline, they fail on the pristine code, so they cannot judge a mutant. Left out of every
#: mutmut run (stats, clean run and mutants alike); `make test` runs them.
TIMING = (
    "tests/test_sdk_guard_async.py::test_a_5ms_ticker_is_never_delayed_50ms_while_an_sdk_restore_is_under_way",
    "tests/test_guard_async.py::test_the_event_loop_ticks_on_while_a_recovery_is_under_way",
    "tests/test_guard_async.py::test_save_state_async_awaits_the_save_without_blocking_the_loop",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    timing = [item for item in items if item.nodeid.split("[")[0] in TIMING]
    if timing:
        config.hook.pytest_deselected(items=timing)
        items[:] = [item for item in items if item not in timing]
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return  # mutmut's own runs (stats, the clean and the forced-fail run) keep the suite's order
    stats = Path(__file__).with_name("mutmut-stats.json")
    try:
        durations: dict[str, float] = json.loads(stats.read_text("utf-8"))["duration_by_test"]
    except (OSError, ValueError, KeyError):
        durations = {}
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
    for item in items:
        item.add_marker(pytest.mark.timeout(60))
