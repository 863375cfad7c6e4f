"""A griffe extension for the API reference: ``integrations/`` ships as ``tinkex_recovery.integrations``.

The package maps the repository's ``integrations/`` folder into ``tinkex_recovery`` (pyproject.toml's
``package-dir``), which griffe's static finder cannot follow. When griffe has loaded ``tinkex_recovery``, this
loads ``integrations/`` as its ``integrations`` submodule, so the reference names every object by the path users
import it from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import griffe

INTEGRATIONS = Path(__file__).resolve().parent.parent / "integrations" / "__init__.py"


class IntegrationsSubpackage(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "tinkex_recovery" or "integrations" in pkg.members:
            return
        module = loader._load_module("integrations", INTEGRATIONS, submodules=True, parent=pkg)
        pkg.set_member("integrations", module)
