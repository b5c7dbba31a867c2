"""The command line, run as a user runs it: in a subprocess, against the emulator."""

import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from fake_runtime import FakeRuntime

import codewords_lite as cw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cli(runtime):
    """Runs ``python -m codewords_lite ARGS`` with the key and base URL in the environment."""
    outputs = []

    def call(*args, stdin=None, key=runtime.api_key, base_url=runtime.url):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CODEWORDS_")}
        if key:
            env["CODEWORDS_API_KEY"] = key
        if base_url:
            env["CODEWORDS_BASE_URL"] = base_url
        result = subprocess.run(
            [sys.executable, "-m", "codewords_lite", *args],
            cwd=ROOT,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        outputs.append(result.stdout + result.stderr)
        return result

    yield call
    for output in outputs:  # whatever happened, the key never shows
        assert runtime.api_key not in output


def test_run_prints_compact_json_and_nothing_else(cli, runtime):
    result = cli("run", "echo", '{"name": "Ada", "tags": ["x"]}')
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == '{"name":"Ada","tags":["x"]}\n'
    assert runtime.executions["echo"] == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("n=3", 3),
        ("ok=true", True),
        ("x=null", None),
        ("s=hello", "hello"),
        ('j={"a": [1]}', {"a": [1]}),
        ("e=", ""),
        ("f=1.5e3", "1.5e3"),  # issue 24: only integers that round-trip are numbers (1.10 stays "1.10")
        ("url=https://x.example/a=b", "https://x.example/a=b"),
        ('q="3"', "3"),
    ],
)
def test_fields_are_json_when_plainly_meant_as_json(field, value):
    assert cw._parse_field(field) == (field.split("=", 1)[0], value)


