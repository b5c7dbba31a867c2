"""codewords-lite side by side with what a user would use instead, in one run.

    pip install '.[bench]' && python bench/run.py            # a few minutes
    python bench/run.py --quick                               # a smoke run: fewer rounds, smaller files
    python bench/run.py --only 1 5 8                          # some sections only

Everything talks to the emulator (tests/fake_runtime.py), which runs in a process of its own on
127.0.0.1 so that it does not share a GIL with the client measured. Contenders take turns
(A B C A B C ...) and every figure is a median, or a ratio of medians, from this one run: these
machines are noisy, so never compare absolute times across runs. The official client
(codewords-client, Python 3.11+) is measured when it is installed, and skipped otherwise.
"""

import argparse
import concurrent.futures
import datetime
import http.client
import importlib.metadata
import json
import logging
import math
import os
import platform
import queue
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import requests  # noqa: E402
from emulator import Emulator  # noqa: E402

import codewords_lite as cw  # noqa: E402

try:
    import codewords_client
except ImportError:
    codewords_client = None
else:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO otherwise
logging.getLogger("codewords_lite").setLevel(logging.ERROR)  # the fallbacks say what they do

INPUTS = {"name": "Ada", "n": 3, "tags": ["a", "b"]}
ROWS: List[Tuple[str, str, str, str]] = []  # figure, contender, value, goal and verdict


def row(figure: str, contender: str, value: str, goal: str = "") -> None:
    ROWS.append((figure, contender, value, goal))
    print(f"  {contender:44s} {value:28s} {goal}", flush=True)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def take_turns(contenders: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, List[float]]:
    """Seconds per call of each contender, calling them in turn, round after round."""
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for call in contenders.values():
        call()  # warm up: connections, caches
    for _ in range(rounds):
        for name, call in contenders.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


# -- 1. a blocking call ------------------------------------------------------------------------


def blocking_calls(emulator: Emulator, rounds: int) -> None:
    print(f"\n1. Time per blocking call (echo, {rounds} calls each, taking turns)")
    key, url = emulator.api_key, emulator.url
    host, port = url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port))
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def floor() -> Any:
        connection.request("POST", "/run/echo", json.dumps(INPUTS).encode(), auth)
        return json.loads(connection.getresponse().read())

    session = requests.Session()
    lean = cw.Client(key, base_url=url, fallback=None)
    default = cw.Client(key, base_url=url)
    contenders = {
        "http.client, kept alive (the floor)": floor,
        "requests.Session().post": lambda: session.post(f"{url}/run/echo", json=INPUTS, headers=auth).json(),
        "codewords-lite, fallback=None": lambda: lean.run("echo", INPUTS),
        'codewords-lite, fallback="resume" (default)': lambda: default.run("echo", INPUTS),
    }
    if codewords_client:
        official = codewords_client.CodewordsClient(base_url=url, api_key=key)
        contenders["codewords-client (official, sync)"] = lambda: official.run("echo", INPUTS).json()
    medians = {name: statistics.median(times) for name, times in take_turns(contenders, rounds).items()}
    for name, median in medians.items():
        row("blocking call", name, f"{median * 1e6:7.0f} µs")
    lean_time = medians["codewords-lite, fallback=None"]
    ratio = lean_time / medians["requests.Session().post"]
    row("blocking call", "no-fallback / requests.Session", f"{ratio:.2f} x", f"<= 0.9: {verdict(ratio <= 0.9)}")
    if codewords_client:
        ratio = lean_time / medians["codewords-client (official, sync)"]
        row("blocking call", "no-fallback / official", f"{ratio:.2f} x", f"<= 1.0: {verdict(ratio <= 1.0)}")
    ratio = medians['codewords-lite, fallback="resume" (default)'] / lean_time
    row(
        "blocking call", "default / no-fallback (two round trips)", f"{ratio:.2f} x", f"<= 2.1: {verdict(ratio <= 2.1)}"
    )


# -- 2. noticing that a run has finished -------------------------------------------------------


