"""Behaviour against the local emulator: fallbacks, retries, long polls, deadlines and threads."""

import logging
import socket
import threading
import time

import pytest
from fake_runtime import FakeRuntime

import codewords_lite as cw


def paths(runtime, method=None):
    return [(c["method"], c["path"]) for c in runtime.calls if method in (None, c["method"])]


# -- blocking runs and the 504 fallback --------------------------------------------------------


def test_blocking_run(runtime, client):
    assert client.run("echo", {"hello": "wörld", "n": [1, 2]}) == {"hello": "wörld", "n": [1, 2]}
    assert client.run("text", {"text": "plain"}) == "plain"
    assert client.run("empty") is None
    assert runtime.executions == {"echo": 1, "text": 1, "empty": 1}


def test_default_fallback_resumes_a_504_and_runs_the_workflow_once():
    with FakeRuntime(gateway_timeout=0.4) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        started = time.monotonic()
        assert client.run("sleep", {"seconds": 1.5, "tag": "a"}) == {"slept": 1.5, "tag": "a"}
        elapsed = time.monotonic() - started
        assert runtime.executions["sleep"] == 1
        assert len(runtime.calls_to("POST", "/provision-request")) == 1
        (run_call,) = runtime.calls_to("POST", "/run/")
        request_id = run_call["headers"]["X-Provisioned-Request-Id"]
        polls = runtime.calls_to("GET", "/result/")
        assert polls and all(p["path"] == f"/result/{request_id}" for p in polls)
        assert 1.5 <= elapsed < 3.0  # it waited for the remaining time, not a second run


def test_default_fallback_resumes_after_the_client_read_timeout(runtime):
    with cw.Client(runtime.api_key, base_url=runtime.url, sync_timeout=0.3) as client:
        assert client.run("sleep", {"seconds": 1.0}) == {"slept": 1.0}
    assert runtime.executions["sleep"] == 1
    assert len(runtime.calls_to("POST", "/run/")) == 1


def test_rerun_fallback_starts_the_inputs_again():
    with FakeRuntime(gateway_timeout=0.3) as runtime:
        with cw.Client(runtime.api_key, base_url=runtime.url, fallback="rerun") as client:
            assert client.run("sleep", {"seconds": 0.6}) == {"slept": 0.6}
        assert runtime.executions["sleep"] == 2  # the documented cost of "rerun"
        assert [p for p in paths(runtime, "POST")] == [("POST", "/run/sleep"), ("POST", "/run_async/sleep")]
        assert runtime.calls_to("POST", "/provision-request") == []


def test_no_fallback_raises_gateway_timeout():
    with FakeRuntime(gateway_timeout=0.3) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        with pytest.raises(cw.GatewayTimeout) as info:
            client.run("sleep", {"seconds": 0.6}, fallback=None)
        assert info.value.status_code == 504
        assert paths(runtime) == [("POST", "/run/sleep")]


def test_no_fallback_raises_the_read_timeout(runtime):
    with cw.Client(runtime.api_key, base_url=runtime.url, sync_timeout=0.3, fallback=None) as client:
        with pytest.raises(cw.APITimeoutError):
            client.run("sleep", {"seconds": 0.6})
    assert paths(runtime) == [("POST", "/run/sleep")]


@pytest.mark.parametrize("status", [404, 405, 501])
def test_an_api_without_request_ids_gets_the_run_without_one(runtime, quick_retries, caplog, status):
    runtime.fault("POST", "/provision-request", status=status, times=10)
    with caplog.at_level(logging.WARNING, logger="codewords_lite"):
        assert client_for(runtime).run("echo", {"a": 1}) == {"a": 1}
    (run_call,) = runtime.calls_to("POST", "/run/")
    assert "X-Provisioned-Request-Id" not in run_call["headers"]
    assert "offers no request ids" in caplog.text


