"""`make mutate`: mutation testing of the code the tests import, with mutmut 3, in a staged tree.

Why a staged tree: `integrations/` ships as `tinkex_recovery.integrations` through a package-dir mapping, so a
mutation tool pointed at the repository would write its mutants of `integrations/_guard.py` to a place the tests
never import (the editable install's finder maps `tinkex_recovery.integrations` back to the pristine
`integrations/`), and mutmut would never activate them (it activates a mutant only in the module whose `__name__`
its name carries). So this script mirrors the repository as the wheel lays it out, in `.mutate/`:

    .mutate/tinkex_recovery/               <- tinkex_recovery/
    .mutate/tinkex_recovery/integrations/  <- integrations/
    .mutate/tests/, examples/, benchmarks/, pyproject.toml

and runs `mutmut run` there; mutmut copies the tree to `.mutate/mutants/` and puts it first on `sys.path`, so
`import tinkex_recovery.integrations._guard` loads the mutated copy, under the name the mutant carries.

Incremental by default: mutmut keeps every verdict in `.mutate/mutants/` and re-tests only the mutants of functions
whose source changed (it hashes each function) plus new ones; this script also re-tests the survivors of earlier
runs, because a new test may kill them. `--full` throws the cache away first (what a published score needs: a
test that was weakened or deleted can turn a cached "killed" into a survivor only a full run sees).

Each mutant runs only the tests that executed the mutated function (mutmut records that once per run, over the
project's own test selection: `pytest tests -m "not slow"`, see `[tool.mutmut]` in pyproject.toml), in a forked
worker, so no mutant pays for pytest's start-up or for the tests of other modules.

The report: per module, mutants killed / survived / not reached by any test, the score, and each surviving
mutant's diff. Mutants that cannot change behaviour (equivalent) are listed in docs/mutation.md with the reason,
and counted apart; a listed name that no longer survives is reported as stale.
"""

from __future__ import annotations

import argparse
import filecmp
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".mutate"
MUTANTS = STAGE / "mutants"
EQUIVALENTS = ROOT / "docs" / "mutation.md"
ORDER_PLUGIN = ROOT / "tools" / "mutate_conftest.py"

#: Source tree -> staged tree, as the wheel lays the package out (see [tool.setuptools.package-dir]).
PACKAGE_DIRS = {"tinkex_recovery": "tinkex_recovery", "integrations": "tinkex_recovery/integrations"}
#: Copied as they are: the tests, pyproject.toml (pytest's and mutmut's settings) and what the tests read, which
#: mutmut copies on into mutants/ (`also_copy`, one list for both).
ALSO = (
    "tests",
    "pyproject.toml",
    *tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["mutmut"]["also_copy"],
)

# mutmut's exit codes (mutmut.stats.status_by_exit_code), grouped for the score.
KILLED = {1, 3, 36, 37, -24, 24, 152, 255, -11, -9}  # failed, pytest error, timeout, type check, crash
SURVIVED = {0}
NO_TESTS = {5, 33}
SKIPPED = {34}
NAME_OF = {1: "killed", 0: "survived", 33: "no tests", 5: "no tests", 36: "timeout", None: "not checked"}

EQUIVALENT_LINE = re.compile(r"^\s*[-*]\s*`([^`]+__mutmut_\d+)`")


def staged_files() -> dict[Path, Path]:
    """Every file the staged tree must hold, staged path -> source path."""
    files: dict[Path, Path] = {}
    for src, dst in PACKAGE_DIRS.items():
        for path in (ROOT / src).rglob("*"):
            rel = path.relative_to(ROOT / src)
            if path.is_file() and "__pycache__" not in rel.parts:
                # integrations/ is staged inside tinkex_recovery/: the core's own copy of it must not exist.
                files[STAGE / dst / rel] = path
    for name in ALSO:
        path = ROOT / name
        if path.is_file():
            files[STAGE / name] = path
        for sub in path.rglob("*") if path.is_dir() else ():
            if sub.is_file() and "__pycache__" not in sub.parts:
                files[STAGE / sub.relative_to(ROOT)] = sub
    return files


