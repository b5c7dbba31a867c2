"""Issue 24: the command line and the emulator, tried as a new user would. Each test runs the real
thing: the CLI in a subprocess (or main()), against the emulator, a real HTTP server."""

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from fake_runtime import SERVICES, WORKFLOW_HELP, FakeRuntime

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


# -- NaN, Infinity and numbers too large for a float: exit 2, one line naming them -----------------


@pytest.mark.parametrize(
    "args, stdin, bad",
    [
        (["run", "echo", '{"n": NaN}'], None, "NaN"),
        (["run", "echo", '{"n": -Infinity}'], None, "-Infinity"),
        (["run", "echo", "[1, 1e400]"], None, "1e400"),
        (["run", "echo", "-"], '{"n": Infinity}', "Infinity"),
        (["start", "echo", "-"], '{"deep": [{"x": -1E999}]}', "-1E999"),
        (["run", "echo", "-i", "j=[NaN]"], None, "NaN"),
        (["run", "echo", "{}", "-i", 'j={"a": 2e308}'], None, "2e308"),
    ],
)
def test_non_finite_numbers_exit_2_with_one_line_naming_them_and_send_nothing(cli, runtime, args, stdin, bad):
    """Regression: a 30-line traceback (TypeError: inputs are not JSON-serialisable) and exit 1."""
    result = cli(*args, stdin=stdin)
    assert result.returncode == 2 and result.stdout == b""
    assert re.search(rf"(^|\s){re.escape(bad)}\b", one_line(result))
    assert runtime.calls == []


def test_a_non_finite_number_in_an_inputs_file_is_named_too(cli, runtime, tmp_path):
    path = tmp_path / "inputs.json"
    path.write_text('{"ratio": NaN}')
    result = cli("run", "echo", f"@{path}")
    assert result.returncode == 2 and "NaN" in one_line(result) and runtime.calls == []


# -- -i keeps the text of what is not plainly JSON; -s is always a string --------------------------


def test_fields_keep_their_text_unless_they_are_plainly_json(cli, runtime):
    """Regression: hex=89504e47 became 8.9504e+51 and ver=1.10 became 1.1."""
    fields = {
        "hex": "89504e47",
        "ver": "1.10",
        "zip": "007",
        "f": "1.5",
        "big": "1e400",
        "nan": "NaN",
        "plus": "+3",
        "n": "3",
        "neg": "-12",
        "ok": "true",
        "no": "false",
        "none": "null",
        "j": '{"a": [1, 2.5]}',
        "l": "[1]",
        "q": '"3"',
        "e": "",
    }
    args = [arg for name, value in fields.items() for arg in ("-i", f"{name}={value}")]
    result = cli("run", "echo", *args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "hex": "89504e47",
        "ver": "1.10",
        "zip": "007",
        "f": "1.5",
        "big": "1e400",
        "nan": "NaN",
        "plus": "+3",
        "n": 3,
        "neg": -12,
        "ok": True,
        "no": False,
        "none": None,
        "j": {"a": [1, 2.5]},
        "l": [1],
        "q": "3",
        "e": "",
    }


def test_dash_s_is_always_a_string_and_the_last_field_given_wins(cli):
    result = cli("run", "echo", "-s", "n=3", "-s", "ok=true", "-s", 'j={"a": 1}', "-s", "e=", "-s", "u=a=b")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"n": "3", "ok": "true", "j": '{"a": 1}', "e": "", "u": "a=b"}
    assert json.loads(cli("run", "echo", "-i", "n=3", "-s", "n=4").stdout) == {"n": "4"}
    assert json.loads(cli("run", "echo", "-s", "n=4", "-i", "n=3").stdout) == {"n": 3}
    assert cli("start", "echo", "{}", "-s", "n=4").stdout.decode().startswith("req_")


@pytest.mark.parametrize(
    "args, message",
    [
        (["-s", "novalue"], "-s takes KEY=VALUE"),
        (["-s", "=x"], "-s takes KEY=VALUE"),
        (["-i", "j={not json"], "-s j="),  # meant as JSON and not JSON: said, with the way to send the text
        (["-i", "j=[1,"], "-s j="),
    ],
)
def test_a_bad_field_is_one_line_and_exit_2(cli, runtime, args, message):
    result = cli("run", "echo", *args)
    assert result.returncode == 2 and message in one_line(result) and runtime.calls == []


