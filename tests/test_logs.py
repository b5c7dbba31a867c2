"""Log streaming: parsing, reconnects that deliver every entry once and in order, and on_log."""

import collections
import itertools
import json
import logging
import random
import threading
import time

import pytest
import responses
import urllib3
from fake_runtime import FakeRuntime
from hypothesis import given, settings
from hypothesis import strategies as st

import codewords_lite as cw


@pytest.fixture(autouse=True)
def quick_reconnects(monkeypatch):
    monkeypatch.setattr(cw, "LOG_BACKOFF", (0.01, 0.05))


def messages(entries):
    return [e.get("message", e.get("rawText")) for e in entries]


# -- parsing -----------------------------------------------------------------------------------


def parse(body, content_type=""):
    """The entries a connection with this body and Content-Type gives, blocks of 3 bytes at a time."""
    parser = cw._LogParser(content_type)
    blocks = [body[i : i + 3] for i in range(0, len(body), 3)]
    return [e for e in (parser.feed(line) for line in cw._split_lines(blocks)) if e is not None]


@pytest.mark.parametrize(
    "line, entry",
    [
        (b'{"createdAt": "t", "message": "hi"}', {"createdAt": "t", "message": "hi"}),
        (b'  {"message": "spaces"} \t', {"message": "spaces"}),
        (b"", None),
        (b"   ", None),
        (b": keep-alive", None),
        (b"Traceback (most recent call last):", {"rawText": "Traceback (most recent call last):"}),
        (b"[1, 2]", {"rawText": "[1, 2]"}),
        (b"\xff\xfe broken utf-8", {"rawText": "\ufffd\ufffd broken utf-8"}),
    ],
)
def test_an_ndjson_line(line, entry):
    assert cw._LogParser("application/x-ndjson").feed(line) == entry


def test_a_deeply_nested_line_is_raw_text_not_a_recursion_error():
    """A line of JSON nested 100,000 deep made json.loads raise RecursionError out of the stream."""
    line = "[" * 100_000 + "]" * 100_000
    assert cw._parse_log_line(line) == {"rawText": line}
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000
    assert parse(deep.encode() + b"\n") == [{"rawText": deep}]
    assert parse(b"data: " + deep.encode() + b"\n\n", "text/event-stream") == [{"rawText": deep}]


def test_server_sent_events_are_parsed_as_the_spec_says():
    """SSE fields used to come out as rawText entries, and a two-line data: event as two entries."""
    body = (
        b": a comment\n"
        b"retry: 1500\n"
        b"event: log\n"
        b'data: {"message":\n'
        b'data:  "two lines"}\n'
        b"id: 7\n"
        b"unknown: field\n"
        b"\n"
        b"data: plain text\n"
        b"data\n"
        b"\n"
        b"id: 8\n"
        b"\n"  # no data: no event
        b'data: {"message": "never ended"}\n'
    )
    parser = cw._LogParser("text/event-stream; charset=utf-8")
    entries = [(parser.feed(line), parser.event_id) for line in cw._split_lines([body])]
    assert [e for e in entries if e[0] is not None] == [
        ({"message": "two lines"}, "7"),
        ({"rawText": "plain text\n"}, "7"),
    ]
    assert parser.retry == 1.5 and parser.event_id == "8"


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("content_type", ["text/event-stream", ""])
def test_sse_with_any_line_end_and_a_byte_order_mark(end, content_type):
    """CR and CRLF line ends and a BOM, which the spec allows, broke events or became raw text."""
    body = b'\xef\xbb\xbfdata: {"n": 1}' + end * 2 + b'data: {"n": 2}' + end + b"data: 3" + end * 2
    assert parse(body, content_type) == [{"n": 1}, {"rawText": '{"n": 2}\n3'}]


def test_ndjson_in_an_event_stream_is_read_line_by_line():
    """What the official clients expect of /logs: JSON lines, even labelled text/event-stream."""
    body = b'{"n": 1}\r\n{"n": 2}\n: keep-alive\n\n{"n": 3}'
    assert parse(body, "text/event-stream") == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert parse(b"\xef\xbb\xbf" + body.replace(b": keep-alive\n", b""), "application/json") == [
        {"n": 1},
        {"n": 2},
        {"n": 3},
    ]


