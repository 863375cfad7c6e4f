"""The project speaks for itself: no comment or docstring points at something a user of the repository does
not have (notes, machines or people outside it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Phrases that only make sense to whoever wrote the project, not to someone who clones it.
OUTSIDE = re.compile(r"shared notes|these machines|our machines|the lead\b|/work/|BRIEF\.md|side-paths", re.IGNORECASE)
FILES = ("Makefile", "pyproject.toml", "README.md", "tinkex_recovery", "integrations", "examples", "benchmarks", "docs")


def test_no_file_refers_to_anything_outside_the_project() -> None:
    found = []
    for entry in FILES:
        base = ROOT / entry
        for path in [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()):
            if path.suffix in (".pyc", ".png", ".svg") or "__pycache__" in path.parts:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if OUTSIDE.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []
