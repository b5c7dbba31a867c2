"""Write codewords_lite-stubs/__init__.pyi, the types a user's type checker reads, from codewords_lite.py.

    python tools/make_stubs.py            # after any change to the public API; commit the result
    python tools/make_stubs.py --check    # CI: fail if the committed stub is not what this writes

PEP 561 has no py.typed marker for a single-file module, so its types travel in the wheel as a
stub-only package beside it, which mypy and pyright find without a marker. mypy's stubgen writes
the signatures and docstrings; what it can only call ``Incomplete`` (an attribute set in
``__init__``, a constant) gets the type that mypy infers for it, so a user sees ``str | None``
where stubgen would say ``Any``. Private definitions are left out, except those that public ones
refer to (a TypeVar, a Protocol); and mypy checks the stub, so that a broken one fails here and
not in a user's type checker. Needs mypy and ruff (the versions .ci/run pins).
"""

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterator, List, Set, Tuple

from mypy import build, stubgen
from mypy.modulefinder import BuildSource
from mypy.nodes import TypeInfo, Var
from mypy.options import Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "codewords_lite"
SOURCE = os.path.join(ROOT, MODULE + ".py")
STUB = os.path.join(ROOT, MODULE + "-stubs", "__init__.pyi")
HEADER = f"# Generated from {MODULE}.py by tools/make_stubs.py: do not edit, run it again.\n"


def stub_text() -> str:
    """The stub as it should be, formatted as ruff formats the rest of the tree, and checked by mypy."""
    with open(SOURCE, encoding="utf-8") as file:
        source = file.read()
    public = _public_names(source)
    raw = _with_self_types(_stubgen(_without_all(source)), source)
    tree = ast.parse(raw)
    dropped = _private_lines(tree)
    owners = {line: cls.name for cls in _classes(tree) for line in _span(cls)}  # the class a line is in
    types = _inferred_types()
    lines: List[str] = []
    modules = set()  # those the filled-in types name, as in "logging.Logger"
    for number, line in enumerate(raw.splitlines(), 1):
        if number in dropped:
            continue
        attribute = re.fullmatch(r"(\s*)(\w+): Incomplete", line)
        if attribute:
            indent, name = attribute.groups()
            inferred = types.get(owners[number] + "." + name if indent else name)
            if inferred is None:
                raise SystemExit(f"make_stubs: stubgen left {name} Incomplete, and mypy infers no type for it")
            inferred = inferred.replace(MODULE + ".", "")
            modules.update(re.findall(r"\b([a-z_][\w.]*)\.[A-Za-z_]\w*", inferred))
            line = f"{indent}{name}: {inferred}"
        lines.append(line)
    text = "\n".join(lines) + "\n"
    text = text.replace("from _typeshed import Incomplete\n", "")
    if "Incomplete" in text:
        raise SystemExit("make_stubs: stubgen left an Incomplete type that mypy could not fill in")
    first = text.index("\n\n")  # after stubgen's imports
    text = (
        text[:first]
        + "".join(f"\nimport {m}" for m in sorted(modules) if f"import {m}\n" not in text)
        + f"\n\n__all__ = {public!r}"
        + text[first:]
    )
    text = _ruff_format(HEADER + text)
    _check_with_mypy(text)
    return text


def _with_self_types(stub: str, source: str) -> str:
    """The stub with the annotations of ``self`` and ``cls`` that the source has and stubgen drops,
    as in ``def __enter__(self: _C) -> _C``, where the return type means nothing without them."""
    annotations = {}  # (class, method) -> the annotation of its first parameter, as written
    for cls, method, first in _first_parameters(source):
        if first.annotation is not None:
            annotations[cls, method] = ast.get_source_segment(source, first.annotation)
    lines = stub.splitlines(keepends=True)
    for cls, method, first in _first_parameters(stub):
        annotation = annotations.get((cls, method))
        if first.annotation is None and annotation is not None:
            line = lines[first.lineno - 1].encode("utf-8")  # ast's columns count bytes
            after = first.end_col_offset or 0
            lines[first.lineno - 1] = (line[:after] + f": {annotation}".encode() + line[after:]).decode("utf-8")
    return "".join(lines)


def _first_parameters(code: str) -> Iterator[Tuple[str, str, ast.arg]]:
    """(class, method, its first parameter) for each method of each top-level class."""
    for cls in _classes(ast.parse(code)):
        for method in cls.body:
            if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
                parameters = method.args.posonlyargs + method.args.args
                if parameters:
                    yield cls.name, method.name, parameters[0]