def test_a_last_line_without_a_line_end_is_kept_but_not_a_last_unended_event():
    assert parse(b'{"n": 1}\n{"n": 2}') == [{"n": 1}, {"n": 2}]
    assert parse(b'data: {"n": 1}\n\ndata: {"n": 2}\n') == [{"n": 1}]  # the spec drops an unended event


def test_split_lines_ends_lines_at_lf_crlf_and_cr_across_blocks():
    blocks = [b'{"a"', b': 1}\n{"b": 2}\r', b"\n\n", b"x\r", b"y\r\r", b"\nlast"]
    assert list(cw._split_lines(blocks)) == [b'{"a": 1}', b'{"b": 2}', b"", b"x", b"y", b"", b"last"]
    assert list(cw._split_lines([b"a\r"])) == [b"a"]


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
    a, b = (earlier, cw._instant(earlier)), (later, cw._instant(later))
    assert cw._time_order(a, b) == -1 and cw._time_order(b, a) == 1 and cw._time_order(a, a) == 0


def test_an_unparsable_timestamp_falls_back_to_text_order():
    assert cw._instant("yesterday") is None
    assert cw._time_order(("b", None), ("a", None)) == 1 and cw._time_order(("a", None), ("a", None)) == 0


def test_the_log_request_on_the_wire():
    """GET /logs/{id} asks for an event stream, uncompressed, and the answer is read as it says."""
    with responses.RequestsMock() as mock:
        mock.get(
            "https://runtime.example/logs/req_1",
            body=b'event: log\ndata: {"message": "a",\ndata: "n": 1}\nid: 1\n\n',
            content_type="text/event-stream",
        )
        mock.get("https://runtime.example/request/req_1", json={"id": "req_1", "completedAt": "t"})
        client = cw.Client("cwk-test", base_url="https://runtime.example")
        assert list(client.logs("req_1")) == [{"message": "a", "n": 1}]
        call, asked = mock.calls  # the stream closed: asked whether the run has ended
        assert asked.request.url.endswith("/request/req_1")
    assert call.request.headers["Accept"] == "text/event-stream"
    assert call.request.headers["Accept-Encoding"] == "identity"
    assert "Last-Event-ID" not in call.request.headers


# -- the de-duplicator: what a reconnect replays is skipped, nothing else -------------------------


def stamp(n):
    return f"2026-01-01T00:00:00.{n:03d}Z"


def server_answer(log, mode, after, last_event_id, shuffle):
    """The suffix of the log a server sends to a reconnect, by how it reads ?after= and Last-Event-ID;
    ``shuffle``, a seed or None, lists entries of equal createdAt in another order (no tie-breaker)."""
    if mode == "last-event-id" and last_event_id:
        return log[int(last_event_id) + 1 :]
    if mode == "ignore" or after is None:
        answer = log
    else:
        inclusive = mode == "inclusive"
        answer = [e for e in log if e["createdAt"] > after or (inclusive and e["createdAt"] == after)]
    if shuffle is None:
        return answer
    ties = [list(run) for _, run in itertools.groupby(answer, key=lambda e: e["createdAt"])]
    for run in ties:
        random.Random(shuffle).shuffle(run)
    return [e for run in ties for e in run]


def deliver(log, mode, cuts, ids, shuffles=()):
    """What the client delivers of the log when the n-th connection drops after cuts[n] entries,
    the n-th reconnect listing ties shuffled by shuffles[n] (a seed, or None for the log's order)."""
    position, delivered = cw._LogPosition(), []
    shuffles = [None, *shuffles]
    for n, cut in enumerate([*cuts, None]):
        shuffle = shuffles[n] if n < len(shuffles) else None
        answer = server_answer(log, mode, position.after, position.event_id, shuffle)
        for entry in answer if cut is None else answer[:cut]:
            if position.is_new(dict(entry), str(log.index(entry)) if ids else ""):
                delivered.append(entry)
        position.reconnected()
    return delivered


