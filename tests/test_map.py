"""Many runs at once: map over threads, the shared rate-limit backoff, and clients in other processes."""

import concurrent.futures
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from fake_runtime import FakeRuntime

import codewords_lite as cw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_map_500_items_over_16_workers_in_order(runtime, client):
    """Connections are bounded by the calls at once: a worker's run, and with provisioned ids the
    provision ahead for the item waiting behind it (issue 22); a map without ids, one per worker."""
    items = [{"i": i, "text": "x" * (i % 7)} for i in range(500)]
    assert list(client.map("echo", items, max_workers=16)) == items
    assert runtime.executions["echo"] == 500
    assert len({call["peer"] for call in runtime.calls}) <= 2 * 16
    runtime.calls.clear()
    assert list(client.map("echo", items, max_workers=16, fallback=None)) == items
    assert len({call["peer"] for call in runtime.calls}) <= 16  # a connection per worker at most


def test_unordered_map_yields_index_output_pairs_as_runs_finish(runtime, client):
    items = [{"seconds": 0.4 if i == 0 else 0.01, "i": i} for i in range(10)]
    pairs = list(client.map("sleep", items, max_workers=4, ordered=False))
    assert sorted(pairs, key=lambda p: p[0]) == [(i, {"slept": items[i]["seconds"], "i": i}) for i in range(10)]
    assert pairs[0][0] != 0 and pairs[-1][0] == 0  # the slow first item came out last


def test_outputs_come_while_later_items_still_run(runtime, client):
    items = [{"seconds": 0.05}] + [{"seconds": 1.5}] * 3
    started = time.monotonic()
    outputs = client.map("sleep", items, max_workers=4)
    assert next(outputs) == {"slept": 0.05}
    assert time.monotonic() - started < 1.0
    assert len(list(outputs)) == 3


def test_inputs_are_read_lazily(runtime, client):
    pulled = []

    def rows():
        for i in range(1000):
            pulled.append(i)
            yield {"i": i}

    outputs = client.map("echo", rows(), max_workers=4)
    for expected in range(10):
        assert next(outputs) == {"i": expected}
        assert len(pulled) <= expected + 1 + 2 * 4
    outputs.close()  # stopping early cancels what has not started
    assert len(pulled) < 30 and runtime.executions["echo"] < 30


def test_the_first_failure_is_raised_after_the_outputs_before_it(runtime, client):
    items = [{"i": i} for i in range(200)]
    items[5] = {"fail": "row 5 is bad"}
    outputs = []
    with pytest.raises(cw.APIStatusError, match="row 5 is bad") as info:
        for output in client.map("check", items, max_workers=4):
            outputs.append(output)
    assert info.value.status_code == 422
    assert outputs == items[:5]
    assert runtime.executions["check"] < 30  # what had not started was cancelled


def test_an_unordered_map_raises_the_failure_when_it_comes(runtime, client):
    items = [{"i": i} for i in range(100)]
    items[3] = {"fail": "row 3 is bad"}
    pairs = []
    with pytest.raises(cw.APIStatusError, match="row 3 is bad"):
        for pair in client.map("check", items, max_workers=2, ordered=False):
            pairs.append(pair)
    assert all(items[index] == output for index, output in pairs)
    assert runtime.executions["check"] < 20


def test_return_exceptions_puts_the_error_in_place(runtime, client):
    items = [{"fail": f"bad {i}"} if i % 3 == 0 else {"i": i} for i in range(9)]
    outputs = list(client.map("check", items, max_workers=3, return_exceptions=True))
    assert [type(o) for o in outputs[::3]] == [cw.RunFailed] * 3
    assert [o.detail for o in outputs[::3]] == ["bad 0", "bad 3", "bad 6"]
    assert [o for i, o in enumerate(outputs) if i % 3] == [items[i] for i in range(9) if i % 3]
    assert runtime.executions["check"] == 9


def test_on_progress_counts_finished_runs(runtime, client):
    calls = []
    list(
        client.map("echo", [{"i": i} for i in range(12)], max_workers=3, on_progress=lambda d, t: calls.append((d, t)))
    )
    assert calls[-1] == (12, 12) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    list(client.map("echo", ({"i": i} for i in range(5)), on_progress=lambda d, t: calls.append((d, t))))
    assert calls[-1] == (5, None)


def test_map_checks_its_arguments_before_sending(runtime, client):
    for bad in ({"max_workers": 0}, {"max_workers": 2.5}, {"timeout": -1}, {"fallback": "twice"}, {"path": "../x"}):
        with pytest.raises(cw.ConfigurationError):
            client.map("echo", [{}], **bad)
    with pytest.raises(cw.ConfigurationError):
        client.map("bad/id", [{}])
    with pytest.raises(cw.ConfigurationError, match="one-time key"):
        cw.Client("cwotk-once", base_url=runtime.url).map("echo", [{}])
    assert runtime.calls == []


