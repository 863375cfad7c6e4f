"""Every Python block of the README and the documentation is a complete program in ``docs/snippets/`` that runs
here as a user would run it: in its own process, ``python -W error`` (so a deprecated tinker 0.38 call fails),
with the real ``tinker`` SDK talking to the loopback server (``TINKER_BASE_URL``/``TINKER_API_KEY``, as
``tinkex-recovery serve`` prints them). The guard snippets have their run corrupted part-way through and must end
with every step trained exactly once. The pages include the files (``--8<--``) and the README carries them
verbatim, so a snippet cannot rot; :func:`test_every_python_block_is_a_tested_snippet` finds any block that is
neither (or that is not marked as a fragment, with its reason)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve

from .http_support import KEY

pytestmark = [pytest.mark.sdk, pytest.mark.slow]

#: A simulated Tinker and the loopback server in front of it.
Served = tuple[SimulatedTinker, SimulatedServer]

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = ROOT / "docs" / "snippets"


@dataclass
class Ran:
    sim: SimulatedTinker
    server: SimulatedServer
    stdout: str
    stderr: str


@pytest.fixture
def server() -> Iterator[Served]:
    sim = SimulatedTinker()
    with serve(sim, KEY) as srv:
        srv.keep_alive = False  # no server thread outlives the request it serves
        yield sim, srv
    sim.release()


def run_snippet(
    name: str,
    served: Served,
    *args: str,
    corrupt_after: int | None = None,
    extra_warning_options: tuple[str, ...] = (),
) -> Ran:
    """Run ``docs/snippets/{name}`` under ``-W error`` against the server; with ``corrupt_after``, mark the
    newest run corrupted once it holds that many checkpoints (the loop is then part-way through, with a
    checkpoint to resume from). Each request the server receives wakes the injector."""
    sim, srv = served
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
    env.update(TINKER_BASE_URL=srv.base_url, TINKER_API_KEY=KEY, TINKER_TELEMETRY="0")
    proc = subprocess.Popen(
        [sys.executable, "-W", "error", *extra_warning_options, str(SNIPPETS / name), *args],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    corrupted: list[str] = []

    def corrupt() -> None:
        assert corrupt_after is not None
        seen = len(srv.requests)
        while proc.poll() is None:
            if not srv.wait_for_requests(seen + 1, timeout=0.2):  # a bound, so a process that ended is noticed
                continue
            seen += 1
            runs = sim.run_ids
            if runs and len(sim.list_checkpoints(runs[-1]).checkpoints) >= corrupt_after:
                sim.corrupt(runs[-1])
                corrupted.append(runs[-1])
                return

    injector = threading.Thread(target=corrupt, name="snippet-corruptor") if corrupt_after else None
    if injector:
        injector.start()
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        if injector:
            injector.join(timeout=60)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{stdout}\n{stderr}"
    assert "Warning" not in stderr, stderr
    assert KEY not in stdout + stderr
    if corrupt_after:
        assert corrupted, f"{name} ended before its run could be corrupted"
    return Ran(sim, srv, stdout, stderr)


def trained(sim: SimulatedTinker, run_id: str) -> list[int]:
    """The first input token of every datum the run (and the runs it was restored from) was trained on."""
    return [tokens[0] for tokens in sim.lineage(run_id)]


@pytest.mark.parametrize(
    "name", ["quickstart.py", "asyncio_loop.py", "asyncio_in_flight.py", "engine.py"], ids=lambda n: n[:-3]
)
def test_a_guarded_loop_trains_every_step_once_through_a_corruption(name: str, server: Served) -> None:
    ran = run_snippet(name, server, corrupt_after=1)
    run_id = ran.sim.run_ids[-1]
    assert ran.stdout.splitlines()[-1] == f"30 steps on run {run_id}, 1 recovery(ies)"
    assert trained(ran.sim, run_id) == list(range(30))
    if name == "engine.py":  # its subscriber prints every event
        kinds = [line.split()[0] for line in ran.stdout.splitlines()[:-1]]
        assert kinds[0] == "detected" and kinds[-1] == "completed", kinds


def test_cookbook_loop_survives_a_corruption_then_a_restart_from_its_checkpoints_jsonl(
    server: Served, tmp_path: Path
) -> None:
    first = run_snippet("cookbook.py", server, str(tmp_path), "25", corrupt_after=1)
    lost = first.sim.run_ids[-1]
    assert first.stdout.strip() == f"steps 0..24 on run {lost}, 1 recovery(ies)"
    records = (tmp_path / "checkpoints.jsonl").read_text().splitlines()
    assert len(records) == 2  # step 10 on the corrupted run, step 20 on the recovered one
    second = run_snippet("cookbook.py", server, str(tmp_path), "40")  # a new process: resumes at entry
    final = second.sim.run_ids[-1]
    assert final != lost
    assert second.stdout.strip() == f"steps 20..39 on run {final}, 0 recovery(ies)"
    assert trained(second.sim, final) == list(range(40))


#: Lightning 2.6's own notices for a module with no local optimizer, on torch 2.13: not the snippet's doing (the
#: suite ignores the same two in pyproject.toml). Every other warning, tinker's deprecations included, fails.
LIGHTNING_NOTICES = (
    "-W",
    "ignore:`isinstance(treespec, LeafSpec)` is deprecated:FutureWarning",
    "-W",
    "ignore:`LightningModule.configure_optimizers` returned `None`:UserWarning",
)


@pytest.mark.lightning
def test_lightning_module_trains_every_batch_once_through_a_corruption(
    server: Served,
) -> None:
    ran = run_snippet("lightning_module.py", server, corrupt_after=1, extra_warning_options=LIGHTNING_NOTICES)
    run_id = ran.sim.run_ids[-1]
    assert ran.stdout.strip().splitlines()[-1] == f"20 steps on run {run_id}, 1 recovery(ies)"
    assert trained(ran.sim, run_id) == list(range(40))


def test_observe_mode_names_the_checkpoint_and_restores_nothing(server: Served) -> None:
    lines = run_snippet("observe.py", server).stdout.splitlines()
    assert lines[0] == "detected "
    assert lines[1].startswith("checkpoint_selected tinker://") and lines[1].endswith("/weights/step-000010")
    assert lines[2] == "would restore: " + lines[1].split()[1]
    assert lines[3] == "runs on the server: 1"


def test_metrics_snippet_records_every_instrument(server: Served) -> None:
    names = run_snippet("metrics.py", server).stdout.split()
    assert names == [
        "tinkex_recovery.polls",
        "tinkex_recovery.recoveries",
        "tinkex_recovery.recovery.duration",
        "tinkex_recovery.restore.attempts",
        "tinkex_recovery.steps_lost",
        "tinkex_recovery.watched_runs",
    ]


def test_policy_snippet_builds_derives_and_refuses(server: Served) -> None:
    assert run_snippet("policy.py", server).stdout.splitlines() == ["5 best", "('poll_interval',)"]


# --- no Python block in the README or the pages escapes the tests above -----------------------------------------

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
INCLUDE = re.compile(r'^\s*--8<--\s+"(?P<path>(?:docs/snippets|examples)/[\w.-]+\.py)"\s*$')
#: An example a page includes whole is run by tests/test_examples.py instead.
EXAMPLES_TEST = (ROOT / "tests" / "test_examples.py").read_text()
#: The comment that may precede a Python block that cannot run as written; its reason is mandatory.
FRAGMENT = re.compile(r"<!--\s*fragment:\s*(?P<reason>\S.*?)\s*-->\s*$")
TESTED = {
    "quickstart.py",
    "asyncio_loop.py",
    "asyncio_in_flight.py",
    "engine.py",
    "cookbook.py",
    "lightning_module.py",
    "observe.py",
    "metrics.py",
    "policy.py",
    "rl_sync.py",  # run by tests/test_rl_snippet.py (corrupted with a sample in flight)
}


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, the text before the block's fence on its line's predecessor, body) of every Python block."""
    text = path.read_text()
    for match in FENCE.finditer(text):
        if match["lang"] not in ("python", "py", "pycon"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        body = "\n".join(row[len(match["indent"]) :] for row in match["body"].splitlines())
        yield line, before, body


def test_every_python_block_is_a_tested_snippet() -> None:
    snippets = {p.name for p in SNIPPETS.glob("*.py")}
    assert snippets == TESTED, "every file in docs/snippets/ needs a test here (and every tested one must exist)"
    untested = []
    for path in markdown_files():
        for line, before, body in python_blocks(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            include = INCLUDE.match(body.strip()) if body.strip().count("\n") == 0 else None
            if include and include["path"].startswith("examples/"):
                assert (ROOT / include["path"]).is_file() and f'"{Path(include["path"]).name}"' in EXAMPLES_TEST, where
            elif include:
                assert Path(include["path"]).name in TESTED, where
            elif path.name == "README.md" and any(body.strip() == (SNIPPETS / n).read_text().strip() for n in TESTED):
                pass  # GitHub shows no includes: the README carries a snippet verbatim
            elif not FRAGMENT.search(before):
                untested.append(where)
    assert not untested, f"Python blocks that are neither a tested snippet nor a marked fragment: {untested}"


def test_the_check_finds_a_block_that_is_not_a_snippet(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('Text.\n\n```python\nprint("hello")\n```\n\n<!-- fragment: why -->\n```python\nx = 1\n```\n')
    found = [(line, bool(FRAGMENT.search(before))) for line, before, _ in python_blocks(page)]
    assert found == [(3, False), (8, True)]