def _private_lines(tree: ast.Module) -> Set[int]:
    """The lines of the stub's private definitions (stubgen writes them all): the private members
    of classes, and each private top-level class, function, TypeVar or alias that no public
    definition refers to, directly or through another private one. The module's business, not
    its users'; but a signature that names ``_BinaryReadable`` needs it defined."""
    dropped: Set[int] = set()
    for cls in _classes(tree):
        for member in cls.body:
            if any(_is_private(name) for name in _defined(member)):
                dropped.update(_span(member))
    private = {name: node for node in tree.body for name in _defined(node) if _is_private(name)}
    needed: Set[str] = set()
    todo = [node for node in tree.body if not any(_is_private(name) for name in _defined(node))]
    while todo:
        node = todo.pop()
        for used in ast.walk(node):
            if isinstance(used, ast.Name) and used.lineno not in dropped and used.id in private:
                if used.id not in needed:
                    needed.add(used.id)
                    todo.append(private[used.id])
    for name, node in private.items():
        if name not in needed:
            dropped.update(_span(node))
    return dropped


def _classes(tree: ast.Module) -> List[ast.ClassDef]:
    return [node for node in tree.body if isinstance(node, ast.ClassDef)]


def _defined(node: ast.stmt) -> List[str]:
    """The names a statement of the stub defines."""
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [target.id for target in node.targets if isinstance(target, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _span(node: ast.stmt) -> range:
    """The lines of a statement, from its first decorator to its last line."""
    decorators = getattr(node, "decorator_list", [])
    first = min([node.lineno] + [decorator.lineno for decorator in decorators])
    return range(first, (node.end_lineno or node.lineno) + 1)


def _public_names(source: str) -> List[str]:
    """The module's ``__all__``, which the stub repeats so that ``from codewords_lite import *`` checks."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["__all__"]:
            return list(ast.literal_eval(node.value))
    raise SystemExit("make_stubs: the module has no __all__")


def _without_all(source: str) -> str:
    """The source without ``__all__``: stubgen then writes every public name (``__version__``, the
    constants, ``main``) and not only those listed, as a user may use any of them."""
    return re.sub(r"^__all__ = \[.*?\]\n", "", source, count=1, flags=re.M | re.S)


def _stubgen(source: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, MODULE + ".py")
        with open(path, "w", encoding="utf-8") as file:
            file.write(source)
        stubgen.main(["--quiet", "--include-private", "--include-docstrings", "-o", folder, path])
        with open(os.path.join(folder, MODULE + ".pyi"), encoding="utf-8") as file:
            return file.read()


def _inferred_types() -> Dict[str, str]:
    """What mypy infers for each module-level and class-level variable: "Client.timeout" -> "float"."""
    options = Options()
    options.preserve_asts = True  # keep the trees, and the types in them, after the build
    result = build.build([BuildSource(SOURCE, MODULE)], options)
    if result.errors:
        raise SystemExit("make_stubs: mypy finds errors in the module:\n" + "\n".join(result.errors))
    types: Dict[str, str] = {}
    for name, symbol in result.files[MODULE].names.items():
        if isinstance(symbol.node, Var) and symbol.node.type:
            types[name] = str(symbol.node.type)
        elif isinstance(symbol.node, TypeInfo):
            for attribute, member in symbol.node.names.items():
                if isinstance(member.node, Var) and member.node.type:
                    types[f"{name}.{attribute}"] = str(member.node.type)
    return types


def _check_with_mypy(text: str) -> None:
    """A stub that mypy rejects (a name it does not define, an import it lacks) fails here, and
    not in a user's type checker."""
    with tempfile.TemporaryDirectory() as folder:  # away from the checkout and its configuration
        with open(os.path.join(folder, MODULE + ".pyi"), "w", encoding="utf-8") as file:
            file.write(text)
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--cache-dir", os.path.join(folder, "cache"), MODULE + ".pyi"],
            capture_output=True,
            text=True,
            cwd=folder,
        )
    if result.returncode != 0:
        raise SystemExit("make_stubs: mypy rejects the stub this wrote:\n" + result.stdout + result.stderr)


def _ruff_format(text: str) -> str:
    """Sorted imports, none unused (a private definition may have been the only user), ruff's layout."""
    for command in (["check", "--fix", "--select", "I,F401", "--quiet"], ["format"]):
        text = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "--stdin-filename", "__init__.pyi", "-"],
            input=text,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the committed stub is up to date")
    args = parser.parse_args()
    wanted = stub_text()
    try:
        with open(STUB, encoding="utf-8") as file:
            current = file.read()
    except FileNotFoundError:
        current = ""
    if args.check:
        if current != wanted:
            print(f"{os.path.relpath(STUB, ROOT)} is out of date: run python tools/make_stubs.py", file=sys.stderr)
            return 1
        return 0
    os.makedirs(os.path.dirname(STUB), exist_ok=True)
    with open(STUB, "w", encoding="utf-8") as file:
        file.write(wanted)
    print(f"wrote {os.path.relpath(STUB, ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
