"""Issue 24: the command line and the emulator, tried as a new user would. Each test runs the real
thing: the CLI in a subprocess (or main()), against the emulator, a real HTTP server."""

import json
import os
import re
import subprocess
import sys

import pytest
from fake_runtime import SERVICES

import codewords_lite as cw

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


# -- a workflow that raises in the emulator fails its run at once ---------------------------------


def _raises(inputs, log):
    log("reading the rows")
    raise ValueError(f"bad row {inputs.get('row')}")


@pytest.fixture
def raising_workflow(monkeypatch):
    monkeypatch.setitem(SERVICES, "raises", _raises)


def test_a_workflow_that_raises_is_a_run_failed_at_once_not_a_timeout(runtime, client, raising_workflow):
    """Regression: the emulator never finished such a run; the caller waited out its deadline."""
    with pytest.raises(cw.RunFailed) as caught:
        client.run("raises", {"row": 3}, timeout=5)
    assert caught.value.status_code == 500 and "ValueError: bad row 3" in str(caught.value.detail)
    with pytest.raises(cw.RunFailed, match="bad row 4"):
        client.start("raises", {"row": 4}).wait(timeout=5)
    assert runtime.executions["raises"] == 2 and runtime.running == 0  # no slot leaked


def test_a_failed_run_from_a_raise_answers_as_the_official_handler_does(runtime, client, raising_workflow):
    """500, {"detail": "Internal server error: ..."} and Error-Origin: service, as the official
    package's handler of unhandled exceptions answers (tests/workflows/service.py)."""
    request_id = client.provision()
    with pytest.raises(cw.RunFailed):
        client.run("raises", {"row": 5}, request_id=request_id, timeout=5)
    status, headers, body = runtime.answers[request_id]
    detail = json.loads(body)["detail"]
    assert (status, headers.get("Error-Origin")) == (500, "service")
    assert detail.startswith("Internal server error:\n\n") and detail.endswith("ValueError: bad row 5")
    record = client.details(request_id)
    assert record["responseStatus"] == 500 and record["completedAt"]
    assert runtime.log_entries[request_id][0]["message"] == "reading the rows"


def test_a_bundled_workflow_given_inputs_it_cannot_read_fails_the_command_at_once(cli):
    """`check` reads its inputs as an object: given a list, it raises, and the command says so."""
    result = cli("run", "check", "[1, 2]", "--timeout", "5")
    assert result.returncode == 1 and "AttributeError" in one_line(result)


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
