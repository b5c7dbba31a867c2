"""Write codewords_lite-stubs/__init__.pyi, the types a user's type checker reads, from codewords_lite.py.

    python tools/make_stubs.py            # after any change to the public API; commit the result
    python tools/make_stubs.py --check    # CI: fail if the committed stub is not what this writes

PEP 561 has no py.typed marker for a single-file module, so its types travel in the wheel as a
stub-only package beside it, which mypy and pyright find without a marker. mypy's stubgen writes
the signatures and docstrings; what it can only call ``Incomplete`` (an attribute set in
``__init__``, a constant) gets the type that mypy infers for it, so a user sees ``str | None``
where stubgen would say ``Any``. Needs mypy and ruff (the versions .ci/run pins).
"""

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

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
    """The stub as it should be, formatted as ruff formats the rest of the tree."""
    with open(SOURCE, encoding="utf-8") as file:
        source = file.read()
    public = _public_names(source)
    raw = _stubgen(_without_all(source))
    types = _inferred_types()
    lines: List[str] = []
    owner = ""  # the class whose body the line is in; "" at module level
    skipping = False
    modules = set()  # those the filled-in types name, as in "logging.Logger"
    for line in raw.splitlines():
        top = re.match(r"(class |def )?(\w+)", line)
        if top:
            owner = top.group(2) if top.group(1) == "class " else ""
            skipping = top.group(2).startswith("_") and not top.group(2).startswith("__")
        if skipping:
            continue  # a private class: the module's business, not its users'
        attribute = re.fullmatch(r"(\s*)(\w+): Incomplete", line)
        if attribute:
            indent, name = attribute.groups()
            inferred = types[owner + "." + name if indent else name].replace(MODULE + ".", "")
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
    return _ruff_format(HEADER + text)


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
        stubgen.main(["--quiet", "--include-docstrings", "-o", folder, path])
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


def _ruff_format(text: str) -> str:
    """Sorted imports, none unused (a private class may have been the only user), ruff's layout."""
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
