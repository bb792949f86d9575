"""The package's shape (docs/design.md): nothing imports upward, no function-local import of a drm_jax
module, and the internal packages (engine, config, cli) export only what another module imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "drm_jax"
# Lowest first; a module may import its own layer and the ones below it (io sits beside the engine).
LAYERS = {"numbers": 0, "errors": 0, "arch": 0, "buffers": 0, "math": 1, "methods": 2, "models": 4, "permute": 3,
          "io": 3, "engine": 3, "learned": 4, "extract": 4, "config": 5, "cli": 6}
INTERNAL = ("engine", "config", "cli")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _layer(path: Path) -> int | None:
    rel = path.relative_to(PACKAGE)
    return LAYERS.get(rel.parts[0].removesuffix(".py")) if len(rel.parts) > 0 else None


def test_nothing_imports_upward_and_no_drm_jax_import_hides_in_a_function():
    upward, hidden = [], []
    for path, tree in _modules():
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue  # the top-level package re-exports every layer
        own = _layer(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("drm_jax."):
                target = LAYERS.get(_part(node.module))
                if own is not None and target is not None and target > own:
                    upward.append(f"{path.relative_to(PACKAGE)} imports {node.module}")
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("drm_jax"):
                        hidden.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.module}")
    assert not upward, upward
    assert not hidden, hidden


def test_internal_modules_export_only_what_another_module_imports():
    sources = {path: path.read_text() for path in PACKAGE.rglob("*.py")}
    exported_alone = []
    for path, tree in _modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] not in INTERNAL or path.name == "__init__.py":
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                for name in ast.literal_eval(node.value):
                    pattern = re.compile(rf"\b{re.escape(name)}\b")
                    if not any(pattern.search(text) for other, text in sources.items() if other != path):
                        exported_alone.append(f"{rel}: {name}")
    assert not exported_alone, exported_alone
