"""Every public function and method of fastcnn/ is annotated (parameters and return type), so
that ``py.typed`` promises something and mypy (run by .ci/run) checks the callers. mypy itself
only insists on this for functions that are partly annotated; private helpers may stay bare."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fastcnn"
# special methods a user calls, spelled with underscores
PUBLIC_DUNDERS = {"__init__", "__call__", "__len__", "__getitem__", "__iter__", "__repr__"}


def _unannotated(tree):
    """(qualified name, what is missing) for each public def of a module, nested defs skipped."""

    def visit(node, prefix, public):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.", public and child.name[0] != "_")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = child.name
                if not public or (name.startswith("_") and name not in PUBLIC_DUNDERS):
                    continue
                args = child.args
                params = args.posonlyargs + args.args + args.kwonlyargs
                params += [a for a in (args.vararg, args.kwarg) if a is not None]
                missing = [
                    a.arg for a in params if a.annotation is None and a.arg not in ("self", "cls")
                ]
                if child.returns is None:
                    missing.append("return")
                if missing:
                    yield f"{prefix}{name}", missing

    return list(visit(tree, "", True))


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_public_api_annotated(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    assert _unannotated(tree) == []


def test_the_check_sees_a_missing_annotation():
    tree = ast.parse("def f(x, y: int) -> int: ...\nclass C:\n    def g(self): ...\n")
    assert _unannotated(tree) == [("f", ["x"]), ("C.g", ["return"])]
