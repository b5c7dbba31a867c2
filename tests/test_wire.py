"""The exact wire format, pinned with `responses`: URLs, headers, bodies and how answers map to errors."""

import json
import pickle
import re

import pytest
import requests
import responses
from responses import matchers

import codewords_lite as cw

BASE = "https://runtime.example"
KEY = "cwk-wire-test-key"


@pytest.fixture
def api():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def client():
    with cw.Client(KEY, base_url=BASE) as client:
        yield client


def test_blocking_run_sends_the_documented_request(api, client):
    api.post(f"{BASE}/provision-request", json={"request_id": "req_1"})
    api.post(
        f"{BASE}/run/svc",
        json={"ok": True},
        match=[
            matchers.header_matcher(
                {
                    "Authorization": f"Bearer {KEY}",
                    "Content-Type": "application/json",
                    "User-Agent": f"codewords-lite/{cw.__version__}",
                    "X-Provisioned-Request-Id": "req_1",
                }
            ),
            matchers.json_params_matcher({"name": "Ada", "n": 3, "nested": {"ü": [1.5, None]}}),
        ],
    )
    assert client.run("svc", {"name": "Ada", "n": 3, "nested": {"ü": [1.5, None]}}) == {"ok": True}
    assert api.calls[1].request.body == '{"name":"Ada","n":3,"nested":{"ü":[1.5,null]}}'.encode()


def test_no_fallback_sends_only_the_run(api, client):
    api.post(f"{BASE}/run/svc/reports/daily", json=[1, 2])
    assert client.run("svc", path="reports/daily", fallback=None) == [1, 2]
    assert len(api.calls) == 1
    assert api.calls[0].request.body == b"{}"
    assert "X-Provisioned-Request-Id" not in api.calls[0].request.headers


def test_rerun_fallback_does_not_provision(api):
    api.post(f"{BASE}/run/svc", json={"ok": 1})
    with cw.Client(KEY, base_url=BASE, fallback="rerun") as client:
        assert client.run("svc") == {"ok": 1}
    assert [c.request.url for c in api.calls] == [f"{BASE}/run/svc"]


@pytest.mark.parametrize(
    "body, content_type, output",
    [
        (b'{"a": [1, "x"]}', "application/json", {"a": [1, "x"]}),
        (b'"just a string"', "application/json", "just a string"),
        (b"plain words", "text/plain", "plain words"),
        (b"", "text/plain", None),
        (b"null", "application/json", None),
    ],
)
def test_blocking_output_is_json_else_text_else_none(api, client, body, content_type, output):
    api.post(f"{BASE}/run/svc", body=body, content_type=content_type)
    assert client.run("svc", fallback=None) == output


def test_start_posts_run_async_and_returns_a_run(api, client):
    api.post(f"{BASE}/run_async/svc/x", json={"request_id": "req_42"}, match=[matchers.json_params_matcher({"k": "v"})])
    run = client.start("svc", {"k": "v"}, path="/x/")
    assert isinstance(run, cw.Run) and run.request_id == "req_42" and run.record is None
    assert "X-Provisioned-Request-Id" not in api.calls[0].request.headers


def test_wait_long_polls_with_whole_seconds_capped_at_110(api, client):
    record = {"id": "req_7", "responseStatus": 200, "responseJson": {"done": True}}
    api.get(f"{BASE}/result/req_7", json=record, match=[matchers.query_param_matcher({"timeout": "110"})])
    assert client.result("req_7") == {"done": True}
    api.get(
        f"{BASE}/result/req_8", json={**record, "id": "req_8"}, match=[matchers.query_param_matcher({"timeout": "3"})]
    )
    assert client.result("req_8", timeout=2.2) == {"done": True}


def test_wait_polls_again_at_once_on_408_and_504_without_spending_retries(api, monkeypatch):
    monkeypatch.setattr(cw, "HELD_POLL_MIN", 0.0)  # these mocked polls answer at once, as if held
    for status in (408, 504, 408, 504, 408):
        api.get(f"{BASE}/result/req_9", status=status)
    api.get(f"{BASE}/result/req_9", json={"responseStatus": 200, "responseJson": 5})
    with cw.Client(KEY, base_url=BASE, max_retries=0) as client:
        assert client.result("req_9") == 5
    assert len(api.calls) == 6