def same_entries_in_time_order(delivered, log):
    """Each entry of the log once (identical ones as often as written), in createdAt order."""
    as_text = [json.dumps(e, sort_keys=True) for e in delivered]
    assert collections.Counter(as_text) == collections.Counter(json.dumps(e, sort_keys=True) for e in log)
    assert [e["createdAt"] for e in delivered] == [e["createdAt"] for e in log]
    return True


# Timestamps from a handful of milliseconds, so that bursts share one; messages from two, so
# that many entries are identical in every field.
entries_in_order = st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["a", "b"])), max_size=14).map(
    lambda pairs: [{"createdAt": stamp(n), "message": m} for n, m in sorted(pairs, key=lambda p: p[0])]
)
reconnect_orders = st.lists(st.one_of(st.none(), st.integers(0, 1000)), max_size=6)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    entries_in_order,
    st.sampled_from(["exclusive", "inclusive", "ignore"]),
    st.lists(st.integers(0, 15), max_size=6),
    reconnect_orders,
)
def test_every_entry_is_delivered_once_however_the_stream_is_cut(log, mode, cuts, shuffles):
    """Any log with bursts of equal timestamps and identical entries, cut anywhere, from a server
    whose after= is exclusive, inclusive or ignored and that may list ties in another order on
    each reconnect: what is delivered is what was written (ties in the order they came)."""
    delivered = deliver(log, mode, cuts, ids=False, shuffles=shuffles)
    assert same_entries_in_time_order(delivered, log)
    if not any(s is not None for s in shuffles):
        assert delivered == log


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    entries_in_order,
    st.sampled_from(["exclusive", "inclusive", "last-event-id"]),
    st.lists(st.integers(0, 15), max_size=6),
    reconnect_orders,
)
def test_every_entry_is_delivered_once_with_event_ids(log, mode, cuts, shuffles):
    """The same with SSE ids, and a server that resumes from Last-Event-ID instead of ?after=
    (such a server must list ties in a stable order: what follows an id is then well defined)."""
    log = [dict(e, n=i) for i, e in enumerate(log)]  # ids are positions: entries differ by them
    shuffles = [None] * len(shuffles) if mode == "last-event-id" else shuffles
    delivered = deliver(log, mode, cuts, ids=True, shuffles=shuffles)
    assert same_entries_in_time_order(delivered, log)


def test_a_burst_of_equal_timestamps_on_an_unbroken_stream_is_kept():
    """The old filter ran on every entry: six entries of one millisecond arrived as one."""
    position = cw._LogPosition()
    burst = [{"createdAt": stamp(1), "message": "same"}] * 6 + [{"createdAt": stamp(0), "message": "late"}]
    assert [position.is_new(e, "") for e in burst] == [True] * 7
    assert position.after == stamp(0)  # a reconnect asks from before the burst


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


def test_logs_that_answer_404_for_longer_than_the_grace_while_the_run_goes_on(runtime, client, monkeypatch):
    """A queued run may have no logs for a while: they raised NotFoundError after five seconds."""
    monkeypatch.setattr(cw, "LOG_NOT_FOUND_GRACE", 0.0)
    monkeypatch.setattr(cw, "POLL_BACKOFF", (0.01, 0.01))
    runtime.fault("GET", "/logs/", status=404, times=5)
    run = client.start("sleep", {"seconds": 0.6, "lines": 3})
    assert messages(run.logs()) == ["step 0", "step 1", "step 2"]
    # asked each time whether the run goes on, and once more when the stream closed with the run
    assert len(runtime.calls_to("GET", "/request/")) == 6


def test_logs_that_answer_404_after_the_run_has_ended_raise(runtime, client, monkeypatch):
    monkeypatch.setattr(cw, "LOG_NOT_FOUND_GRACE", 0.0)
    runtime.fault("GET", "/logs/", status=404, times=1)
    run = client.start("talk", {"lines": 3})
    run.wait()
    with pytest.raises(cw.NotFoundError, match="/logs/"):
        list(run.logs())


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


# -- what the issue found: each against the emulator -------------------------------------------


