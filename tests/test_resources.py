"""What a long-lived process must not lose or get wrong: sockets, a closed client, the key
behind a session of the caller's."""

import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import codewords_lite as cw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOCKETS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading
    sys.path.insert(0, sys.argv[1])
    import codewords_lite as cw

    def sockets():
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
            except OSError:
                pass  # the listing's own descriptor, closed by now
        return count

    client = cw.Client(sys.argv[2], base_url=sys.argv[3])
    for _ in range(10):  # fallback=None: 8 calls at once (the default adds the provisions of the items ahead)
        list(client.map("echo", [{"i": i} for i in range(16)], max_workers=8, fallback=None))
    after_maps = sockets()
    for _ in range(50):  # 200 short-lived threads, 4 at a time
        batch = [threading.Thread(target=client.run, args=("echo",), kwargs={"fallback": None}) for _ in range(4)]
        for thread in batch:
            thread.start()
        for thread in batch:
            thread.join()
    after_threads = sockets()
    client.close()
    print(json.dumps([after_maps, after_threads, sockets()]))
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts sockets in /proc")
def test_open_sockets_are_bounded_by_peak_concurrency_not_by_threads(runtime):
    """Regression: every thread that ever called kept a pool of its own until close(): 80
    sockets after 10 maps of 8 workers, 200 after 200 short-lived threads."""
    result = subprocess.run(
        [sys.executable, "-c", SOCKETS_SCRIPT, ROOT, runtime.api_key, runtime.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    after_maps, after_threads, after_close = json.loads(result.stdout)
    assert after_maps <= 8  # the peak: 8 workers
    assert after_threads <= 8  # 4 at a time, reusing what the maps left open
    assert after_close == 0
    assert len({call["peer"] for call in runtime.calls}) <= 8


DROPPED_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, pickle, sys, threading, weakref
    sys.path.insert(0, sys.argv[1])
    import codewords_lite as cw

    def sockets():
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
            except OSError:
                pass
        return count

    gc.disable()  # what frees a dropped client must be its last reference, not a collection
    client = cw.Client(sys.argv[2], base_url=sys.argv[3])
    copies = []
    for _ in range(10):  # as a Dask task does: a copy unpickled, used, dropped, never closed
        copy = pickle.loads(pickle.dumps(client))
        list(copy.map("echo", [{"i": i} for i in range(16)], max_workers=8))
        copy.run("echo", {"once": True})
        copies.append(weakref.ref(copy))
        del copy
    for thread in threading.enumerate():
        if thread.name == "codewords-ids":  # a provision ahead still under way holds its client
            thread.join()
    print(json.dumps([sum(ref() is not None for ref in copies), sockets()]))
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts sockets in /proc")
def test_a_client_dropped_without_close_frees_its_sockets_at_once(runtime):
    """Regression: a map's id reserve and the map held each other, so a client that had run a map
    and was dropped kept its sockets until the garbage collector ran: 85 sockets after 10 copies."""
    result = subprocess.run(
        [sys.executable, "-c", DROPPED_SCRIPT, ROOT, runtime.api_key, runtime.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    alive, sockets = json.loads(result.stdout)
    assert (alive, sockets) == (0, 0)


def test_a_closed_client_refuses_every_call_and_opens_no_connection(runtime):
    """Regression: after close() or a with block, calls went on and opened new connections."""
    with cw.Client(runtime.api_key, base_url=runtime.url) as client:
        request_id = client.start("echo").request_id
    given = requests.Session()
    closed_by_hand = cw.Client(runtime.api_key, base_url=runtime.url, session=given)
    closed_by_hand.close()
    calls, puts = len(runtime.calls), len(runtime.storage_calls)
    for closed in (client, closed_by_hand):
        for attempt in _every_call(closed, request_id):
            with pytest.raises(RuntimeError, match="Client is closed"):
                attempt()
    assert (len(runtime.calls), len(runtime.storage_calls)) == (calls, puts)
    given.close()


def _every_call(client, request_id):
    return [
        lambda: client.run("echo", {"a": 1}),
        lambda: client.run("echo", fallback=None),
        lambda: client.start("echo"),
        lambda: client.provision(),
        lambda: client.details(request_id),
        lambda: client.result(request_id),
        lambda: client.get_run(request_id).wait(),
        lambda: list(client.logs(request_id)),
        lambda: list(client.map("echo", [{}, {}])),
        lambda: client.upload(b"data", filename="a.txt"),
        lambda: client.__enter__(),
    ]


@pytest.fixture
def netrc_for_localhost(tmp_path, monkeypatch):
    """A ~/.netrc with credentials for 127.0.0.1, which requests applies to a session that trusts the environment."""
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login someone password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.parametrize("session_auth", [None, ("someone", "hunter2")])
def test_a_given_session_with_netrc_or_auth_still_sends_the_key(runtime, netrc_for_localhost, session_auth):
    """Regression: with session=, ~/.netrc replaced `Authorization: Bearer <key>` by `Basic ...`."""
    session = requests.Session()
    session.auth = session_auth
    with cw.Client(runtime.api_key, base_url=runtime.url, session=session) as client:
        run = client.start("talk", {"lines": 2})
        assert run.wait(on_log=lambda entry: None) == {"lines": 2}
        client.run("echo", {"a": 1}, on_log=lambda entry: None)
        client.details(run.request_id)
        list(client.logs(run.request_id))
        client.upload(b"abc", filename="a.txt")
    sent = {call["headers"].get("Authorization") for call in runtime.calls}
    assert sent == {"Bearer " + runtime.api_key}
    assert len(runtime.calls) >= 8
    assert [c for c in runtime.storage_calls if "Authorization" in c["headers"]] == []
    session.close()


class _RecordingProxy(BaseHTTPRequestHandler):
    """A forward proxy that accepts every PUT itself and remembers what it was asked."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # or each answer waits ~40 ms for a delayed ACK
    seen = None  # what each PUT asked, set by the test

    def do_PUT(self):
        self.seen.append({"target": self.path, "headers": dict(self.headers)})
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_uploads_go_through_the_given_sessions_proxies_and_verify(runtime, monkeypatch):
    """Regression: the PUT ignored the given session's proxies and CA bundle. The API host is
    reached as localhost and the storage host as 127.0.0.1, so that only the PUT is proxied."""
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    _RecordingProxy.seen = []
    verifies = []
    send = requests.adapters.HTTPAdapter.send

    def spy(adapter, request, **kwargs):
        verifies.append((request.method, kwargs.get("verify")))
        return send(adapter, request, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", spy)
    session = requests.Session()
    session.proxies = {"http://127.0.0.1": f"http://127.0.0.1:{proxy.server_address[1]}"}
    session.verify = "/etc/our-ca.pem"
    api_url = runtime.url.replace("127.0.0.1", "localhost")
    try:
        with cw.Client(runtime.api_key, base_url=api_url, session=session) as client:
            client.upload(b"abc", filename="a.txt")
    finally:
        proxy.shutdown()
        proxy.server_close()
        session.close()
    (put,) = _RecordingProxy.seen
    assert put["target"].startswith(runtime.storage_url + "/upload/")
    assert "Authorization" not in put["headers"] and runtime.api_key not in json.dumps(put)
    assert ("PUT", "/etc/our-ca.pem") in verifies and ("POST", "/etc/our-ca.pem") in verifies


def test_close_stops_a_log_stream_already_streaming(runtime):
    """Regression: a logs() iterator already streaming kept delivering entries after close()."""
    client = cw.Client(runtime.api_key, base_url=runtime.url)
    request_id = client.start("sleep", {"seconds": 3, "lines": 30}).request_id
    stream = client.logs(request_id)
    next(stream)
    client.close()
    with pytest.raises(RuntimeError, match="Client is closed"):
        next(stream)
    assert stream._stop.is_set()  # stopped, its socket shut, not merely refused


def test_close_during_a_run_with_on_log_prints_nothing(runtime, monkeypatch):
    """Regression: close() while run(on_log=...) went on let a RuntimeError escape the log
    follower's thread, and Python printed its traceback: a library prints nothing."""
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    client = cw.Client(runtime.api_key, base_url=runtime.url)
    first_line = threading.Event()

    def run():
        try:
            client.run("sleep", {"seconds": 1, "lines": 4}, on_log=lambda entry: first_line.set())
        except RuntimeError:
            pass  # the closed client's refusal, in the caller's thread: as it should be

    caller = threading.Thread(target=run)
    caller.start()
    assert first_line.wait(30)
    client.close()
    caller.join(30)
    for thread in threading.enumerate():
        if thread.name.startswith("codewords-logs"):
            thread.join(30)
    assert escaped == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_uses_connections_of_its_own(runtime):
    """Regression: after fork() the child shared the parent's pooled keep-alive socket, and the
    first call in each process failed (once a run waited until its deadline)."""
    client = cw.Client(runtime.api_key, base_url=runtime.url, max_retries=0)
    client.details(client.start("echo").request_id)  # an idle connection in the pool
    request_id = client.start("echo").request_id
    readable, writable = os.pipe()
    pid = os.fork()
    failures = 0
    for _ in range(20):
        try:
            failures += client.details(request_id)["id"] != request_id
        except Exception:
            failures += 1
    if pid == 0:
        os.write(writable, str(failures).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert (failures, int(os.read(readable, 100))) == (0, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_forked_child_that_closes_the_client_leaves_the_parents_log_stream_alone(runtime):
    """Regression: the child's close() closed the log streams it inherited, shutting the socket
    it shares with the parent, whose stream was then cut and reconnected."""
    client = cw.Client(runtime.api_key, base_url=runtime.url)
    run = client.start("talk", {"lines": 10, "interval": 0.1})
    stream, got = client.logs(run.request_id), []
    first = threading.Event()
    reader = threading.Thread(target=lambda: [got.append(e) or first.set() for e in stream], daemon=True)
    reader.start()
    assert first.wait(10)  # the stream is open and delivering
    pid = os.fork()
    if pid == 0:
        client.close()
        os._exit(0)
    os.waitpid(pid, 0)
    reader.join(20)
    assert [e["message"] for e in got] == [f"line {i}" for i in range(10)]
    assert len(runtime.calls_to("GET", "/logs/")) == 1