def test_long_items_finish_once_through_their_fallback():
    with FakeRuntime(gateway_timeout=0.3) as runtime, cw.Client(runtime.api_key, base_url=runtime.url) as client:
        items = [{"seconds": 0.6, "i": i} for i in range(6)]
        assert list(client.map("sleep", items, max_workers=6)) == [{"slept": 0.6, "i": i} for i in range(6)]
        assert runtime.executions["sleep"] == 6


# -- the shared rate-limit backoff -------------------------------------------------------------


def test_workers_share_the_backoff_when_the_server_limits_concurrency(runtime, client, figures, monkeypatch):
    monkeypatch.setattr(cw, "RECORD_SETTLE", 0.05)  # the emulator writes its records at once: no lag to wait out
    runtime.concurrency_limit = 4
    runtime.rate_limit_retry_after = "0.3"
    items = [{"seconds": 0.1, "i": i} for i in range(100)]
    assert list(client.map("sleep", items, max_workers=16)) == [{"slept": 0.1, "i": i} for i in range(100)]
    rejected = runtime.faults_applied["429 concurrency"]
    assert runtime.executions["sleep"] == 100 and runtime.most_running <= 4
    figures.append(f"100 runs, 16 workers, server limit 4: {rejected} answers 429 (16 workers x 3 retries = 48)")
    assert rejected < 48 / 2


def test_a_429_pauses_the_other_threads_too(runtime, client):
    runtime.fault("POST", "/run/", status=429, retry_after="1")
    first = threading.Thread(target=client.run, args=("echo",))  # a provisioned id: a 429 is resent
    first.start()
    waited = time.monotonic()
    while client._gate._pause_until <= time.monotonic():  # until the first thread has had its 429
        assert time.monotonic() - waited < 30, "no 429 seen"
        time.sleep(0.01)
    pause_until = client._gate._pause_until
    client.details(client.start("echo").request_id)  # from another thread, during the pause
    assert time.monotonic() >= pause_until
    first.join()
    (rejected, retried) = runtime.calls_to("POST", "/run/")
    assert retried["at"] - rejected["at"] >= 0.95


# -- clients in other processes ----------------------------------------------------------------


def run_in_child(client, service_id, inputs):
    return os.getpid(), client.run(service_id, inputs)


def test_a_pickled_client_works_in_a_process_pool(runtime, client):
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters: nothing inherited but the pickle
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn) as pool:
        results = list(pool.map(run_in_child, [client] * 4, ["echo"] * 4, [{"i": i} for i in range(4)]))
    assert [output for _, output in results] == [{"i": i} for i in range(4)]
    assert all(pid != os.getpid() for pid, _ in results)


def test_a_key_from_the_environment_does_not_travel_in_the_pickle(runtime, monkeypatch):
    monkeypatch.setenv("CODEWORDS_API_KEY", runtime.api_key)
    client = cw.Client(base_url=runtime.url, timeout=42, max_retries=1)
    data = pickle.dumps(client)
    assert runtime.api_key.encode() not in data
    copy = pickle.loads(data)
    assert (copy.base_url, copy.timeout, copy.max_retries) == (runtime.url, 42, 1)
    assert copy.run("echo", {"a": 1}) == {"a": 1}  # read from this environment
    monkeypatch.delenv("CODEWORDS_API_KEY")
    with pytest.raises(cw.ConfigurationError):
        copy.run("echo")


def test_a_key_given_as_an_argument_travels_in_the_pickle(runtime, client):
    copy = pickle.loads(pickle.dumps(client))
    assert copy.run("echo", {"b": 2}) == {"b": 2}
    assert copy._transport._pool is not client._transport._pool


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import logging
    import codewords_lite as cw
    logging.basicConfig()  # the library prints nothing on its own: show its warning
    client = cw.Client(sys.argv[2], base_url=sys.argv[3])
    print("started", flush=True)
    for output in client.map("sleep", [{"seconds": 1.5}] * 20, max_workers=3):
        pass
    """
)


def test_ctrl_c_stops_the_map_and_names_the_runs_that_go_on(runtime):
    process = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, ROOT, runtime.api_key, runtime.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "started\n"
    with runtime.lock:  # the three workers' runs are going
        assert runtime.lock.wait_for(lambda: runtime.executions["sleep"] == 3, timeout=30)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert "KeyboardInterrupt: map of sleep interrupted; runs that go on: item 0 (req_" in stderr
    assert stderr.count("(req_") >= 6  # in the warning and in the exception: three runs each
    time.sleep(0.2)
    assert runtime.executions["sleep"] == 3  # nothing started after Ctrl-C