def test_without_a_provisioned_id_a_504_cannot_be_resumed(quick_retries):
    with FakeRuntime(gateway_timeout=0.3) as runtime:
        runtime.fault("POST", "/provision-request", status=404, times=10)
        with pytest.raises(cw.GatewayTimeout):
            client_for(runtime).run("sleep", {"seconds": 0.6})
        assert runtime.executions["sleep"] == 1
        assert runtime.calls_to("GET", "/result/") == []


def test_a_refused_key_on_provision_is_raised_and_the_run_not_sent(runtime):
    client = cw.Client("cwk-wrong", base_url=runtime.url)
    with pytest.raises(cw.AuthenticationError) as info:
        client.run("echo")
    # issue 14: not "from POST /provision-request", a call the user never made
    assert str(info.value) == "the API key was refused (401): Invalid or missing API key"
    assert info.value.status_code == 401
    assert paths(runtime) == [("POST", "/provision-request")]


def test_a_failing_workflow_raises_with_its_detail(runtime, client):
    with pytest.raises(cw.RunFailed, match="boom here") as info:
        client.run("fail", {"detail": "boom here"})
    assert info.value.request_id == runtime.calls_to("POST", "/run/")[0]["headers"]["X-Provisioned-Request-Id"]
    with pytest.raises(cw.APIStatusError, match="422") as info:
        client.run("fail", {"status": 422, "detail": [{"loc": ["body", "x"], "msg": "field required"}]})
    assert info.value.detail == [{"loc": ["body", "x"], "msg": "field required"}]
    assert runtime.executions["fail"] == 2


def test_one_time_key_spends_one_request(quick_retries):
    with FakeRuntime(api_key="cwotk-single-use") as runtime:
        client = cw.Client(runtime.api_key, base_url=runtime.url)
        assert client.run("echo", {"x": 1}) == {"x": 1}
        assert paths(runtime) == [("POST", "/run/echo")]
        with pytest.raises(cw.AuthenticationError):
            client.run("echo")
        assert len(runtime.calls) == 2


# -- retries -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502])
def test_a_run_that_may_have_reached_the_workflow_is_never_sent_again(runtime, client, quick_retries, status):
    """A gateway's error after the run answered: not sent again; the record holds its output."""
    runtime.fault("POST", "/run/", status=status, after_run=True)
    assert client.run("echo", {"a": 1}) == {"a": 1}
    assert len(runtime.calls_to("POST", "/run/")) == 1
    assert runtime.executions["echo"] == 1


def test_a_dropped_background_run_is_not_sent_again(runtime, client, quick_retries):
    """POST /run_async carries no id to ask about: a connection lost after it left is raised."""
    runtime.fault("POST", "/run_async/", drop=True, after_run=True)
    with pytest.raises(cw.APIConnectionError) as info:
        client.start("echo", {"a": 1})
    assert not isinstance(info.value, cw.APITimeoutError)
    assert len(runtime.calls_to("POST", "/run_async/")) == 1
    time.sleep(0.1)
    assert runtime.executions["echo"] == 1


@pytest.mark.parametrize("after_run", [True, False])
def test_a_dropped_run_is_asked_about_and_runs_once(runtime, client, quick_retries, monkeypatch, after_run):
    """Changed on purpose: a blocking run whose connection dropped raised APIConnectionError, its
    output lost. Its record says whether it started: if so it is waited for by its id, if not it
    is sent again under that id."""
    monkeypatch.setattr(cw, "RECORD_SETTLE", 0.05)  # the emulator writes its records at once
    runtime.fault("POST", "/run/", drop=True, after_run=after_run)
    assert client.run("echo", {"a": 1}) == {"a": 1}
    assert len(runtime.calls_to("POST", "/run/")) == (1 if after_run else 2)
    assert runtime.executions["echo"] == 1


