"""The dependency rule of docs/architecture.md, checked on every import in the package (those inside
functions and under TYPE_CHECKING included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "meshllm"

# The vocabulary every part shares; it imports nothing but itself.
NEUTRAL = {"meshllm", "errors", "log", "defaults", "step", "devices", "compute"}
# Each part, and the parts it may import besides the neutral ones and itself.
ALLOWED = {
    "models": set(),
    "engines": {"models"},
    "transport": set(),
    "runtime": {"engines", "models", "transport"},
    "server": {"runtime.engine_client"},
    "config": set(),
    "cluster": {"config", "models", "transport"},
    "cli": {"*"},
    "__main__": {"cli"},
}
# Third-party libraries that belong to one part only.
OWNED = {"grpc": {"transport"}, "uvicorn": {"server"}, "fastapi": {"server"}, "starlette": {"server"}}
KEEP_OUT = {"server": {"torch", "mlx", "numpy"}, "transport": {"transformers"}}


def part_of(module: str) -> str:
    """'meshllm.runtime.scheduler' -> 'runtime'; 'meshllm.step' -> 'step'; 'meshllm' -> 'meshllm'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(path: Path) -> list[str]:
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level + (path.name == "__init__.py") or None]
                found.append(".".join(base + ([node.module] if node.module else [])))
            else:
                found.append(node.module or "")
    return found


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "proto" not in p.relative_to(PACKAGE).parts[:2])


def allowed(importer: str, imported: str) -> bool:
    target = part_of(imported)
    if target in NEUTRAL or target == importer:
        return True
    if importer in NEUTRAL:
        return False
    rules = ALLOWED[importer]
    return "*" in rules or target in rules or any(imported.startswith(f"meshllm.{rule}") for rule in rules)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_import_follows_the_dependency_rule(path: Path) -> None:
    importer = part_of(
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    )
    problems = []
    for imported in imports(path):
        root = imported.split(".")[0]
        if root == "meshllm":
            if not allowed(importer, imported):
                problems.append(f"{importer} may not import {imported}")
            if "_pb2" in imported and importer != "transport":
                problems.append(f"generated protobuf code outside transport/: {imported}")
        elif root in OWNED and importer not in OWNED[root]:
            problems.append(f"{root} is imported only in {', '.join(sorted(OWNED[root]))}/")
        elif root in KEEP_OUT.get(importer, ()):
            problems.append(f"{importer} does not import {root}")
    assert not problems, "\n".join(problems)


def test_the_rule_covers_every_part_of_the_package() -> None:
    parts = {
        part_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"))
        for p in sources()
    }
    assert parts <= NEUTRAL | set(ALLOWED), parts - NEUTRAL - set(ALLOWED)


def test_the_checker_sees_imports_inside_functions() -> None:
    source = PACKAGE / "cli" / "serve.py"
    assert "meshllm.runtime.coordinator" in imports(source)  # imported inside run()
