"""A server that echoes every request header back, in its status line, its headers and its body,
on every endpoint: the key must still be in no exception, attribute, pickle or log record."""

import itertools
import json
import logging
import os
import pickle
import re
import socketserver
import subprocess
import sys
import threading
import traceback
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
        lambda: list(itertools.islice(client.logs("req_1"), 3)),  # the echo's run never ends
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
        try:
            result = subprocess.run(
                [sys.executable, "-c", CLI_WITH_QUICK_LOG_BACKOFF, *command, "--debug"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                timeout=60 if command[0] != "logs" else 3,
            )
        except subprocess.TimeoutExpired as stopped:  # `logs` follows a run that the echo never ends
            assert command[0] == "logs" and status == 200
            printed = (stopped.stdout or b"") + (stopped.stderr or b"")
        else:
            # Some print what the server said, the key masked; an echoed record is not a finished
            # one, so `result` waits for it until its deadline (exit 3).
            assert result.returncode in (0, 1, 3), result.stderr
            printed = result.stdout + result.stderr
        assert PREFIX.encode() not in printed


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


class _RawEcho(socketserver.ThreadingTCPServer):
    """Answers every request with raw bytes that break HTTP, the request's key in them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer):
        self.answer = answer
        super().__init__(("127.0.0.1", 0), _RawHandler)


class _RawHandler(socketserver.StreamRequestHandler):
    def handle(self):
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.rfile.readline()
            if not line:
                return
            head += line
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        self.rfile.read(int(length[1]) if length else 0)
        key = re.search(rb"(?i)authorization: *bearer (\S+)", head)[1]
        self.wfile.write(self.server.answer(key))


_BROKEN_ANSWERS = {
    # http.client's BadStatusLine quotes the line
    "status line": lambda key: b"HTTP/1.1 2OO " + key + b"\r\nContent-Length: 0\r\n\r\n",
    # urllib3's InvalidChunkLength quotes the size line
    "chunk size": lambda key: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + key + b"\r\n",
    # urllib3 logs "Failed to parse headers ... unparsed data: '<key>...'"
    "header line": lambda key: (
        b"HTTP/1.1 200 OK\r\nX-Echo: ok\r\n"
        + key
        + b'\r\nContent-Type: application/json\r\nContent-Length: 18\r\n\r\n{"request_id":"r"}'
    ),
}


@pytest.fixture(params=sorted(_BROKEN_ANSWERS))
def broken(request):
    server = _RawEcho(_BROKEN_ANSWERS[request.param])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_no_echoed_key_in_the_text_of_transport_errors(broken, monkeypatch, quick_retries):
    """Regression: the key echoed in a status line or a chunk size reached our exception's text
    (pasted from requests' error) and its __cause__ chain, and a log stream's failure too."""
    monkeypatch.setattr(cw, "LOG_BACKOFF", (0.001, 0.002))
    client = cw.Client(KEY, base_url=broken, max_retries=0)
    texts = []
    logs = lambda: list(itertools.islice(client.logs("r1"), 3))  # noqa: E731 (a run that never ends)
    for call in (client.provision, lambda: client.details("r1"), logs):
        try:
            call()
        except cw.CodewordsError as error:
            texts += [*_texts(error), "".join(traceback.format_exception(type(error), error, error.__traceback__))]
    assert [text for text in texts if PREFIX in text] == []


def test_no_echoed_key_in_transport_errors_on_the_command_line(broken):
    """Regression: the CLI's one line and its --debug traceback carried the key from a transport
    error, and its --debug log showed urllib3's warning quoting a header line with the key."""
    env = dict(os.environ, CODEWORDS_API_KEY=KEY, CODEWORDS_BASE_URL=broken)
    for command in (["details", "r1"], ["start", "svc", "--debug"]):
        result = subprocess.run(
            [sys.executable, "-m", "codewords_lite", *command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert PREFIX not in result.stdout + result.stderr
