"""Packaging: the import stays light, and both an editable install and a built wheel import correctly."""

from __future__ import annotations

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
