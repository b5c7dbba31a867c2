"""Log streaming: parsing, reconnects that deliver every entry once and in order, and on_log."""

import logging
import threading
import time

import pytest
from fake_runtime import FakeRuntime

import codewords_lite as cw


@pytest.fixture(autouse=True)
def quick_reconnects(monkeypatch):
    monkeypatch.setattr(cw, "LOG_BACKOFF", (0.01, 0.05))


def messages(entries):
    return [e.get("message", e.get("rawText")) for e in entries]


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, entry",
    [
        (b'{"createdAt": "t", "message": "hi"}', {"createdAt": "t", "message": "hi"}),
        (b'data: {"message": "sse"}', {"message": "sse"}),
        (b'data:{"message": "sse, no space"}\r', {"message": "sse, no space"}),
        (b"", None),
        (b"   \r", None),
        (b": keep-alive", None),
        (b"data:", None),
        (b"Traceback (most recent call last):", {"rawText": "Traceback (most recent call last):"}),
        (b"data: not json", {"rawText": "not json"}),
        (b"[1, 2]", {"rawText": "[1, 2]"}),
        (b"\xff\xfe broken utf-8", {"rawText": "\ufffd\ufffd broken utf-8"}),
    ],
)
def test_parse_log_line(line, entry):
    assert cw._parse_log_line(line) == entry


def test_split_lines_joins_lines_across_chunks_and_keeps_a_last_line():
    chunks = [b'{"a"', b': 1}\n{"b": 2}\r', b"\n\n", b"x" * 5, b"y" * 5, b"\nlast"]
    assert list(cw._split_lines(chunks)) == [b'{"a": 1}', b'{"b": 2}\r', b"", b"x" * 5 + b"y" * 5, b"last"]


def test_split_lines_of_a_long_line_is_linear():
    started = time.monotonic()
    chunk = b"z" * 1024
    (line,) = cw._split_lines(chunk for _ in range(12 * 1024))  # one 12 MiB line in 1 KiB pieces
    assert len(line) == 12 << 20
    assert time.monotonic() - started < 5  # pending + chunk, quadratic, takes minutes


@pytest.mark.parametrize(
    "earlier, later",
    [
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00.5Z"),  # a string comparison gets this one wrong
        ("2026-01-01T00:00:00.123456Z", "2026-01-01T00:00:00.1234567Z"),
        ("2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00.000001Z"),
        ("2026-01-01T00:00:00", "2026-01-01T00:00:01+00:00"),
        ("2025-12-31T23:59:59.999Z", "2026-01-01 00:00:00Z"),
    ],
)
def test_timestamps_are_compared_as_instants(earlier, later):
    assert cw._instant(earlier) < cw._instant(later)
    assert cw._is_newer(later, cw._instant(later), earlier, cw._instant(earlier))
    assert not cw._is_newer(earlier, cw._instant(earlier), later, cw._instant(later))


def test_an_unparsable_timestamp_falls_back_to_text_order():
    assert cw._instant("yesterday") is None
    assert cw._is_newer("b", None, "a", None) and not cw._is_newer("a", None, "a", None)


# -- streaming against the emulator ------------------------------------------------------------


@pytest.mark.parametrize("ndjson", [True, False], ids=["ndjson", "sse"])
def test_logs_stream_live_until_the_run_ends(ndjson):
    with FakeRuntime(ndjson=ndjson) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        run = client.start("talk", {"lines": 6, "interval": 0.1})
        arrivals = []
        started = time.monotonic()
        for entry in run.logs():
            arrivals.append(time.monotonic() - started)
            assert set(entry) == {"createdAt", "level", "message"}
        assert len(arrivals) == 6
        assert arrivals[0] < 0.3  # live, not all at the end
        assert run.wait() == {"lines": 6}


def test_a_stream_cut_several_times_delivers_every_entry_once_in_order(runtime, client):
    runtime.fault("GET", "/logs/", cut_after=3, times=4)
    run = client.start("talk", {"lines": 40, "interval": 0.01})
    entries = list(client.logs(run.request_id))
    assert messages(entries) == [f"line {i}" for i in range(40)]
    assert runtime.faults_applied["cut log stream"] == 4
    reconnects = runtime.calls_to("GET", "/logs/")[1:]
    assert len(reconnects) == 4 and all("after" in c["query"] for c in reconnects)


def test_entries_the_server_sends_again_are_skipped(runtime, client):
    runtime.ignore_after = True  # a server that replays the whole stream on every reconnect
    runtime.fault("GET", "/logs/", cut_after=5, times=3)
    run = client.start("talk", {"lines": 12, "interval": 0.01})
    assert messages(client.logs(run.request_id)) == [f"line {i}" for i in range(12)]


