"""The core promises of issue 10, each against the emulator: a run happens once, a one-time key is
spent once, a workflow's failure is RunFailed, and a deadline bounds the whole call."""

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest
import responses
from fake_runtime import FakeRuntime

import codewords_lite as cw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for_call(runtime, method, prefix, count=1, timeout=10.0):
    """Wait until the emulator has received ``count`` such requests."""
    limit = time.monotonic() + timeout
    while len(runtime.calls_to(method, prefix)) < count:
        assert time.monotonic() < limit, f"no {method} {prefix} arrived"
        time.sleep(0.005)


def ctrl_c_when(runtime, method, prefix):
    """Send this process a SIGINT as soon as the emulator receives such a request."""

    def watch():
        wait_for_call(runtime, method, prefix)
        time.sleep(0.05)  # let the main thread block on the answer
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# -- 1. nothing runs twice -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_a_workflows_own_429_or_503_is_not_sent_again(runtime, client, quick_retries, status):
    """Item 1: a workflow that returns 429/503 (no Error-Origin) ran; it used to be sent 4 times."""
    with pytest.raises(cw.RunFailed) as info:
        client.run("refuse", {"status": status, "detail": "I am busy"})
    error = info.value
    assert error.status_code == status and error.detail == "I am busy"
    assert error.record is not None and error.record["serviceId"] == "refuse"
    assert error.request_id == runtime.calls_to("POST", "/run/")[0]["headers"]["X-Provisioned-Request-Id"]
    assert isinstance(error, cw.APIStatusError)
    assert len(runtime.calls_to("POST", "/run/")) == 1 and runtime.executions["refuse"] == 1


@pytest.mark.parametrize("status, cls", [(429, cw.RateLimitError), (503, cw.ServerError)])
def test_without_a_request_id_a_429_or_503_to_a_run_is_not_sent_again(runtime, quick_retries, status, cls):
    """Item 1: with no provisioned id, whose 429/503 it was cannot be known: raise, do not resend."""
    client = cw.Client(runtime.api_key, base_url=runtime.url, fallback=None)
    with pytest.raises(cls) as info:
        client.run("refuse", {"status": status})
    assert len(runtime.calls_to("POST", "/run/")) == 1 and runtime.executions["refuse"] == 1
    runtime.fault("POST", "/run/", status=429, retry_after="7")
    with pytest.raises(cw.RateLimitError) as info:
        client.run("echo")  # the gateway's 429: still not resent without an id, and retry_after kept
    assert info.value.retry_after == 7.0 and len(runtime.calls_to("POST", "/run/")) == 2


@pytest.mark.parametrize("status", [429, 503])
def test_a_run_the_gateway_turned_away_is_sent_again_with_the_same_id(runtime, client, status):
    """Item 1: the husk has not started, so the 429/503 was the gateway's: resend under the same id."""
    runtime.fault("POST", "/run/", status=status, retry_after="0.05")
    assert client.run("echo", {"a": 1}) == {"a": 1}
    first, second = runtime.calls_to("POST", "/run/")
    assert first["headers"]["X-Provisioned-Request-Id"] == second["headers"]["X-Provisioned-Request-Id"]
    # Two looks at the record, RECORD_SETTLE apart, before it is believed (issue 20: a record may lag its run)
    assert len(runtime.calls_to("GET", "/request/")) == 2 and runtime.executions["echo"] == 1


def test_ctrl_c_in_map_while_workers_provision_sends_no_run(runtime, client):
    """Item 2: workers provisioning at Ctrl-C went on to POST /run (4 runs after the interrupt)."""
    runtime.fault("POST", "/provision-request", delay=0.4, times=100)
    ctrl_c_when(runtime, "POST", "/provision-request")
    with pytest.raises(KeyboardInterrupt, match="runs that go on: none; no other run is sent"):
        list(client.map("echo", [{"i": i} for i in range(8)], max_workers=4))
    time.sleep(0.8)  # the provisions in flight finish; no run may follow them
    assert runtime.calls_to("POST", "/run") == []


