"""A griffe extension for the API reference: the docstrings are written in reST (``:class:`X```, literal blocks
after ``::``), which the site renders as Markdown. Roles become inline code (``~pkg.Name`` shows ``Name``), and a
paragraph ending in ``::`` ends in ``:`` before its indented block, as Sphinx shows it."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|attr|mod|data|func|exc|obj|const):`~?([^`]+)`")
LITERAL = re.compile(r"(\S)::\n")


def _role(match: re.Match[str]) -> str:
    target = match[1]
    shown = target.rsplit(".", 1)[-1] if match[0].split("`", 1)[1].startswith("~") else target
    return f"`{shown}`"


def _convert(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = LITERAL.sub(r"\1:\n", ROLE.sub(_role, obj.docstring.value))


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _convert(pkg)  # a package's own docstring gets no on_object call

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _convert(obj)
