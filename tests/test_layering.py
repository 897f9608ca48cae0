"""The engine and loaders never import ComfyUI, and loaders never import the engine (DESIGN.md layers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loraloom"
COMFY = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_engine_and_loaders_import_no_comfyui_module():
    for layer in ("training", "loaders"):
        for path in (PACKAGE / layer).rglob("*.py"):
            assert not imported_roots(path) & COMFY, path


def test_loaders_do_not_import_the_engine():
    for path in (PACKAGE / "loaders").rglob("*.py"):
        assert "from ..training" not in path.read_text() and "loraloom.training" not in path.read_text(), path


def test_engine_imports_headless():
    code = ("import sys; import loraloom.training.session, loraloom.training.cli, loraloom.training.demo; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(COMFY)!r}); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
