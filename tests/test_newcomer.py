"""A newcomer's first ten minutes: the README's commands and recipes work as written, the emulator
runs on its own, the tour uses the installed package, and the messages say what to do."""

import inspect
import os
import pydoc
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from fake_runtime import SERVICES

import codewords_lite as cw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
TESTING = open(os.path.join(ROOT, "docs", "testing.md"), encoding="utf-8").read()


def section(title):
    """The README's text under a heading, up to the next heading of the same or a higher level."""
    lines, level, fenced = [], None, False
    for line in README.splitlines(keepends=True):
        fenced ^= line.startswith("```")
        heading = re.match(r"(#+) (.*)", line) if not fenced else None
        if heading and level is None and heading.group(2) == title:
            level = len(heading.group(1))
        elif heading and level is not None and len(heading.group(1)) <= level:
            break
        elif level is not None:
            lines.append(line)
    assert level, f"the README has no section {title!r}"
    return "".join(lines)


def code_blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_the_readme_keeps_the_commands_ci_runs():
    """CI runs the README's test command; the install and the tour must be there as written."""
    commands = section("The two commands")
    assert "pip install '.[test]' && python -m pytest -q\n" in code_blocks(commands, "bash")
    assert "pip install . && python examples/quickstart.py\n" in code_blocks(commands, "bash")
    assert len(README.encode()) < 12 * 1024, "the README is to stay short enough to read top to bottom"


def test_try_it_without_an_account_works_as_written():
    """The emulator runs alone: it prints the README's export line and workflows, serves the
    README's command, and stops cleanly on Ctrl-C (it had no command line before)."""
    start, export, command = code_blocks(section("Try it without an account"), "bash")[0].splitlines()
    assert start == "python tests/fake_runtime.py --port 8787"
    emulator = subprocess.Popen(
        [sys.executable, *shlex.split(start)[1:-1], "0"],  # any free port, not 8787
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        printed = []
        for line in emulator.stdout:
            printed.append(line)
            if line.startswith("Ctrl-C"):
                break
        url = re.search(r"serving on (http://127\.0\.0\.1:\d+)", printed[0]).group(1)
        assert export.replace("http://127.0.0.1:8787", url) in "".join(printed)
        listed = printed[printed.index("Its workflows:\n") + 1 :]
        assert [line.split()[0] for line in listed if line.startswith("    ")] == list(SERVICES)
        env = dict(os.environ, CODEWORDS_API_KEY=cw_key(export), CODEWORDS_BASE_URL=url)
        with cw.Client(base_url=url, api_key=cw_key(export)) as client:
            assert client.run("sleep", {"seconds": 0.01, "x": 1}) == {"slept": 0.01, "x": 1}
        if not shutil.which("codewords-lite"):  # the package is not installed where the suite runs
            command = command.replace("codewords-lite", f"{shlex.quote(sys.executable)} -m codewords_lite", 1)
        shell = subprocess.run(command, shell=True, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert (shell.returncode, shell.stdout, shell.stderr) == (0, '{"name":"Ada"}\n', "")
        emulator.send_signal(signal.SIGINT)
        out, err = emulator.communicate(timeout=10)
    finally:
        if emulator.poll() is None:
            emulator.kill()
            emulator.communicate()
    assert (emulator.returncode, out, err) == (0, "Stopped.\n", "")


def cw_key(export_line):
    return re.search(r"CODEWORDS_API_KEY=(\S+)", export_line).group(1)


def test_the_emulator_says_when_its_port_is_taken():
    """A port in use is one line naming it, not a traceback."""
    with socket_on_a_port() as port:
        result = subprocess.run(
            [sys.executable, "tests/fake_runtime.py", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr


class socket_on_a_port:
    def __enter__(self):
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        return self.socket.getsockname()[1]

    def __exit__(self, *exc_info):
        self.socket.close()


def test_the_testing_recipes_pass(tmp_path):
    """The recipes of docs/testing.md, which the README's "Testing code that uses codewords-lite"
    points to, run as a user's own test files, with the emulator copied next to them, so the
    page cannot drift from the library."""
    assert "(docs/testing.md)" in section("Testing code that uses codewords-lite")
    blocks = code_blocks(TESTING, "python")
    assert len(blocks) == 2
    for block in blocks:
        filename = re.match(r"# (test_\w+\.py)\n", block).group(1)
        (tmp_path / filename).write_text(block, encoding="utf-8")
    shutil.copy(os.path.join(ROOT, "tests", "fake_runtime.py"), tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


def test_the_tour_uses_the_installed_package():
    """examples/quickstart.py must not fall back on the checkout's module: without an installed
    package (python -S hides site-packages) it says so, where it used to run the tour anyway."""
    result = subprocess.run(
        [sys.executable, "-S", os.path.join(ROOT, "examples", "quickstart.py")],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"codewords-lite is not installed for {sys.executable}: run `pip install .` in {ROOT}\n"


def test_the_tour_runs_to_its_end_against_the_emulator():
    """Regression: the tour still caught ServerError when a workflow's failure became RunFailed,
    so the README's first command crashed at step 4; only its opening was ever tested. The
    checkout's module stands in for the installed package (PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEWORDS_")}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
        cwd=ROOT,
        env={**env, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RunFailed:" in result.stdout and "(exit code 0)" in result.stdout


def test_the_command_lines_missing_key_message_says_what_to_export(capsys):
    """The command line has no Client(api_key=...): its message used to suggest it."""
    assert cw.main(["run", "echo"]) == 2
    err = capsys.readouterr().err
    assert "export CODEWORDS_API_KEY=..." in err and "Client(" not in err


@pytest.mark.parametrize("method", [cw.Client.run, cw.Client.map])
def test_help_shows_a_readable_default_for_fallback(method):
    """help(Client.run) used to show fallback=<object object at 0x...>."""
    signature = inspect.signature(method)
    assert repr(signature.parameters["fallback"].default) == "<the client's setting>"
    assert " at 0x" not in pydoc.render_doc(method)


def test_a_refused_connection_says_where_in_words():
    """A newcomer with the emulator not running read urllib3's internals: "_WatchedPool(host=...):
    Max retries exceeded ... <codewords_lite._WatchedConnection object at 0x...>"."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once it is closed
    with pytest.raises(cw.APIConnectionError) as caught:
        cw.Client("cwk-x", base_url=url, max_retries=0).details("req_1")
    assert str(caught.value) == f"GET /request/req_1 failed: could not connect to {url}: " + (
        "Failed to establish a new connection: [Errno 111] Connection refused"
    )
