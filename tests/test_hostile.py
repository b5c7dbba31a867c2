"""Hostile or broken servers: each gets a clear CodewordsError or the documented result, never a
bare requests exception, a hang, or a key sent where it should not go."""

import json
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fake_runtime import FakeRuntime

import codewords_lite as cw


class Hostile:
    """A server on 127.0.0.1 that answers every request with the same bytes, and records the requests."""

    def __init__(self, body: bytes, status: int = 200, headers=None, close_after=True):
        self.requests = []
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer()

            def answer(self):
                hostile.requests.append((self.command, self.path, dict(self.headers)))
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if close_after:  # no Content-Length: the body ends when the connection does
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()


def client_of(server, **settings):
    return cw.Client("cwk-hostile-test-key", base_url=server.url, **settings)


# -- bodies ------------------------------------------------------------------------------------


def test_a_blocking_run_answered_with_non_json_of_no_type_gives_the_bytes():
    """With no Content-Type, an answer that is not JSON is returned as it came (issue 13)."""
    with Hostile(b"<html>Service Unavailable</html>", close_after=False) as server:
        assert client_of(server).run("svc", fallback=None) == b"<html>Service Unavailable</html>"
    with Hostile(b"<html>Service Unavailable</html>", headers={"Content-Type": "text/html"}) as server:
        assert client_of(server).run("svc", fallback=None) == "<html>Service Unavailable</html>"


@pytest.mark.parametrize(
    "body", [b"<html>oops</html>", b'{"request_id": 42}', b'{"request_id": "../../etc"}', b"[]", b""]
)
def test_a_start_answered_with_no_usable_request_id(body):
    with Hostile(body, close_after=False) as server:
        with pytest.raises(cw.APIStatusError, match="expected a JSON object with a request_id"):
            client_of(server).start("svc")


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'"done"', b"[1, 2]", b"null"])
def test_a_result_that_is_not_a_record(body):
    with Hostile(body, close_after=False) as server:
        with pytest.raises(cw.APIStatusError, match="not a JSON object"):
            client_of(server).result("req_1")


def test_a_record_with_oddly_typed_fields():
    record = {"responseStatus": 200.0, "responseContent": 17}
    with Hostile(json.dumps(record).encode(), close_after=False) as server:
        assert client_of(server).result("req_1") is None


@pytest.mark.parametrize("status", ["teapot", [500], {"code": 500}, True, -1, 0, 99, 600, 500.5, "²"])
def test_a_record_whose_status_is_no_status_has_no_output(status):
    """What the workflow answered cannot be told: never an output, nor the workflow's failure."""
    record = {"responseStatus": status, "responseJson": {"detail": "x"}}
    with Hostile(json.dumps(record).encode(), close_after=False) as server:
        with pytest.raises(cw.CodewordsError, match=r"req_1.*no HTTP status") as caught:
            client_of(server).result("req_1")
    assert not isinstance(caught.value, cw.RunFailed)


def test_a_truncated_answer_to_a_run_is_not_sent_again_and_its_record_has_the_output(runtime, client):
    """Changed on purpose: a run's answer cut short was an APIConnectionError, with the request id to
    look the run up by; the client now looks it up itself, as for any connection lost on the way."""
    runtime.fault("POST", "/run/", truncate=True, after_run=True)
    assert client.run("echo", {"a": 1}) == {"a": 1}
    assert runtime.executions["echo"] == 1 and len(runtime.calls_to("POST", "/run/")) == 1


def test_a_truncated_answer_to_a_run_without_an_id_is_an_error_and_not_sent_again(runtime, client):
    runtime.fault("POST", "/run/", truncate=True, after_run=True)
    with pytest.raises(cw.APIConnectionError):
        client.run("echo", {"a": 1}, fallback=None)
    assert runtime.executions["echo"] == 1 and len(runtime.calls_to("POST", "/run/")) == 1


