"""Real workflows behind the emulator: FastAPI apps served by uvicorn, as CodeWords users write
them (tests/workflows/), their status, headers and body passed through as the runtime does."""

import hashlib

import pytest
from fake_runtime import FakeRuntime

import codewords_lite as cw

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError:
    pytest.skip("the real-workflow tier needs FastAPI and uvicorn: pip install '.[workflows]'", allow_module_level=True)

from workflows import answers, files, greeter, serve, slow

APPS = {"greeter": greeter.app, "answers": answers.app, "slow": slow.app, "files": files.app}


@pytest.fixture(scope="module")
def workflows():
    """Each workflow on a uvicorn server of its own, for the whole module: service id -> URL."""
    servers = {name: serve(app) for name, app in APPS.items()}
    try:
        yield {name: server.__enter__() for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def fresh_counts():
    answers.app.state.runs = {}
    slow.app.state.runs = 0


@pytest.fixture
def runtime(workflows):
    with FakeRuntime(workflows=workflows) as runtime:
        yield runtime


@pytest.fixture
def client(runtime):
    with cw.Client(runtime.api_key, base_url=runtime.url) as client:
        yield client


# -- pydantic models and the official package's error handlers ----------------------------------


def test_a_pydantic_workflow_runs_blocking_and_in_the_background(runtime, client):
    assert client.run("greeter", {"name": "Ada", "age": 36}) == {"message": "Hello, Ada (36)!"}
    assert client.start("greeter", {"name": "Bo", "age": 7}).wait() == {"message": "Hello, Bo (7)!"}
    assert runtime.executions["greeter"] == 2


def test_a_validation_error_is_a_422_with_its_list_of_errors(runtime, client):
    """FastAPI's 422: ``detail`` is a list of errors, each with loc and msg, shown field by field."""
    with pytest.raises(cw.APIStatusError) as info:
        client.run("greeter", {"name": "", "age": -1})
    error = info.value
    assert error.status_code == 422
    assert [entry["loc"] for entry in error.detail] == [["body", "name"], ["body", "age"]]
    assert "body.name: String should have at least 1 character" in str(error)
    assert "body.age: Input should be greater than or equal to 0" in str(error)
    with pytest.raises(cw.RunFailed) as failed:
        client.start("greeter", {"age": "old"}).wait()
    assert failed.value.status_code == 422
    assert "body.name: Field required; body.age: Input should be a valid integer" in str(failed.value)
    assert runtime.executions["greeter"] == 2  # each sent once, never again


def test_a_raised_http_exception_comes_back_with_its_detail(runtime, client):
    with pytest.raises(cw.APIStatusError, match="no such person: nobody") as info:
        client.run("greeter", {"name": "nobody", "age": 1})
    assert info.value.status_code == 404 and info.value.detail == "no such person: nobody"
    with pytest.raises(cw.APIStatusError, match="already done") as info:  # no handler, no Error-Origin
        client.run("answers", path="conflict")
    assert info.value.status_code == 409 and info.value.detail == "already done"
    assert runtime.executions == {"greeter": 1, "answers": 1}


def test_a_raised_exception_is_a_500_with_the_trimmed_traceback(runtime, client):
    """The official handler turns any exception into {"detail": ...} with Error-Origin: service:
    the workflow's failure, which is raised with its message and never sent again."""
    with pytest.raises(cw.RunFailed) as info:
        client.run("greeter", {"name": "crash", "age": 1})
    assert info.value.status_code == 500
    assert "ValueError: the greeting machine broke" in info.value.detail
    assert "Internal server error" in str(info.value)
    assert runtime.executions["greeter"] == 1


def test_a_503_returned_by_the_workflow_reaches_the_record(client):
    with pytest.raises(cw.RunFailed, match="busy, run 1") as info:
        client.start("answers", path="busy").wait()
    assert info.value.status_code == 503
    assert answers.app.state.runs == {"/busy": 1}


def test_a_503_returned_by_the_workflow_is_not_run_again(client, quick_retries):
    """JSONResponse(status_code=503) carries no Error-Origin: the workflow ran, so the run must
    not be sent again (issue 10 made it so; this is the same against a real workflow)."""
    with pytest.raises(cw.RunFailed, match="busy, run 1") as info:
        client.run("answers", path="busy")
    assert info.value.status_code == 503
    assert answers.app.state.runs == {"/busy": 1}


# -- answers of every type -----------------------------------------------------------------------


def test_png_bytes_come_back_as_the_bytes(client):
    output = client.run("answers", path="image")
    assert output == answers.PNG and isinstance(output, bytes)


def test_a_text_answer_is_a_str(client):
    assert client.run("answers", path="text") == "héllo wörld"
    assert client.start("answers", path="text").wait() == "héllo wörld"


@pytest.mark.parametrize(
    "kind, output",
    [
        ("json-latin-1", {"city": "Zürich"}),
        ("text-no-charset", "naïve"),
        ("text-latin-1", "naïve"),
        ("problem", {"type": "about:blank", "title": "Gone", "status": 410}),
        ("csv", "a,b\n1,2\n"),
        ("none", b"\x00\x01 not json"),
    ],
)
def test_answers_declared_every_way(client, kind, output):
    answer = client.run("answers", path=f"typed/{kind}")
    assert answer == output and type(answer) is type(output)


@pytest.mark.parametrize("kind", ["json", "text", "png", "problem", "none"])
def test_an_empty_answer_is_none(client, kind):
    assert client.run("answers", path=f"empty/{kind}") is None


# -- paths and inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "segment, raw", [("café", "caf%C3%A9"), ("a b", "a%20b"), ("100%", "100%25"), ("q?x=1#y", "q%3Fx=1%23y")]
)
def test_a_path_segment_arrives_as_given(client, segment, raw):
    assert client.run("greeter", path=f"items/{segment}") == {"name": segment, "raw_path": f"/items/{raw}"}


