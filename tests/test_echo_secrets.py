"""A server that echoes every request header back, in its status line, its headers and its body,
on every endpoint: the key must still be in no exception, attribute, pickle or log record."""

import json
import logging
import os
import pickle
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import codewords_lite as cw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "cwk-SECRET-5f4dcc3b5aa765d61d8327deb882cf99"
PREFIX = KEY[:7]  # "cwk-SEC": what a cut in the middle of the key would leave


def _body(shape, headers):
    """An answer that carries the request's headers, the key among them, in one of several shapes."""
    sent = headers.get("Authorization", "")
    if shape == "headers":
        return json.dumps(headers)
    if shape == "detail":
        return json.dumps({"detail": f"bad key {sent}", "request_id": sent})
    if shape == "cut":  # the key across the 500th character of the detail
        return json.dumps({"detail": "x" * 490 + sent})
    if shape == "record":
        return json.dumps({"responseStatus": 500, "responseJson": {"detail": "x" * 490 + sent, "h": headers}})
    if shape == "escaped":  # the key's characters as JSON escapes
        return '{"detail": "' + "".join(f"\\u{ord(c):04x}" for c in sent) + '"}'
    return f"{'y' * 495} {sent} {headers}"  # text


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # or each answer waits ~40 ms for a delayed ACK
    status = 500
    shape = "headers"

    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = dict(self.headers)
        data = _body(self.shape, headers).encode()
        self.send_response(self.status, f"Echo {headers.get('Authorization')}")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Location", f"https://elsewhere/{headers.get('Authorization')}")
        self.send_header("X-Echo", headers.get("Authorization", ""))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = answer

    def log_message(self, *args):
        pass


@pytest.fixture
def echo():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _texts(error):
    """Everything of an exception a person could see: text, repr, attributes, pickle, and its chain."""
    texts = []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts += [str(error), repr(error), repr(error.args), repr(vars(error))]
        try:
            texts.append(repr(pickle.loads(pickle.dumps(error)).__dict__))
        except Exception:
            pass  # a foreign exception that does not pickle: not ours to fix
        error = error.__cause__ or error.__context__
    return texts


@pytest.mark.parametrize("shape", ["headers", "detail", "cut", "record", "escaped", "text"])
def test_no_echoed_key_in_any_exception_or_log_record(echo, shape, caplog, monkeypatch, quick_retries):
    """Regression: only _status_error masked the key, after its 500-character cut; the answers to
    /provision-request, /run_async, /result and /file, `exc.body` and the provision warning leaked it."""
    monkeypatch.setattr(cw, "LOG_NOT_FOUND_GRACE", 0.0)
    monkeypatch.setattr(cw, "LOG_BACKOFF", (0.01, 0.02))  # a log stream's failed reopens count toward giving up
    caplog.set_level(logging.DEBUG)
    _Echo.shape = shape
    url = f"http://127.0.0.1:{echo.server_address[1]}"
    client = cw.Client(KEY, base_url=url, max_retries=0)
    calls = [
        lambda: client.provision(),
        lambda: client.start("svc"),
        lambda: client.run("svc", fallback=None),
        lambda: client.run("svc"),  # provisions first: the warning when that fails
        lambda: client.details("req_1"),
        lambda: client.result("req_1", timeout=0.1),
        lambda: client.upload(b"abc", filename="a.txt"),
        lambda: list(client.logs("req_1")),
    ]
    texts, errors = [], 0
    for status in (200, 307, 400, 401, 404, 422, 429, 500, 502, 504):
        _Echo.status = status
        for call in calls:
            try:
                call()
            except cw.CodewordsError as error:
                errors += 1
                texts += _texts(error)
                for name in ("detail", "body", "record"):
                    texts.append(json.dumps(getattr(error, name, None), default=repr))
    texts += [record.getMessage() for record in caplog.records] + [caplog.text]
    assert errors >= 60
    assert any("offers no request ids" in record.getMessage() for record in caplog.records)
    assert [text for text in texts if PREFIX in text] == []


# The command line, its log streams backing off in milliseconds (the echo never ends a run).
CLI_WITH_QUICK_LOG_BACKOFF = "import sys, codewords_lite as cw; cw.LOG_BACKOFF = (0.01, 0.02); sys.exit(cw.main())"


@pytest.mark.parametrize("status", [200, 422])
def test_no_echoed_key_on_the_command_line(echo, status):
    """The command line's one-line message and its --debug traceback and log, against the echo."""
    _Echo.status, _Echo.shape = status, "cut"
    env = dict(os.environ, CODEWORDS_API_KEY=KEY, CODEWORDS_BASE_URL=f"http://127.0.0.1:{echo.server_address[1]}")
    commands = [["run", "svc"], ["run", "svc", "--fallback", "off"], ["start", "svc"], ["details", "req_1"]]
    for command in [
        *commands,
        ["logs", "req_1"],
        ["result", "req_1", "--logs", "--timeout", "2"],
        ["upload", __file__],
    ]:
        result = subprocess.run(
            [sys.executable, "-c", CLI_WITH_QUICK_LOG_BACKOFF, *command, "--debug"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Some print what the server said, the key masked; an echoed record is not a finished one,
        # so `result` waits for it until its deadline (exit 3).
        assert result.returncode in (0, 1, 3), result.stderr
        assert PREFIX not in result.stdout + result.stderr


def test_an_answer_to_post_file_cannot_send_the_key_to_the_storage_host(quick_retries):
    """Regression: upload_headers (or an upload_uri) that echo the key sent it to the storage host."""
    from fake_runtime import FakeRuntime

    with FakeRuntime(api_key=KEY) as runtime:
        runtime.upload_headers = {"X-Amz-Meta-Echo": "Bearer " + KEY}
        client = cw.Client(KEY, base_url=runtime.url)
        with pytest.raises(cw.APIStatusError) as info:
            client.upload(b"abc", filename="a.txt")
        assert PREFIX not in " ".join(_texts(info.value))
        assert runtime.storage_calls and PREFIX not in json.dumps(runtime.storage_calls)
