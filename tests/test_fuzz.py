"""Fuzzing with hypothesis: what the server or the command line sends may be anything.

Every parser takes arbitrary input and either returns a value or raises the module's own error,
never a bare TypeError, KeyError, ValueError or requests exception.
"""

import json
import re

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codewords_lite as cw

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
records = st.dictionaries(
    st.sampled_from(["responseStatus", "responseJson", "responseContent", "id", "completedAt", "other"]),
    json_values | st.integers(min_value=-1000, max_value=1000).map(str),
    max_size=5,
)


def response(status: int, content: bytes) -> "cw._Answer":
    """An answer as the transport hands it over: status, headers, the whole body."""
    headers = requests.structures.CaseInsensitiveDict()
    return cw._Answer(status, "", headers, content, "https://runtime.example/x", "cwk-fuzz")


@FUZZ
@given(st.binary(max_size=300))
def test_log_lines_of_any_bytes(line):
    for content_type in ("application/x-ndjson", "text/event-stream"):
        entry = cw._LogParser(content_type).feed(line)
        assert entry is None or isinstance(entry, dict)


@FUZZ
@given(st.lists(st.binary(max_size=50), max_size=20))
def test_split_lines_loses_and_invents_nothing(chunks):
    data = b"".join(chunks)
    lines = list(cw._split_lines(chunks))
    expected = re.split(rb"\r\n|\r|\n", data)
    assert lines == (expected[:-1] if expected[-1] == b"" else expected)


def decode_every_way(content: bytes) -> None:
    """Decode an answer as a record, a request id and an upload answer: a value or a CodewordsError."""
    for decode in (lambda r: cw._record_in(r, "req_1"), cw._request_id_in, cw._upload_answer):
        try:
            decode(response(200, content))
        except cw.CodewordsError:
            pass


@FUZZ
@given(st.binary(max_size=300))
def test_bodies_of_any_bytes(content):
    cw._decode(content)
    decode_every_way(content)


@FUZZ
@given(json_values)
def test_json_answers_of_any_shape(value):
    decode_every_way(json.dumps(value).encode())


@FUZZ
@given(records)
def test_records_with_missing_or_oddly_typed_fields(record):
    try:
        cw._output(record, "req_1")
    except cw.RunFailed as failed:
        assert "req_1" in str(failed)
    except cw.APIStatusError as unexpected:  # a record with no output field at all (issue 13)
        assert all(record.get(field) is None for field in ("responseStatus", "responseJson", "responseContent"))
        assert "req_1" in str(unexpected)
    except cw.CodewordsError as no_status:  # a responseStatus that is no HTTP status (issue 20)
        assert "no HTTP status" in str(no_status) and "req_1" in str(no_status)


@FUZZ
@given(st.integers(min_value=100, max_value=599), st.binary(max_size=200))
def test_error_answers_of_any_bytes(status, content):
    run = cw._Request(cw._RUN_POST, "/run/x", None, 0.0, request_id="req_1")
    error = cw._status_error(run, response(status, content), "")
    assert isinstance(error, cw.APIStatusError) and error.status_code == status
    assert isinstance(str(error), str) and len(str(error)) < 1000
    storage = cw._status_error(
        cw._Request(cw._PUT, "https://bucket.example/k", None, 0.0), response(status, content), ""
    )
    assert isinstance(storage, cw.APIStatusError)


@FUZZ
@given(st.text(max_size=60))
def test_timestamps_of_any_text(text):
    instant = cw._instant(text)
    assert instant is None or isinstance(instant, int)


@FUZZ
@given(
    st.text(max_size=60)
    | st.sampled_from(["Wed, 21 Oct 99999 07:28:00 GMT", "Mon, 01 Jan 0001 00:00:00 GMT", "1e400", "-inf"])
)
def test_retry_after_of_any_text(text):
    answer = requests.Response()
    answer.headers["Retry-After"] = text
    seconds = cw._retry_after(answer)
    assert seconds is None or 0 <= seconds <= cw.RETRY_AFTER_MAX


@FUZZ
@given(st.text(max_size=60))
def test_command_line_fields_of_any_text(field):
    text = field.partition("=")[2]
    meant_as_json = text.startswith(("{", "[", '"'))  # issue 24: then it must be JSON (finite)
    try:
        key, value = cw._parse_field(field)
    except cw._UsageError:
        assert "=" not in field or not field.split("=", 1)[0].strip() or meant_as_json
    else:
        assert key == field.split("=", 1)[0].strip() and key
        json.dumps(value, allow_nan=False)  # whatever it became is JSON again, and finite
        if isinstance(value, str) and not meant_as_json:
            assert value == text  # a string keeps its text
    if "=" in field and field.split("=", 1)[0].strip():
        assert cw._parse_field(field, as_string=True)[1] == text  # -s: always the text as given


@FUZZ
@given(st.text(max_size=30), st.text(max_size=30))
def test_names_are_checked_or_refused(service_id, path):
    try:
        url_path = cw._service_path(cw._RUN_POST, service_id, path)
    except cw.ConfigurationError:
        return
    assert (
        url_path.startswith("/run/") and ".." not in url_path.split("/") and "?" not in url_path and "#" not in url_path
    )


@pytest.mark.parametrize("timestamp", ["2026-13-45T99:99:99Z", "0000-00-00T00:00:00", "2026-01-01T00:00:00+99:99"])
def test_impossible_timestamps_are_not_instants(timestamp):
    assert cw._instant(timestamp) is None
