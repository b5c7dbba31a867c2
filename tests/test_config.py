"""Configuration and bad input: a clear error, and nothing sent."""

import math

import pytest

import codewords_lite as cw


def test_import_and_construction_never_need_a_key():
    client = cw.Client()
    assert client.base_url == "https://runtime.codewords.ai"
    assert "key" not in repr(client).lower()


def test_missing_key_is_a_clear_error_naming_the_variable(runtime):
    client = cw.Client(base_url=runtime.url)
    with pytest.raises(cw.ConfigurationError, match=r"\$CODEWORDS_API_KEY"):
        client.run("echo")
    assert runtime.calls == []


def test_key_from_the_environment_is_read_when_needed(runtime, monkeypatch):
    client = cw.Client(base_url=runtime.url)
    monkeypatch.setenv("CODEWORDS_API_KEY", runtime.api_key)
    assert client.run("echo", {"a": 1}) == {"a": 1}
    assert runtime.calls[0]["headers"]["Authorization"] == f"Bearer {runtime.api_key}"


def test_a_key_with_a_newline_is_refused_without_showing_it(runtime):
    client = cw.Client("cwk-secret\r\nX-Evil: 1", base_url=runtime.url)
    with pytest.raises(cw.ConfigurationError) as info:
        client.run("echo")
    assert "secret" not in str(info.value)
    assert runtime.calls == []


def test_base_url_from_the_environment_in_order(monkeypatch):
    """RUNTIME_URI, which the official synchronous client reads, is the last place looked at."""
    monkeypatch.setenv("RUNTIME_URI", "https://third.example")
    assert cw.Client().base_url == "https://third.example"
    monkeypatch.setenv("CODEWORDS_RUNTIME_URI", "https://second.example/")
    assert cw.Client().base_url == "https://second.example"
    monkeypatch.setenv("CODEWORDS_BASE_URL", "https://first.example/prefix/")
    assert cw.Client().base_url == "https://first.example/prefix"
    assert cw.Client(base_url="https://arg.example").base_url == "https://arg.example"


@pytest.mark.parametrize(
    "url",
    [
        "http://runtime.codewords.ai",
        "ftp://x.example",
        "runtime.codewords.ai",
        "https://",
        "https://user:pw@x.example",
        "https://x.example?a=1",
        "https://x.example#top",
        "https://x.example:port",
        "http://10.0.0.1",
        "http://localhost.evil.com",
    ],
)
def test_bad_base_urls(url):
    with pytest.raises(cw.ConfigurationError, match="bad base URL"):
        cw.Client(base_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8000",
        "http://127.0.0.1:1",
        "http://127.9.9.9",
        "http://[::1]:80",
        "https://x.example:8443/api",
    ],
)
def test_good_base_urls(url):
    assert cw.Client(base_url=url).base_url == url


@pytest.mark.parametrize(
    "name, value",
    [
        ("timeout", 0),
        ("timeout", -1),
        ("timeout", math.inf),
        ("timeout", math.nan),
        ("timeout", "60"),
        ("sync_timeout", None),
        ("connect_timeout", True),
        ("max_retries", -1),
        ("max_retries", 1.5),
        ("fallback", "retry"),
        ("fallback", False),
    ],
)
def test_bad_settings(name, value):
    with pytest.raises(cw.ConfigurationError, match=name):
        cw.Client(**{name: value})


@pytest.mark.parametrize(
    "service_id, path",
    [
        ("", ""),
        (".", ""),
        ("..", ""),
        ("a/b", ""),
        ("a b", ""),
        ("svc?x=1", ""),
        ("svc#", ""),
        ("sv%2e", ""),
        ("é", ""),
        (None, ""),
        (42, ""),
        ("svc", "a//b"),
        ("svc", "../admin"),
        ("svc", "a/./b"),
        ("svc", "a/.."),
        ("svc", "\ud800"),
        ("svc", None),
        ("svc", b"bytes"),
    ],
)
def test_bad_service_ids_and_paths_send_nothing(runtime, client, service_id, path):
    for call in (lambda: client.run(service_id, {}, path=path), lambda: client.start(service_id, {}, path=path)):
        with pytest.raises(cw.ConfigurationError):
            call()
    assert runtime.calls == []


@pytest.mark.parametrize("request_id", ["", "../x", "a/b", "r?timeout=1", None, ".."])
def test_bad_request_ids_send_nothing(runtime, client, request_id):
    for call in (
        lambda: client.get_run(request_id),
        lambda: client.result(request_id),
        lambda: client.details(request_id),
    ):
        with pytest.raises(cw.ConfigurationError):
            call()
    assert runtime.calls == []


@pytest.mark.parametrize(
    "inputs", [{"when": object()}, {"x": {1, 2}}, {"f": float("nan")}, {"b": b"bytes"}, [object()], b"raw", {1, 2}]
)
def test_inputs_that_are_not_json_raise_type_error_and_send_nothing(runtime, client, inputs):
    with pytest.raises(TypeError):
        client.run("echo", inputs)
    with pytest.raises(TypeError):
        client.start("echo", inputs)
    assert runtime.calls == []


def test_bad_fallback_and_timeout_per_call_send_nothing(runtime, client):
    with pytest.raises(cw.ConfigurationError):
        client.run("echo", fallback="twice")
    with pytest.raises(cw.ConfigurationError):
        client.run("echo", timeout=0)
    with pytest.raises(cw.ConfigurationError):
        client.result("req_1", timeout=-5)
    assert runtime.calls == []