@pytest.mark.parametrize("status", [429, 503])
def test_a_run_turned_away_is_retried_after_retry_after(runtime, client, status):
    runtime.fault("POST", "/run/", status=status, retry_after="1")
    started = time.monotonic()
    assert client.run("echo", {"a": 1}) == {"a": 1}
    assert time.monotonic() - started >= 0.95
    assert len(runtime.calls_to("POST", "/run/")) == 2
    assert runtime.executions["echo"] == 1


def test_a_retry_after_past_the_deadline_is_not_waited_for(runtime, client):
    runtime.fault("POST", "/run/", status=429, retry_after="30")
    started = time.monotonic()
    with pytest.raises(cw.RateLimitError) as info:
        client.run("echo", timeout=5)
    assert time.monotonic() - started < 1.0
    assert info.value.retry_after == 30.0


def test_retries_give_up_after_max_retries(runtime, quick_retries):
    runtime.fault("POST", "/run_async/", status=503, times=10)
    with pytest.raises(cw.ServerError, match="503"):
        cw.Client(runtime.api_key, base_url=runtime.url, max_retries=2).start("echo")
    assert len(runtime.calls_to("POST", "/run_async/")) == 3


@pytest.mark.parametrize(
    "fault", [{"status": 500}, {"status": 502}, {"status": 504}, {"drop": True}, {"truncate": True}]
)
def test_gets_and_provisions_are_retried(runtime, client, quick_retries, fault):
    runtime.fault("POST", "/provision-request", **fault)
    runtime.fault("GET", "/request/", **fault)
    assert client.run("echo", {"a": 1}) == {"a": 1}
    assert len(runtime.calls_to("POST", "/provision-request")) == 2
    run_call = runtime.calls_to("POST", "/run/")[0]
    request_id = run_call["headers"]["X-Provisioned-Request-Id"]
    assert client.details(request_id)["responseJson"] == {"a": 1}
    assert len(runtime.calls_to("GET", "/request/")) == 2


def test_a_refused_connection_is_retried_until_the_server_is_up(monkeypatch):
    monkeypatch.setattr(cw, "RETRY_BACKOFF", (0.2, 0.4))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers = []
    threading.Timer(0.3, lambda: servers.append(FakeRuntime(port=port))).start()
    try:
        client = cw.Client("cwk-test-0123456789abcdef", base_url=f"http://127.0.0.1:{port}", max_retries=6)
        assert client.run("echo", {"up": True}, fallback=None) == {"up": True}
        assert servers[0].executions["echo"] == 1
    finally:
        time.sleep(0.35)
        for server in servers:
            server.close()


def test_a_refused_connection_gives_up_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(cw, "RETRY_BACKOFF", (0.01, 0.02))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(cw.APIConnectionError, match="POST /run/echo failed"):
        cw.Client("cwk-x", base_url=f"http://127.0.0.1:{port}", max_retries=1).run("echo", fallback=None)


# -- waiting -----------------------------------------------------------------------------------


def test_start_and_wait(runtime, client):
    run = client.start("sleep", {"seconds": 0.3})
    assert run.record is None
    assert run.wait() == {"slept": 0.3}
    assert run.record["responseStatus"] == 200 and run.done()
    assert client.result(run.request_id) == {"slept": 0.3}
    assert runtime.executions["sleep"] == 1


def test_wait_returns_soon_after_the_run_ends_with_one_held_poll(runtime, client):
    run = client.start("sleep", {"seconds": 0.5})
    started = time.monotonic()
    run.wait(timeout=30)
    assert time.monotonic() - started < 0.9
    polls = runtime.calls_to("GET", "/result/")
    assert len(polls) == 1 and polls[0]["query"] == {"timeout": ["30"]}


def test_a_failed_run_raises_run_failed(runtime, client):
    run = client.start("fail", {"status": 500, "detail": "exploded"})
    with pytest.raises(cw.RunFailed, match=f"run {run.request_id} failed with status 500: exploded") as info:
        run.wait()
    assert info.value.record["responseStatus"] == 500