def test_a_404_just_after_the_start_is_retried(runtime, client):
    runtime.fault("GET", "/logs/", status=404, times=2)
    run = client.start("talk", {"lines": 3})
    assert messages(run.logs()) == ["line 0", "line 1", "line 2"]


def test_logs_of_an_unknown_request_raise_not_found(runtime, client, monkeypatch):
    monkeypatch.setattr(cw, "LOG_NOT_FOUND_GRACE", 0.3)
    with pytest.raises(cw.NotFoundError):
        list(client.logs("req_nobody"))


def test_a_stream_that_keeps_failing_gives_up(runtime, client, monkeypatch):
    monkeypatch.setattr(cw, "LOG_RECONNECTS", 2)
    runtime.fault("GET", "/logs/", cut_after=0, times=10)
    run = client.start("talk", {"lines": 5, "interval": 0.05})
    with pytest.raises(cw.APIConnectionError, match="failed 3 times in a row"):
        list(run.logs())
    assert len(runtime.calls_to("GET", "/logs/")) == 3


def test_closing_the_iterator_stops_a_blocked_read_at_once(runtime, client):
    runtime.keep_alive = False  # nothing arrives to wake the reader
    run = client.start("sleep", {"seconds": 30})
    stream = client.logs(run.request_id)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(list(stream)))
    reader.start()
    time.sleep(0.3)
    started = time.monotonic()
    stream.close()
    reader.join(5)
    assert not reader.is_alive() and outcome == [[]]
    assert time.monotonic() - started < 1.0


# -- on_log ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fallback", ["resume", None])
def test_on_log_sees_every_entry_of_a_blocking_run(runtime, fallback):
    seen = []
    with cw.Client(runtime.api_key, base_url=runtime.url, fallback=fallback) as client:
        assert client.run("talk", {"lines": 25, "interval": 0.01}, on_log=seen.append) == {"lines": 25}
    assert messages(seen) == [f"line {i}" for i in range(25)]
    (run_call,) = runtime.calls_to("POST", "/run/")
    assert (
        run_call["headers"]["X-Provisioned-Request-Id"] == runtime.calls_to("GET", "/logs/")[0]["path"].split("/")[-1]
    )


def test_on_log_sees_every_entry_of_a_started_run_through_cuts(runtime, client):
    runtime.fault("GET", "/logs/", cut_after=4, times=3)
    seen = []
    run = client.start("talk", {"lines": 20, "interval": 0.01})
    assert run.wait(on_log=seen.append) == {"lines": 20}
    assert messages(seen) == [f"line {i}" for i in range(20)]


def test_on_log_follows_a_run_resumed_after_a_504():
    seen = []
    with FakeRuntime(gateway_timeout=0.3) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        assert client.run("sleep", {"seconds": 0.8, "lines": 8}, on_log=seen.append) == {"slept": 0.8}
        assert runtime.executions["sleep"] == 1
    assert messages(seen) == [f"step {i}" for i in range(8)]


def test_on_log_that_raises_is_logged_and_the_result_kept(runtime, client, caplog):
    calls = []

    def broken(entry):
        calls.append(entry)
        raise RuntimeError("my callback broke")

    with caplog.at_level(logging.ERROR, logger="codewords_lite"):
        assert client.run("talk", {"lines": 10, "interval": 0.01}, on_log=broken) == {"lines": 10}
    assert len(calls) == 1  # streaming stopped at the first error
    assert "on_log raised" in caplog.text and "my callback broke" in caplog.text


def test_a_stream_that_never_ends_is_stopped_after_a_grace_period(runtime, client, monkeypatch):
    monkeypatch.setattr(cw, "LOG_GRACE", 0.3)
    runtime.logs_never_end = True
    seen = []
    started = time.monotonic()
    assert client.run("talk", {"lines": 3}, on_log=seen.append) == {"lines": 3}
    assert time.monotonic() - started < 1.5
    assert len(seen) == 3
    for thread in threading.enumerate():
        if thread.name.startswith("codewords-logs-"):
            thread.join(10)  # it has been told to stop: a bound that only catches a hang
            assert not thread.is_alive()


def test_on_log_with_a_one_time_key_is_refused_before_sending():
    with FakeRuntime(api_key="cwotk-once") as runtime:
        client = cw.Client(runtime.api_key, base_url=runtime.url)
        with pytest.raises(cw.ConfigurationError, match="one-time key"):
            client.run("talk", on_log=print)
        assert runtime.calls == []
