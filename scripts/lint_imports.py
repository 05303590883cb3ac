"""Check the import contracts in pyproject.toml ([tool.importlinter]) with import-linter.

    .venv/bin/python scripts/lint_imports.py        # exit 0: every contract holds

import-linter (through grimp) finds a package's modules by walking its folder, but
semedge's subpackages live beside semedge/ (pyproject's [tool.setuptools.package-dir]
maps core/, runtime/ ... into it). So this links them into one `semedge` folder in a
temp dir and lints that: the same files, under the names the code imports them by.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "semedge"


def package_dirs(pyproject: Path) -> dict[str, Path]:
    """{"core": ROOT/core, ...}: the direct subpackages of semedge mapped from other folders."""
    mapping = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    prefix = PACKAGE + "."
    return {name[len(prefix):]: ROOT / folder for name, folder in mapping.items()
            if name.startswith(prefix) and "." not in name[len(prefix):]}


def link_tree(dest: Path, pyproject: Path) -> Path:
    """dest/semedge: links to semedge/'s own files plus one link per mapped subpackage."""
    pkg = dest / PACKAGE
    pkg.mkdir()
    for entry in (ROOT / PACKAGE).iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in package_dirs(pyproject).items():
        (pkg / name).symlink_to(folder, target_is_directory=True)
    return pkg


def lint(tree: Path, pyproject: Path = ROOT / "pyproject.toml") -> int:
    """Run import-linter on the linked `tree` (holding semedge/); 0 when every contract holds."""
    from importlinter.cli import lint_imports

    os.chdir(tree)  # lint-imports puts the working folder first on sys.path
    return lint_imports(config_filename=str(pyproject), no_cache=True, no_logo=True)


def main() -> int:
    pyproject = ROOT / "pyproject.toml"
    with tempfile.TemporaryDirectory(prefix="semedge-imports-") as tmp:
        link_tree(Path(tmp), pyproject)
        return lint(Path(tmp), pyproject)


if __name__ == "__main__":
    sys.exit(main())