def scripted(*messages_at):
    """Log entries as (millisecond, message) pairs, identical ones included."""
    return [{"createdAt": stamp(ms), "level": "INFO", "message": m} for ms, m in messages_at]


BURSTY = scripted(
    (1, "a"),
    (2, "burst"),
    (2, "burst"),
    (2, "burst"),
    (2, "x"),
    (2, "burst"),
    (2, "burst"),
    (1, "late"),
    (3, "b"),
    (3, "b"),
)


def test_a_burst_in_one_millisecond_and_a_late_entry_all_arrive(runtime, client):
    """Entries sharing a createdAt, or a millisecond older than the one before, were dropped."""
    run = client.start("script", {"entries": BURSTY})
    assert list(run.logs()) == BURSTY


@pytest.mark.parametrize(
    "after_inclusive", [False, True, "alternate", None], ids=["exclusive", "inclusive", "alternate", "ignored"]
)
@pytest.mark.parametrize("cut_after", [1, 2, 3, 4])
def test_a_reconnect_inside_a_burst_delivers_each_entry_once(runtime, client, after_inclusive, cut_after):
    """Cut inside a group of equal timestamps, with after= inclusive, exclusive, switching
    between the two, or ignored: every entry arrives once, the identical ones too."""
    runtime.after_inclusive, runtime.ignore_after = after_inclusive, after_inclusive is None
    runtime.fault("GET", "/logs/", cut_after=cut_after, times=3)
    run = client.start("script", {"entries": BURSTY[:7]})
    run.wait()
    assert list(run.logs()) == BURSTY[:7]
    assert runtime.faults_applied["cut log stream"] == 3


@pytest.mark.parametrize("after_inclusive", [False, True])
def test_millisecond_timestamps_through_many_cuts(runtime, client, after_inclusive):
    """A chatty run stamped in milliseconds, as real runtimes stamp, its stream cut five times."""
    runtime.millisecond_stamps, runtime.after_inclusive = True, after_inclusive
    runtime.fault("GET", "/logs/", cut_after=7, times=5)
    seen = []
    assert client.start("talk", {"lines": 60, "interval": 0}).wait(on_log=seen.append) == {"lines": 60}
    assert messages(seen) == [f"line {i}" for i in range(60)]
    assert len({e["createdAt"] for e in seen}) < 60  # bursts did share timestamps


def test_an_answer_with_a_content_length_cut_short(runtime, client):
    """A body with a Content-Length cut short: the entries before the cut are delivered before
    the reconnect (they were thrown away with the error), and the rest after it."""
    runtime.log_framing = "length"
    runtime.fault("GET", "/logs/", cut_after=3, times=1)
    run = client.start("talk", {"lines": 8})
    run.wait()
    connections_at = []
    for _ in run.logs():
        connections_at.append(len(runtime.calls_to("GET", "/logs/")))
    assert len(connections_at) == 8
    assert connections_at[:3] == [1, 1, 1] and connections_at[3:] == [2] * 5


@pytest.mark.skipif(
    not hasattr(urllib3.response.HTTPResponse, "read1"), reason="an older urllib3 reads such a body to its end"
)
def test_a_stream_without_chunks_is_live(runtime, client):
    """A body that ends when the connection closes was read whole before the first entry came out."""
    runtime.log_framing = "close"
    run = client.start("sleep", {"seconds": 30, "lines": 1})
    stream = run.logs()
    assert messages([next(stream)]) == ["step 0"]
    assert not runtime.records[run.request_id].get("completedAt")  # the run goes on
    stream.close()
    run = client.start("talk", {"lines": 5})
    assert messages(run.logs()) == [f"line {i}" for i in range(5)]


def test_a_quiet_run_is_not_a_failing_stream(runtime, client, monkeypatch):
    """Each silent read timeout counted as a failed reconnect: a run quiet for long made logs() raise."""
    monkeypatch.setattr(cw, "LOG_READ_TIMEOUT", 0.1)
    monkeypatch.setattr(cw, "LOG_RECONNECTS", 1)
    runtime.keep_alive = False
    run = client.start("sleep", {"seconds": 0.8, "lines": 2})
    assert messages(run.logs()) == ["step 0", "step 1"]
    assert len(runtime.calls_to("GET", "/logs/")) > 2  # reconnected while quiet, and did not give up
    assert runtime.calls_to("GET", "/request/")  # asked whether the run had ended


