"""The Dask recipe of docs/reference.md (examples/dask_batch.py), run as its users run it: Dask's
process scheduler, a FastAPI workflow behind the emulator, one journal a partition; killed with
kill -9 mid-batch and run again, every row runs once. Part of the real-workflow tier."""

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from fake_runtime import FakeRuntime

import codewords_lite as cw

try:
    import dask  # noqa: F401
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError:
    pytest.skip("the Dask recipe needs Dask, FastAPI and uvicorn: pip install '.[workflows]'", allow_module_level=True)

from workflows import serve, slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "examples", "dask_batch.py")


@pytest.fixture
def runtime():
    slow.app.state.runs = 0
    with serve(slow.app) as url, FakeRuntime(workflows={"slow": url}) as runtime:
        yield runtime


def recipe(runtime, tmp_path, rows, *arguments):
    """The recipe's command, started in a session of its own (its Dask workers with it); the key
    and the API's URL come from the environment, as on a real machine."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = dict(os.environ, CODEWORDS_API_KEY=runtime.api_key, CODEWORDS_BASE_URL=runtime.url)
    return subprocess.Popen(
        [sys.executable, RECIPE, "slow", str(path), str(tmp_path / "journals"), *arguments],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finished(process, timeout=120):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, [json.loads(text) for text in stdout.splitlines()], stderr


def executions(runtime, rows):
    return [runtime.executions_of[("slow", json.dumps(row, sort_keys=True))] for row in rows]


def journal_states(tmp_path):
    """Each partition's journal: its file name -> the states of its rows."""
    states = {}
    for name in sorted(os.listdir(tmp_path / "journals")):
        if name.endswith(".db"):
            with sqlite3.connect(str(tmp_path / "journals" / name)) as db:
                states[name] = sorted(state for (state,) in db.execute("SELECT state FROM items"))
    return states


def test_a_batch_runs_over_process_workers_and_replays_with_no_request(runtime, tmp_path):
    rows = [{"seconds": 0.05, "tag": f"row-{i}"} for i in range(12)]
    code, lines, stderr = finished(recipe(runtime, tmp_path, rows, "--partition-size", "4", "--workers", "3"))
    assert code == 0, stderr
    assert lines == [{"index": i, "output": {"slept": 0.05, "tag": f"row-{i}"}} for i in range(12)]
    assert executions(runtime, rows) == [1] * 12
    assert journal_states(tmp_path) == {f"{k}.db": ["done"] * 4 for k in range(3)}
    assert runtime.api_key.encode() not in b"".join(
        (tmp_path / "journals" / name).read_bytes() for name in os.listdir(tmp_path / "journals")
    )

    sent = len(runtime.calls)
    code, again, stderr = finished(recipe(runtime, tmp_path, rows, "--partition-size", "4", "--workers", "3"))
    assert (code, again) == (0, lines), stderr
    assert len(runtime.calls) == sent  # replayed from the journals: no provision, no run, no poll

    code, _, stderr = finished(recipe(runtime, tmp_path, rows, "--partition-size", "5", "--workers", "3"))
    assert code == 1 and "holds the journals of another batch" in stderr  # other partitions: refused
    assert len(runtime.calls) == sent


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers in /proc")
@pytest.mark.parametrize("killed", ["the job", "a worker"])
def test_a_batch_killed_mid_way_runs_each_row_once_when_run_again(runtime, tmp_path, killed):
    """kill -9 of the whole job (the driver and its Dask workers), or of one worker process (the
    compute fails), once some rows have finished and the others are running; the same command
    again waits for those by their ids."""
    rows = [{"seconds": 0.1 if i % 4 == 0 else 2.0, "tag": f"row-{i}"} for i in range(12)]
    process = recipe(runtime, tmp_path, rows, "--partition-size", "4", "--workers", "3")
    deadline = time.monotonic() + 60
    while not (os.path.isdir(tmp_path / "journals") and _done(tmp_path) >= 2 and slow.app.state.runs >= 6):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    if killed == "the job":
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    else:
        os.kill(_workers_of(process.pid)[0], signal.SIGKILL)
        code, _, stderr = finished(process)
        assert code != 0, stderr
    assert _done(tmp_path) < 12  # killed mid-batch, not after it

    code, lines, stderr = finished(recipe(runtime, tmp_path, rows, "--partition-size", "4", "--workers", "3"))
    assert code == 0, stderr
    assert lines == [{"index": i, "output": {"slept": row["seconds"], "tag": row["tag"]}} for i, row in enumerate(rows)]
    assert executions(runtime, rows) == [1] * 12  # none paid twice
    assert journal_states(tmp_path) == {f"{k}.db": ["done"] * 4 for k in range(3)}


def _workers_of(pid):
    """The Dask worker processes of a driver: its children that multiprocessing spawned."""
    workers = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as file:
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as file:
                command = file.read()
        except (OSError, ValueError):
            continue
        if parent == pid and b"spawn_main" in command:
            workers.append(int(name))
    return workers


def _done(tmp_path):
    try:
        return sum(states.count("done") for states in journal_states(tmp_path).values())
    except sqlite3.Error:  # a journal being created
        return 0


def test_the_client_carries_its_settings_to_a_worker_and_not_an_environment_key(monkeypatch):
    monkeypatch.setenv("CODEWORDS_API_KEY", "cwk-from-the-environment")
    client = cw.Client(base_url="http://127.0.0.1:9", timeout=33)
    data = pickle.dumps(client)
    assert b"cwk-from-the-environment" not in data
    copy = pickle.loads(data)
    assert (copy.base_url, copy.timeout) == ("http://127.0.0.1:9", 33)


def test_the_reference_shows_the_recipe_as_the_example_runs_it():
    with open(RECIPE) as file:
        example = file.read()
    with open(os.path.join(ROOT, "docs", "reference.md")) as file:
        reference = file.read()
    heart = "    return list(client.map(service_id, rows, journal=journal, return_exceptions=True))\n"
    assert heart in example and heart in reference
    assert "dask.delayed(run_partition)(rows[start : start + " in example
    assert "dask.delayed(run_partition)(rows[start : start + 500]" in reference
