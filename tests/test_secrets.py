"""The API key never leaves the process except in the Authorization header to the API host.

With every logger at DEBUG, run every operation, the failing ones too, and look for the key in
every log record, exception text and repr, and in the command line's output.
"""

import logging
import os
import subprocess
import sys

import pytest
from fake_runtime import FakeRuntime

import codewords_lite as cw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "cwk-secret-5f4dcc3b5aa765d61d8327deb882cf99"


def test_the_key_appears_in_no_log_record_message_or_repr(caplog, tmp_path, quick_retries, monkeypatch):
    monkeypatch.setattr(cw, "LOG_NOT_FOUND_GRACE", 0.2)
    caplog.set_level(logging.DEBUG)  # every logger: ours, urllib3's, requests'
    seen = []
    with FakeRuntime(api_key=KEY, gateway_timeout=0.3) as runtime:
        client = cw.Client(KEY, base_url=runtime.url)
        path = tmp_path / "data.csv"
        path.write_bytes(b"a,b\n")
        seen += [repr(client), str(client)]
        seen.append(repr(client.run("echo", {"k": 1}, on_log=seen.append)))
        seen.append(repr(client.run("sleep", {"seconds": 0.5, "lines": 2}, on_log=seen.append)))  # a 504, resumed
        run = client.start("talk", {"lines": 3})
        seen += [repr(run), repr(run.wait(on_log=seen.append)), repr(run.record), repr(list(run.logs()))]
        seen += [
            repr(client.details(run.request_id)),
            client.upload(path),
            repr(list(client.map("echo", [{"m": 1}] * 3))),
        ]
        runtime.fault("POST", "/run/echo", status=307, headers={"Location": f"{runtime.url}/x"})
        runtime.fault("GET", "/request/", status=500, times=10, body=f'{{"detail": "bad key {KEY}"}}'.encode())
        failing = [
            lambda: client.run("fail", {"detail": "boom"}),
            lambda: client.start("fail").wait(),
            lambda: client.run("echo"),  # the redirect
            lambda: client.details(run.request_id),  # a server that echoes the key back
            lambda: client.run("sleep", {"seconds": 2}, timeout=0.5),
            lambda: client.result("req_nobody"),
            lambda: list(client.logs("req_nobody")),
            lambda: cw.Client("cwk-wrong-key", base_url=runtime.url).run("echo"),
            lambda: cw.Client(KEY + "\n", base_url=runtime.url).run("echo"),
            lambda: cw.Client(KEY, base_url="http://127.0.0.1:1").run("echo", fallback=None),
        ]
        for call in failing:
            with pytest.raises(cw.CodewordsError) as info:
                call()
            seen += [str(info.value), repr(info.value), repr(info.value.args), repr(vars(info.value).get("detail"))]
    texts = seen + [record.getMessage() for record in caplog.records] + [caplog.text]
    assert len(caplog.records) > 50  # the DEBUG logs were on
    leaks = [text for text in texts if KEY in str(text)]
    assert leaks == []


def test_the_key_is_not_in_the_command_lines_output_even_with_debug(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"x")
    with FakeRuntime(api_key=KEY) as runtime:
        env = dict(os.environ, CODEWORDS_API_KEY=KEY, CODEWORDS_BASE_URL=runtime.url)
        commands = [
            ["run", "echo", '{"a": 1}'],
            ["run", "fail"],
            ["start", "talk"],
            ["upload", str(path)],
            ["result", "req_nobody"],
            ["details", "req_nobody"],
            ["run", "sleep", '{"seconds": 2}', "--timeout", "0.3"],
        ]
        for command in commands:
            result = subprocess.run(
                [sys.executable, "-m", "codewords_lite", *command, "--debug"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert KEY not in result.stdout + result.stderr
            assert "codewords_lite" in result.stderr or result.returncode == 0


def test_a_one_time_key_is_sent_exactly_once():
    with FakeRuntime(api_key="cwotk-one-time-secret", gateway_timeout=0.3) as runtime:
        client = cw.Client(runtime.api_key, base_url=runtime.url)
        with pytest.raises(cw.GatewayTimeout):
            client.run("sleep", {"seconds": 0.6})  # no provision, no retry, no fallback
        sent = [c for c in runtime.calls if runtime.api_key in c["headers"].get("Authorization", "")]
        assert len(sent) == 1 and sent[0]["path"] == "/run/sleep"