def test_ctrl_c_in_map_names_exactly_the_runs_sent(runtime, client):
    """Item 2: the message names the runs that were sent and go on, and no other run is sent."""
    ctrl_c_when(runtime, "POST", "/run/")
    with pytest.raises(KeyboardInterrupt) as info:
        list(client.map("sleep", [{"seconds": 0.6}] * 8, max_workers=2))
    time.sleep(0.3)
    sent = [c["headers"]["X-Provisioned-Request-Id"] for c in runtime.calls_to("POST", "/run/")]
    assert 1 <= len(sent) <= 2
    assert all(request_id in str(info.value) for request_id in sent)
    assert str(info.value).count("req_") == len(sent)
    assert sorted(info.value.request_ids) == sorted(sent)  # for a program to act on, not only to read
    time.sleep(0.7)
    assert len(runtime.calls_to("POST", "/run/")) == len(sent)


def test_rerun_streams_only_the_returned_runs_logs_from_one_thread_at_a_time(quick_retries):
    """Item 3: with fallback="rerun", both runs' logs reached on_log, interleaved, from two threads."""
    with FakeRuntime(gateway_timeout=0.3) as runtime:
        client = cw.Client(runtime.api_key, base_url=runtime.url, fallback="rerun")
        seen, busy, overlaps = [], threading.Lock(), []

        def on_log(entry):
            if not busy.acquire(blocking=False):
                overlaps.append(entry)
                return
            try:
                seen.append((time.monotonic(), entry["createdAt"]))
                time.sleep(0.005)
            finally:
                busy.release()

        assert client.run("talk", {"lines": 12, "interval": 0.07}, on_log=on_log) == {"lines": 12}
        time.sleep(0.5)  # the first run goes on: none of its later lines may arrive
        first_id = runtime.calls_to("POST", "/run/")[0]["headers"]["X-Provisioned-Request-Id"]
        (second,) = runtime.calls_to("POST", "/run_async/")
        second_id = next(i for i in runtime.records if i != first_id and runtime.records[i].get("serviceId"))
        first_lines = {e["createdAt"] for e in runtime.log_entries[first_id]}
        second_lines = [e["createdAt"] for e in runtime.log_entries[second_id]]
        assert overlaps == []
        assert [c for at, c in seen if c in first_lines and at > second["at"]] == []
        assert [c for _, c in seen if c not in first_lines] == second_lines


# -- 4. a one-time key is sent once --------------------------------------------------------------


def one_time_client(runtime):
    return cw.Client(runtime.issue_one_time_key(), base_url=runtime.url)


@pytest.mark.parametrize(
    "call",
    [
        lambda c, r: c.run("echo", on_log=print, request_id=r),
        lambda c, r: c.run("echo", fallback="resume"),
        lambda c, r: c.run("echo", fallback="rerun", request_id=r),
        lambda c, r: c.get_run(r).wait(on_log=print),
        lambda c, r: c.map("echo", [{}]),
    ],
    ids=["run request_id on_log", "run fallback=resume", "run fallback=rerun", "wait on_log", "map"],
)
def test_a_one_time_key_refuses_what_needs_two_requests_before_sending(runtime, call):
    """Item 4: run(request_id=..., on_log=...) sent POST /run and GET /logs on one key."""
    with pytest.raises(cw.ConfigurationError, match="one-time key allows one request"):
        call(one_time_client(runtime), runtime.new_record())
    assert runtime.calls == []


def test_a_one_time_key_run_with_a_request_id_does_not_resume_a_504(quick_retries):
    """Item 4: run(request_id=...) resumed a 504 with GET /result on the spent key."""
    with FakeRuntime(gateway_timeout=0.2) as runtime:
        client = one_time_client(runtime)
        with pytest.raises(cw.GatewayTimeout):
            client.run("sleep", {"seconds": 0.5}, request_id=runtime.new_record())
        assert [c["path"] for c in runtime.calls] == ["/run/sleep"]


def test_a_one_time_key_spends_one_request_on_every_call(runtime):
    """Item 4: each call with a fresh one-time key sends exactly one request, and it is accepted."""
    request_id = runtime.new_record()
    assert one_time_client(runtime).run("echo", {"a": 1}, request_id=request_id) == {"a": 1}
    started = one_time_client(runtime).start("echo", {"b": 2})
    assert one_time_client(runtime).result(started.request_id) == {"b": 2}
    assert "id" in one_time_client(runtime).details(started.request_id)
    assert one_time_client(runtime).get_run(started.request_id).done()
    assert len(runtime.calls) == 5 and len(runtime.spent_keys) == 5


def test_a_one_time_key_waits_with_one_poll():
    """Item 4: a second poll would be refused (401): one poll, then RunTimeout with the id."""
    with FakeRuntime(hold_polls=False) as runtime:  # "not yet" at once
        request_id = one_time_client(runtime).start("sleep", {"seconds": 1}).request_id
        with pytest.raises(cw.RunTimeout, match="one poll a one-time key allows") as info:
            one_time_client(runtime).result(request_id, timeout=5)
        assert info.value.request_id == request_id and len(runtime.calls_to("GET", "/result/")) == 1


