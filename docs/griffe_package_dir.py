"""A Griffe extension for the API reference: subpackages that setuptools installs from elsewhere.

``pyproject.toml`` maps ``reprmetrics.callbacks`` to the top-level ``callbacks/`` folder
(``[tool.setuptools] package-dir``). Python sees it there once the package is installed, but
Griffe reads the source tree statically and finds no ``reprmetrics/callbacks/``. This extension
reads the same mapping and, once a parent package is loaded, visits the mapped folder's modules as
its subpackage, so ``::: reprmetrics.callbacks`` documents what ``import reprmetrics.callbacks``
gives. Static only: nothing is imported, so the docs build needs neither Lightning nor transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import griffe
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _mapped_subpackages() -> dict[str, Path]:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package_dir = table["tool"]["setuptools"].get("package-dir", {})
    return {
        name: ROOT / folder
        for name, folder in package_dir.items()
        if "." in name and (ROOT / folder) != ROOT / name.replace(".", "/")
    }


def _visit(name: str, path: Path, parent: griffe.Module, loader: griffe.GriffeLoader) -> griffe.Module:
    code = path.read_text(encoding="utf-8")
    loader.lines_collection[path] = code.splitlines()
    return griffe.visit(
        name,
        filepath=path,
        code=code,
        parent=parent,
        extensions=loader.extensions,
        docstring_parser=loader.docstring_parser,
        docstring_options=loader.docstring_options,
        lines_collection=loader.lines_collection,
        modules_collection=loader.modules_collection,
    )


class PackageDir(griffe.Extension):
    """Attach each ``package-dir``-mapped subpackage (one folder of modules) to its parent package."""

    def __init__(self) -> None:
        super().__init__()
        self.mapped = _mapped_subpackages()

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for name, folder in self.mapped.items():
            parent_name, _, child = name.rpartition(".")
            if parent_name != pkg.path or child in pkg.members:
                continue
            package = _visit(child, folder / "__init__.py", pkg, loader)
            pkg.set_member(child, package)
            for module_path in sorted(folder.glob("*.py")):
                if module_path.stem != "__init__":
                    package.set_member(module_path.stem, _visit(module_path.stem, module_path, package, loader))
