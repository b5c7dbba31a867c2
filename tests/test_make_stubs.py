"""tools/make_stubs.py, which writes the types users' checkers read: what it keeps of stubgen's output."""

import ast
import importlib.util
import os
import textwrap

import pytest

pytest.importorskip("mypy.stubgen", reason="tools/make_stubs.py needs mypy (the dev venv and .ci/run's types step)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("make_stubs", os.path.join(ROOT, "tools", "make_stubs.py"))
assert spec is not None and spec.loader is not None
make_stubs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_stubs)


def kept(stub: str) -> str:
    """The lines of a stubgen output (``--include-private``) that make it into the stub."""
    stub = textwrap.dedent(stub)
    dropped = make_stubs._private_lines(ast.parse(stub))
    return "\n".join(line for number, line in enumerate(stub.splitlines(), 1) if number not in dropped).strip()


def test_a_decorator_after_a_private_class_stays_with_its_function():
    """Guards the filter's state: a line-based "skipping" after a private class ran on into the next
    ``@...`` line, so a public function lost its decorator (and a private class's own decorator
    was left to the public function that followed it)."""
    stub = """
        class _Hidden:
            def method(self) -> None: ...

        @overload
        def public(x: int) -> int: ...
        @overload
        def public(x: str) -> str: ...

        @final
        class _AlsoHidden: ...

        def plain() -> None: ...
    """
    assert kept(stub).split("\n") == [
        "@overload",
        "def public(x: int) -> int: ...",
        "@overload",
        "def public(x: str) -> str: ...",
        "",
        "",
        "def plain() -> None: ...",
    ]


def test_private_names_that_public_ones_refer_to_are_kept():
    """Guards against undefined names in the stub: a private TypeVar, Protocol or alias that a public
    signature names is kept, with what it names in turn; other private definitions, and the
    private members of public classes (with what only they use), are left out."""
    stub = """
        _C = TypeVar("_C", bound="Client")
        _Unused = TypeVar("_Unused")
        _Size = int

        class _Readable(Protocol):
            def read(self, size: _Size, /) -> bytes: ...

        class _Helper: ...

        class Client:
            def __enter__(self: _C) -> _C: ...
            def upload(self, source: _Readable) -> str: ...
            def _put(self, body: _Helper) -> None: ...
    """
    assert kept(stub) == textwrap.dedent("""\
        _C = TypeVar("_C", bound="Client")
        _Size = int

        class _Readable(Protocol):
            def read(self, size: _Size, /) -> bytes: ...


        class Client:
            def __enter__(self: _C) -> _C: ...
            def upload(self, source: _Readable) -> str: ...""")


def test_the_annotation_of_self_that_stubgen_drops_is_put_back():
    """Guards ``def __enter__(self: _C) -> _C``: stubgen writes ``(self)``, and a TypeVar that appears
    only in the return type is an error in the stub (a subclass would lose its type)."""
    source = (
        "class Client:\n    def __enter__(self: _C) -> _C:\n        return self\n    def close(self) -> None: ...\n"
    )
    stub = "class Client:\n    def __enter__(self) -> _C: ...\n    def close(self) -> None: ...\n"
    assert make_stubs._with_self_types(stub, source) == (
        "class Client:\n    def __enter__(self: _C) -> _C: ...\n    def close(self) -> None: ...\n"
    )


def test_a_stub_that_mypy_rejects_fails_in_the_tool():
    """Guards the check inside make_stubs.py: a stub with an undefined name fails there, with mypy's
    message, and not in a user's type checker."""
    with pytest.raises(SystemExit, match=r"mypy rejects the stub[\s\S]*_Readable"):
        make_stubs._check_with_mypy("def upload(source: _Readable) -> str: ...\n")
    make_stubs._check_with_mypy("def upload(source: bytes) -> str: ...\n")
