"""Griffe extension for the docs site: a trailing `#: text` comment documents the attribute it ends.

copra documents config fields Sphinx-style, `name: type = default  #: what it is`, which griffe does not
read by itself. This extension makes such a comment the attribute's docstring (when it has none), so the
API pages show every config key with its meaning. Used by mkdocs.yml only; not part of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import griffe


class InlineComments(griffe.Extension):
    """Turn `#:` trailing comments into attribute docstrings."""

    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, agent: Any, **kwargs: Any) -> None:
        if attr.docstring is not None or not isinstance(node, ast.AST):
            return
        above = []  # `#:` lines right above the attribute belong to it too (as copra.utils.settings.field_help reads them)
        path = attr.filepath
        source = attr.lines_collection[path] if isinstance(path, Path) and path in attr.lines_collection else None
        index = (attr.lineno or 1) - 2
        while source and index >= 0 and source[index].lstrip().startswith("#:"):
            above.insert(0, source[index])
            index -= 1
        parts = [line.split("#:", 1)[1].strip() for line in [*above, *attr.lines] if "#:" in line]
        if parts:
            attr.docstring = griffe.Docstring(" ".join(parts), parent=attr)
