"""What a third independent review broke, each kept as a test: a reserved id taken for refused
after a failure that was not the run's, a record bound too small to hold an output, a check that
outlived its deadline, the key in a Content-Encoding or across a cut, bare ValueErrors, and a slow
on_log waited for twice."""

import http.server
import itertools
import json
import threading
import time

import pytest

import codewords_lite as cw

KEY = "cwk-SECRET123"


class Server:
    """A threaded HTTP/1.1 server on 127.0.0.1 whose answers a test writes as a function of the handler."""

    def __init__(self, answer):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def send(self, status, body, headers=()):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def answer(self):
                self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer(self)

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(answer):
        servers.append(Server(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def warm(client):
    """Two runs: from the second on, the client keeps an id in reserve; wait for it to land."""
    client.run("ok", {})
    client.run("ok", {})
    for thread in [t for t in threading.enumerate() if t.name == "codewords-ids"]:
        thread.join(10)


def test_a_404_while_resuming_a_run_on_a_reserved_id_does_not_send_it_again(runtime):
    """A 504 is resumed; a 404 from GET /result then (and from its record) was taken for "the
    reserved id was refused", and the run was sent again under a new id: two executions."""
    runtime.gateway_timeout = 0.3
    with cw.Client(runtime.api_key, base_url=runtime.url, timeout=20) as client:
        client.run("echo", {"n": 1})
        client.run("echo", {"n": 2})
        for thread in [t for t in threading.enumerate() if t.name == "codewords-ids"]:
            thread.join(10)
        runtime.fault("GET", "/result/", status=404, times=1)
        runtime.fault("GET", "/request/", status=404, times=1)
        with pytest.raises(cw.NotFoundError):
            client.run("sleep", {"seconds": 0.6})
    assert runtime.executions["sleep"] == 1


def test_a_workflows_own_409_behind_a_lagging_record_is_not_sent_again(serve):
    """The record store lags the run by 0.3 s (under RECORD_SETTLE): one look at once said "no run",
    and the run was sent again under a new id."""
    records, executions, ids = {}, [], itertools.count(1)

    def answer(handler):
        if handler.path == "/provision-request":
            request_id = f"req{next(ids)}"
            records[request_id] = {"id": request_id}
            return handler.send(200, {"request_id": request_id})
        if handler.command == "GET":
            request_id = handler.path.split("/")[2].split("?")[0]
            return handler.send(200, records[request_id]) if request_id in records else handler.send(404, {})
        request_id = handler.headers["X-Provisioned-Request-Id"]
        executions.append(request_id)
        status = 409 if handler.path.startswith("/run/conflicty") else 200
        body = {"detail": "already booked"} if status == 409 else {"ok": True}
        record = dict(serviceId="svc", startedAt="t", completedAt="t", responseStatus=status, responseJson=body)
        threading.Timer(0.3, records[request_id].update, kwargs=record).start()
        handler.send(status, body)

    server = serve(answer)
    with cw.Client(KEY, base_url=server.url, timeout=10) as client:
        warm(client)
        executions.clear()
        with pytest.raises(cw.APIStatusError):
            client.run("conflicty", {"seat": "1A"})
    assert len(executions) == 1


def test_a_502_after_a_run_whose_record_is_larger_than_control_answers_returns_the_output(runtime, client):
    """The question "did it start?" read the record under CONTROL_MAX (1 MiB): the output was lost."""
    inputs = {"rows": "x" * 600_000}
    runtime.fault("POST", "/run/echo", status=502, after_run=True)
    assert client.run("echo", inputs) == inputs
    assert runtime.executions["echo"] == 1


def test_the_check_of_a_refused_reserved_id_keeps_the_runs_deadline(serve):
    stall, release, ids = threading.Event(), threading.Event(), itertools.count(1)

    def answer(handler):
        if handler.path == "/provision-request":
            return handler.send(200, {"request_id": f"req{next(ids)}"})
        if handler.command == "GET":
            release.wait(30)  # the record store hangs
            return handler.send(404, {})
        handler.send(404, {"detail": "unknown request id"}) if stall.is_set() else handler.send(200, {"ok": 1})

    server = serve(answer)
    with cw.Client(KEY, base_url=server.url, max_retries=0) as client:
        warm(client)
        stall.set()
        started = time.monotonic()
        with pytest.raises(cw.CodewordsError):
            client.run("svc", {}, timeout=2)
        assert time.monotonic() - started < 3.5
        release.set()


def test_a_content_encoding_that_echoes_the_key_is_masked(serve, caplog):
    def answer(handler):
        echo = [("Content-Encoding", handler.headers["Authorization"])] if handler.path.startswith("/request") else []
        handler.send(200, {"id": "req1"}, echo)

    server = serve(answer)
    with cw.Client(KEY, base_url=server.url, timeout=5) as client, pytest.raises(cw.APIStatusError) as caught:
        client.details("req1")
    assert "Content-Encoding 'Bearer ***'" in str(caught.value) and KEY not in repr(caught.value.args)


def test_no_start_of_the_key_is_left_where_an_error_body_is_cut(serve):
    def answer(handler):
        key = handler.headers["Authorization"].split()[-1].encode()
        handler.send(400, b"x" * (cw.CONTROL_MAX - 7) + key + b" tail", [("Content-Type", "text/plain")])

    server = serve(answer)
    with cw.Client(KEY, base_url=server.url, timeout=5) as client, pytest.raises(cw.APIStatusError) as caught:
        client.details("req1")
    for text in (caught.value.body, caught.value.detail, str(caught.value)):
        assert KEY[:4] not in text[-40:]


@pytest.mark.parametrize("field", ["responseStatus", "detail"])
def test_an_integer_too_long_for_text_in_a_record_is_a_codewords_error(serve, field):
    big = "9" * 5000
    record = {
        "responseStatus": '{"completedAt":"t","responseStatus":' + big + "}",
        "detail": '{"completedAt":"t","responseStatus":500,"responseJson":{"detail":' + big + "}}",
    }[field]
    server = serve(lambda handler: handler.send(200, record.encode()))
    with cw.Client(KEY, base_url=server.url, timeout=5) as client, pytest.raises(cw.CodewordsError):
        client.result("req1")


def test_a_location_that_is_not_a_url_is_an_api_status_error(serve):
    server = serve(lambda handler: handler.send(307, b"", [("Location", "http://[oops/x")]))
    with cw.Client(KEY, base_url=server.url, timeout=5) as client:
        for call in (lambda: client.details("req1"), client.provision, lambda: client.run("svc", fallback=None)):
            with pytest.raises(cw.APIStatusError, match="its Location is not a URL"):
                call()


def test_a_slow_on_log_holds_a_finished_run_for_log_grace_at_most(runtime, client):
    """finish() waited LOG_GRACE for the stream, then LOG_GRACE again for the callback: 4 s."""
    release = threading.Event()

    def slow(entry):
        release.wait(10)

    started = time.monotonic()
    try:
        assert client.run("talk", {"lines": 3, "interval": 0.05}, on_log=slow) == {"lines": 3}
        assert time.monotonic() - started < cw.LOG_GRACE + 1.0
    finally:
        release.set()
