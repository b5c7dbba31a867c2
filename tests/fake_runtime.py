"""A local stand-in for the CodeWords runtime: real HTTP on 127.0.0.1, standard library only.

    with FakeRuntime() as runtime:
        client = codewords_lite.Client(runtime.api_key, base_url=runtime.url)

Or on its own, to try the client without an account (it prints the key and URL to export, and
what each workflow does; Ctrl-C or SIGTERM stops it, also in the background):

    python tests/fake_runtime.py --port 8787

It serves every endpoint that codewords_lite.py calls (provision, run, run_async, result, request,
logs, file), runs a few test workflows (see SERVICES; add your own there: one that raises answers 500
with Error-Origin: service and its traceback, as the real runtime does), counts their executions,
can play a gateway that answers 504 while the run goes on, and takes injected faults: status codes
with Retry-After, dropped connections, slow, trickled and truncated answers. One-time keys (cwotk-)
are spent by the first request that carries them. A second server on another port plays the
storage host that presigned upload URLs point to.

``FakeRuntime(workflows={"service-id": "http://127.0.0.1:PORT"})`` puts real workflows (FastAPI
apps, see tests/workflows/) behind it: ``/run/{service}/{path}`` and ``/run_async/...`` are
forwarded to them as the runtime does, their status, headers and body passed through, and the
request record filled from their answer.
"""

import collections
import datetime
import errno
import hashlib
import http.client
import itertools
import json
import random
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

API_KEY = "cwk-test-0123456789abcdef"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- the test workflows: each takes (inputs, log) and answers (status, body, content type) ----------


def _echo(inputs: Any, log: Callable[[str], None]) -> Tuple[int, Any, str]:
    return 200, inputs, "application/json"


def _check(inputs: Any, log: Callable[[str], None]) -> Tuple[int, Any, str]:
    """Echoes its inputs, unless they hold {"fail": "why"}: then a 422 with that detail."""
    if inputs.get("fail"):
        return 422, {"detail": inputs["fail"]}, "application/json"
    return 200, inputs, "application/json"


def _sleep(inputs: Any, log: Callable[[str], None]) -> Tuple[int, Any, str]:
    seconds = float(inputs.get("seconds", 1))
    steps = int(inputs.get("lines", 0))
    for i in range(steps):
        log(f"step {i}")
        time.sleep(seconds / steps)
    if not steps:
        time.sleep(seconds)
    return (
        200,
        {"slept": seconds, **{k: v for k, v in inputs.items() if k not in ("seconds", "lines")}},
        "application/json",
    )


def _fail(inputs: Any, log: Callable[[str], None]) -> Tuple[int, Any, str]:
    log("about to fail")
    return int(inputs.get("status", 500)), {"detail": inputs.get("detail", "boom")}, "application/json"


def _refuse(inputs: Any, log: Callable[[str], None]) -> Tuple[int, Any, str]:
    """Returns (does not raise) an error answer, as ``return JSONResponse(status_code=503)`` does:
    it passes the gateway with no Error-Origin header, like the gateway's own refusals."""
    log("refusing")
    return int(inputs.get("status", 503)), {"detail": inputs.get("detail", "busy")}, "application/json"


def _text(inputs: Any, log: Callable[[str], None]) -> Tuple[int, Any, str]:
    return 200, str(inputs.get("text", "hello")).encode(), "text/plain"


def _empty(inputs: Any, log: Callable[[str], None]) -> Tuple[int, Any, str]:
    return 204, b"", "text/plain"


def _echo_bytes(inputs: Any, log: Callable[[str], None]) -> Tuple[int, Any, str]:
    """Answers the bytes given as ``hex``, as an image."""
    return 200, bytes.fromhex(inputs.get("hex", "")), "image/png"


def _script(inputs: Any, log: Callable[[Any], None]) -> Tuple[int, Any, str]:
    """Writes the log ``entries`` given, exactly as given (timestamps too), ``interval`` seconds apart."""
    for entry in inputs["entries"]:
        log(entry)
        time.sleep(float(inputs.get("interval", 0)))
    return 200, {"entries": len(inputs["entries"])}, "application/json"


def _talk(inputs: Any, log: Callable[[str], None]) -> Tuple[int, Any, str]:
    """Writes ``lines`` log lines, ``interval`` seconds apart."""
    for i in range(int(inputs.get("lines", 10))):
        log(f"line {i}")
        time.sleep(float(inputs.get("interval", 0.01)))
    return 200, {"lines": int(inputs.get("lines", 10))}, "application/json"