def test_the_command_line_runs_with_a_one_time_key(runtime):
    """Item 4: the command line's run provisioned first, so with a one-time key it always failed (401)."""
    key = runtime.issue_one_time_key()
    env = {**os.environ, "CODEWORDS_API_KEY": key, "CODEWORDS_BASE_URL": runtime.url}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "codewords_lite.py"), "run", "echo", '{"a": 1}'],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, '{"a":1}\n'), result.stderr
    assert [c["path"] for c in runtime.calls] == ["/run/echo"]


# -- 5. one class for a workflow's failure -------------------------------------------------------


def test_a_workflows_failure_is_run_failed_however_it_is_waited_for(runtime, client):
    """Item 5: a quick run() raised NotFoundError for the workflow's own 404, resumed runs RunFailed."""
    inputs = {"status": 404, "detail": "no such customer"}
    with pytest.raises(cw.RunFailed) as quick:
        client.run("fail", inputs)
    with pytest.raises(cw.RunFailed) as waited:
        client.start("fail", inputs).wait()
    for error in (quick.value, waited.value):
        assert error.status_code == 404 and error.detail == "no such customer"
        assert not isinstance(error, cw.NotFoundError)
    assert waited.value.record["responseStatus"] == 404
    with pytest.raises(cw.RunFailed) as returned:  # return JSONResponse(status_code=404): no Error-Origin
        client.run("refuse", inputs)
    assert returned.value.status_code == 404 and returned.value.record["serviceId"] == "refuse"
    with pytest.raises(cw.NotFoundError) as misspelt:
        client.run("no-such-service")
    assert not isinstance(misspelt.value, cw.RunFailed)
    copy = pickle.loads(pickle.dumps(quick.value))
    assert (type(copy), copy.status_code, copy.detail, str(copy)) == (
        cw.RunFailed,
        404,
        "no such customer",
        str(quick.value),
    )


# -- 6, 7. deadlines -----------------------------------------------------------------------------


def test_a_tiny_deadline_is_a_timeout_not_a_value_error(runtime, client):
    """Item 6: run(timeout=1e-5) and wait(timeout=1e-5) reached requests with a negative timeout."""
    for fallback in ("resume", None):
        with pytest.raises((cw.RunTimeout, cw.APITimeoutError)):
            client.run("echo", timeout=1e-5, fallback=fallback)
    for timeout in (1e-5, 5e-4, 9e-4):  # passed, or too close for a request: the same
        with pytest.raises(cw.RunTimeout) as info:
            client.get_run("req_any").wait(timeout=timeout)
        assert 'client.result("req_any")' in str(info.value)


def test_a_deadline_that_passes_after_the_rate_gate_is_a_timeout(runtime, client, monkeypatch):
    """Item 6: a Retry-After that ends just inside a deadline left a negative timeout (ValueError)."""
    enter = cw._RateGate.enter

    def enter_just_inside(self, deadline, is_run, stop=None, held=True):
        allowed = enter(self, deadline, is_run, stop, held)
        time.sleep(max(0.0, deadline - time.monotonic()))  # the pause ends as the deadline passes
        return allowed

    monkeypatch.setattr(cw._RateGate, "enter", enter_just_inside)
    with pytest.raises(cw.APITimeoutError, match="deadline"):
        client.run("echo", timeout=0.05, fallback=None)


@pytest.mark.parametrize("headers", [False, True], ids=["trickled body", "trickled headers"])
def test_a_trickled_answer_does_not_outlive_the_deadline(runtime, client, headers):
    """Item 7: an answer sent a byte every 0.3 s kept wait(timeout=1) going for 8+ s."""
    runtime.fault("GET", "/result/", trickle=0.3, trickle_headers=headers, times=100)
    started = time.monotonic()
    with pytest.raises(cw.RunTimeout):
        client.get_run(runtime.new_record("echo")).wait(timeout=1)
    assert time.monotonic() - started < 2.0
    runtime.fault("POST", "/run/", trickle=0.3, trickle_headers=headers)
    started = time.monotonic()
    with pytest.raises((cw.RunTimeout, cw.APITimeoutError)):
        client.run("echo", timeout=1, fallback=None)
    assert time.monotonic() - started < 2.0


