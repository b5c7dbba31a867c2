"""Issue 24: the command line and the emulator, tried as a new user would. Each test runs the real
thing: the CLI in a subprocess (or main()), against the emulator, a real HTTP server."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_for(runtime, key=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEWORDS_")}
    return dict(env, CODEWORDS_API_KEY=key or runtime.api_key, CODEWORDS_BASE_URL=runtime.url)


@pytest.fixture
def cli(runtime):
    """Runs ``python -m codewords_lite ARGS`` against the emulator; stdin may be text or bytes."""

    def call(*args, stdin=None, timeout=60):
        return subprocess.run(
            [sys.executable, "-m", "codewords_lite", *args],
            cwd=ROOT,
            env=env_for(runtime),
            input=stdin.encode() if isinstance(stdin, str) else stdin,
            capture_output=True,
            timeout=timeout,
        )

    return call


def one_line(result):
    """The one line of standard error of a command that failed, checked to be one line, no traceback."""
    err = result.stderr.decode()
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


# -- figures that do not break into -q's progress line ------------------------------------------


FIGURES_TEST = """
def test_one(figures):
    figures.append("one figure")

def test_two(figures):
    figures.append("another figure")

def test_three():
    pass
"""


def test_figures_are_printed_after_the_progress_line_not_inside_it(tmp_path):
    """Regression: the chaos and map figures were printed in the middle of -q's dots. The suite's
    conftest is loaded as a plugin (-p conftest) by a pytest run on a file of its own."""
    (tmp_path / "test_figured.py").write_text(FIGURES_TEST)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", str(tmp_path)],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT])),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"\.\.\. +\[100%\]", lines[0]), lines
    figures = lines.index("  one figure")
    assert lines[figures + 1] == "  another figure" and "figures" in lines[figures - 1]
    assert lines[-1].startswith("3 passed")