def test_fields_override_inputs_from_a_file_and_from_stdin(cli, tmp_path):
    path = tmp_path / "inputs.json"
    path.write_text('{"a": 1, "b": 2}')
    result = cli("run", "echo", f"@{path}", "-i", "b=20", "-i", "c=word")
    assert json.loads(result.stdout) == {"a": 1, "b": 20, "c": "word"}
    result = cli("run", "echo", "-", "-i", "z=true", stdin='{"from": "stdin"}')
    assert json.loads(result.stdout) == {"from": "stdin", "z": True}


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "echo", "{not json"], "INPUTS is not valid JSON"),
        (["run", "echo", "[1, 2]", "-i", "a=1"], "-i adds a field to a JSON object, and INPUTS is a list"),
        (["run", "echo", "-i", "novalue"], "-i takes KEY=VALUE"),
        (["run", "echo", "@/nonexistent/inputs.json"], "No such file"),
        (["run", "bad/id"], "bad service id"),
        (["upload", "/nonexistent/file.csv"], "No such file"),
    ],
)
def test_bad_usage_exits_2_with_one_line_and_sends_nothing(cli, runtime, args, message):
    result = cli(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert runtime.calls == []


def test_argparse_usage_errors_exit_2(cli):
    assert cli("run").returncode == 2
    assert cli("frobnicate").returncode == 2


def test_a_missing_key_exits_2(cli, runtime):
    result = cli("run", "echo", key=None)
    assert result.returncode == 2 and "CODEWORDS_API_KEY" in result.stderr
    assert runtime.calls == []


def test_a_failing_workflow_exits_1_with_the_detail_and_request_id(cli):
    result = cli("run", "fail", '{"detail": "no such customer"}')
    assert result.returncode == 1 and result.stdout == ""
    assert "no such customer" in result.stderr and "(request req_" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback_and_the_requests(cli):
    result = cli("run", "fail", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "POST /run/fail" in result.stderr


def test_start_result_logs_and_details(cli, runtime):
    started = cli("start", "talk", '{"lines": 3, "interval": 0.05}')
    request_id = started.stdout.strip()
    assert started.returncode == 0 and request_id.startswith("req_")
    logs = cli("logs", request_id)
    assert [json.loads(line)["message"] for line in logs.stdout.splitlines()] == ["line 0", "line 1", "line 2"]
    assert json.loads(cli("result", request_id).stdout) == {"lines": 3}
    details = json.loads(cli("details", request_id).stdout)
    assert details["id"] == request_id and details["responseStatus"] == 200


def test_run_with_logs_prints_them_to_stderr(cli):
    result = cli("run", "talk", '{"lines": 4}', "--logs")
    assert result.returncode == 0 and json.loads(result.stdout) == {"lines": 4}
    assert result.stderr.splitlines() == ["line 0", "line 1", "line 2", "line 3"]


def test_a_deadline_exits_3_and_names_the_run_to_pick_up_later(cli, runtime):
    result = cli("run", "sleep", '{"seconds": 1.5}', "--timeout", "0.5")
    assert result.returncode == 3 and result.stdout == ""
    request_id = result.stderr.split("codewords-lite result ")[-1].strip()
    assert request_id.startswith("req_")
    assert json.loads(cli("result", request_id).stdout) == {"slept": 1.5}
    assert runtime.executions["sleep"] == 1


@pytest.mark.parametrize("fallback, executions", [("rerun", 2), ("off", 1)])
def test_fallback_option(fallback, executions):
    with FakeRuntime(gateway_timeout=0.3) as runtime:
        env = dict(os.environ, CODEWORDS_API_KEY=runtime.api_key, CODEWORDS_BASE_URL=runtime.url)
        result = subprocess.run(
            [sys.executable, "-m", "codewords_lite", "run", "sleep", '{"seconds": 0.6}', "--fallback", fallback],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == (0 if fallback == "rerun" else 1)
        time.sleep(0.5)
        assert runtime.executions["sleep"] == executions


def test_upload(cli, runtime, tmp_path):
    path = tmp_path / "table.csv"
    path.write_bytes(b"a,b\n1,2\n")
    result = cli("upload", str(path), "--filename", "renamed.csv")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.strip().endswith("/renamed.csv")
    (put,) = runtime.storage_calls
    assert put["headers"]["Content-Type"] == "text/csv"


def test_version_and_help(cli):
    assert cli("--version").stdout.strip() == f"codewords-lite {cw.__version__}"
    help_text = cli("--help").stdout
    for code in ("0 ", "1 ", "2 ", "3 ", "130"):
        assert f"\n  {code}" in help_text
    for command in ("run", "start", "result", "logs", "details", "upload"):
        assert command in help_text


@pytest.mark.skipif(shutil.which("codewords-lite") is None, reason="the package is not installed")
def test_the_console_script():
    result = subprocess.run(["codewords-lite", "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip().startswith("codewords-lite ")


# -- on a terminal -----------------------------------------------------------------------------


def run_on_a_terminal(runtime, *args, interrupt_after=None, key=None):
    """Runs the command with its standard error on a pseudo-terminal; returns (code, stdout, stderr)."""
    master, slave = pty.openpty()
    env = dict(os.environ, CODEWORDS_API_KEY=key or runtime.api_key, CODEWORDS_BASE_URL=runtime.url, COLUMNS="120")
    process = subprocess.Popen(
        [sys.executable, "-m", "codewords_lite", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    seen, started = b"", time.monotonic()
    while True:
        if interrupt_after is not None and time.monotonic() - started > interrupt_after:
            process.send_signal(signal.SIGINT)
            interrupt_after = None
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not data:
                break
            seen += data
        elif process.poll() is not None:
            break
        assert time.monotonic() - started < 30
    os.close(master)
    stdout = process.stdout.read()
    return process.wait(), stdout, seen.decode()


def test_a_progress_line_on_a_terminal_shows_time_request_id_and_newest_log(runtime):
    code, stdout, stderr = run_on_a_terminal(runtime, "run", "talk", '{"lines": 12, "interval": 0.1}')
    assert code == 0 and json.loads(stdout) == {"lines": 12}
    frames = [frame for frame in stderr.split("\r\x1b[K") if frame.strip()]
    assert len(frames) >= 3
    request_id = runtime.calls_to("POST", "/run/")[0]["headers"]["X-Provisioned-Request-Id"]
    assert any(request_id in frame and " s " in frame and "line " in frame for frame in frames)
    assert stderr.endswith("\r\x1b[K")  # the line is cleared at the end


def test_upload_progress_on_a_terminal(runtime, tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(64 << 20))
    code, stdout, stderr = run_on_a_terminal(runtime, "upload", str(path))
    assert code == 0 and stdout.strip().endswith("/big.bin")
    assert "MiB" in stderr and "%" in stderr and "MiB/s" in stderr


def test_no_progress_without_a_terminal(cli):
    result = cli("run", "talk", '{"lines": 12, "interval": 0.05}')
    assert result.returncode == 0 and result.stderr == ""


def test_ctrl_c_prints_the_request_id_to_resume_with(runtime):
    code, stdout, stderr = run_on_a_terminal(runtime, "run", "sleep", '{"seconds": 2}', interrupt_after=0.8)
    assert code == 130 and stdout == ""
    request_id = stderr.split("codewords-lite result ")[-1].strip()
    assert request_id == runtime.calls_to("POST", "/run/")[0]["headers"]["X-Provisioned-Request-Id"]
    assert cw.Client(runtime.api_key, base_url=runtime.url).result(request_id) == {"slept": 2}


def test_a_one_time_key_on_a_terminal_sends_one_request_and_follows_no_logs(runtime, cli):
    """Review 10 d: the status line on a terminal added an on_log, so `run`/`result` with a
    one-time key exited 2 there. Now it shows time and id only; --logs is a usage error."""
    code, stdout, _ = run_on_a_terminal(runtime, "run", "echo", '{"n": 1}', key=runtime.issue_one_time_key())
    assert code == 0 and json.loads(stdout) == {"n": 1}
    assert [c["path"] for c in runtime.calls] == ["/run/echo"]
    refused = cli("run", "echo", "{}", "--logs", key=runtime.issue_one_time_key())
    assert refused.returncode == 2 and "--logs" in refused.stderr and "one-time key" in refused.stderr
    assert len(runtime.calls) == 1


def test_a_provision_that_cannot_connect_fails_the_command_at_once(cli):
    """Review 10 j, on the command line: a refused provision is not retried; exit 1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = cli("run", "echo", "{}", "--debug", base_url=f"http://127.0.0.1:{port}")
    assert result.returncode == 1 and "the run was not sent" in result.stderr
    assert "; retry 1 of" not in result.stderr  # --debug logs each retry
