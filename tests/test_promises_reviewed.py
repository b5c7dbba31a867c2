"""The core promises where an independent review broke them: runs sent once, one-time keys
spent once, deadlines kept, log streams stopped; each test against the emulator."""

import contextlib
import logging
import os
import signal
import socket
import threading
import time

import pytest
import urllib3

import codewords_lite as cw


def one_time_client(runtime):
    return cw.Client(runtime.issue_one_time_key(), base_url=runtime.url)


def test_a_run_inside_the_callers_own_except_block_is_not_sent_again(runtime, client):
    """a: "nothing was sent" followed __context__, so a run called while the caller handled a
    ConnectionRefusedError was sent again after its answer was lost: it ran 4 times."""
    runtime.fault("POST", "/run/", drop=True, after_run=True)
    try:
        raise ConnectionRefusedError("the caller's own")
    except ConnectionRefusedError:
        with pytest.raises(cw.APIConnectionError):
            client.run("echo", {}, fallback=None)
    assert runtime.executions["echo"] == 1


def test_a_refused_connection_is_still_sent_again(runtime, quick_retries, caplog):
    """a's other side: a connection refused before anything left is retried (by its class)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.INFO, logger="codewords_lite")
    with cw.Client("k", base_url=f"http://127.0.0.1:{port}", max_retries=2) as client:
        with pytest.raises(cw.APIConnectionError, match="could not connect"):
            client.details("req_1")
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "retry 2 of 2" in retries[-1]


def test_a_provision_that_cannot_connect_raises_at_once(caplog):
    """j: a provision refused for lack of network was retried with backoff (3 s; 6.9 s with a
    connect timeout). The run could not be sent either: it raises at once, with no retry."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.INFO, logger="codewords_lite")
    with cw.Client("k", base_url=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(cw.APIConnectionError, match="the run was not sent"):
            client.run("echo", {})
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_a_one_time_key_never_asks_after_a_returned_error(runtime):
    """b: with a one-time key, run(request_id=...) of a workflow that returns its own 503 also
    sent GET /request/{id} on the spent key. One request: the answer is raised as it is."""
    request_id = runtime.new_record()
    with one_time_client(runtime) as client:
        with pytest.raises(cw.ServerError):
            client.run("refuse", {"status": 503}, request_id=request_id)
    assert [c["path"] for c in runtime.calls] == ["/run/refuse"]


def test_logs_with_a_one_time_key_is_refused_before_anything_is_sent(runtime):
    """c: logs() with a one-time key sent its stream and then more (the end check, reconnects)."""
    with one_time_client(runtime) as client:
        with pytest.raises(cw.ConfigurationError, match="one-time key"):
            client.logs("req_1")
        with pytest.raises(cw.ConfigurationError, match="one-time key"):
            client.get_run("req_1").logs()
    assert runtime.calls == []


@pytest.mark.parametrize("status", [500, 502, 401, 403])
def test_a_workflows_own_error_without_error_origin_is_run_failed(runtime, client, status):
    """e: a workflow that returned its own 500/502/401/403 (no Error-Origin) raised ServerError or
    AuthenticationError from run() but RunFailed from result(): the record says it started."""
    with pytest.raises(cw.RunFailed) as caught:
        client.run("refuse", {"status": status})
    assert caught.value.status_code == status and caught.value.record["serviceId"] == "refuse"
    assert runtime.executions["refuse"] == 1


def test_a_success_asks_nothing_more(runtime, client):
    """e: the record is asked about only after an error answer."""
    client.run("echo", {})
    assert runtime.calls_to("GET", "/request/") == []


def test_on_log_drain_is_cut_to_the_deadline(runtime, client):
    """f: run(timeout=T, on_log=...) and wait(timeout=T, on_log=...) waited LOG_GRACE (2 s) for a
    log stream that does not end, past T."""
    runtime.logs_never_end = True
    started = time.monotonic()
    client.run("talk", {"lines": 2}, timeout=0.6, on_log=lambda entry: None)
    assert time.monotonic() - started < 0.6 + 0.5
    run = client.start("talk", {"lines": 2})
    started = time.monotonic()
    run.wait(timeout=0.6, on_log=lambda entry: None)
    assert time.monotonic() - started < 0.6 + 0.5


@pytest.mark.parametrize(
    "framing",
    [
        "chunked",
        pytest.param(
            "close",
            marks=pytest.mark.skipif(
                not hasattr(urllib3.response.HTTPResponse, "read1"),
                reason="an older urllib3 reads such a body to its end: its first entry never comes early",
            ),
        ),
    ],
)
def test_close_wakes_a_blocked_read_in_every_framing(runtime, client, framing):
    """k: with a close-delimited log stream, http.client lets go of the socket (conn.sock is
    None), so close() could not wake the thread blocked on it: Ctrl-C took 2 s, threads piled up."""
    runtime.log_framing, runtime.logs_never_end, runtime.keep_alive = framing, True, False
    run = client.start("talk", {"lines": 1})
    stream = client.logs(run.request_id)
    assert next(stream)["message"] == "line 0"
    run.wait()
    threading.Timer(0.2, stream.close).start()
    started = time.monotonic()
    assert list(stream) == []  # blocked on the silent stream until close() woke it
    assert time.monotonic() - started < 1.5


def test_a_rerun_streams_only_its_own_logs_from_one_thread(runtime, monkeypatch):
    """p: with fallback="rerun", the first run's stream (close-delimited, so close() could not wake
    it) went on delivering while the rerun's did: on_log was called from two threads at once,
    with the first run's entries. Its first entry after the rerun began comes while it is closed."""
    runtime.log_framing, runtime.keep_alive, runtime.gateway_timeout = "close", False, 0.3
    monkeypatch.setattr(cw, "LOG_GRACE", 0.2)  # the rerun begins before the first run's next entry
    calls, running, most = [], [0], [0]
    lock = threading.Lock()

    def on_log(entry):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        calls.append(entry["createdAt"])
        with lock:
            running[0] -= 1

    with cw.Client(runtime.api_key, base_url=runtime.url, sync_timeout=10) as client:
        client.run("talk", {"lines": 3, "interval": 0.6}, fallback="rerun", on_log=on_log)
    first = runtime.calls_to("GET", "/logs/")[0]["path"].rsplit("/", 1)[1]
    second = next(r for r in runtime.records if r != first and runtime.records[r].get("serviceId"))
    first_stamps = {e["createdAt"] for e in runtime.log_entries[first]}
    second_stamps = [e["createdAt"] for e in runtime.log_entries[second]]
    from_first = [i for i, stamp in enumerate(calls) if stamp in first_stamps]
    assert most[0] == 1
    assert calls[len(from_first) :] == second_stamps and from_first == list(range(len(from_first)))


def test_a_map_closed_at_its_yield_sends_no_more_runs(runtime, client):
    """g: Ctrl-C in the caller's loop body, with the map paused at its yield: closing the map
    (contextlib.closing, or dropping it) stops it; no queued run is sent after."""
    with pytest.raises(KeyboardInterrupt):
        with contextlib.closing(client.map("sleep", [{"seconds": 0.1}] * 40, max_workers=4)) as outputs:
            for _ in outputs:
                raise KeyboardInterrupt
    # A run admitted just before the map stopped may still be on its way to the server: let those
    # land (each takes 0.1 s), then nothing more may come. The window holds 2 x max_workers runs.
    time.sleep(0.5)
    sent = len(runtime.calls_to("POST", "/run/"))
    time.sleep(0.5)
    assert len(runtime.calls_to("POST", "/run/")) == sent <= 8


def test_a_map_interrupt_names_a_rerun_and_the_run_it_replaced(runtime):
    """The Ctrl-C message of a map with fallback="rerun" said "no request id" for the rerun and
    left out the first run cut short, which may go on."""
    runtime.gateway_timeout = 0.2

    def interrupt_once_the_rerun_is_waited_for():
        deadline = time.monotonic() + 10
        while not runtime.calls_to("GET", "/result/") and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # a real signal wakes the wait, as Ctrl-C does

    with cw.Client(runtime.api_key, base_url=runtime.url, fallback="rerun") as client:
        outputs = client.map("sleep", [{"seconds": 3}], max_workers=1)
        threading.Thread(target=interrupt_once_the_rerun_is_waited_for).start()
        with pytest.raises(KeyboardInterrupt) as caught:
            next(outputs)
    rerun = runtime.calls_to("GET", "/result/")[0]["path"].rsplit("/", 1)[1]
    assert f"item 0 (no request id known), item 0 ({rerun})" in str(caught.value)


def test_the_watchdog_never_shuts_a_connection_given_back_to_its_pool(runtime, monkeypatch):
    """l: a call's answer was read (its connection back in the pool) before its watch was released;
    a deadline passing then shut the socket another call had taken. Widened here by a pause after
    the answer is read, in thread A only."""
    runtime.fault("GET", "/request/", delay=0.3)
    read, resume = threading.Event(), threading.Event()
    check_length = cw._check_length

    def widened(response, received):
        check_length(response, received)
        if threading.current_thread().name == "A":
            read.set()
            resume.wait(5)  # A's deadline passes here, while B uses the connection

    monkeypatch.setattr(cw, "_check_length", widened)
    request_id = runtime.new_record()
    outcome = {}
    with cw.Client(runtime.api_key, base_url=runtime.url, timeout=0.5, fallback=None) as client:
        a = threading.Thread(target=lambda: outcome.update(a=client.details(request_id)), name="A")
        a.start()
        assert read.wait(5)
        outcome["b"] = client.run("sleep", {"seconds": 0.4}, timeout=10)  # past A's deadline
        resume.set()
        a.join(5)
    assert outcome["b"]["slept"] == 0.4 and outcome["a"]["id"] == request_id


def test_upload_keeps_its_deadline(runtime, client):
    """h: upload() had no deadline: a storage host that trickles its answer held it for 120 s a
    read, and Retry-After waits for up to a minute."""
    runtime.fault("PUT", "/upload/", trickle=0.2)
    started = time.monotonic()
    with pytest.raises(cw.APITimeoutError):
        client.upload(b"x" * 10, filename="a.bin", timeout=1)
    assert time.monotonic() - started < 2.0
    runtime.fault("PUT", "/upload/", status=503, retry_after="30")
    started = time.monotonic()
    with pytest.raises(cw.StorageError):
        client.upload(b"x" * 10, filename="a.bin", timeout=1)
    assert time.monotonic() - started < 2.0


def test_a_trickled_answer_that_ends_with_its_connection_keeps_the_deadline(runtime):
    """A sibling of k, found on the way: http.client lets go of the socket of an answer with no
    length, so the watchdog could not cut it (11 s for a 1 s deadline), and a body cut there
    looks whole. It raises APITimeoutError by the deadline."""
    runtime.fault("GET", "/request/", trickle=0.2, no_length=True, body=b'{"id": "' + b"x" * 40 + b'"}')
    started = time.monotonic()
    with cw.Client(runtime.api_key, base_url=runtime.url, timeout=1, max_retries=0) as client:
        with pytest.raises(cw.APITimeoutError):
            client.details(runtime.new_record())
    assert time.monotonic() - started < 2.0


def test_ctrl_c_in_a_rerun_names_the_first_run_too(runtime):
    """A sibling of the map's message: run() with fallback="rerun" interrupted while its rerun
    goes on named only the rerun, not the first run cut short, which may go on too."""
    runtime.gateway_timeout = 0.2

    def interrupt_once_the_rerun_is_waited_for():
        deadline = time.monotonic() + 10
        while not runtime.calls_to("GET", "/result/") and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_the_rerun_is_waited_for).start()
    with cw.Client(runtime.api_key, base_url=runtime.url, fallback="rerun") as client:
        with pytest.raises(KeyboardInterrupt) as caught:
            client.run("sleep", {"seconds": 3})
    rerun = runtime.calls_to("GET", "/result/")[0]["path"].rsplit("/", 1)[1]
    assert rerun in str(caught.value) and "the run it reran (sent without a request id)" in str(caught.value)


def test_a_gateway_error_after_a_run_that_succeeded_is_not_run_failed(runtime, client):
    """e's limit: the record is the truth. A 503 from the gateway after the run answered 200 is not
    the workflow's: the run is not sent again, and its output is its record's."""
    runtime.fault("POST", "/run/", status=503, after_run=True)
    assert client.run("echo", {"a": 1}) == {"a": 1}
    assert runtime.executions["echo"] == 1
