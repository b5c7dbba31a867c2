"""Calls the official client can make (issue 13): answers of any type, paths of any characters,
inputs of any JSON value, and records of an unexpected shape. Wire format with `responses`,
behaviour against the emulator; the same against real FastAPI workflows is in test_workflows.py."""

import json
import os
import subprocess
import sys

import pytest
import requests
import responses
from hypothesis import given, settings
from hypothesis import strategies as st

import codewords_lite as cw

BASE = "https://runtime.example"
KEY = "cwk-calls-test-key"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x80"  # not UTF-8: a str would have lost bytes


@pytest.fixture
def api():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def lean():
    with cw.Client(KEY, base_url=BASE, fallback=None) as client:
        yield client


# -- 1. the answer decoded by its Content-Type --------------------------------------------------


@pytest.mark.parametrize(
    "body, content_type, output",
    [
        (PNG, "image/png", PNG),
        (b"\x00\x01\xff", "application/octet-stream", b"\x00\x01\xff"),
        (b"%PDF-1.7", "application/pdf", b"%PDF-1.7"),
        (b'{"a": 1}', "application/octet-stream", b'{"a": 1}'),  # bytes say they are bytes
        (b"caf\xe9", "text/plain; charset=latin-1", "café"),
        (b"caf\xe9", "text/plain; charset=ISO-8859-1", "café"),
        (b"caf\xc3\xa9", "text/plain", "café"),  # no charset: UTF-8, not HTTP/1.0's latin-1
        (b"caf\xc3\xa9", 'text/plain; charset="utf-8"', "café"),
        ("a,b\n1,2\n".encode("utf-16"), "text/csv; charset=utf-16", "a,b\n1,2\n"),
        (b"[1, 2]", "text/plain", "[1, 2]"),  # text is text, even when it looks like JSON
        (b"caf\xc3\xa9", "text/plain; charset=no-such-codec", "café"),
        (b"caf\xc3\xa9", "text/plain; charset=base64", "café"),  # a codec, but not a text encoding
        (b'{"a": "caf\xe9"}', "application/json; charset=latin-1", {"a": "café"}),
        (b'{"a": "caf\xc3\xa9"}', "application/json", {"a": "café"}),
        (b'{"a": "caf\xc3\xa9"}', "APPLICATION/JSON", {"a": "café"}),
        (
            b'{"title": "Out of stock", "status": 409}',
            "application/problem+json",
            {"title": "Out of stock", "status": 409},
        ),
        (b"not json", "application/json", "not json"),  # declared JSON that is not: its text
        (b"[1, 2]", None, [1, 2]),
        (b"plain words", None, b"plain words"),
    ],
)
def test_the_answer_is_decoded_by_its_content_type(api, lean, body, content_type, output):
    """Binary output came back as a str with bytes replaced by U+FFFD, and text in another charset
    was garbled: JSON is decoded, text/* is a str in its charset, anything else is bytes."""
    api.post(f"{BASE}/run/svc", body=body, content_type=content_type)
    answer = lean.run("svc")
    assert answer == output and type(answer) is type(output)


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", "image/png", "application/problem+json", None]
)
def test_an_empty_answer_is_none_whatever_its_type(api, lean, content_type):
    api.post(f"{BASE}/run/svc", body=b"", content_type=content_type, status=200)
    assert lean.run("svc") is None


@pytest.mark.parametrize("content_type", [None, "application/json", "application/problem+json; charset=utf-8"])
def test_json_nested_too_deeply_is_a_codewords_error(api, lean, content_type):
    api.post(f"{BASE}/run/svc", body=b"[" * 100_000 + b"]" * 100_000, content_type=content_type)
    with pytest.raises(cw.CodewordsError, match="nested too deeply"):
        lean.run("svc")


def test_binary_output_from_the_emulator_is_the_bytes(runtime, client):
    runtime_png = client.run("echo-bytes", {"hex": PNG.hex()})
    assert runtime_png == PNG


def answer_of(body: bytes, content_type) -> requests.Response:
    answer = requests.Response()
    answer.status_code, answer._content = 200, body
    if content_type is not None:
        answer.headers["Content-Type"] = content_type
    return answer


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.binary(max_size=64),
    st.none()
    | st.sampled_from(["application/json", "text/plain", "image/png", "application/x+json", ""])
    | st.text(max_size=40).map(lambda charset: "text/plain; charset=" + charset),
)
def test_any_answer_of_any_type_decodes_to_a_value(body, content_type):
    """Whatever the body and the Content-Type (a charset no codec has, or garbage), the answer is
    a value of the type its Content-Type promises: never an exception."""
    output = cw._output_of(answer_of(body, content_type))
    if not body:
        assert output is None
    elif content_type and content_type.startswith("text/"):
        assert isinstance(output, str)
    elif content_type == "image/png":
        assert output == body


# -- 2. path segments of any characters ---------------------------------------------------------