def test_a_wait_past_its_deadline_raises_run_timeout_and_the_run_can_be_found_later(runtime, client):
    run = client.start("sleep", {"seconds": 1.2})
    started = time.monotonic()
    with pytest.raises(cw.RunTimeout) as info:
        run.wait(timeout=0.4)
    assert 0.35 <= time.monotonic() - started < 0.9
    assert info.value.request_id == run.request_id and isinstance(info.value, TimeoutError)
    assert client.get_run(info.value.request_id).wait() == {"slept": 1.2}
    assert runtime.executions["sleep"] == 1


def test_a_blocking_run_past_its_deadline_raises_run_timeout_with_the_request_id():
    with FakeRuntime(gateway_timeout=0.3) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        with pytest.raises(cw.RunTimeout) as info:
            client.run("sleep", {"seconds": 1.5}, timeout=0.8)
        assert info.value.request_id == runtime.calls_to("POST", "/run/")[0]["headers"]["X-Provisioned-Request-Id"]
        assert client.result(info.value.request_id) == {"slept": 1.5}
        assert runtime.executions["sleep"] == 1


def test_a_server_that_does_not_hold_polls_is_polled_with_backoff_not_in_a_loop():
    with FakeRuntime(hold_polls=False) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        run = client.start("sleep", {"seconds": 60})
        started = time.monotonic()
        with pytest.raises(cw.RunTimeout):
            run.wait(timeout=2.5)
        assert 2.4 <= time.monotonic() - started < 3.2
        polls = len(runtime.calls_to("GET", "/result/"))
        assert 3 <= polls <= 6  # 0.25 + 0.5 + 1 + 2 s of sleeps: no spinning


def test_a_gateway_that_cuts_polls_is_polled_again_at_once():
    with FakeRuntime(gateway_timeout=0.6) as runtime, cw.Client(
        runtime.api_key, base_url=runtime.url, max_retries=0
    ) as client:
        run = client.start("sleep", {"seconds": 1.5})
        started = time.monotonic()
        assert run.wait() == {"slept": 1.5}
        assert time.monotonic() - started < 1.8  # no sleeping between polls cut at 0.6 and 1.2 s
        assert len(runtime.calls_to("GET", "/result/")) == 3


def test_an_unknown_request_id(runtime, client):
    with pytest.raises(cw.NotFoundError):
        client.result("req_nobody")
    with pytest.raises(cw.NotFoundError):
        client.details("req_nobody")


def test_details(runtime, client):
    run = client.start("echo", {"q": 1})
    run.wait()
    details = client.details(run.request_id)
    assert details["id"] == run.request_id and details["serviceId"] == "echo" and "cost" in details


# -- sessions and threads ----------------------------------------------------------------------


def test_threads_share_a_client_and_its_connection_pool(runtime, client):
    errors, outputs = [], {}

    def work(n):
        try:
            for i in range(15):
                outputs[(n, i)] = client.run("echo", {"n": n, "i": i}, fallback=None)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert outputs == {(n, i): {"n": n, "i": i} for n in range(8) for i in range(15)}
    assert len({call["peer"] for call in runtime.calls}) <= 8  # a connection per thread at most


def test_a_given_session_is_used_and_left_open(runtime):
    import requests

    session = requests.Session()
    with cw.Client(runtime.api_key, base_url=runtime.url, session=session) as client:
        client.run("echo", fallback=None)
        assert len(client._transport._pool.poolmanager.pools) == 0
    assert session.adapters  # still usable by its owner
    session.close()


def test_close_closes_the_connections_and_later_calls_raise(runtime, client):
    client.run("echo", fallback=None)
    assert len(client._transport._pool.poolmanager.pools) == 1
    client.close()
    assert len(client._transport._pool.poolmanager.pools) == 0
    with pytest.raises(RuntimeError, match="closed"):
        client.run("echo", {"again": True}, fallback=None)


def client_for(runtime, **settings):
    return cw.Client(runtime.api_key, base_url=runtime.url, **settings)