SERVICES = {
    "echo": _echo,
    "check": _check,
    "sleep": _sleep,
    "fail": _fail,
    "refuse": _refuse,
    "text": _text,
    "empty": _empty,
    "echo-bytes": _echo_bytes,
    "talk": _talk,
    "script": _script,
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server", "host"}
RETURNED_ERRORS = {"refuse"}  # workflows whose error answers carry no Error-Origin header


class Fault:
    """One injected fault, applied to the next ``times`` requests that match."""

    def __init__(
        self,
        method: str,
        path: str,
        *,
        status: int = 0,
        retry_after: Optional[str] = None,
        drop: bool = False,
        delay: float = 0.0,
        truncate: bool = False,
        after_run: bool = False,
        body: Optional[bytes] = None,
        headers: Optional[Dict[str, str]] = None,
        times: int = 1,
        cut_after: Optional[int] = None,
        trickle: float = 0.0,
        trickle_headers: bool = False,
        no_length: bool = False,
    ) -> None:
        self.no_length = no_length  # a trickled answer with no Content-Length: it ends when the connection closes
        self.trickle = trickle  # seconds between the bytes of the answer (its body, or all of it)
        self.trickle_headers = trickle_headers
        self.method, self.path, self.times = method, path, times
        self.cut_after = cut_after  # for /logs: drop the stream in the middle of the entry after this many
        self.status, self.retry_after, self.drop, self.delay = status, retry_after, drop, delay
        self.truncate, self.after_run, self.body, self.headers = truncate, after_run, body, headers or {}

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and method == self.method and path.startswith(self.path)


class FakeRuntime:
    """The runtime and its storage host, each on its own port of 127.0.0.1."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        gateway_timeout: Optional[float] = None,
        hold_polls: bool = True,
        ndjson: bool = True,
        port: int = 0,
        workflows: Optional[Dict[str, str]] = None,
    ) -> None:
        self.api_key = api_key
        self.workflows = dict(workflows or {})  # service id -> base URL of a real workflow
        self.gateway_timeout = gateway_timeout  # a blocking /run or /result held longer answers 504
        self.hold_polls = hold_polls  # False: /result answers 408 at once instead of holding
        self.ndjson = ndjson  # False: /logs sends SSE "data:" lines
        self.ignore_after = False  # True: /logs sends every entry again, whatever ?after= says
        self.after_inclusive = False  # True: ?after=T sends entries at T too; "alternate": each connection switches
        self.logs_never_end = False  # True: /logs stays open after the run has ended
        self.keep_alive = True  # False: /logs says nothing while the run is silent
        self.keep_alive_every = 0.5  # seconds between two keep-alives
        self.drop_after_keep_alives: Optional[int] = None  # drop each /logs answer after this many keep-alives
        self.log_framing = "chunked"  # "length": one answer with a Content-Length once the run has ended;
        # "close": no length, no chunks, the body ends when the connection closes
        self.millisecond_stamps = False  # True: createdAt in milliseconds, several entries may share one
        self.sse_ids = False  # True: each event has an "id:", and Last-Event-ID resumes after it
        self.sse_retry: Optional[int] = None  # a "retry:" field, in milliseconds, opening each SSE stream
        self.sse_multiline = False  # True: each event's JSON is spread over several "data:" lines
        self.sse_resume = True  # False: Last-Event-ID is ignored, only ?after= counts
        self.sse_id_prefix = ""  # put before each SSE id: non-ASCII, or a space the client cannot send back
        self.pings = False  # True: keep-alives are "event: ping" events, or NDJSON "ping" lines (not JSON)
        self.shuffle_ties = False  # True: reconnects list entries of equal createdAt in reverse order
        self.log_close_after: Optional[int] = None  # end each /logs answer cleanly after this many entries
        self.line_end = b"\n"  # or b"\r\n", b"\r"
        self.bom = False  # True: each /logs body starts with a UTF-8 byte order mark
        self.log_connections = 0
        self.concurrency_limit: Optional[int] = None  # more runs at once than this get a 429
        self.rate_limit_retry_after = "0.2"
        self.running = 0  # runs executing now
        self.most_running = 0
        self._chaos: Optional[Tuple[float, random.Random, str]] = None
        self.executions: collections.Counter = collections.Counter()  # service id -> runs started
        self.executions_of: collections.Counter = collections.Counter()  # (service id, inputs as JSON) -> runs
        # Called (event, request id) as a provision is answered, a run arrives, or a blocking run's
        # answer is about to be sent: a test may wait for an instant there, or hold it.
        self.on_event: Optional[Callable[[str, str], None]] = None
        self.calls: List[Dict[str, Any]] = []  # every request received: method, path, query, headers, body
        self.faults: List[Fault] = []
        self.faults_applied: collections.Counter = collections.Counter()  # kind -> how many
        self.records: Dict[str, Dict[str, Any]] = {}
        self.answers: Dict[str, Tuple[int, Dict[str, str], bytes]] = {}  # request id -> status, headers, body
        self.log_entries: Dict[str, List[Dict[str, Any]]] = collections.defaultdict(list)
        self.uploads: Dict[str, Dict[str, Any]] = {}  # token -> size, sha256, headers, content (small ones)
        self.upload_headers: Optional[Dict[str, str]] = None  # answered by POST /file when set
        self.spent_keys: set = set()
        self.one_time_keys: set = set()  # more keys, each good for one request
        self.lock = threading.Condition()
        self._servers = [_serve(self, _ApiHandler, port), _serve(self, _StorageHandler)]
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.storage_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        self.storage_calls: List[Dict[str, Any]] = []  # every PUT received: path, headers, size

    def __enter__(self) -> "FakeRuntime":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    # -- what tests use --------------------------------------------------------------------------

    def fault(self, method: str, path: str, **kwargs: Any) -> Fault:
        fault = Fault(method, path, **kwargs)
        with self.lock:
            self.faults.append(fault)
        return fault

    def chaos(self, rate: float, seed: int, retry_after: str = "0.05") -> None:
        """Hit about ``rate`` of all API requests with a random fault, drawn from a seeded generator.

        A run POST only gets faults that turn it away before it runs (429, 503) or delay it: any
        other fault there would leave the client unable to tell whether the workflow ran, which
        it reports as an error rather than risk running it twice. Other calls get them all.
        """
        self._chaos = (rate, random.Random(seed), retry_after)

    def calls_to(self, method: str, prefix: str) -> List[Dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if c["method"] == method and c["path"].startswith(prefix)]

    def wait_until_done(self, request_id: str, timeout: float = 10.0) -> Dict[str, Any]:
        with self.lock:
            self.lock.wait_for(lambda: self.records[request_id].get("completedAt"), timeout)
            return dict(self.records[request_id])

    # -- what the handler uses -------------------------------------------------------------------

    def take_fault(self, method: str, path: str) -> Optional[Fault]:
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    return fault
            if self._chaos is None or path.startswith(("/logs/", "/file", "/upload/")):
                return None
            rate, draw, retry_after = self._chaos
            if draw.random() >= rate:
                return None
            if method == "POST" and path.startswith("/run_async/"):
                kind = draw.choice(["429", "503", "slow"])
            elif method == "POST" and path.startswith("/run/"):  # a lost run is asked about by its id
                kind = draw.choice(["429", "503", "slow", "drop", "drop after run"])
            else:
                kind = draw.choice(["429", "502", "503", "504", "drop", "truncate", "slow"])
        if kind == "slow":
            return Fault(method, path, delay=0.05)
        if kind == "drop after run":
            return Fault(method, path, drop=True, after_run=True)
        if kind in ("drop", "truncate"):
            return Fault(method, path, **{kind: True})
        return Fault(method, path, status=int(kind), retry_after=retry_after if kind in ("429", "503") else None)

    def new_record(self, service_id: Optional[str] = None, request_id: Optional[str] = None) -> str:
        request_id = request_id or "req_" + uuid.uuid4().hex[:16]
        with self.lock:
            self.records.setdefault(request_id, {"id": request_id, "userId": "user_test", "createdAt": now_iso()})
            if service_id:
                self.records[request_id]["serviceId"] = service_id
        return request_id

    def execute(self, request_id: str, service_id: str, request: "Forwarded") -> None:
        """Run a workflow to its end, recording its answer and logs under the request id."""
        inputs = request.inputs
        if service_id in self.workflows:  # a real workflow's body, counted as its inputs when it is JSON
            try:
                inputs = request.parse_inputs()
            except ValueError:
                inputs = None
        with self.lock:
            self.executions[service_id] += 1
            self.executions_of[(service_id, json.dumps(inputs, sort_keys=True))] += 1
            self.records[request_id]["startedAt"] = now_iso()
            self.most_running = max(self.most_running, self.running)  # counted in by the handler
            self.lock.notify_all()  # for tests that wait for a run to start

        def log(message: Any) -> None:
            with self.lock:
                entries = self.log_entries[request_id]
                if isinstance(message, dict):  # a scripted entry, timestamp and all
                    entries.append(message)
                    self.lock.notify_all()
                    return
                created = now_iso()
                if self.millisecond_stamps:
                    created = created[:23] + "Z"
                elif entries and created <= entries[-1]["createdAt"]:  # keep timestamps strictly rising
                    stamp = datetime.datetime.strptime(entries[-1]["createdAt"], "%Y-%m-%dT%H:%M:%S.%fZ")
                    created = (stamp + datetime.timedelta(microseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                entries.append({"createdAt": created, "level": "INFO", "message": message})
                self.lock.notify_all()

        if service_id in self.workflows:
            try:
                status, headers, body = request.forward(self.workflows[service_id], request_id)
            except OSError as exc:  # the workflow is down or hung up: the gateway's own answer
                status, headers, body = 502, {"Content-Type": "text/plain"}, f"bad gateway: {exc}".encode()
        else:
            try:
                status, output, content_type = SERVICES[service_id](request.inputs, log)
                body = json.dumps(output).encode() if content_type == "application/json" else output
                raised = False
            except Exception as exc:  # a bug in the workflow: a 500 of its own, at once, not a run that never ends
                status, body, content_type, raised = 500, _unhandled(exc), "application/json", True
            headers = {"Content-Type": content_type}
            if status >= 400 and (raised or service_id not in RETURNED_ERRORS):  # as the official handlers do
                headers["Error-Origin"] = "service"
        with self.lock:
            self.answers[request_id] = (status, headers, body)
            self.records[request_id].update(_record_fields(status, headers, body), completedAt=now_iso())
            self.running -= 1
            self.lock.notify_all()

    def event(self, name: str, request_id: str) -> None:
        hook = self.on_event
        if hook is not None:
            hook(name, request_id)

    def issue_one_time_key(self) -> str:
        """A fresh one-time key: the first request that carries it spends it, as the runtime does."""
        key = "cwotk-" + uuid.uuid4().hex
        with self.lock:
            self.one_time_keys.add(key)
        return key

    def check_key(self, header: Optional[str]) -> bool:
        key = (header or "")[len("Bearer ") :] if (header or "").startswith("Bearer ") else header
        with self.lock:
            if (key != self.api_key and key not in self.one_time_keys) or key in self.spent_keys:
                return False
            if key.startswith("cwotk-"):
                self.spent_keys.add(key)
        return True


class Forwarded:
    """A run as the gateway received it, to hand to a workflow: method, path after the service id,
    query, headers and body."""

    def __init__(self, method: str, path: str, query: str, headers: Dict[str, str], body: bytes) -> None:
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body
        self.inputs: Any = None  # for an emulated service, set by the handler

    def parse_inputs(self) -> Any:
        """The inputs of an emulated service: the JSON body, or the query of a GET."""
        if self.method == "GET":
            return {name: values[0] for name, values in parse_qs(self.query).items()}
        return json.loads(self.body or b"{}")

    def forward(self, base_url: str, request_id: str) -> Tuple[int, Dict[str, str], bytes]:
        """Send the run to a real workflow and return its answer, as the runtime's proxy does."""
        host, port = urlsplit(base_url).hostname, urlsplit(base_url).port
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"authorization"}}
        headers["X-Request-Id"] = request_id
        connection = http.client.HTTPConnection(host or "", port, timeout=60)
        try:
            target = self.path + ("?" + self.query if self.query else "")
            connection.request(self.method, target, body=self.body or None, headers=headers)
            answer = connection.getresponse()
            body = answer.read()
        finally:
            connection.close()
        return answer.status, {k: v for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP}, body