def test_a_short_client_timeout_does_not_shorten_a_quiet_stream(runtime, monkeypatch):
    """The read timeout was capped by Client(timeout): with timeout=0.3 a quiet half second failed."""
    monkeypatch.setattr(cw, "LOG_RECONNECTS", 1)
    runtime.keep_alive = False
    with cw.Client(runtime.api_key, base_url=runtime.url, timeout=0.3) as client:
        run = client.start("sleep", {"seconds": 0.9, "lines": 1})
        assert messages(run.logs()) == ["step 0"]


def test_logs_end_when_the_run_has_ended_though_keep_alives_go_on(runtime, client, monkeypatch):
    """A server that keeps the stream open with keep-alive lines after the run: logs() never ended."""
    monkeypatch.setattr(cw, "LOG_READ_TIMEOUT", 0.2)
    monkeypatch.setattr(cw, "LOG_GRACE", 0.2)
    runtime.logs_never_end = True
    run = client.start("talk", {"lines": 3})
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(messages(run.logs())), daemon=True)
    reader.start()
    reader.join(20)
    assert outcome == [["line 0", "line 1", "line 2"]]


@pytest.mark.parametrize("multiline", [False, True])
def test_server_sent_events_with_ids_retry_and_several_data_lines(multiline, monkeypatch):
    """SSE: multi-line data joined, "retry:" used as the reconnect delay, Last-Event-ID sent back."""
    monkeypatch.setattr(cw, "LOG_BACKOFF", (60.0, 60.0))  # only the server's retry: keeps the test quick
    with FakeRuntime(ndjson=False) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        runtime.sse_ids, runtime.sse_retry, runtime.sse_multiline = True, 10, multiline
        runtime.millisecond_stamps = True
        runtime.fault("GET", "/logs/", cut_after=4, times=2)
        run = client.start("talk", {"lines": 12})
        run.wait()
        assert messages(run.logs()) == [f"line {i}" for i in range(12)]
        resumed = [c["headers"].get("Last-Event-ID") for c in runtime.calls_to("GET", "/logs/")]
        assert resumed == [None, "3", "7"]


@pytest.mark.parametrize("line_end", [b"\r\n", b"\r"], ids=["crlf", "cr"])
@pytest.mark.parametrize("ndjson", [True, False], ids=["ndjson", "sse"])
def test_other_line_ends_and_a_byte_order_mark(line_end, ndjson):
    with FakeRuntime(ndjson=ndjson) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        runtime.line_end, runtime.bom = line_end, True
        runtime.fault("GET", "/logs/", cut_after=2, times=1)
        run = client.start("talk", {"lines": 5})
        assert messages(run.logs()) == [f"line {i}" for i in range(5)]


def test_finish_without_drain_stops_at_once(runtime, client):
    """finish() without a drain, for Ctrl-C: no grace period, the thread is gone at once."""
    runtime.logs_never_end = True
    seen = []
    run = client.start("talk", {"lines": 2})
    follower = cw._LogFollower(client, client._key(), seen.append)
    follower.follow(run.request_id)
    thread = follower._thread
    run.wait()
    started = time.monotonic()
    follower.finish()
    assert time.monotonic() - started < cw.LOG_GRACE
    assert not thread.is_alive()


