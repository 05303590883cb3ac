"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and the check can fail.

Run in a subprocess: the linter finds `semedge` through a linked tree (scripts/lint_imports.py).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "lint_imports.py"


def test_import_contracts_hold():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "3 kept, 0 broken" in r.stdout, r.stdout[-2000:]


def test_import_contracts_catch_a_torch_import_in_core():
    code = textwrap.dedent(
        f"""
        import shutil, sys, tempfile
        from pathlib import Path
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import lint_imports as L
        tmp = Path(tempfile.mkdtemp())
        pkg = L.link_tree(tmp, L.ROOT / "pyproject.toml")
        (pkg / "core").unlink()
        shutil.copytree(L.ROOT / "core", pkg / "core", ignore=shutil.ignore_patterns("__pycache__"))
        (pkg / "core" / "bad.py").write_text("import torch\\nfrom semedge.runtime import link\\n")
        try:
            sys.exit(L.lint(tmp))
        finally:
            shutil.rmtree(tmp)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode != 0, r.stdout[-4000:]
    assert "1 kept, 2 broken" in r.stdout, r.stdout[-4000:]  # layers and core break; the device one holds
    assert "semedge.core.bad -> torch" in r.stdout and "semedge.core.bad -> semedge.runtime.link" in r.stdout