@pytest.mark.parametrize(
    "record, output",
    [
        ({"responseStatus": 200, "responseJson": {"a": 1}, "responseContent": '{"a": 2}'}, {"a": 1}),
        ({"responseStatus": 200, "responseContent": '{"a": 2}'}, {"a": 2}),
        ({"responseStatus": 200, "responseContent": "words"}, "words"),
        ({"responseStatus": 200, "responseJson": False}, False),
        ({"responseStatus": 200}, None),
        ({"responseStatus": "201", "responseJson": 0}, 0),
        ({"completedAt": "2026-01-01T00:00:01Z", "responseStatus": None, "responseJson": [1]}, [1]),
    ],
)
def test_output_from_the_record(api, client, record, output):
    api.get(f"{BASE}/result/req_1", json=record)
    run = client.get_run("req_1")
    assert run.wait() == output
    assert run.record == record


def test_a_failed_run_raises_run_failed_with_the_detail(api, client):
    record = {
        "id": "req_f",
        "responseStatus": 422,
        "responseJson": {"detail": [{"loc": ["body", "n"], "msg": "field required"}]},
    }
    api.get(f"{BASE}/result/req_f", json=record)
    with pytest.raises(cw.RunFailed) as info:
        client.result("req_f")
    error = info.value
    assert str(error) == "run req_f failed with status 422: body.n: field required"
    assert error.request_id == "req_f" and error.record == record and error.status_code == 422


def test_run_failed_from_text_content(api, client):
    api.get(f"{BASE}/result/req_f", json={"responseStatus": 500, "responseContent": "Traceback: ValueError"})
    with pytest.raises(cw.RunFailed, match="status 500: Traceback: ValueError"):
        client.result("req_f")


def test_details_and_done(api, client):
    api.get(f"{BASE}/request/req_d", json={"id": "req_d", "startedAt": "2026-01-01T00:00:00Z"})
    api.get(
        f"{BASE}/request/req_d",
        json={"id": "req_d", "completedAt": "2026-01-01T00:00:01Z", "responseStatus": 200, "responseJson": 1},
    )
    run = client.get_run("req_d")
    assert run.done() is False and run.record is None
    assert run.done() is True
    assert run.wait() == 1  # the finished record is kept: no further request
    assert len(api.calls) == 2


@pytest.mark.parametrize(
    "status, cls",
    [
        (400, cw.APIStatusError),
        (401, cw.AuthenticationError),
        (403, cw.AuthenticationError),
        (404, cw.NotFoundError),
        (409, cw.APIStatusError),
        (422, cw.APIStatusError),
        (500, cw.ServerError),
        (502, cw.ServerError),
        (504, cw.GatewayTimeout),
    ],
)
def test_http_errors_map_to_classes_and_keep_the_detail(api, client, status, cls):
    api.post(f"{BASE}/run/svc", status=status, json={"detail": "the server's own words"})
    with pytest.raises(cls) as info:
        client.run("svc", fallback=None)
    error = info.value
    assert type(error) is cls
    assert error.status_code == status and error.detail == "the server's own words"
    assert error.body == {"detail": "the server's own words"}
    assert "the server's own words" in str(error) and str(status) in str(error)


def test_the_workflows_own_504_is_run_failed_not_a_gateway_timeout(api, client):
    api.post(f"{BASE}/provision-request", json={"request_id": "req_w"})
    api.post(f"{BASE}/run/svc", status=504, json={"detail": "upstream API slow"}, headers={"Error-Origin": "service"})
    with pytest.raises(cw.RunFailed) as info:
        client.run("svc")
    assert info.value.request_id == "req_w" and info.value.status_code == 504
    assert len(api.calls) == 2  # no fallback: the workflow has answered


def test_validation_errors_are_summarised(api, client):
    detail = [
        {"loc": ["body", "a"], "msg": "field required", "type": "missing"},
        {"loc": ["body", "b"], "msg": "not an int"},
    ]
    api.post(f"{BASE}/run/svc", status=422, json={"detail": detail})
    # the reason phrase is http.client's: "Unprocessable Entity" before Python 3.13, "Content" after
    with pytest.raises(
        cw.APIStatusError,
        match=r"422 Unprocessable [A-Za-z]+ from POST /run/svc: body\.a: field required; body\.b: not an int",
    ):
        client.run("svc", fallback=None)


def test_redirects_are_not_followed(api, client):
    api.post(f"{BASE}/run/svc", status=307, headers={"Location": "https://elsewhere.example/run/svc"})
    with pytest.raises(cw.APIStatusError, match=re.escape("redirected to 'https://elsewhere.example/run/svc'")):
        client.run("svc", fallback=None)
    assert len(api.calls) == 1