def test_a_cut_inside_a_multibyte_character(runtime, client):
    """A drop in the middle of a UTF-8 character: no mangled entry, and nothing lost."""

    def cut_inside_a_character(entry):  # the emulator cuts an entry in the middle of its line
        line = json.dumps(entry, ensure_ascii=False).encode() + b"\n"
        return line[: len(line) // 2].decode("utf-8", "strict")

    entries = scripted(*[(i, "😀" * 18) for i in range(6)])
    with pytest.raises(UnicodeDecodeError):
        cut_inside_a_character(entries[2])
    runtime.fault("GET", "/logs/", cut_after=2, times=3)
    run = client.start("script", {"entries": entries})
    run.wait()
    assert list(run.logs()) == entries


def test_a_silent_stream_that_never_closes_ends_with_the_run(runtime, client, monkeypatch):
    """A server that neither closes nor says anything once the run has ended."""
    monkeypatch.setattr(cw, "LOG_READ_TIMEOUT", 0.2)
    runtime.logs_never_end, runtime.keep_alive = True, False
    run = client.start("talk", {"lines": 2})
    assert messages(run.logs()) == ["line 0", "line 1"]


# -- what the review of the rebuilt stream found: each against the emulator ---------------------


TIES = scripted((1, "a"), (2, "p"), (2, "q"), (2, "p"), (2, "r"), (2, "s"), (3, "b"))


@pytest.mark.parametrize("ndjson", [True, False], ids=["ndjson", "sse-ids"])
@pytest.mark.parametrize("cut_after", [2, 3, 4])
def test_ties_listed_in_another_order_after_a_reconnect(cut_after, ndjson):
    """A server doing ORDER BY created_at with no tie-breaker lists equal timestamps in another
    order on a reconnect: they were skipped by count, so some came twice and others never."""
    with FakeRuntime(ndjson=ndjson) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        runtime.shuffle_ties = True
        runtime.sse_ids, runtime.sse_resume = not ndjson, False  # stable ids, Last-Event-ID ignored
        runtime.fault("GET", "/logs/", cut_after=cut_after, times=1)
        run = client.start("script", {"entries": TIES})
        run.wait()
        delivered = list(run.logs())
    assert sorted(messages(delivered)) == sorted(messages(TIES))
    assert [e["createdAt"] for e in delivered] == [e["createdAt"] for e in TIES]


def test_a_line_ended_by_a_cr_at_the_end_of_a_block_is_delivered_at_once():
    """A CR at the end of a block was held back for a possible LF: the line waited for more bytes."""

    def blocks():
        yield b'{"n": 1}\r'
        raise AssertionError("the line was held back for the next block")

    assert next(cw._split_lines(blocks())) == b'{"n": 1}'
    assert list(cw._split_lines([b"a\r", b"\nb\r", b"\r\n", b"\n"])) == [b"a", b"b", b"", b""]


def test_the_last_line_ended_by_a_cr_is_not_lost(runtime, client, monkeypatch):
    """CR line ends, and a stream that stays open and silent after the run: the last entry was lost."""
    monkeypatch.setattr(cw, "LOG_READ_TIMEOUT", 0.3)
    runtime.line_end, runtime.logs_never_end, runtime.keep_alive = b"\r", True, False
    run = client.start("talk", {"lines": 3})
    assert messages(run.logs()) == ["line 0", "line 1", "line 2"]


@pytest.mark.parametrize("failure", [{"status": 502}, {"status": 503}, {"drop": True}], ids=["502", "503", "reset"])
def test_failed_reopens_count_as_drops(runtime, client, quick_retries, failure):
    """A reopen answered 5xx or reset gave up after the generic three retries, not LOG_RECONNECTS."""
    runtime.fault("GET", "/logs/", cut_after=2, times=1)
    runtime.fault("GET", "/logs/", times=5, **failure)
    run = client.start("talk", {"lines": 5})
    run.wait()
    assert messages(run.logs()) == [f"line {i}" for i in range(5)]
    assert len(runtime.calls_to("GET", "/logs/")) == 7


def test_failed_reopens_still_give_up_after_log_reconnects(runtime, client, monkeypatch):
    monkeypatch.setattr(cw, "LOG_RECONNECTS", 2)
    runtime.fault("GET", "/logs/", status=502, times=10)
    with pytest.raises(cw.APIConnectionError, match="failed 3 times in a row"):
        list(client.logs(client.start("talk", {"lines": 2}).request_id))
    assert len(runtime.calls_to("GET", "/logs/")) == 3


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never came"
        time.sleep(0.01)


@pytest.mark.parametrize("state", ["waiting-for-headers", "asking-about-the-run", "backing-off"])
def test_close_returns_the_iterator_at_once_in_every_state(runtime, client, monkeypatch, state):
    """close() did not wake a stream waiting for the server's answer (it waited out read
    timeouts and retries), nor one asking GET /request whether the run had ended."""
    if state == "waiting-for-headers":
        runtime.fault("GET", "/logs/", delay=5)
        reached = lambda: runtime.faults_applied["delay"]  # noqa: E731
    elif state == "asking-about-the-run":
        monkeypatch.setattr(cw, "LOG_READ_TIMEOUT", 0.1)
        runtime.keep_alive = False
        runtime.fault("GET", "/request/", delay=5)
        reached = lambda: runtime.faults_applied["delay"]  # noqa: E731
    else:
        monkeypatch.setattr(cw, "LOG_BACKOFF", (30.0, 30.0))
        runtime.fault("GET", "/logs/", drop=True, times=1)
        reached = lambda: runtime.faults_applied["drop"]  # noqa: E731
    stream = client.logs(client.start("sleep", {"seconds": 10}).request_id)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(list(stream)), daemon=True)
    reader.start()
    wait_for(reached)
    time.sleep(0.1)  # into the wait
    started = time.monotonic()
    stream.close()
    reader.join(5)
    assert outcome == [[]] and time.monotonic() - started < 1.0


