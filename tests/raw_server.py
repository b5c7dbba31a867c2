"""A hostile HTTP server written on raw sockets, for tests where http.server is too polite.

A threaded TCP server on 127.0.0.1. Each connection reads one request (head and body) and runs
the script of the route its method and path match: a script writes exact bytes, trickles them,
cuts or resets the connection, or holds it open, as a test needs. Requests are counted per route.

    with RawServer() as server:
        server.route("POST", "/provision-request", json_answer(200, {"request_id": "req-1"}))
        server.route("GET", "/request/*", lambda conn, request: conn.send(answer(200, b"{}")))
        ...
        assert server.count("POST", "/provision-request") == 1

A route's path is matched without its query; a path ending in ``*`` matches as a prefix (the
longest such prefix wins, an exact path before any). A script is ``script(conn, request)``, or
bytes to send as they are. After the script returns, the connection is closed (gracefully, unless
the script reset it), unless the script set ``conn.keep_alive``: then the next request on it is read.
Requests no route matches get a 404 JSON answer. Closing the server wakes every script that holds a
connection open or trickles, and shuts every socket, so no test waits for its server.
"""

import collections
import gzip
import json
import socket
import struct
import threading
import time
from typing import Any, Callable, Counter, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

HEAD_MAX = 1 << 16
READ_TIMEOUT = 10.0  # a peer that sends half a request is given up on after this long