def test_help_says_which_values_are_json_and_offers_dash_s(cli):
    for args in (["--help"], ["run", "--help"], ["start", "--help"]):
        text = " ".join(cli(*args).stdout.decode().split())
        assert "-s KEY=VALUE" in text or "-s key=value" in text, args
        assert "true, false, null" in text and "always a string" in text, args


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


# -- the emulator: what its banner says, and how it stops -------------------------------------------


def read_banner(process):
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C"):
            return lines
    raise AssertionError("the banner ended early: " + "".join(lines))


def test_the_banner_says_what_each_workflow_does_and_how_to_stop_it():
    process = subprocess.Popen(
        [sys.executable, "tests/fake_runtime.py", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = read_banner(process)
    finally:
        process.terminate()
        process.communicate(timeout=10)
    listed = [line.split(None, 1) for line in banner[banner.index("Its workflows:\n") + 1 :] if line.startswith("    ")]
    assert [name for name, _ in listed] == list(SERVICES)
    for name, said in listed:
        assert len(said.split()) >= 3, f"the banner does not say what {name} does"
    assert set(WORKFLOW_HELP) == set(SERVICES)
    assert f"kill {process.pid}" in banner[-1] and "SIGTERM" in banner[-1]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to a background job"])
def test_the_emulator_stops_on_sigterm_and_on_ctrl_c_in_the_background(how):
    """Regression: started with `&`, which has the shell ignore SIGINT in the job, it ignored
    Ctrl-C; SIGTERM killed it without a word."""
    if how == "SIGTERM":
        command = [sys.executable, "tests/fake_runtime.py", "--port", "0"]
    else:  # a non-interactive shell's background job: SIGINT ignored, as bash sets it
        command = ["bash", "-c", f"{sys.executable} tests/fake_runtime.py --port 0 & wait $!"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = read_banner(process)
        pid = int(re.search(r"kill (\d+)", banner[-1]).group(1))
        os.kill(pid, signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert (process.returncode, out, err) == (0, "Stopped.\n", "")


def test_a_second_emulator_on_a_taken_port_says_so_in_one_line():
    with FakeRuntime() as first:
        port = first.url.rsplit(":", 1)[1]
        result = subprocess.run(
            [sys.executable, "tests/fake_runtime.py", "--port", port],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0 and result.stdout == "" and result.stderr.count("\n") == 1
    assert f"127.0.0.1:{port}" in result.stderr and "already" in result.stderr


# -- upload - reads standard input ----------------------------------------------------------------


def test_upload_dash_reads_standard_input(cli, runtime):
    """Regression: `upload -` was "No such file or directory: '-'" (only /dev/stdin worked)."""
    result = cli("upload", "-", stdin=b"a,b\n1,2\n")
    assert result.returncode == 0 and result.stderr == b""
    assert result.stdout.decode().strip().endswith("/stdin")  # as `upload /dev/stdin` names it
    named = cli("upload", "-", "--filename", "rows.csv", stdin=b"a,b\n3,4\n")
    assert named.returncode == 0 and named.stdout.decode().strip().endswith("/rows.csv")
    contents = sorted(u["content"] for u in runtime.uploads.values() if "size" in u)
    assert contents == [b"a,b\n1,2\n", b"a,b\n3,4\n"]
    assert runtime.storage_calls[-1]["headers"]["Content-Type"] == "text/csv"


def test_dash_without_a_standard_input_is_one_line_and_exit_2(runtime):
    """A process whose descriptor 0 is closed (sys.stdin is None) got an AttributeError traceback."""
    command = f"exec 0<&-; {sys.executable} -m codewords_lite"
    for args in ("upload -", "run echo -"):
        result = subprocess.run(
            ["bash", "-c", f"{command} {args}"], cwd=ROOT, env=env_for(runtime), capture_output=True, timeout=60
        )
        assert result.returncode == 2 and "standard input" in one_line(result), args
    assert runtime.calls == []


# -- --fallback off on a 504: the run goes on, and how to pick it up --------------------------------


def test_fallback_off_on_a_504_says_the_run_goes_on_and_how_to_pick_it_up():
    with FakeRuntime(gateway_timeout=0.3) as runtime:
        env = env_for(runtime)
        command = [sys.executable, "-m", "codewords_lite", "run", "sleep", '{"seconds": 0.6}', "--fallback", "off"]
        named = subprocess.run([*command, "--logs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        request_id = runtime.calls_to("POST", "/run/")[0]["headers"]["X-Provisioned-Request-Id"]
        assert named.returncode == 1 and named.stdout == ""
        last = named.stderr.strip().splitlines()[-1]
        assert "504" in last and "may go on" in last and last.endswith(f"codewords-lite result {request_id}")
        picked_up = subprocess.run(
            [sys.executable, "-m", "codewords_lite", "result", request_id],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(picked_up.stdout) == {"slept": 0.6}
        unnamed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert unnamed.returncode == 1 and unnamed.stdout == ""
        line = unnamed.stderr.strip()
        assert "\n" not in line and "may go on" in line and "without a request id" in line
        assert "--fallback resume" in line
        once = subprocess.run(
            command[:-2], cwd=ROOT, env=env_for(runtime, runtime.issue_one_time_key()), capture_output=True, text=True
        )  # a one-time key: off by default, and resume is not for it
        assert once.returncode == 1 and "may go on" in once.stderr and "one-time key" in once.stderr


# -- result of an id provisioned but never sent ------------------------------------------------------


def test_result_of_an_id_no_run_was_sent_with_says_so_at_once_and_at_its_deadline(runtime, client):
    """Regression: it waited the whole deadline in silence, then said the run "may still finish"."""
    request_id = client.provision()
    process = subprocess.Popen(
        [sys.executable, "-m", "codewords_lite", "result", request_id, "--timeout", "1"],
        cwd=ROOT,
        env=env_for(runtime),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = process.communicate(timeout=30)
    assert process.returncode == 3 and out == ""
    first, last = err.strip().splitlines()
    assert f"run {request_id} has not started" in first and "no run has been sent with this request id" in first
    assert f"run {request_id} never started" in last and "no run was sent with this request id" in last
    assert last.endswith(f"codewords-lite result {request_id}")


def test_result_keeps_waiting_for_a_run_sent_later_with_that_id(runtime, client):
    """The note does not end the wait: another process may send the run under the id it was given."""
    request_id = client.provision()
    process = subprocess.Popen(
        [sys.executable, "-m", "codewords_lite", "result", request_id, "--timeout", "20"],
        cwd=ROOT,
        env=env_for(runtime),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([process.stderr], [], [], 10)  # the note comes before the wait
        assert ready and "has not started" in process.stderr.readline()
        assert process.poll() is None  # still waiting
        assert client.run("echo", {"late": True}, request_id=request_id) == {"late": True}
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert (process.returncode, json.loads(out), err) == (0, {"late": True}, "")


def test_result_of_a_started_run_says_nothing_more(cli, runtime, client):
    run = client.start("sleep", {"seconds": 0.2})
    result = cli("result", run.request_id)
    assert (result.returncode, json.loads(result.stdout), result.stderr) == (0, {"slept": 0.2}, b"")


def test_the_librarys_timeout_of_a_wait_by_id_says_a_run_may_never_have_been_sent(runtime, client):
    request_id = client.provision()
    started = time.monotonic()
    with pytest.raises(cw.RunTimeout) as caught:
        client.result(request_id, timeout=0.5)
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert f'client.result("{request_id}")' in message  # as before
    assert "no run was sent with" in message and f'client.details("{request_id}")' in message


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


# -- the README's test command: how long it takes, and why tests are skipped ----------------------


def test_the_readme_says_how_long_the_tests_take_and_how_to_see_why_some_are_skipped():
    from test_newcomer import section

    commands = " ".join(section("The two commands").split())
    assert "200 s on two cores" in commands and "-rs" in commands