def test_a_timestamp_that_is_not_valid_unicode_is_sent_back_on_a_reconnect():
    """A createdAt with a lone surrogate (JSON "\\ud800") made the reconnect raise UnicodeEncodeError."""
    ndjson = "application/x-ndjson"
    with responses.RequestsMock() as mock:
        logs, record = "https://runtime.example/logs/req_1", "https://runtime.example/request/req_1"
        mock.get(
            logs,
            body=b'{"createdAt": "1\\ud800", "message": "a"}\n{"createdAt": "2", "message": "b"}\n',
            content_type=ndjson,
        )
        mock.get(
            logs, body=b'{"createdAt": "2", "message": "b"}\n{"createdAt": "3", "message": "c"}\n', content_type=ndjson
        )
        mock.get(record, json={"id": "req_1"})  # the run goes on after the first answer
        mock.get(record, json={"id": "req_1", "completedAt": "t"})
        client = cw.Client("cwk-test", base_url="https://runtime.example")
        assert messages(client.logs("req_1")) == ["a", "b", "c"]
        again = [c.request.url for c in mock.calls if "/logs/" in c.request.url][1]
    assert again.endswith("?after=1%ED%A0%80")


def test_sse_events_of_another_type_are_not_entries():
    body = b'event: ping\ndata: 2026-11-28 10:00:00\n\nevent: log\ndata: {"n": 1}\n\nevent: message\ndata: {"n": 2}\n\n'
    assert parse(body, "text/event-stream") == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize("ndjson", [False, True], ids=["sse-ping-events", "ndjson-ping-lines"])
def test_pings_after_the_run_do_not_keep_the_stream_alive(monkeypatch, ndjson):
    """Keep-alives sent as "event: ping" events came out as rawText entries, and each one, like a
    "ping" line of NDJSON, counted as news: logs() never ended. Only an entry with a createdAt does."""
    monkeypatch.setattr(cw, "LOG_READ_TIMEOUT", 0.3)
    monkeypatch.setattr(cw, "LOG_GRACE", 0.2)
    with FakeRuntime(ndjson=ndjson) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        runtime.pings, runtime.logs_never_end, runtime.keep_alive_every = True, True, 0.05
        run = client.start("talk", {"lines": 3})
        outcome = []
        reader = threading.Thread(target=lambda: outcome.append(messages(run.logs())), daemon=True)
        reader.start()
        reader.join(10)
    (delivered,) = outcome
    lines = [m for m in delivered if m != "ping"]  # a line that is not JSON is still delivered
    assert lines == ["line 0", "line 1", "line 2"] and (ndjson or len(delivered) == 3)


