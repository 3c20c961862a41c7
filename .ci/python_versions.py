"""Syntax and standard-library imports of every Python file of the project, checked by the Python that runs this.

CI runs it with the oldest Python the pack declares (requires-python) and the newest one ComfyUI ships: each file
must compile, and each standard-library module a file imports unconditionally must exist in that Python (tomllib
is 3.11+, imghdr and audioop are gone in 3.13). Imports under ``if sys.version_info ...`` or in a ``try`` that
catches ImportError are the file's own fallbacks and are not required. Third-party modules are not looked up: the
interpreter has none installed; what they need is pinned in the requirements files.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".compat", ".venv", "node_modules", "__pycache__", "workflows"}
# Every standard-library module of the Pythons CI checks (3.10: sys.stdlib_module_names exists from 3.10 on), so a
# module that a newer Python added or an older one removed is still recognised as standard library.
KNOWN_STDLIB = set(sys.stdlib_module_names) | {"tomllib", "imghdr", "audioop", "cgi", "crypt", "distutils", "asynchat", "asyncore", "smtpd"}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body and any(
            handler.type is None or "Error" in ast.unparse(handler.type) for handler in parent.handlers
        ):
            return True
        if isinstance(parent, ast.If) and "version_info" in ast.unparse(parent.test):
            return True
        node = parent
    return False


def problems(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    try:
        compile(source, str(path), "exec")
        tree = ast.parse(source)
    except SyntaxError as exc:
        return [f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}"]
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in KNOWN_STDLIB and importlib.util.find_spec(top) is None and not _guarded(node, parents):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {name}, which Python "
                             f"{sys.version_info.major}.{sys.version_info.minor} does not have")
    return found


def main() -> int:
    files = [p for p in sorted(ROOT.rglob("*.py")) if not SKIP & set(p.relative_to(ROOT).parts)]
    found = [line for path in files for line in problems(path)]
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    sys.stdout.write("".join(f"{line}\n" for line in found))
    sys.stdout.write(f"Python {version}: {len(files)} files, {len(found)} problems\n")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