@pytest.mark.parametrize(
    "path, url_path",
    [
        ("items:batch", "/run/svc/items:batch"),
        ("a b", "/run/svc/a%20b"),
        ("café", "/run/svc/caf%C3%A9"),
        ("100%", "/run/svc/100%25"),
        ("%41", "/run/svc/%2541"),  # a path is given as text, not pre-encoded
        ("q?x=1", "/run/svc/q%3Fx=1"),
        ("frag#x", "/run/svc/frag%23x"),
        ("reports/daily", "/run/svc/reports/daily"),
        ("/v1/items/", "/run/svc/v1/items"),
        ("user@host;v=1+2", "/run/svc/user@host;v=1+2"),
        ("..a/.b./...", "/run/svc/..a/.b./..."),
        ("tab\there", "/run/svc/tab%09here"),
    ],
)
def test_path_segments_are_percent_encoded(api, lean, path, url_path):
    """`path="a b"`, "café" or "items:batch" raised ConfigurationError; the official client sends
    them. Each segment is percent-encoded, so that '?', '#' and '%' are data, never URL syntax."""
    api.post(f"{BASE}{url_path}", json={"ok": True})
    assert lean.run("svc", path=path) == {"ok": True}
    assert api.calls[0].request.path_url == url_path


@pytest.mark.parametrize("path", ["a//b", ".", "..", "a/../b", "a/./b", "../admin", "a/.."])
def test_empty_and_dot_segments_are_still_refused(runtime, client, path):
    with pytest.raises(cw.ConfigurationError, match=r"empty, '\.' or '\.\.'"):
        client.run("echo", path=path)
    assert runtime.calls == []


@pytest.mark.parametrize("service_id", ["a b", "café", "svc:x", "svc%2e", "a/b"])
def test_service_ids_stay_slugs(runtime, client, service_id):
    with pytest.raises(cw.ConfigurationError, match="bad service id"):
        client.start(service_id)
    assert runtime.calls == []


def test_the_emulator_receives_each_segment_as_sent(runtime, client):
    client.start("echo", path="a b/café/100%/q?x#y")
    (call,) = runtime.calls_to("POST", "/run_async/")
    assert call["path"] == "/run_async/echo/a%20b/caf%C3%A9/100%25/q%3Fx%23y"
    assert call["query"] == {}


# -- 3. inputs of any JSON value ----------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs, body",
    [
        ([1, 2], b"[1,2]"),
        ("text", b'"text"'),
        (3, b"3"),
        (2.5, b"2.5"),
        (True, b"true"),
        ((1, "two"), b'[1,"two"]'),
        ({}, b"{}"),
        (None, b"{}"),
    ],
)
def test_inputs_of_any_json_value_are_sent_as_json(api, lean, inputs, body):
    """A FastAPI route may take a list or a scalar body: run("svc", [1, 2]) raised TypeError."""
    api.post(f"{BASE}/run/svc", json=None)
    api.post(f"{BASE}/run_async/svc", json={"request_id": "req_1"})
    lean.run("svc", inputs)
    lean.start("svc", inputs)
    assert [c.request.body for c in api.calls] == [body, body]


def test_inputs_of_any_json_value_reach_the_workflow(runtime, client):
    assert client.run("echo", [1, "two", None]) == [1, "two", None]
    assert client.start("echo", "just text").wait() == "just text"
    assert list(client.map("echo", [[1], 2, "three", None])) == [[1], 2, "three", {}]


# -- 7. a record of an unexpected shape ---------------------------------------------------------


def test_a_finished_record_with_no_output_field_raises_and_shows_its_keys(api, lean):
    """A record with none of responseJson, responseContent, responseStatus came back as None,
    silently: now an APIStatusError that names the fields the record has."""
    record = {"id": "req_1", "userId": "u", "completedAt": "2026-01-01T00:00:00Z", "output": {"a": 1}}
    api.get(f"{BASE}/result/req_1", json=record)
    with pytest.raises(cw.APIStatusError) as info:
        lean.result("req_1")
    assert "id, userId, completedAt, output" in str(info.value)
    assert "responseJson" in str(info.value)
    assert info.value.body == record and info.value.request_id == "req_1"


@pytest.mark.parametrize(
    "record, output",
    [
        ({"responseStatus": 200}, None),  # a workflow that answered nothing
        ({"responseStatus": 204, "responseContent": ""}, None),
        ({"responseJson": None, "responseStatus": 200}, None),  # it answered JSON null
        ({"responseContent": "words"}, "words"),
    ],
)
def test_a_record_with_any_output_field_is_an_output(api, lean, record, output):
    api.get(f"{BASE}/result/req_1", json={"id": "req_1", "completedAt": "2026-01-01T00:00:00Z", **record})
    assert lean.result("req_1") == output


def test_a_record_found_done_by_done_is_checked_too(api, lean):
    api.get(f"{BASE}/request/req_1", json={"id": "req_1", "completedAt": "2026-01-01T00:00:00Z"})
    run = lean.get_run("req_1")
    assert run.done()
    with pytest.raises(cw.APIStatusError, match="its fields are id, completedAt"):
        run.wait()


# -- the command line ---------------------------------------------------------------------------


def run_cli(runtime, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEWORDS_")}
    env.update(CODEWORDS_API_KEY=runtime.api_key, CODEWORDS_BASE_URL=runtime.url)
    return subprocess.run(
        [sys.executable, "-m", "codewords_lite", *args], cwd=ROOT, env=env, capture_output=True, timeout=60
    )


def test_the_command_line_writes_bytes_as_they_came(runtime):
    """`codewords-lite run` of a workflow that answers an image printed a traceback (bytes are not
    JSON): they go to standard output as they came, for `> image.png`."""
    result = run_cli(runtime, "run", "echo-bytes", json.dumps({"hex": PNG.hex()}))
    assert result.returncode == 0 and result.stderr == b""
    assert result.stdout == PNG


def test_the_command_line_takes_inputs_of_any_json_value(runtime):
    result = run_cli(runtime, "run", "echo", "[1, 2]")
    assert result.returncode == 0 and result.stdout == b"[1,2]\n"