REASONS = {
    100: "Continue",
    102: "Processing",
    103: "Early Hints",
    200: "OK",
    301: "Moved Permanently",
    302: "Found",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Request(NamedTuple):
    method: str
    target: str  # as sent: path and query
    path: str  # without the query
    query: str
    headers: Dict[str, str]  # names in lower case
    body: bytes
    route: Tuple[str, str]  # (method, pattern) of the route it matched
    at: float  # time.monotonic() when it had been read


class Connection:
    """One accepted connection, as a script sees it."""

    def __init__(self, sock: socket.socket, server: "RawServer") -> None:
        self.sock, self.server = sock, server
        self.keep_alive = False
        self.closed = False
        self._pending = b""

    # -- reading -------------------------------------------------------------------------------

    def read_request(self) -> Optional[Tuple[str, str, Dict[str, str], bytes]]:
        """(method, target, headers, body) of the next request; None if the peer closed first."""
        while b"\r\n\r\n" not in self._pending:
            if len(self._pending) > HEAD_MAX:
                return None
            data = self._recv()
            if not data:
                return None
            self._pending += data
        head, self._pending = self._pending.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target = [*lines[0].split(" "), "", ""][:2]
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self._read_exactly(int(headers.get("content-length") or 0))
        return method, target, headers, body

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except OSError:
            return b""

    def _read_exactly(self, size: int) -> bytes:
        while len(self._pending) < size:
            data = self._recv()
            if not data:
                break
            self._pending += data
        body, self._pending = self._pending[:size], self._pending[size:]
        return body

    def _read_line(self) -> bytes:
        while b"\r\n" not in self._pending:
            data = self._recv()
            if not data:
                return b""
            self._pending += data
        line, self._pending = self._pending.split(b"\r\n", 1)
        return line

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            size = int(self._read_line().split(b";")[0] or b"0", 16)
            if size == 0:
                while self._read_line():  # trailers, up to the blank line
                    pass
                return body
            body += self._read_exactly(size)
            self._read_line()

    def wait_closed(self, seconds: float) -> bool:
        """Wait for the peer to close its side (or the server to stop); True if it did."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.server.stopping.is_set():
            try:  # the server's close() may have closed the socket under us: it is closed then
                self.sock.settimeout(min(0.1, max(0.001, end - time.monotonic())))
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                continue
            except OSError:
                return True
        return False

    # -- writing -------------------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Write the bytes; False if the peer has gone."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def trickle(self, data: bytes, every: float = 0.05, size: int = 1) -> bool:
        """Write the bytes ``size`` at a time, ``every`` seconds apart; False if the peer went or the server stopped."""
        for start in range(0, len(data), size):
            if not self.send(data[start : start + size]) or self.server.stopping.wait(every):
                return False
        return True

    def hold(self, seconds: float = 60.0) -> None:
        """Keep the connection open, sending nothing, for this long or until the server stops."""
        self.server.stopping.wait(seconds)

    def close(self) -> None:
        """Close gracefully: the peer reads the end of the body (a close-delimited body ends here)."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.wait_closed(0.2)
            self.sock.close()

    def reset(self) -> None:
        """Close with a TCP reset: the peer's next read fails with ECONNRESET."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.sock.close()


Script = Union[bytes, Callable[[Connection, Request], Any]]


class RawServer:
    """A threaded TCP server on 127.0.0.1 that runs a script per request, chosen by method and path."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.requests: List[Request] = []
        self.counts: Counter[Tuple[str, str]] = collections.Counter()
        self.errors: List[BaseException] = []  # what scripts raised (a test may check it is empty)
        self._routes: Dict[Tuple[str, str], Script] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._sockets: List[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, name="raw-server", daemon=True).start()

    def __enter__(self) -> "RawServer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self.stopping.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    # -- routes and counts ---------------------------------------------------------------------

    def route(self, method: str, pattern: str, script: Script) -> None:
        """Answer ``method pattern`` (``/logs/*`` for a prefix) with the script (or bytes)."""
        self._routes[(method.upper(), pattern)] = script

    def count(self, method: str, pattern: str) -> int:
        """How many requests matched this route so far."""
        with self._lock:
            return self.counts[(method.upper(), pattern)]

    def requests_to(self, method: str, pattern: str) -> List[Request]:
        with self._lock:
            return [r for r in self.requests if r.route == (method.upper(), pattern)]

    def wait_for(self, method: str, pattern: str, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until this many requests have matched the route; False if they did not come in time."""
        end = time.monotonic() + timeout
        with self._arrived:
            while self.counts[(method.upper(), pattern)] < count:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._arrived.wait(left)
            return True

    def _match(self, method: str, path: str) -> Tuple[Tuple[str, str], Optional[Script]]:
        if (method, path) in self._routes:
            return (method, path), self._routes[(method, path)]
        prefixes = [p for m, p in self._routes if m == method and p.endswith("*") and path.startswith(p[:-1])]
        if prefixes:
            best = max(prefixes, key=len)
            return (method, best), self._routes[(method, best)]
        return (method, path), None

    # -- serving -------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.settimeout(READ_TIMEOUT)
            with self._lock:
                if self.stopping.is_set():
                    sock.close()
                    return
                self._sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock,), name="raw-server-connection", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = Connection(sock, self)
        try:
            while not conn.closed:
                read = conn.read_request()
                if read is None:
                    break
                method, target, headers, body = read
                path, _, query = target.partition("?")
                key, script = self._match(method.upper(), path)
                request = Request(method, target, path, query, headers, body, key, time.monotonic())
                with self._arrived:
                    self.requests.append(request)
                    self.counts[key] += 1
                    self._arrived.notify_all()
                conn.keep_alive = False
                if script is None:
                    conn.send(json_answer(404, {"detail": f"no route for {method} {path}"}))
                elif isinstance(script, (bytes, bytearray)):
                    conn.send(bytes(script))
                else:
                    script(conn, request)
                if not conn.keep_alive:
                    break
        except BaseException as exc:  # a script's bug: kept for the test to see, the connection closed
            self.errors.append(exc)
        finally:
            conn.close()
            with self._lock:
                if sock in self._sockets:
                    self._sockets.remove(sock)


# -- answers, as bytes -----------------------------------------------------------------------------


def status_line(status: int, reason: Optional[str] = None) -> bytes:
    return f"HTTP/1.1 {status} {REASONS.get(status, 'Whatever') if reason is None else reason}\r\n".encode("latin-1")


def answer(
    status: int,
    body: bytes = b"",
    headers: Iterable[Tuple[str, str]] = (),
    *,
    reason: Optional[str] = None,
    length: Optional[int] = -1,
    close: bool = True,
) -> bytes:
    """A whole HTTP/1.1 answer. ``length`` -1: the body's own Content-Length; None: no
    Content-Length (the body ends with the connection); any other number is sent as it is.
    ``close`` adds Connection: close (every answer of a raw server ends its connection)."""
    head = status_line(status, reason)
    for name, value in headers:
        head += f"{name}: {value}\r\n".encode("latin-1")
    if length is not None:
        head += f"Content-Length: {len(body) if length == -1 else length}\r\n".encode()
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


def json_answer(status: int, value: Any, headers: Iterable[Tuple[str, str]] = (), **options: Any) -> bytes:
    return answer(status, json.dumps(value).encode(), [("Content-Type", "application/json"), *headers], **options)


def interim(status: int = 103, headers: Iterable[Tuple[str, str]] = (("Link", "</style.css>; rel=preload"),)) -> bytes:
    """An interim (1xx) answer: a status line and headers, no body."""
    head = status_line(status)
    for name, value in headers:
        head += f"{name}: {value}\r\n".encode("latin-1")
    return head + b"\r\n"


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def script(data: bytes) -> Callable[[Connection, Request], None]:
    """A script that writes these bytes and closes the connection."""

    def run(conn: Connection, request: Request) -> None:
        conn.send(data)

    return run


def cut(data: bytes, keep: int) -> Callable[[Connection, Request], None]:
    """A script that writes the first ``keep`` bytes of an answer, then closes the connection."""
    return script(data[:keep])


def reset_connection(conn: Connection, request: Request) -> None:
    """A script that reads the request and answers with a TCP reset."""
    conn.reset()


def silent(conn: Connection, request: Request) -> None:
    """A script that reads the request and sends nothing, holding the connection open."""
    conn.hold()