def _unhandled(exc: Exception) -> bytes:
    """The answer to a workflow that raised, as the official package's handler of unhandled
    exceptions writes it (tests/workflows/service.py): its last frames, in a detail of 2,000
    characters at most. The traceback goes to standard error too, as a server's log would show it."""
    traceback.print_exc(file=sys.stderr)
    frames = traceback.extract_tb(exc.__traceback__)[-5:]
    trace = "".join(traceback.format_list(frames)) + f"{type(exc).__name__}: {exc}"
    return json.dumps({"detail": "Internal server error:\n\n" + trace[:2000]}).encode()


def _record_fields(status: int, headers: Dict[str, str], body: bytes) -> Dict[str, Any]:
    """The fields of a request record filled from a workflow's answer: its status, its text, and
    its JSON when it is JSON (binary output is kept as text with U+FFFD: a record holds text)."""
    fields: Dict[str, Any] = {"responseStatus": status, "responseContent": body.decode("utf-8", "replace")}
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            fields["responseJson"] = json.loads(body)
        except ValueError:
            pass
    return fields


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # sockets dropped on purpose, or by the client
            super().handle_error(request, client_address)


def _serve(runtime: FakeRuntime, handler: type, port: int = 0) -> ThreadingHTTPServer:
    server = _Server(("127.0.0.1", port), handler)
    server.runtime = runtime  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # or a reply written in two pieces waits ~40 ms for a delayed ACK

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def runtime(self) -> FakeRuntime:
        return self.server.runtime  # type: ignore[attr-defined,no-any-return]

    def send(
        self,
        status: int,
        body: Any = None,
        *,
        content_type: str = "application/json",
        headers: Optional[Dict[str, str]] = None,
    ) -> None:
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
        else:
            data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def read_body(self) -> Optional[bytes]:
        """The request's body; None if its client went away before all of it came (a process
        killed as it sent), which a server does not act on."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return b""
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        return body if len(body) == length else None

    def trickle(self, fault: Fault) -> None:
        """Answer a byte at a time, ``fault.trickle`` seconds apart: the headers too, if asked."""
        body = fault.body if fault.body is not None else json.dumps({"detail": "trickled"}).encode()
        length = "Connection: close\r\n" if fault.no_length else f"Content-Length: {len(body)}\r\n"
        head = f"HTTP/1.1 {fault.status or 200} OK\r\nContent-Type: application/json\r\n{length}\r\n".encode()
        if not fault.trickle_headers:
            self.wfile.write(head)
            head = b""
        try:
            for i in range(len(head + body)):
                self.wfile.write((head + body)[i : i + 1])
                self.wfile.flush()
                time.sleep(fault.trickle)
        except OSError:
            pass  # the client gave up
        self.close_connection = True

    def drop(self) -> None:
        """Close the connection without a word, as a crashed gateway would."""
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def apply(self, fault: Fault) -> bool:
        """Act out a fault; True if the request has been answered (or dropped) by it."""
        if fault.delay:
            self.runtime.faults_applied["delay"] += 1
            time.sleep(fault.delay)
        if fault.drop:
            self.runtime.faults_applied["drop"] += 1
            self.drop()
            return True
        if fault.trickle:
            self.runtime.faults_applied["trickle"] += 1
            self.trickle(fault)
            return True
        if fault.truncate:
            self.runtime.faults_applied["truncate"] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"request_id": "req_trunc')
            self.drop()
            return True
        if fault.status:
            self.runtime.faults_applied[str(fault.status)] += 1
            headers = dict(fault.headers)
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            body = fault.body if fault.body is not None else {"detail": f"injected {fault.status}"}
            self.send(fault.status, body, headers=headers)
            return True
        return False


class _ApiHandler(_Handler):
    def do_GET(self) -> None:
        self.handle_api("GET")

    def do_POST(self) -> None:
        self.handle_api("POST")

    def handle_api(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        body = self.read_body()
        runtime = self.runtime
        if body is None:
            self.close_connection = True
            return
        with runtime.lock:
            runtime.calls.append(
                {
                    "method": method,
                    "path": path,
                    "query": query,
                    "headers": dict(self.headers),
                    "body": body,
                    "at": time.monotonic(),
                    "peer": self.client_address[1],  # the client's port: one per connection
                }
            )
        if not runtime.check_key(self.headers.get("Authorization")):
            return self.send(401, {"detail": "Invalid or missing API key"})
        fault = runtime.take_fault(method, path)
        if fault and not fault.after_run and fault.cut_after is None and self.apply(fault):
            return
        segments = path.strip("/").split("/")
        route = (method, segments[0])
        if route == ("POST", "provision-request"):
            request_id = runtime.new_record()
            runtime.event("provision", request_id)
            return self.send(200, {"request_id": request_id})
        if segments[0] in ("run", "run_async") and len(segments) >= 2:
            rest = path[len(f"/{segments[0]}/{segments[1]}") :] or "/"
            forwarded = Forwarded(method, rest, parts.query, dict(self.headers), body)
            return self.run(segments[0], segments[1], forwarded, fault)
        if route == ("GET", "result") and len(segments) == 2:
            return self.result(segments[1], float(query.get("timeout", ["0"])[0]))
        if route == ("GET", "request") and len(segments) == 2:
            record = runtime.records.get(segments[1])
            return self.send(200, {**record, "cost": 0.001}) if record else self.not_found()
        if route == ("GET", "logs") and len(segments) == 2:
            return self.logs(segments[1], query.get("after", [""])[0], fault)
        if route == ("POST", "file"):
            return self.file(query.get("filename", [""])[0])
        self.not_found()

    def not_found(self) -> None:
        self.send(404, {"detail": "Not Found"})

    def run(self, kind: str, service_id: str, request: Forwarded, fault: Optional[Fault]) -> None:
        runtime = self.runtime
        if request.method not in (("POST",) if kind == "run_async" else ("POST", "GET")):
            return self.send(405, {"detail": "Method Not Allowed"})
        if service_id not in SERVICES and service_id not in runtime.workflows:
            return self.send(404, {"detail": f"Service {service_id} not found"})
        if service_id not in runtime.workflows:
            try:
                request.inputs = request.parse_inputs()
            except ValueError:
                return self.send(422, {"detail": [{"loc": ["body"], "msg": "invalid JSON"}]})
        provisioned = self.headers.get("X-Provisioned-Request-Id")
        if provisioned and provisioned not in runtime.records:
            return self.send(404, {"detail": "Provisioned request not found"})
        with runtime.lock:
            limited = runtime.concurrency_limit is not None and runtime.running >= runtime.concurrency_limit
            if limited:
                runtime.faults_applied["429 concurrency"] += 1
            else:
                runtime.running += 1  # until execute() ends
        if limited:
            return self.send(
                429,
                {"detail": "Too many concurrent executions"},
                headers={"Retry-After": runtime.rate_limit_retry_after},
            )
        request_id = runtime.new_record(service_id, provisioned)
        runtime.event("run", request_id)
        with runtime.lock:  # an id sent again (a redirect followed) starts afresh
            runtime.answers.pop(request_id, None)
            for field in ("responseStatus", "responseJson", "responseContent", "completedAt"):
                runtime.records[request_id].pop(field, None)
        worker = threading.Thread(target=runtime.execute, args=(request_id, service_id, request), daemon=True)
        worker.start()
        if kind == "run_async":
            if fault and fault.after_run and self.apply(fault):
                return
            return self.send(200, {"request_id": request_id})
        with runtime.lock:
            finished = runtime.lock.wait_for(lambda: request_id in runtime.answers, runtime.gateway_timeout)
            answer = runtime.answers.get(request_id)
        if fault and fault.after_run and self.apply(fault):
            return
        if not finished or answer is None:
            return self.send(504, b"upstream request timeout", content_type="text/plain")
        status, headers, body = answer
        runtime.event("answer", request_id)
        self.pass_through(status, headers, body, f"{runtime.workflows.get(service_id)}", f"/{kind}/{service_id}")

    def pass_through(self, status: int, headers: Dict[str, str], body: bytes, origin: str, mounted: str) -> None:
        """Send a workflow's answer on as it is, with its own URLs in Location mapped to the runtime's."""
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() == "location" and value.startswith(origin):
                value = self.runtime.url + mounted + value[len(origin) :]
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def result(self, request_id: str, timeout: float) -> None:
        runtime = self.runtime
        if request_id not in runtime.records:
            return self.not_found()
        hold = timeout if runtime.hold_polls else 0
        gateway = runtime.gateway_timeout
        with runtime.lock:
            finished = runtime.lock.wait_for(
                lambda: runtime.records[request_id].get("completedAt"),
                min(hold, gateway) if gateway is not None else hold,
            )
            record = dict(runtime.records[request_id])
        if finished:
            return self.send(200, record)
        if gateway is not None and gateway < hold:
            return self.send(504, b"upstream request timeout", content_type="text/plain")
        self.send(408, {"detail": "Request still running"})

    def logs(self, request_id: str, after: str, fault: Optional[Fault]) -> None:
        """Stream the run's entries from ``after`` (or Last-Event-ID) on, until the run has ended."""
        runtime = self.runtime
        if request_id not in runtime.records:
            return self.not_found()
        with runtime.lock:
            runtime.log_connections += 1
            inclusive = runtime.after_inclusive
            if inclusive == "alternate":
                inclusive = runtime.log_connections % 2 == 0
            entries = runtime.log_entries[request_id]
            self.reconnect = runtime.log_connections > 1
            last_event_id = self.headers.get("Last-Event-ID", "").encode("latin-1").decode("utf-8")
            if runtime.sse_ids and runtime.sse_resume and last_event_id:
                index = int(last_event_id[len(runtime.sse_id_prefix) :]) + 1
            elif after and not runtime.ignore_after:
                index = next(
                    (
                        i
                        for i, e in enumerate(entries)
                        if e["createdAt"] > after or (inclusive and e["createdAt"] == after)
                    ),
                    len(entries),
                )
            else:
                index = 0
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson" if runtime.ndjson else "text/event-stream")
        if runtime.log_framing == "length":
            return self.logs_at_once(request_id, index, fault)
        if runtime.log_framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        try:
            self.stream_entries(request_id, index, fault)
        except OSError:
            self.close_connection = True  # the client went away

    def event(self, entry: Dict[str, Any], index: int) -> bytes:
        """One entry as an NDJSON line or an SSE event, in the line ends the runtime uses."""
        runtime = self.runtime
        if runtime.ndjson:
            lines = [json.dumps(entry, ensure_ascii=False).encode()]
        else:
            text = json.dumps(entry, indent=1 if runtime.sse_multiline else None, ensure_ascii=False)
            lines = [b"event: log"] + [b"data: " + part.encode() for part in text.split("\n")]
            if runtime.sse_ids:
                lines.append(b"id: " + (runtime.sse_id_prefix + str(index)).encode())
            lines.append(b"")
        return b"".join(line + runtime.line_end for line in lines)

    def opening(self) -> bytes:
        runtime = self.runtime
        head = b"\xef\xbb\xbf" if runtime.bom else b""
        if not runtime.ndjson and runtime.sse_retry is not None:
            head += b"retry: %d" % runtime.sse_retry + runtime.line_end + runtime.line_end
        return head

    def logs_at_once(self, request_id: str, index: int, fault: Optional[Fault]) -> None:
        """The whole log in one answer with a Content-Length, once the run has ended; cut short by a fault."""
        runtime = self.runtime
        runtime.wait_until_done(request_id)
        with runtime.lock:
            entries = list(runtime.log_entries[request_id])
        events = [self.event(entry, i) for i, entry in enumerate(entries) if i >= index]
        body = self.opening() + b"".join(events)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault and fault.cut_after is not None and fault.cut_after < len(events):
            runtime.faults_applied["cut log stream"] += 1
            kept = (
                len(self.opening()) + sum(len(e) for e in events[: fault.cut_after]) + len(events[fault.cut_after]) // 2
            )
            self.wfile.write(body[:kept])
            return self.drop()
        self.wfile.write(body)

    def stream_entries(self, request_id: str, index: int, fault: Optional[Fault]) -> None:
        runtime = self.runtime
        entries = runtime.log_entries[request_id]
        sent = keep_alives = 0
        if self.opening():
            self.write(self.opening())
        while True:
            with runtime.lock:
                runtime.lock.wait_for(
                    lambda index=index: (  # type: ignore[misc]
                        len(entries) > index
                        or (runtime.records[request_id].get("completedAt") and not runtime.logs_never_end)
                    ),
                    runtime.keep_alive_every,
                )
                fresh, finished = entries[index:], bool(runtime.records[request_id].get("completedAt"))
            if not fresh and (not finished or runtime.logs_never_end) and runtime.keep_alive:
                self.write(self.keep_alive())
                keep_alives += 1
                if keep_alives == runtime.drop_after_keep_alives:
                    return self.drop()
            if sent == runtime.log_close_after:  # a clean end while the run goes on
                return self.chunk(b"") if runtime.log_framing == "chunked" else None
            listed = list(enumerate(fresh, index))
            if runtime.shuffle_ties and self.reconnect:  # ORDER BY createdAt, ties in another order
                runs = itertools.groupby(listed, key=lambda pair: pair[1].get("createdAt"))
                listed = [pair for _, run in runs for pair in reversed(list(run))]
            for position, entry in listed:
                event = self.event(entry, position)
                if fault and fault.cut_after is not None and sent == fault.cut_after:
                    runtime.faults_applied["cut log stream"] += 1
                    self.write(event[: len(event) // 2])
                    return self.drop()
                if sent == runtime.log_close_after:  # a clean end while the run goes on
                    return self.chunk(b"") if runtime.log_framing == "chunked" else None
                self.write(event)
                sent += 1
            index += len(fresh)
            if finished and not fresh and not runtime.logs_never_end:
                if runtime.log_framing == "chunked":
                    self.chunk(b"")  # the last chunk
                return

    def keep_alive(self) -> bytes:
        runtime = self.runtime
        if runtime.ndjson:
            return b"ping" + runtime.line_end if runtime.pings else runtime.line_end
        if runtime.pings:
            return b"event: ping" + runtime.line_end + b"data: " + now_iso().encode() + runtime.line_end * 2
        return b": keep-alive" + runtime.line_end * 2

    def write(self, data: bytes) -> None:
        """Send part of a streamed body: as a chunk, or as it is (an empty chunk ends a chunked body)."""
        if self.runtime.log_framing == "chunked":
            return self.chunk(data)
        if data:
            self.wfile.write(data)
            self.wfile.flush()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def file(self, filename: str) -> None:
        if not filename:
            return self.send(422, {"detail": [{"loc": ["query", "filename"], "msg": "field required"}]})
        token = uuid.uuid4().hex
        answer = {
            "upload_uri": f"{self.runtime.storage_url}/upload/{token}?X-Amz-Signature=sig{token[:8]}",
            "download_uri": f"{self.runtime.storage_url}/files/{token}/{filename}",
        }
        if self.runtime.upload_headers is not None:
            answer["upload_headers"] = self.runtime.upload_headers
        with self.runtime.lock:
            self.runtime.uploads[token] = {"filename": filename, "signed": self.runtime.upload_headers}
        self.send(200, answer)


class _StorageHandler(_Handler):
    """The storage host: takes PUTs on presigned URLs and refuses what S3 refuses."""

    def do_PUT(self) -> None:
        runtime = self.runtime
        token = urlsplit(self.path).path.rsplit("/", 1)[-1]
        headers = dict(self.headers)
        with runtime.lock:
            runtime.storage_calls.append({"path": self.path, "headers": headers})
            upload = runtime.uploads.get(token)
        fault = runtime.take_fault("PUT", "/upload/")
        if fault and self.apply(fault):
            return
        if upload is None:
            return self.s3_error(403, "AccessDenied", "No such presigned URL")
        if "Authorization" in self.headers:
            return self.s3_error(400, "InvalidArgument", "Only one auth mechanism allowed")
        if self.headers.get("Transfer-Encoding"):
            return self.s3_error(
                501, "NotImplemented", "A header you provided implies functionality that is not implemented"
            )
        if self.headers.get("Content-Length") is None:
            return self.s3_error(411, "MissingContentLength", "You must provide the Content-Length HTTP header.")
        wanted = upload["signed"] or {"x-amz-acl": "public-read"}
        if any(self.headers.get(name) != value for name, value in wanted.items()):
            return self.s3_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match")
        size, digest, kept = int(self.headers["Content-Length"]), hashlib.sha256(), bytearray()
        left = size
        while left:
            block = self.rfile.read(min(left, 1 << 20))
            if not block:
                return self.drop()
            left -= len(block)
            digest.update(block)
            if size <= 32 << 20:
                kept += block
        with runtime.lock:
            upload.update(
                size=size, sha256=digest.hexdigest(), content=bytes(kept) if size <= 32 << 20 else None, headers=headers
            )
        self.send(200, b"", headers={"ETag": f'"{digest.hexdigest()[:32]}"'})

    def do_GET(self) -> None:
        token = urlsplit(self.path).path.split("/")[2]
        upload = self.runtime.uploads.get(token)
        if not upload or upload.get("content") is None:
            return self.s3_error(404, "NoSuchKey", "The specified key does not exist.")
        self.send(200, upload["content"], content_type="application/octet-stream")

    def s3_error(self, status: int, code: str, message: str) -> None:
        self.close_connection = True  # the body of the PUT may not have been read
        body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
        self.send(status, body.encode(), content_type="application/xml")


# -- the command line: the emulator on its own, until Ctrl-C or SIGTERM --------------------------

WORKFLOW_HELP = {
    "echo": "answers its inputs",
    "check": 'answers its inputs, or 422 if they hold {"fail": "why"}',
    "sleep": 'takes {"seconds": 1, "lines": 0}, logging a line per step',
    "fail": 'answers {"status": 500, "detail": "boom"} as the workflow\'s error',
    "refuse": 'returns {"status": 503} without Error-Origin, as the gateway\'s own refusals come',
    "text": 'answers {"text": "hello"} as plain text',
    "empty": "answers 204 with no body",
    "echo-bytes": 'answers the bytes given as {"hex": "89504e47"}, as image/png',
    "talk": 'logs {"lines": 10} lines, {"interval": 0.01} s apart',
    "script": 'logs the {"entries": [...]} given, as given, {"interval": 0} s apart',
}


class _Stopped(Exception):
    """SIGINT or SIGTERM: stop serving."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import os
    import signal

    parser = argparse.ArgumentParser(
        description="Serve the CodeWords runtime emulator on 127.0.0.1 until Ctrl-C or SIGTERM (kill PID)."
    )
    parser.add_argument("--port", type=int, default=8787, help="the API's port; 0 takes a free one (default 8787)")
    parser.add_argument(
        "--gateway-timeout",
        type=float,
        metavar="S",
        help="answer 504 to a blocking run held longer than S seconds, as the real gateway does after about 120",
    )
    args = parser.parse_args(argv)
    try:
        runtime = FakeRuntime(port=args.port, gateway_timeout=args.gateway_timeout)
    except OSError as exc:
        hint = "another emulator may be serving there: stop it, or " if exc.errno == errno.EADDRINUSE else ""
        parser.exit(2, f"cannot serve on 127.0.0.1:{args.port} ({exc.strerror}): {hint}pick another --port\n")
    # Installed, not inherited: a shell starts a background job (`&`) with SIGINT ignored, which
    # Python then leaves ignored; and SIGTERM (kill) would end it without closing its servers.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    with runtime:
        try:
            print(f"The CodeWords runtime emulator is serving on {runtime.url}. In another shell:\n")
            print(f"    export CODEWORDS_API_KEY={runtime.api_key} CODEWORDS_BASE_URL={runtime.url}")
            print('    codewords-lite run echo \'{"name": "Ada"}\'\n')
            print("Its workflows:")
            width = max(map(len, SERVICES)) + 2
            for name, workflow in SERVICES.items():
                said = WORKFLOW_HELP.get(name) or (workflow.__doc__ or "").strip().split("\n")[0]
                print(f"    {name:{width}}{said}".rstrip())
            print(f"\nCtrl-C stops it, or SIGTERM: kill {os.getpid()} (Ctrl-C does not reach a job started with &).")
            sys.stdout.flush()
            while True:
                time.sleep(3600)
        except _Stopped:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)  # a second one does not cut the shutdown short
            print("Stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