def test_a_truncated_answer_to_a_get_is_retried_then_reported(runtime, client, quick_retries):
    runtime.fault("GET", "/request/", truncate=True, times=10)
    with pytest.raises(cw.APIConnectionError, match="GET /request/req_x failed"):
        client.details("req_x")
    assert len(runtime.calls_to("GET", "/request/")) == client.max_retries + 1


# -- log streams -------------------------------------------------------------------------------


def test_a_10_mib_log_line_is_delivered_whole():
    big = json.dumps({"createdAt": "2026-01-01T00:00:01Z", "message": "x" * (10 << 20)}).encode()
    body = (
        b'{"createdAt": "2026-01-01T00:00:00Z", "message": "before"}\n'
        + big
        + b'\n{"createdAt": "2026-01-01T00:00:02Z", "message": "after"}\n'
    )
    with Hostile(body) as server:
        entries = list(client_of(server).logs("req_1"))
    assert [len(e["message"]) for e in entries] == [6, 10 << 20, 5]


def test_a_log_line_that_never_ends_is_refused():
    with Hostile(b"x" * (cw.LOG_LINE_MAX + (1 << 20))) as server:
        with pytest.raises(cw.CodewordsError, match="longer than 16 MiB"):
            list(client_of(server).logs("req_1"))


def test_a_garbage_log_stream_gives_raw_text_entries():
    garbage = (
        random.Random(7).randbytes(256 * 1024)
        if hasattr(random.Random, "randbytes")
        else bytes(random.Random(7).getrandbits(8) for _ in range(256 * 1024))
    )
    with Hostile(garbage) as server:
        entries = list(client_of(server).logs("req_1"))
    assert entries and all(set(e) == {"rawText"} or isinstance(e, dict) for e in entries)


def test_a_log_stream_answered_with_an_error_status():
    with Hostile(b'{"detail": "logs are off"}', status=403, close_after=False) as server:
        with pytest.raises(cw.AuthenticationError, match="logs are off"):
            list(client_of(server).logs("req_1"))


# -- redirects: the key stays home -------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, call",
    [
        ("POST", "/run/", lambda c: c.run("echo", fallback=None)),
        ("POST", "/provision-request", lambda c: c.provision()),
        ("GET", "/result/", lambda c: c.result("req_1")),
        ("GET", "/logs/", lambda c: list(c.logs("req_1"))),
    ],
)
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_to_another_host_is_not_followed(runtime, client, method, path, call, status):
    with FakeRuntime(api_key=runtime.api_key) as elsewhere:
        runtime.fault(method, path, status=status, headers={"Location": f"{elsewhere.url}/steal"})
        with pytest.raises(cw.APIStatusError, match=r"redirected to .*, which is not followed"):
            call(client)
        assert elsewhere.calls == []


def test_an_upload_redirected_elsewhere_is_not_followed(runtime, client):
    with FakeRuntime() as elsewhere:
        runtime.fault("PUT", "/upload/", status=307, headers={"Location": f"{elsewhere.storage_url}/upload/x"})
        with pytest.raises(cw.APIStatusError, match="307"):
            client.upload(b"secret data", filename="a.txt")
        assert elsewhere.storage_calls == []


def serve_once_per_connection(answer: bytes):
    """A raw server on 127.0.0.1 that writes ``answer`` to every connection, then closes it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize(
    "declared, body, complete", [("10", b'{"a":1}', False), ("7", b'{"a":1}', True), ("", b"{}", True)]
)
def test_an_answer_shorter_than_its_content_length_is_a_dropped_connection(declared, body, complete):
    """urllib3 2 refuses such a body itself; urllib3 1.26, which requests 2.25 brings, lets it
    through: the client checks the length itself, so a cut answer is never decoded."""
    length = f"Content-Length: {declared}\r\n" if declared else ""
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{length}Connection: close\r\n\r\n"
    listener, url = serve_once_per_connection(head.encode() + body)
    with listener, cw.Client("cwk-hostile-test-key", base_url=url, max_retries=0) as client:
        if complete:
            assert client.details("req_1") == json.loads(body)
        else:
            with pytest.raises(cw.APIConnectionError, match=r"of 10 bytes|3 more expected"):
                client.details("req_1")
