"""Packaging: the import stays light, and both an editable install and a built wheel import correctly."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(python: str | Path, code: str, cwd: Path) -> str:
    out = subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_pulls_in_neither_torch_lightning_tinker_nor_opentelemetry(tmp_path: Path) -> None:
    heavy = ("torch", "lightning", "tinker", "pytorch_lightning", "opentelemetry")
    code = (
        "import sys, tinkex_recovery, tinkex_recovery.simulated, tinkex_recovery.integrations;"
        "import tinkex_recovery.__main__;"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    assert run_python(sys.executable, code, tmp_path).strip() == "[]"


def test_import_loads_each_name_on_first_use_and_every_public_name_resolves(tmp_path: Path) -> None:
    code = (
        "import sys, tinkex_recovery as t;"
        "print(sorted(m for m in ('pydantic', 'httpx', 'tinkex_recovery._engine') if m in sys.modules));"
        "missing = [n for n in t.__all__ if getattr(t, n, None) is None];"
        "print(missing, 'pydantic' in sys.modules)"
    )
    first, second = run_python(sys.executable, code, tmp_path).splitlines()
    assert first == "[]"  # `import tinkex_recovery` (and the CLI's --help) pays for nothing it does not use
    assert second == "[] True"


def test_editable_install_maps_integrations_under_the_package(tmp_path: Path) -> None:
    code = (
        "import tinkex_recovery.integrations as i, importlib.util as u; print(i.__name__, u.find_spec('integrations'))"
    )
    assert run_python(sys.executable, code, tmp_path).split() == ["tinkex_recovery.integrations", "None"]


@pytest.mark.slow
def test_built_wheel_installs_and_imports(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(dist.glob("tinkex_recovery-*.whl"))
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The wheel's copy comes first on the path, ahead of the editable install of the same package.
    code = (
        "import tinkex_recovery, tinkex_recovery.integrations, tinkex_recovery.simulated, importlib.util as u;"
        f"print(tinkex_recovery.integrations.__file__.startswith({str(site)!r}), u.find_spec('integrations'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "None"]
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "tinkex_recovery/integrations/__init__.py" in names and "tinkex_recovery/py.typed" in names
    assert not any(n.startswith("integrations/") for n in names)


def imports_of(path: Path) -> set[str]:
    """The modules ``path`` imports (relative imports made absolute within its package)."""
    package = "tinkex_recovery.integrations" if path.parent.name == "integrations" else "tinkex_recovery"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package, *([base] if base else [])])
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_integrations_use_the_public_api_and_the_one_internal_seam() -> None:
    seam = "tinkex_recovery._integration"
    for path in sorted((ROOT / "integrations").glob("*.py")):
        private = {
            m
            for m in imports_of(path)
            if m.startswith("tinkex_recovery._")
            and not m.startswith("tinkex_recovery.__")  # __version__ is public
            and m != seam
            and not m.startswith(f"{seam}.")
        }
        assert not private, f"{path.name} imports private core modules {sorted(private)}: use {seam}"


def test_no_import_circles_within_integrations_and_rest_stays_out_of_the_engine() -> None:
    modules = {p.stem: imports_of(p) for p in (ROOT / "integrations").glob("*.py")}
    graph = {
        name: {
            m.split(".")[2]
            for m in mods
            if m.startswith("tinkex_recovery.integrations.") and m.split(".")[2] in modules
        }
        for name, mods in modules.items()
    }

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph[start])

    circles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not circles, f"import circle through {circles}"
    assert not {m for m in imports_of(ROOT / "tinkex_recovery" / "_rest.py") if m.startswith("tinkex_recovery._engine")}