def stage() -> int:
    """Mirror the repository into .mutate/; returns how many files changed.

    A changed file is written anew (its mtime is now), which is how mutmut sees that it must mutate it again. A
    file gone from the repository is removed from the staged tree and from mutmut's copy, so a deleted module or
    test cannot linger there.
    """
    wanted = staged_files()
    changed = 0
    for dst, src in wanted.items():
        if dst.exists() and filecmp.cmp(dst, src, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        changed += 1
    for top in [*{Path(d).parts[0] for d in PACKAGE_DIRS.values()}, *ALSO]:
        for path in sorted((STAGE / top).rglob("*"), reverse=True) if (STAGE / top).is_dir() else ():
            if path.is_file() and path not in wanted and "__pycache__" not in path.parts:
                path.unlink()
                changed += 1
                for stale in (MUTANTS / path.relative_to(STAGE), MUTANTS / f"{path.relative_to(STAGE)}.meta"):
                    stale.unlink(missing_ok=True)
    # mutmut copies the tests into mutants/ on every run but never deletes one: start them afresh.
    shutil.rmtree(MUTANTS / "tests", ignore_errors=True)
    # The root conftest of mutmut's copy: the quickest tests first while a mutant is tested (see that file).
    MUTANTS.mkdir(parents=True, exist_ok=True)
    conftest = MUTANTS / "conftest.py"
    if not conftest.exists() or not filecmp.cmp(ORDER_PLUGIN, conftest, shallow=False):
        shutil.copyfile(ORDER_PLUGIN, conftest)
    return changed


def load_results() -> dict[str, dict[str, tuple[int | None, float]]]:
    """Module -> mutant name -> (exit code, seconds), from mutmut's meta files."""
    results: dict[str, dict[str, tuple[int | None, float]]] = defaultdict(dict)
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        rel = meta.relative_to(MUTANTS).with_suffix("").with_suffix("")
        module = ".".join(rel.parts)
        data = json.loads(meta.read_text("utf-8"))
        durations = data.get("durations_by_key", {})
        for name, code in data["exit_code_by_key"].items():
            results[module][name] = (code, float(durations.get(name) or 0.0))
    return results


def equivalents() -> set[str]:
    """The mutants docs/mutation.md lists as equivalent (one line each, with the reason)."""
    if not EQUIVALENTS.exists():
        return set()
    return {m.group(1) for line in EQUIVALENTS.read_text("utf-8").splitlines() if (m := EQUIVALENT_LINE.match(line))}


def survivors() -> list[str]:
    return [
        name
        for module in load_results().values()
        for name, (code, _) in module.items()
        if code in SURVIVED or code in NO_TESTS
    ]


def mutmut(*args: str) -> int:
    """Run the mutmut of this interpreter in the staged tree."""
    exe = Path(sys.executable).with_name("mutmut")
    return subprocess.call([str(exe), *args], cwd=STAGE)


def show(name: str) -> str:
    exe = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(exe), "show", name], cwd=STAGE, capture_output=True, text=True, check=False)
    return "\n".join(
        line for line in out.stdout.splitlines() if line.startswith(("-", "+")) and line[:3] not in ("---", "+++")
    )


def tally(mutants: dict[str, tuple[int | None, float]], equivalent: set[str], lost: list[str]) -> Counter[str]:
    """Count one module's verdicts; the names of its survivors go to ``lost``."""
    c: Counter[str] = Counter()
    for name, (code, duration) in mutants.items():
        c["mutants"] += 1
        c["seconds"] += duration  # type: ignore[assignment]  # a float in a Counter: summed, never compared
        if name in equivalent and code in SURVIVED | NO_TESTS:
            c["equivalent"] += 1
        elif code in KILLED:
            c["killed"] += 1
        elif code in SKIPPED:
            c["skipped"] += 1
        elif code is None:
            c["not checked"] += 1
        else:
            c["survived" if code in SURVIVED else "no tests" if code in NO_TESTS else "suspicious"] += 1
            lost.append(name)
    return c


def score(c: Counter[str]) -> str:
    judged = c["killed"] + c["survived"] + c["no tests"] + c["suspicious"]
    return f"{100 * c['killed'] / judged:5.1f} %" if judged else "    -"