def test_a_stalled_handshake_does_not_outlive_the_deadline(quick_retries):
    """Item 7: a server that accepts the connection and never answers (as a stalled TLS handshake)."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        client = cw.Client("cwk-x", base_url=f"https://localhost:{server.getsockname()[1]}", fallback=None)
        started = time.monotonic()
        with pytest.raises((cw.RunTimeout, cw.APITimeoutError)):
            client.run("echo", timeout=1)
        assert time.monotonic() - started < 2.0


# -- 8, 9, 10 ------------------------------------------------------------------------------------


def test_an_unfinished_record_from_result_is_not_yet(monkeypatch):
    """Item 8: a 2xx from /result whose record had not finished was returned as an output of None."""
    monkeypatch.setattr(cw, "POLL_BACKOFF", (0.01, 0.05))
    base = "https://api.example"
    with responses.RequestsMock() as api, cw.Client("cwk-x", base_url=base) as client:
        api.get(f"{base}/result/req_u", json={"id": "req_u", "startedAt": "2026-01-01T00:00:00Z"})
        api.get(f"{base}/result/req_u", json={"id": "req_u", "completedAt": "2026-01-01T00:00:01Z", "responseJson": 7})
        assert client.result("req_u") == 7
        assert len(api.calls) == 2


def test_ctrl_c_in_run_names_the_run_and_returns_at_once_with_on_log(runtime, client):
    """Item 9: Ctrl-C in run() said nothing of the run, and waited two seconds for the log stream."""
    ctrl_c_when(runtime, "POST", "/run/")
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as info:
        client.run("sleep", {"seconds": 3, "lines": 3}, on_log=lambda entry: None)
    assert time.monotonic() - started < 1.5
    request_id = runtime.calls_to("POST", "/run/")[0]["headers"]["X-Provisioned-Request-Id"]
    assert f'client.result("{request_id}")' in str(info.value)


def test_ctrl_c_in_wait_names_the_run_and_returns_at_once_with_on_log(runtime, client):
    """Item 9: the same for wait()."""
    run = client.start("sleep", {"seconds": 3, "lines": 3})
    ctrl_c_when(runtime, "GET", "/result/")
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as info:
        run.wait(on_log=lambda entry: None)
    assert time.monotonic() - started < 1.5
    assert f'client.result("{run.request_id}")' in str(info.value)


def test_a_provision_that_cannot_reach_the_network_raises_at_once(quick_retries, caplog):
    """Item 10: the run was then sent without an id to the same dead host, after a warning."""
    with socket_closed() as url:
        with caplog.at_level(logging.WARNING, logger="codewords_lite"):
            with pytest.raises(cw.APIConnectionError, match="the run was not sent: provisioning"):
                cw.Client("cwk-x", base_url=url).run("echo")
        assert caplog.text == ""


def test_a_provision_that_fails_with_a_server_error_raises(runtime, client, quick_retries):
    """Item 10: only 404, 405 and 501 mean "no request ids here"; a 500 is raised, the run not sent."""
    runtime.fault("POST", "/provision-request", status=500, times=10)
    with pytest.raises(cw.ServerError):
        client.run("echo")
    assert runtime.calls_to("POST", "/run/") == []


class socket_closed:
    """The URL of a port on which nothing listens."""

    def __enter__(self):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{probe.getsockname()[1]}"

    def __exit__(self, *exc_info):
        pass


# -- issue 14, item 5: messages ------------------------------------------------------------------


def test_run_timeout_says_how_to_pick_the_run_up(runtime, client):
    """Issue 14: str(RunTimeout) was "run of sleep passed its deadline", with no request id."""
    with pytest.raises(cw.RunTimeout) as info:
        client.run("sleep", {"seconds": 2}, timeout=0.5)
    request_id = info.value.request_id
    assert request_id and f'client.result("{request_id}")' in str(info.value)


def test_a_run_refused_before_it_started_does_not_wait_for_its_log_stream(runtime, client):
    """Sibling of item 9: a run the API refused never writes logs, so on_log's stream is not
    drained for two seconds before the error is raised; a finished run's logs all arrive."""
    started = time.monotonic()
    with pytest.raises(cw.NotFoundError):
        client.run("no-such-service", on_log=lambda entry: None)
    assert time.monotonic() - started < 1.0
    entries = []
    with pytest.raises(cw.RunFailed):
        client.run("fail", {"status": 500}, on_log=entries.append)
    assert [e["message"] for e in entries] == ["about to fail"]