def test_a_key_echoed_by_the_server_is_masked_in_the_message(api, client):
    api.post(f"{BASE}/run/svc", status=401, json={"detail": f"key {KEY} is revoked"})
    with pytest.raises(cw.AuthenticationError) as info:
        client.run("svc", fallback=None)
    assert KEY not in str(info.value) and "key *** is revoked" in str(info.value)


def test_rate_limit_error_carries_retry_after(api):
    api.post(f"{BASE}/run/svc", status=429, headers={"Retry-After": "7"}, json={"detail": "slow down"})
    with cw.Client(KEY, base_url=BASE, max_retries=0) as client:
        with pytest.raises(cw.RateLimitError) as info:
            client.run("svc", fallback=None)
    assert info.value.retry_after == 7.0


@pytest.mark.parametrize(
    "value, seconds", [("3", 3.0), ("0.5", 0.5), ("86400", 60.0), ("-4", 0.0), ("soon", None), ("nan", None)]
)
def test_retry_after_parsing(value, seconds):
    response = requests.Response()
    response.headers["Retry-After"] = value
    assert cw._retry_after(response) == seconds


def test_retry_after_as_an_http_date():
    import email.utils
    import time

    response = requests.Response()
    response.headers["Retry-After"] = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= cw._retry_after(response) <= 30


@pytest.mark.parametrize(
    "status, error", [(504, cw.GatewayTimeout), (503, cw.ServerError)], ids=["no fallback", "no retry"]
)
def test_one_time_key_sends_exactly_one_request(api, quick_retries, status, error):
    api.post(f"{BASE}/run/svc", status=status)
    with cw.Client("cwotk-once", base_url=BASE) as client:
        with pytest.raises(error):
            client.run("svc")
    assert len(api.calls) == 1  # no provision, and no retry or fallback to spend the key on
    assert api.calls[0].request.headers["Authorization"] == "Bearer cwotk-once"


def test_malformed_request_id_answer(api, client):
    api.post(f"{BASE}/run_async/svc", json={"id": "wrong-field"})
    with pytest.raises(cw.APIStatusError, match="expected a JSON object with a request_id"):
        client.start("svc")


def test_record_that_is_not_an_object(api, client):
    api.get(f"{BASE}/result/req_x", body=b"[1, 2")
    with pytest.raises(cw.APIStatusError, match="not a JSON object"):
        client.result("req_x")


ERRORS = [
    cw.CodewordsError("plain"),
    cw.ConfigurationError("bad"),
    cw.APIConnectionError("down", request_id="req_1"),
    cw.APITimeoutError("slow", request_id="req_1"),
    cw.APIStatusError("418", status_code=418, detail="teapot", body={"detail": "teapot"}, request_id="req_1"),
    cw.AuthenticationError("401", status_code=401, detail="no"),
    cw.NotFoundError("404", status_code=404),
    cw.RateLimitError("429", status_code=429),
    cw.ServerError("500", status_code=500, detail=["x"]),
    cw.GatewayTimeout("504", status_code=504, request_id="req_2"),
    cw.RunFailed("failed", request_id="req_3", record={"responseStatus": 500}, status_code=500, detail="d"),
    cw.RunTimeout("late", request_id="req_4"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_exceptions_pickle_with_their_attributes(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and vars(copy) == vars(error)


def test_exception_tree():
    assert issubclass(cw.ConfigurationError, ValueError)
    assert issubclass(cw.APITimeoutError, cw.APIConnectionError) and issubclass(cw.APITimeoutError, TimeoutError)
    assert issubclass(cw.RunTimeout, TimeoutError)
    assert issubclass(cw.GatewayTimeout, cw.ServerError) and issubclass(cw.ServerError, cw.APIStatusError)
    for name in cw.__all__:
        cls = getattr(cw, name)
        if isinstance(cls, type) and issubclass(cls, Exception):
            assert issubclass(cls, cw.CodewordsError)
            assert name in cw.__doc__, f"{name} is missing from the tree in the module docstring"
    assert str(cw.RunTimeout("late", request_id="r")) == "late"


def test_json_dumps_is_compact_and_keeps_unicode():
    assert (
        cw._encode_inputs({"a": "é", "b": [1]})
        == json.dumps({"a": "é", "b": [1]}, separators=(",", ":"), ensure_ascii=False).encode()
    )
