"""A user's program, type-checked against the installed wheel by .ci/run, never run.

It checks that the types reach a user: the correct calls must pass ``mypy --strict``, and each
wrong call must be caught, which ``--warn-unused-ignores`` (mypy) and
``reportUnnecessaryTypeIgnoreComment`` (pyright) turn into an error the day a type goes missing
or becomes ``Any``. The stub is tools/make_stubs.py's; this file is what users write.
"""

import contextlib
import gzip
import io
import threading
from typing import Any, Dict, Iterator, List, Literal, Optional

import requests
from typing_extensions import assert_type

import codewords_lite as cw


def correct_calls(client: cw.Client) -> None:
    output = client.run("my-service", {"name": "Ada"}, timeout=30, fallback="rerun", on_log=print)
    run = client.start("slow-service", {"rows": 10_000}, path="/rows")
    assert_type(run, cw.Run)
    assert_type(run.request_id, str)
    output = run.wait(timeout=1800, on_log=lambda entry: print(entry.get("message")))
    assert_type(run.done(), bool)
    outputs = client.map("echo", [{"i": i} for i in range(10)], max_workers=4, on_progress=lambda done, total: None)
    assert_type(outputs, Iterator[Any])
    assert_type(client.upload("data.csv", content_type="text/csv"), str)
    assert_type(client.upload(io.BytesIO(b"abc"), filename="abc.bin"), str)
    assert_type(client.upload(b"raw bytes", on_progress=lambda sent, total: None), str)
    assert_type(client.details(run.request_id), Dict[str, Any])
    assert_type(client.provision(), str)
    output = client.run("calculator", [1, 2, 3], path="sum", headers={"X-Correlation-Id": "c-1"})
    output = client.run("reports", {"day": "monday"}, path="daily", method="GET")
    cw.Client(headers={"Run-As-Template": "yes"}).start("my-service", "text", headers={"X-Team": "data"})
    assert_type(client.fallback, Optional[Literal["resume", "rerun"]])
    client.run("my-service", fallback=None)
    cw.Client(fallback=client.fallback)
    print(output, cw.__version__)


def log_streams(client: cw.Client, run: cw.Run) -> None:
    """The README's promise: a log stream is an iterator that ``close()`` stops, from any thread."""
    stream = client.logs(run.request_id)
    assert_type(stream, cw.LogStream)
    threading.Timer(60, stream.close).start()
    for entry in stream:
        assert_type(entry, Dict[str, Any])
    client.logs("r").close()
    with contextlib.closing(run.logs()) as entries:
        assert_type(entries, cw.LogStream)
        assert_type(next(entries), Dict[str, Any])


def uploads_of_binary_readables(client: cw.Client, response: requests.Response) -> None:
    """upload() takes any binary object with read(), not only an IO[bytes]."""
    with gzip.GzipFile("data.csv.gz") as compressed:
        assert_type(client.upload(compressed, filename="data.csv"), str)
    assert_type(client.upload(response.raw, filename="download.bin"), str)
    with open("data.csv", "rb") as file:
        assert_type(client.upload(file, filename="data.csv"), str)


class MyClient(cw.Client):
    """A user's subclass keeps its type in a ``with`` block."""

    def greet(self) -> str:
        return str(self.run("hello"))


def subclass_in_with_block() -> None:
    with MyClient() as mine:
        assert_type(mine, MyClient)
        assert_type(mine.greet(), str)


def exceptions(client: cw.Client) -> List[Any]:
    seen: List[Any] = []
    try:
        client.run("my-service")
    except cw.RateLimitError as exc:
        assert_type(exc.retry_after, Optional[float])
        seen.append(exc.retry_after)
    except cw.RunFailed as exc:  # before APIStatusError, its base: pyright reports an unreachable clause
        assert_type(exc.record, Optional[Dict[str, Any]])
        seen += [exc.record, exc.detail]
    except cw.APIStatusError as exc:
        assert_type(exc.status_code, int)
        assert_type(exc.request_id, Optional[str])
        seen += [exc.status_code, exc.detail, exc.body]
    except cw.RunTimeout as exc:
        assert_type(exc.request_id, Optional[str])
        seen.append(client.get_run(exc.request_id or "").wait())
    except (cw.APITimeoutError, cw.APIConnectionError, cw.ConfigurationError) as exc:
        seen.append(str(exc))
    except cw.CodewordsError as exc:
        seen.append(exc)
    return seen


def wrong_calls(client: cw.Client) -> None:
    client.run(42, {"name": "Ada"})  # type: ignore[arg-type]
    client.run("my-service", {"name": "Ada"}, timout=30)  # type: ignore[call-arg]
    client.start("my-service", path=["not", "a", "path"])  # type: ignore[arg-type]
    client.run("my-service", headers=[("X-Correlation-Id", "c-1")])  # type: ignore[arg-type]
    client.start("slow-service").wait(timeout="soon")  # type: ignore[arg-type]
    client.map("echo", [{}], max_worker=4)  # type: ignore[call-arg]
    client.upload(12345)  # type: ignore[arg-type]
    cw.Client(api_key=b"bytes")  # type: ignore[arg-type]
    print(cw.APIStatusError("boom").status)  # type: ignore[attr-defined]
    cw.Client().runn("my-service")  # type: ignore[attr-defined]
    client.run("my-service", fallback="resum")  # type: ignore[arg-type]
    client.map("echo", [{}], fallback="Rerun")  # type: ignore[arg-type]
    cw.Client(fallback="off")  # type: ignore[arg-type]
    client.upload(io.StringIO("text, not bytes"), filename="a.txt")  # type: ignore[arg-type]
    client.logs("r").close(now=True)  # type: ignore[call-arg]


with cw.Client() as client:
    correct_calls(client)
    log_streams(client, client.start("slow-service"))
    uploads_of_binary_readables(client, requests.get("https://example.com/data.bin", stream=True))
    subclass_in_with_block()
    exceptions(client)
    wrong_calls(client)
