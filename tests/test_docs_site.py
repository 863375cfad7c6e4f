"""The documentation site's reference is complete: every public module and every name in its ``__all__`` has a
docstring, read the way the site's generator reads them (griffe, with the site's own extension that maps
``integrations/`` to ``tinkex_recovery.integrations``), and every public module has a reference page.
``make docs`` (part of ``make test``) builds the site with ``mkdocs build --strict``: a broken link, a reference
that does not resolve or a snippet file that is missing fails it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import griffe  # the docs extra: make venv-test installs it
import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The public modules: each has a page under docs/reference/ and its names are documented.
PUBLIC_MODULES = {
    "tinkex_recovery": "tinkex_recovery.md",
    "tinkex_recovery.integrations": "integrations.md",
    "tinkex_recovery.integrations.lightning": "lightning.md",
    "tinkex_recovery.integrations.opentelemetry": "opentelemetry.md",
    "tinkex_recovery.rest": "rest.md",
    "tinkex_recovery.simulated": "simulated.md",
}


@pytest.fixture(scope="module")
def loader() -> griffe.GriffeLoader:
    return load_package()


def load_package() -> griffe.GriffeLoader:
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        extension = importlib.import_module("griffe_integrations").IntegrationsSubpackage
    finally:
        sys.path.remove(str(ROOT / "docs"))
    loader = griffe.GriffeLoader(extensions=griffe.load_extensions(extension()))
    loader.load("tinkex_recovery")
    loader.resolve_aliases(external=False)
    return loader


def undocumented(loader: griffe.GriffeLoader) -> list[str]:
    missing = []
    for name in PUBLIC_MODULES:
        module = loader.modules_collection.get_member(name)
        if not (module.docstring and module.docstring.value.strip()):
            missing.append(name)
        exports = [e for e in module.exports or () if isinstance(e, str)]
        assert exports == list(importlib.import_module(name).__all__), f"griffe reads {name}'s __all__ wrongly"
        for export in exports:
            obj = module[export]
            target = obj.final_target if obj.is_alias else obj
            if not (target.docstring and target.docstring.value.strip()):
                missing.append(f"{name}.{export}")
    return missing


def test_every_public_name_has_a_docstring(loader: griffe.GriffeLoader) -> None:
    assert undocumented(loader) == []


def test_a_name_without_a_docstring_is_found(loader: griffe.GriffeLoader) -> None:
    guard = loader.modules_collection.get_member("tinkex_recovery.integrations.recovery_guard").final_target
    docstring, guard.docstring = guard.docstring, None
    try:
        # Found under each module that exports it.
        assert undocumented(loader) == ["tinkex_recovery.recovery_guard", "tinkex_recovery.integrations.recovery_guard"]
    finally:
        guard.docstring = docstring


def test_every_public_module_has_a_reference_page_that_renders_it() -> None:
    for module, page in PUBLIC_MODULES.items():
        text = (ROOT / "docs" / "reference" / page).read_text()
        assert f"::: {module}\n" in text, page