def report(patterns: list[str], show_diffs: bool) -> None:
    """Print the per-module table, stale entries of the equivalent list, and the survivors (with their diffs)."""
    equivalent = equivalents()
    results = load_results()
    totals: Counter[str] = Counter()
    lost: list[str] = []
    columns = ("mutants", "killed", "survived", "no tests", "equivalent", "not checked")
    print(f"{'module':44} " + " ".join(f"{h:>11}" for h in columns) + f" {'score':>7} {'test s':>7}")
    for module, mutants in sorted(results.items()):
        chosen = {n: v for n, v in mutants.items() if not patterns or any(fnmatch.fnmatch(n, p) for p in patterns)}
        if chosen:
            c = tally(chosen, equivalent, lost)
            totals.update(c)
            print(f"{module:44} " + " ".join(f"{c[h]:11}" for h in columns) + f" {score(c):>7} {c['seconds']:7.0f}")
    print(
        f"{'total':44} "
        + " ".join(f"{totals[h]:11}" for h in columns)
        + f" {score(totals):>7} {totals['seconds']:7.0f}"
    )
    print("\nscore = killed / (mutants - equivalent - not checked); a mutant no test reaches counts as a survivor.")
    alive = {n for mutants in results.values() for n, (code, _) in mutants.items() if code in SURVIVED | NO_TESTS}
    if stale := sorted(equivalent - alive):
        print("\nlisted as equivalent in docs/mutation.md but not surviving now (update the list):")
        for name in stale:
            print("  ", name)
    if lost:
        print(f"\n{len(lost)} surviving mutant(s) (`.venv/bin/python tools/mutate.py --show NAME` for one diff):")
        for name in sorted(lost):
            print("  ", name)
            if show_diffs:
                for line in show(name).splitlines():
                    print("        ", line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="forget every cached verdict and test all mutants")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    parser.add_argument("--report", action="store_true", help="print the last results without running anything")
    parser.add_argument("--no-diffs", action="store_true", help="list the survivors without their diffs")
    parser.add_argument("--show", metavar="NAME", help="print one mutant's diff")
    parser.add_argument(
        "--unchecked",
        action="store_true",
        help="with patterns: only their mutants not yet checked or surviving (finish an interrupted run)",
    )
    parser.add_argument(
        "--survivors", action="store_true", help="with patterns: only their surviving mutants (after adding tests)"
    )
    parser.add_argument(
        "patterns", nargs="*", help="mutant names or globs, e.g. 'tinkex_recovery._policy.*' (default: all)"
    )
    args = parser.parse_args(argv)

    if args.show:
        print(show(args.show))
        return 0
    if not args.report:
        if args.full and not args.patterns:  # with patterns, mutmut re-tests every matching mutant anyway
            shutil.rmtree(MUTANTS, ignore_errors=True)
        fresh = not (MUTANTS / "mutmut-stats.json").exists()
        print(f"staged {stage()} changed file(s) in {STAGE.relative_to(ROOT)}/")
        before = set() if fresh or args.patterns else set(survivors())
        started = time.monotonic()
        chosen = args.patterns
        if (args.unchecked or args.survivors) and args.patterns:
            open_codes = SURVIVED | NO_TESTS | ({None} if args.unchecked else set())
            chosen = [
                name
                for module in load_results().values()
                for name, (code, _) in module.items()
                if code in open_codes and any(fnmatch.fnmatch(name, p) for p in args.patterns)
            ]
            if not chosen:
                print("every matching mutant is killed")
                report(args.patterns, show_diffs=not args.no_diffs)
                return 0
        rc = mutmut("run", "--max-children", str(args.jobs), *chosen)
        if rc != 0:
            print(f"mutmut run failed (exit {rc})", file=sys.stderr)
            return rc
        # Survivors of an earlier run are cached as survivors; a test added since may kill them now.
        again = sorted(before & set(survivors()))
        if again:
            print(f"re-testing {len(again)} earlier survivor(s)")
            rc = mutmut("run", "--max-children", str(args.jobs), *again)
            if rc != 0:
                print(f"mutmut run failed (exit {rc})", file=sys.stderr)
                return rc
        print(f"\nmutation run took {time.monotonic() - started:.0f} s\n")
    report(args.patterns, show_diffs=not args.no_diffs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
