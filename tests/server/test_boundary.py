"""The server depends on the engine client only: what `meshllm.server` may import, and no `Any` in its
signatures."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import meshllm.server

SERVER = Path(meshllm.server.__file__).parent
ALLOWED = {
    "meshllm",  # the package's __version__
    "meshllm.step",
    "meshllm.devices",
    "meshllm.errors",
    "meshllm.defaults",
    "meshllm.runtime.engine_client",
}
FORBIDDEN_THIRD_PARTY = {"grpc", "torch", "mlx", "numpy", "transformers"}
MODULES = sorted(SERVER.glob("*.py"))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_the_server_imports_only_the_engine_client_and_the_shared_vocabulary(path: Path) -> None:
    for name in imported(parse(path)):
        if name == "meshllm" or name.startswith("meshllm."):
            assert name in ALLOWED or name.startswith("meshllm.server"), f"{path.name} imports {name}"
        else:
            assert name.split(".")[0] not in FORBIDDEN_THIRD_PARTY, f"{path.name} imports {name}"


def annotations(tree: ast.AST) -> list[ast.expr]:
    found: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            every = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
            every += [arg for arg in (arguments.vararg, arguments.kwarg) if arg is not None]
            found += [arg.annotation for arg in every if arg.annotation is not None]
            found += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_no_signature_or_attribute_of_the_server_is_typed_any(path: Path) -> None:
    for annotation in annotations(parse(path)):
        names = {node.id for node in ast.walk(annotation) if isinstance(node, ast.Name)}
        names |= {node.attr for node in ast.walk(annotation) if isinstance(node, ast.Attribute)}
        assert "Any" not in names, f"{path.name}: {ast.unparse(annotation)}"