def test_pings_on_connections_that_keep_dropping_do_not_keep_the_stream_alive(monkeypatch):
    """The time without news restarted with each connection: pings on connections dropped more
    often than the read timeout kept logs() going long after the run had ended."""
    monkeypatch.setattr(cw, "LOG_READ_TIMEOUT", 0.3)
    monkeypatch.setattr(cw, "LOG_GRACE", 0.1)
    monkeypatch.setattr(cw, "LOG_RECONNECTS", 1000)
    with FakeRuntime(ndjson=False) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        runtime.pings, runtime.logs_never_end, runtime.keep_alive_every = True, True, 0.05
        runtime.drop_after_keep_alives = 3
        run = client.start("talk", {"lines": 3})
        run.wait()
        outcome = []
        reader = threading.Thread(target=lambda: outcome.append(messages(run.logs())), daemon=True)
        reader.start()
        reader.join(10)
    assert outcome == [["line 0", "line 1", "line 2"]]


@pytest.mark.parametrize("prefix, sent_back", [("évé-日本-", "évé-日本-3"), (" ", None)], ids=["utf-8", "space"])
def test_sse_ids_that_cannot_go_into_a_header_as_they_are(prefix, sent_back):
    """A non-ASCII id raised UnicodeEncodeError, and an id with a leading space ("id:  7") made
    requests refuse the header: the stream broke and entries were lost."""
    with FakeRuntime(ndjson=False) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        runtime.sse_ids, runtime.sse_id_prefix = True, prefix
        runtime.fault("GET", "/logs/", cut_after=4, times=1)
        run = client.start("talk", {"lines": 8})
        run.wait()
        assert messages(run.logs()) == [f"line {i}" for i in range(8)]
        (_, again) = runtime.calls_to("GET", "/logs/")
    header = again["headers"].get("Last-Event-ID")
    assert (header and header.encode("latin-1").decode("utf-8")) == sent_back
    assert cw._header_value("a\tb") == cw._header_value("x ") == cw._header_value("") == ""


@pytest.mark.parametrize("failure", [{"status": 500}, {"drop": True}], ids=["500", "reset"])
def test_a_failed_question_about_the_run_does_not_end_the_stream(runtime, client, monkeypatch, quick_retries, failure):
    """GET /request failing during a silence raised out of logs(): it counts as a failed reconnect."""
    monkeypatch.setattr(cw, "LOG_READ_TIMEOUT", 0.1)
    runtime.keep_alive = False
    runtime.fault("GET", "/request/", times=8, **failure)  # the first two questions, retries and all
    run = client.start("sleep", {"seconds": 1.0, "lines": 2})
    assert messages(run.logs()) == ["step 0", "step 1"]
    assert runtime.faults_applied[str(failure.get("status", "drop"))] == 8


def test_a_clean_close_while_the_run_goes_on_reconnects(runtime, client):
    """A server that ends each answer cleanly after a few entries: logs() ended with the first."""
    runtime.log_close_after = 2
    run = client.start("talk", {"lines": 7, "interval": 0.05})
    assert messages(run.logs()) == [f"line {i}" for i in range(7)]
    assert len(runtime.calls_to("GET", "/logs/")) >= 4


@pytest.mark.parametrize("pings", [False, True], ids=["keep-alive", "ping-line"])
def test_a_server_that_closes_at_once_every_time_is_asked_again_until_the_run_ends(runtime, client, monkeypatch, pings):
    """A clean close while the run goes on is no failure: it counted as one, so a quiet run on a
    server that answers with what it has and closes raised APIConnectionError after ten closes,
    though the run went on. Each close now waits a pause that grows, and the stream ends with
    the run; a "ping" line is no sign of progress, so it does not shorten the pause."""
    monkeypatch.setattr(cw, "LOG_RECONNECTS", 2)
    monkeypatch.setattr(cw, "LOG_BACKOFF", (0.05, 0.2))
    runtime.log_close_after, runtime.keep_alive_every, runtime.pings = 0, 0.05, pings
    run = client.start("sleep", {"seconds": 1.5})
    assert [m for m in messages(run.logs()) if m != "ping"] == []
    asked = len(runtime.calls_to("GET", "/logs/"))
    assert 4 <= asked <= 1.5 / 0.05  # asked again while the run went on, with pauses between
