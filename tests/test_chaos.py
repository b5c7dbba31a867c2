"""Chaos: hundreds of runs while a seeded injector hits a quarter of the requests with faults.

Afterwards every output is the right one, every workflow ran exactly once, and nothing waited
past its deadline. The seed is fixed so that a failure can be replayed (threads may still order
the draws differently from one run to the next).
"""

import concurrent.futures
import logging
import time

import pytest
from fake_runtime import FakeRuntime

import codewords_lite as cw

SEED = 20261128
STARTED_RUNS = 240
BLOCKING_RUNS = 60
LONG_RUNS = 8  # blocking runs longer than the gateway allows: 504, then resumed


def test_chaos(monkeypatch, caplog, figures):  # figures: printed after the tests (conftest.py)
    monkeypatch.setattr(cw, "RETRY_BACKOFF", (0.01, 0.05))
    monkeypatch.setattr(cw, "POLL_BACKOFF", (0.01, 0.05))
    monkeypatch.setattr(cw, "RECORD_SETTLE", 0.05)  # the emulator writes its records at once: no lag to wait out
    caplog.set_level(logging.INFO, logger="codewords_lite")
    waits = []  # (seconds waited, deadline)

    with FakeRuntime(gateway_timeout=0.5) as runtime:
        runtime.chaos(rate=0.25, seed=SEED)
        client = cw.Client(runtime.api_key, base_url=runtime.url, max_retries=10, timeout=60)

        runs = [client.start("echo", {"i": i}) for i in range(STARTED_RUNS)]
        for i, run in enumerate(runs):
            started = time.monotonic()
            assert run.wait(timeout=30) == {"i": i}
            waits.append((time.monotonic() - started, 30))

        def blocking(i):
            started = time.monotonic()
            if i < LONG_RUNS:
                output, expected = client.run("sleep", {"seconds": 0.8, "i": i}, timeout=20), {"slept": 0.8, "i": i}
            else:
                output, expected = client.run("echo", {"b": i}, timeout=20), {"b": i}
            waits.append((time.monotonic() - started, 20))
            return output == expected

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert all(pool.map(blocking, range(BLOCKING_RUNS)))

        def too_slow(i):
            # Each on a client of its own, so with a rate gate of its own: on one shared client, a
            # 429 halves the runs let in flight (down to 1), and each of these POST /run holds its
            # slot until the gateway's 504 at 0.5 s, so the third and fourth would wait past their
            # 0.7 s in the gate, never sent (APITimeoutError, rightly), instead of outliving them.
            late_client = cw.Client(runtime.api_key, base_url=runtime.url, max_retries=10, timeout=60)
            started = time.monotonic()
            with late_client, pytest.raises(cw.RunTimeout) as info:
                late_client.run("sleep", {"seconds": 3, "late": i}, timeout=0.7)
            waits.append((time.monotonic() - started, 0.7))
            return info.value.request_id

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            late = list(pool.map(too_slow, range(4)))
        runtime.chaos(rate=0.0, seed=SEED)
        for request_id in late:  # the runs that outlived their deadline still finish, once
            assert client.result(request_id, timeout=10)["slept"] == 3

        faults = sum(runtime.faults_applied.values())
        requests_made = len(runtime.calls)
        retries = sum("retry" in record.getMessage() for record in caplog.records)
        assert runtime.executions == {"echo": STARTED_RUNS + BLOCKING_RUNS - LONG_RUNS, "sleep": LONG_RUNS + 4}
        assert faults / requests_made >= 0.2
        overrun = max(seconds - deadline for seconds, deadline in waits)
        assert overrun < 0.3, f"a wait went {overrun:.2f} s past its deadline"

        figures.append(
            f"chaos: {STARTED_RUNS} started runs, {BLOCKING_RUNS} blocking runs ({LONG_RUNS} past the gateway),"
            f" 4 past their deadline; {requests_made} requests"
        )
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(runtime.faults_applied.items()))
        figures.append(f"chaos: {faults} faults injected ({faults / requests_made:.0%}): {kinds}")
        figures.append(f"chaos: {retries} retries made; executions {dict(runtime.executions)}, each run exactly once")
        slowest = max(waits)
        figures.append(
            f"chaos: slowest wait {slowest[0]:.2f} s of a {slowest[1]:.0f} s deadline;"
            f" furthest past a deadline {max(overrun, 0) * 1000:.0f} ms"
        )