def finish_delays(emulator: Emulator, rounds: int, seconds: float) -> None:
    print(f"\n2. Delay between a run finishing and the wait returning ({seconds} s runs, {rounds} each)")
    key, url = emulator.api_key, emulator.url
    lite = cw.Client(key, base_url=url)
    session = requests.Session()
    auth = {"Authorization": f"Bearer {key}"}

    def guide_loop() -> str:  # the public guide: start with run_async, then GET /result until 200
        request_id = session.post(f"{url}/run_async/sleep", json={"seconds": seconds}, headers=auth).json()[
            "request_id"
        ]
        while session.get(f"{url}/result/{request_id}", headers=auth).status_code != 200:
            time.sleep(1.0)
        return request_id  # type: ignore[no-any-return]

    def lite_wait() -> str:
        run = lite.start("sleep", {"seconds": seconds})
        run.wait()
        return run.request_id

    contenders: Dict[str, Callable[[], str]] = {
        "codewords-lite start() + wait() (long poll)": lite_wait,
        "the guide's poll loop (1 s sleeps)": guide_loop,
    }
    if codewords_client:
        official = codewords_client.CodewordsClient(base_url=url, api_key=key)

        def official_wait() -> str:
            handle = official.run("sleep", {"seconds": seconds}, in_background=True)
            handle.result()
            return handle.request_id  # type: ignore[no-any-return]

        contenders["codewords-client run(in_background) + result()"] = official_wait
    delays: Dict[str, List[float]] = {name: [] for name in contenders}
    polls: Dict[str, List[int]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, call in contenders.items():
            request_id = call()
            returned = time.time()
            record = lite.details(request_id)
            finished = datetime.datetime.fromisoformat(record["completedAt"].replace("Z", "+00:00")).timestamp()
            delays[name].append(returned - finished)
            polls[name].append(emulator.calls("GET", f"/result/{request_id}"))
    most_polls = math.ceil(seconds / 110) + 1
    for name in contenders:
        delay, count = statistics.median(delays[name]), max(polls[name])
        goal = ""
        if name.startswith("codewords-lite"):
            goal = f"<= 10 ms, <= {most_polls} polls: {verdict(delay <= 0.010 and count <= most_polls)}"
        row("finish delay", name, f"{delay * 1e3:7.1f} ms, {count} polls", goal)


# -- 3. a run longer than the gateway allows ---------------------------------------------------


def gateway_cuts(emulator: Emulator, rounds: int, duration: float, gateway: float) -> None:
    print(f"\n3. A {duration:.0f} s run behind a gateway that cuts at {gateway:.0f} s ({rounds} each)")
    key, url = emulator.api_key, emulator.url
    emulator.set("gateway_timeout", gateway)
    resume = cw.Client(key, base_url=url, fallback="resume")
    rerun = cw.Client(key, base_url=url, fallback="rerun")
    session = requests.Session()
    auth = {"Authorization": f"Bearer {key}"}
    inputs = {"seconds": duration}

    def guide() -> Any:  # the guide's error handling: catch the 504, switch to run_async, poll
        response = session.post(f"{url}/run/sleep", json=inputs, headers=auth)
        if response.status_code != 504:
            return response.json()
        request_id = session.post(f"{url}/run_async/sleep", json=inputs, headers=auth).json()["request_id"]
        while True:
            response = session.get(f"{url}/result/{request_id}", headers=auth)
            if response.status_code == 200:
                return response.json()["responseJson"]
            time.sleep(1.0)

    contenders = {
        'codewords-lite fallback="resume"': lambda: resume.run("sleep", inputs),
        'codewords-lite fallback="rerun"': lambda: rerun.run("sleep", inputs),
        "the guide's catch-504-then-run_async": guide,
    }
    walls: Dict[str, List[float]] = {name: [] for name in contenders}
    runs: Dict[str, List[int]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, call in contenders.items():
            emulator.reset()
            started = time.perf_counter()
            assert call() == {"slept": duration}
            walls[name].append(time.perf_counter() - started)
            time.sleep(duration - gateway + 0.2)  # let an abandoned first run finish, to be counted
            runs[name].append(emulator.get("executions").get("sleep", 0))
    emulator.set("gateway_timeout", None)
    for name in contenders:
        wall, executions = statistics.median(walls[name]), max(runs[name])
        goal = ""
        if "resume" in name:
            goal = f"<= 1.05 x D, 1 execution: {verdict(wall <= 1.05 * duration and executions == 1)}"
        row("gateway cut", name, f"{wall / duration:.2f} x D, {executions} executions", goal)


# -- 4. a large upload -------------------------------------------------------------------------

UPLOAD_SCRIPT = """
import os, sys, time, logging
sys.path.insert(0, sys.argv[1])
kind, path, key, url = sys.argv[2:6]
def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024
if kind == "lite":
    import codewords_lite as cw
    client = cw.Client(key, base_url=url)
    upload = client.upload
else:
    import codewords_client
    logging.getLogger("httpx").setLevel(logging.WARNING)
    client = codewords_client.CodewordsClient(base_url=url, api_key=key)
    upload = client.upload_file
with open(path + ".warm", "wb") as warm:
    warm.write(b"warm-up")
upload(path + ".warm")
before = rss("VmRSS:")
started = time.perf_counter()
upload(path)
print(time.perf_counter() - started, rss("VmHWM:") - before)
"""


def uploads(emulator: Emulator, rounds: int, size: int) -> None:
    mib = size >> 20
    print(f"\n4. Upload of a {mib} MiB file ({rounds} each after a warm-up; the official client once)")
    folder = tempfile.mkdtemp(prefix="codewords-bench-")
    path = os.path.join(folder, "large.bin")
    with open(path, "wb") as sparse:
        sparse.truncate(size)
    key, url = emulator.api_key, emulator.url

    def in_a_process(kind: str) -> Tuple[float, float]:
        result = subprocess.run(
            [sys.executable, "-c", UPLOAD_SCRIPT, ROOT, kind, path, key, url],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode:
            raise RuntimeError(result.stderr)
        seconds, growth = result.stdout.split()
        return float(seconds), float(growth)

    def with_curl() -> Tuple[float, float]:
        answer = requests.post(
            f"{url}/file", params={"filename": "large.bin"}, headers={"Authorization": f"Bearer {key}"}
        ).json()
        started = time.perf_counter()
        subprocess.run(
            [
                "curl",
                "-sS",
                "--fail",
                "-T",
                path,
                "-H",
                "Content-Type: application/octet-stream",
                "-H",
                "x-amz-acl: public-read",
                answer["upload_uri"],
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        return time.perf_counter() - started, float("nan")

    contenders: Dict[str, Callable[[], Tuple[float, float]]] = {"codewords-lite upload()": lambda: in_a_process("lite")}
    if codewords_client:
        contenders["codewords-client upload_file()"] = lambda: in_a_process("official")
    if shutil.which("curl"):
        contenders["curl -T"] = with_curl
    results: Dict[str, List[Tuple[float, float]]] = {name: [] for name in contenders}
    slow = "codewords-client upload_file()"  # a minute or more a GiB: measured once, and not warmed up
    try:
        for name, call in contenders.items():
            if name != slow:
                call()  # warm up: the first large upload to the emulator is slower, whoever makes it
        for round_ in range(rounds):
            for name, call in contenders.items():
                if name != slow or round_ == 0:
                    results[name].append(call())
    finally:
        shutil.rmtree(folder)
    rates = {name: size / statistics.median(s for s, _ in results[name]) / 2**20 for name in contenders}
    for name in contenders:
        growth = max(g for _, g in results[name])
        memory = "" if math.isnan(growth) else f", +{growth:.0f} MiB peak"
        goal = f"<= 40 MiB: {verdict(growth <= 40)}" if name.startswith("codewords-lite") else ""
        row("upload", name, f"{rates[name]:6.0f} MiB/s{memory}", goal)
    if "curl -T" in rates:
        ratio = rates["codewords-lite upload()"] / rates["curl -T"]
        row("upload", "codewords-lite / curl throughput", f"{ratio:.2f} x", f">= 0.7: {verdict(ratio >= 0.7)}")


# -- 5. import time and installed size ---------------------------------------------------------


IMPORT_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
import requests
started = time.perf_counter()
import codewords_lite
print(time.perf_counter() - started)
"""


def imports_and_sizes(rounds: int) -> None:
    print(f"\n6. Import time ({rounds} fresh interpreters each) and what gets installed")
    modules = {
        "nothing (python -c pass)": "pass",
        "requests": "import requests",
        "codewords_lite": "import codewords_lite",
    }
    if codewords_client:
        modules["codewords_client"] = "import codewords_client"
    # Every module from compiled bytecode, as pip leaves installed packages, whatever
    # PYTHONDONTWRITEBYTECODE says: the warm-up round writes the cache.
    cache = tempfile.mkdtemp(prefix="codewords-bench-pycache-")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache
    contenders = {
        name: (lambda code=code: subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True))
        for name, code in modules.items()
    }

    def inside() -> float:  # whole processes swing by tens of ms here: this times the import alone
        command = [sys.executable, "-c", IMPORT_SCRIPT, ROOT]
        return float(subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=True).stdout)

    try:
        medians = {name: statistics.median(times) for name, times in take_turns(contenders, rounds).items()}
        inside()  # warm up, as the contenders were
        alone = statistics.median(inside() for _ in range(rounds)) * 1e3
    finally:
        shutil.rmtree(cache)
    base = medians["nothing (python -c pass)"]
    for name, median in medians.items():
        if name != "nothing (python -c pass)":
            row("import", f"import {name}", f"{(median - base) * 1e3:6.1f} ms")
    extra = (medians["codewords_lite"] - medians["requests"]) * 1e3
    row("import", "codewords_lite - requests, whole processes", f"{extra:6.1f} ms")
    row(
        "import",
        "codewords_lite after requests, timed inside",
        f"{alone:6.1f} ms",
        f"<= 3 ms: {verdict(alone <= 3)}",
    )
    for distribution in ("requests", "codewords-lite", "codewords-client"):
        closure = _installed_closure(distribution)
        if closure:
            size = sum(_installed_size(name) for name in closure)
            row("installed", distribution, f"{len(closure):3d} packages, {size / 2**20:6.1f} MiB")


def _installed_closure(name: str) -> List[str]:
    """The installed distributions that ``name`` needs, itself included, with the extras its
    requirements ask for (``uvicorn[standard]``) but not its own optional extras."""
    seen: List[str] = []
    visited = set()
    todo: List[Tuple[str, Tuple[str, ...]]] = [(name, ())]
    while todo:
        current, extras = todo.pop()
        current = re.sub(r"[-_.]+", "-", current).lower()
        if (current, extras) in visited:
            continue
        visited.add((current, extras))
        try:
            distribution = importlib.metadata.distribution(current)
        except importlib.metadata.PackageNotFoundError:
            continue
        if current not in seen:
            seen.append(current)
        for requirement in distribution.requires or []:
            wanted = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
            if wanted and wanted.group(1) not in extras:
                continue
            parts = re.match(r"([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement)
            if parts:
                asked = tuple(sorted(e.strip() for e in (parts.group(2) or "").split(",") if e.strip()))
                todo.append((parts.group(1), asked))
    return seen


def _installed_size(name: str) -> int:
    files = importlib.metadata.distribution(name).files or []
    return sum(os.path.getsize(f.locate()) for f in files if os.path.isfile(f.locate()))


# -- 6. threads sharing a client, and map ------------------------------------------------------


def threads(emulator: Emulator, rounds: int, calls: int) -> None:
    workers = 16
    print(f"\n5. {workers} threads, {calls} blocking calls each ({rounds} rounds each, taking turns)")
    key, url = emulator.api_key, emulator.url
    auth = {"Authorization": f"Bearer {key}"}
    shared = cw.Client(key, base_url=url, fallback=None)
    errors: List[BaseException] = []

    def in_threads(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            def worker() -> None:
                try:
                    work()
                except BaseException as exc:  # counted, and reported below
                    errors.append(exc)

            pool = [threading.Thread(target=worker) for _ in range(workers)]
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()

        return run

    def raw_work() -> None:
        with requests.Session() as session:
            for _ in range(calls):
                session.post(f"{url}/run/echo", json=INPUTS, headers=auth).raise_for_status()

    def lite_work() -> None:
        for _ in range(calls):
            shared.run("echo", INPUTS)

    times = take_turns(
        {
            "raw requests, a Session per thread": in_threads(raw_work),
            "codewords-lite, one shared Client": in_threads(lite_work),
        },
        rounds,
    )
    rates = {name: workers * calls / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        row("16 threads", name, f"{rate:6.0f} calls/s")
    ratio = rates["codewords-lite, one shared Client"] / rates["raw requests, a Session per thread"]
    row(
        "16 threads",
        "shared Client / raw",
        f"{ratio:.2f} x, {len(errors)} errors",
        f">= 0.9, no errors: {verdict(ratio >= 0.9 and not errors)}",
    )

    items = [dict(INPUTS, i=i) for i in range(workers * calls)]
    local = threading.local()

    def raw_call(item: Dict[str, Any]) -> Any:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return local.session.post(f"{url}/run/echo", json=item, headers=auth).json()

    def hand_rolled() -> None:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            assert list(pool.map(raw_call, items)) == items

    lean, default = cw.Client(key, base_url=url, fallback=None), cw.Client(key, base_url=url)
    times = take_turns(
        {
            "a ThreadPoolExecutor of raw requests calls": hand_rolled,
            "codewords-lite map(), fallback=None": lambda: _check(lean.map("echo", items, max_workers=workers), items),
            "codewords-lite map(), default": lambda: _check(default.map("echo", items, max_workers=workers), items),
        },
        rounds,
    )
    rates = {name: len(items) / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        row("map", name, f"{rate:6.0f} runs/s")
    ratio = rates["codewords-lite map(), fallback=None"] / rates["a ThreadPoolExecutor of raw requests calls"]
    row("map", "map() / hand-rolled, one request a run each", f"{ratio:.2f} x", f">= 0.8: {verdict(ratio >= 0.8)}")
    ratio = rates["codewords-lite map(), default"] / rates["a ThreadPoolExecutor of raw requests calls"]
    row("map", "map() default (+1 provision a run) / hand-rolled", f"{ratio:.2f} x")


def _check(outputs: Any, expected: List[Any]) -> None:
    assert list(outputs) == expected


# -- 7. over a link with 20 ms of round trip ---------------------------------------------------


class DelayingProxy:
    """A TCP proxy on 127.0.0.1 that holds every chunk ``rtt / 2`` seconds each way, as a
    network with that round-trip time would (latency only: no loss, no bandwidth limit)."""

    def __init__(self, target: str, rtt: float) -> None:
        self._target = tuple(target.split("//")[1].split(":"))
        self._delay = rtt / 2
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return  # closed
            far = socket.create_connection((self._target[0], int(self._target[1])))
            for sock in (near, far):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(near, far)
            self._pipe(far, near)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        chunks: queue.Queue[Tuple[float, bytes]] = queue.Queue()

        def read() -> None:
            while True:
                try:
                    data = source.recv(65536)
                except OSError:
                    data = b""
                chunks.put((time.monotonic() + self._delay, data))
                if not data:
                    return

        def write() -> None:
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self._listener.close()


def over_a_link(emulator: Emulator, rounds: int, rtt: float, seconds: float) -> None:
    print(f"\n7. A {seconds * 1e3:.0f} ms workflow over a link with {rtt * 1e3:.0f} ms of round trip ({rounds} each)")
    proxy = DelayingProxy(emulator.url, rtt)
    key, url = emulator.api_key, proxy.url
    inputs = {"seconds": seconds}
    session = requests.Session()
    auth = {"Authorization": f"Bearer {key}"}
    lean = cw.Client(key, base_url=url, fallback=None)
    default = cw.Client(key, base_url=url)
    contenders = {
        "requests.Session().post": lambda: session.post(f"{url}/run/sleep", json=inputs, headers=auth).json(),
        "codewords-lite, fallback=None": lambda: lean.run("sleep", inputs),
        'codewords-lite, fallback="resume" (default)': lambda: default.run("sleep", inputs),
    }
    if codewords_client:
        official = codewords_client.CodewordsClient(base_url=url, api_key=key)
        contenders["codewords-client (official, sync)"] = lambda: official.run("sleep", inputs).json()
    medians = {name: statistics.median(times) for name, times in take_turns(contenders, rounds).items()}
    for name, median in medians.items():
        row("20 ms link", name, f"{median * 1e3:7.1f} ms")
    ratio = medians['codewords-lite, fallback="resume" (default)'] / medians["codewords-lite, fallback=None"]
    row(
        "20 ms link",
        "run(): default / fallback=None (warm client)",
        f"{ratio:.3f} x",
        f"<= 1.03: {verdict(ratio <= 1.03)}",
    )
    map_over_a_link(url, key, rounds=max(1, rounds // 10), items=64, seconds=0.1, workers=8)
    proxy.close()


def map_over_a_link(url: str, key: str, rounds: int, items: int, seconds: float, workers: int) -> None:
    """map() of a workflow over the same link: the default fetches the ids of the items ahead while
    earlier items run (issue 22), so that no item's run waits for its provision."""
    inputs, expected = [{"seconds": seconds}] * items, [{"slept": seconds}] * items
    lean, default = cw.Client(key, base_url=url, fallback=None), cw.Client(key, base_url=url)
    contenders = {
        "map(), fallback=None": lambda: _check(lean.map("sleep", inputs, max_workers=workers), expected),
        'map(), fallback="resume" (default)': lambda: _check(
            default.map("sleep", inputs, max_workers=workers), expected
        ),
    }
    medians = {name: statistics.median(times) for name, times in take_turns(contenders, rounds).items()}
    for name, median in medians.items():
        row("20 ms link", f"{name}, {items} x {seconds * 1e3:.0f} ms, {workers} workers", f"{median * 1e3:7.1f} ms")
    ratio = medians['map(), fallback="resume" (default)'] / medians["map(), fallback=None"]
    row("20 ms link", "map(): default / fallback=None", f"{ratio:.3f} x", f"<= 1.05: {verdict(ratio <= 1.05)}")


# -- 8. durable batches: a journaled map --------------------------------------------------------


def journals(emulator: Emulator, rounds: int, items: int, replayed: int) -> None:
    print(f"\n8. durable batches: a map of {items} quick runs with and without a journal ({rounds} rounds each)")
    key, url = emulator.api_key, emulator.url
    client, workdir, made = cw.Client(key, base_url=url), tempfile.mkdtemp(prefix="cw-bench-"), [0]
    batch = [dict(INPUTS, i=i) for i in range(items)]

    def fresh_journal() -> str:
        made[0] += 1
        return os.path.join(workdir, f"batch-{made[0]}.db")

    try:
        times = take_turns(
            {
                "map(), no journal": lambda: _check(client.map("echo", batch), batch),
                "map(journal=...), a new journal": lambda: _check(
                    client.map("echo", batch, journal=fresh_journal()), batch
                ),
            },
            rounds,
        )
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, median in medians.items():
            row("journal", name, f"{items / median:6.0f} runs/s")
        ratio = medians["map(journal=...), a new journal"] / medians["map(), no journal"]
        row("journal", "journaled / not, time", f"{ratio:.3f} x", f"<= 1.10: {verdict(ratio <= 1.10)}")

        big = [dict(INPUTS, i=i) for i in range(replayed)]
        path = fresh_journal()
        _check(client.map("echo", big, max_workers=16, journal=path), big)
        before = emulator.calls("POST", "/") + emulator.calls("GET", "/")
        replays = take_turns({"replay": lambda: _check(client.map("echo", big, journal=path), big)}, rounds)
        requests_made = emulator.calls("POST", "/") + emulator.calls("GET", "/") - before
        seconds = statistics.median(replays["replay"])
        row(
            "journal",
            f"replay of a finished {replayed}-item journal",
            f"{seconds:.3f} s, {requests_made} requests",
            f"< 1 s, 0 requests: {verdict(seconds < 1 and requests_made == 0)}",
        )
        row("journal", "bytes per item (these inputs and outputs)", f"{os.path.getsize(path) / replayed:.0f} B")
    finally:
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)


# -- the report --------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    for name in ("requests", "urllib3", "httpx", "codewords-client"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; codewords-lite {cw.__version__}, {', '.join(versions)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer rounds, a smaller file")
    parser.add_argument(
        "--only", type=int, nargs="+", choices=range(1, 9), metavar="N", help="run only these sections (1 to 8)"
    )
    args = parser.parse_args()
    quick = args.quick
    wanted = set(args.only or range(1, 9))
    started = time.monotonic()
    print(machine())
    if not codewords_client:
        print(
            "codewords-client is not installed (it needs Python 3.11+): its figures are skipped."
            " pip install '.[bench]' brings it."
        )
    with Emulator() as emulator:
        if 1 in wanted:
            blocking_calls(emulator, rounds=100 if quick else 1500)
        if 2 in wanted:
            finish_delays(emulator, rounds=1 if quick else 5, seconds=1.5)
        if 3 in wanted:
            gateway_cuts(emulator, rounds=1 if quick else 2, duration=2.0 if quick else 3.0, gateway=1.0)
        if 4 in wanted:
            uploads(emulator, rounds=1 if quick else 2, size=(64 if quick else 1024) << 20)
        if 5 in wanted:
            threads(emulator, rounds=1 if quick else 5, calls=20 if quick else 60)
        if 7 in wanted:
            over_a_link(emulator, rounds=5 if quick else 30, rtt=0.020, seconds=0.2)
        if 8 in wanted:
            journals(emulator, rounds=3 if quick else 9, items=1000, replayed=2000 if quick else 10_000)
    if 6 in wanted:
        imports_and_sizes(rounds=5 if quick else 20)
    print("\n| figure | contender | measured | goal |\n|---|---|---|---|")
    for figure, contender, value, goal in ROWS:
        print(f"| {figure} | {contender} | {value.strip()} | {goal} |")
    print(f"\nMachine: {machine()}. Took {time.monotonic() - started:.0f} s.")
    return 1 if any("MISSED" in goal for *_, goal in ROWS) else 0


if __name__ == "__main__":
    raise SystemExit(main())