def test_a_route_with_a_colon(client):
    assert client.run("greeter", path="items:batch") == {"batch": True}


def test_a_list_or_a_string_as_the_body(client):
    assert client.run("greeter", [1, 2, 3], path="sum") == 6
    assert client.start("greeter", "quiet", path="shout").wait() == "QUIET"
    assert list(client.map("greeter", [[1], [2, 2], []], path="sum")) == [1, 4, 0]


# -- redirects, the gateway's cut and files ------------------------------------------------------


def test_a_trailing_slash_redirect_is_followed_and_the_route_runs_once(runtime, client):
    """FastAPI answers /slashed with a 307 to /slashed/, which through the gateway points back at
    the runtime: the same scheme, host and port, so it is followed with the method and body."""
    output = client.run("answers", {"a": 1}, path="slashed", headers={"X-Correlation-Id": "c-7"})
    assert output == {"slashed": True, "method": "POST", "body": '{"a":1}'}
    first, second = runtime.calls_to("POST", "/run/answers/slashed")
    assert (first["path"], second["path"]) == ("/run/answers/slashed", "/run/answers/slashed/")
    for name in ("X-Provisioned-Request-Id", "X-Correlation-Id", "Authorization"):
        assert second["headers"][name] == first["headers"][name]
    assert answers.app.state.runs == {"/slashed/": 1}


def test_a_redirect_in_a_record_is_a_failure_not_an_empty_output(client):
    """A background run cannot follow the 307 its record holds: it came back as None."""
    with pytest.raises(cw.RunFailed, match="status 307") as info:
        client.start("answers", {"a": 1}, path="slashed").wait()
    assert info.value.status_code == 307


def test_a_get_route_takes_its_inputs_as_query_parameters(client):
    output = client.run("greeter", {"verbose": True, "tag": "a b&c"}, path="status", method="GET")
    assert output == {"ok": True, "verbose": True, "tag": "a b&c"}
    assert client.run("answers", {"day": "monday"}, path="report", method="GET") == {"report": "monday"}
    with pytest.raises(cw.APIStatusError, match="405 Method Not Allowed"):  # FastAPI's, passed through
        client.run("answers", path="report")


def test_headers_of_your_own_reach_the_workflow(runtime, client):
    output = client.run("greeter", path="headers", headers={"X-Correlation-Id": "c-1", "Run-As-Template": "yes"})
    assert output["x-correlation-id"] == "c-1" and output["run-as-template"] == "yes"
    assert output["accept"] == "*/*"
    started = client.start("greeter", path="headers", headers={"X-Correlation-Id": "c-2"})
    assert started.wait()["x-correlation-id"] == "c-2"


def test_a_route_slower_than_the_gateway_is_resumed_and_runs_once(workflows):
    with FakeRuntime(workflows=workflows, gateway_timeout=0.3) as runtime:
        with cw.Client(runtime.api_key, base_url=runtime.url) as client:
            assert client.run("slow", {"seconds": 0.8, "tag": "x"}) == {"slept": 0.8, "tag": "x"}
        assert slow.app.state.runs == 1
        assert len(runtime.calls_to("POST", "/run/slow")) == 1
        assert runtime.calls_to("GET", "/result/")  # the 504 was resumed by the provisioned id


def test_a_workflow_reads_the_file_that_upload_returned(runtime, client):
    content = b"name,age\nAda,36\nBo,7\n" * 1000
    url = client.upload(content, filename="people.csv")
    expected = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "lines": 3000}
    assert client.run("files", {"file": url}) == expected
    with pytest.raises(cw.RunFailed) as info:  # the workflow's own failure to fetch it
        client.run("files", {"file": url.replace("/files/", "/files/x")})
    assert "HTTPError: 404 Client Error" in info.value.detail
