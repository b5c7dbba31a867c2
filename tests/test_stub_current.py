"""The committed stub (codewords_lite-stubs/) still says what the module says: its public names, the
parameters of its public functions and methods, and their docstrings. tools/make_stubs.py --check
(in .ci/run) compares the whole text but needs mypy; this needs only ast, so a plain pytest run
catches a stub left stale by a change to the public API."""

import ast
import os
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = "run `python tools/make_stubs.py` and commit the stub"


def parsed(*path: str) -> ast.Module:
    with open(os.path.join(ROOT, *path), encoding="utf-8") as file:
        return ast.parse(file.read())


def parameters(function: ast.AST) -> List[Tuple[str, str, bool]]:
    """(name, kind, has a default) of each parameter: what a caller's code depends on."""
    assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
    args = function.args
    positional = args.posonlyargs + args.args
    defaults = [False] * (len(positional) - len(args.defaults)) + [True] * len(args.defaults)
    found = [(a.arg, "positional", d) for a, d in zip(positional, defaults)]
    found += [(a.arg, "keyword", d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    found += [(a.arg, kind, False) for a, kind in ((args.vararg, "*"), (args.kwarg, "**")) if a is not None]
    return found


def surface(tree: ast.Module) -> Dict[str, object]:
    """Every public function and class of a module (and each public method of a public class, with
    __init__ and the other dunders), with its parameters and docstring."""
    found: Dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            found[node.name] = ast.get_docstring(node)
            if isinstance(node, ast.FunctionDef):
                found[node.name] = (parameters(node), ast.get_docstring(node))
                continue
            for member in node.body:
                if isinstance(member, ast.FunctionDef):
                    name = member.name
                    if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
                        found[f"{node.name}.{name}"] = (parameters(member), ast.get_docstring(member))
    return found


def test_the_stub_has_the_modules_public_functions_classes_and_methods():
    module, stub = surface(parsed("codewords_lite.py")), surface(parsed("codewords_lite-stubs", "__init__.pyi"))
    assert sorted(set(module) ^ set(stub)) == [], f"the stub and the module name different things: {FIX}"


def test_the_stubs_signatures_and_docstrings_are_the_modules():
    module, stub = surface(parsed("codewords_lite.py")), surface(parsed("codewords_lite-stubs", "__init__.pyi"))
    stale = [name for name in module if name in stub and module[name] != stub[name]]
    assert stale == [], f"the stub is stale for {', '.join(stale)}: {FIX}"
