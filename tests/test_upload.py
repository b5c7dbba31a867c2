"""Uploads: byte-exact, streamed with a Content-Length, never carrying the key, retried safely."""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import requests
import responses

import codewords_lite as cw

HERE = os.path.dirname(os.path.abspath(__file__))


def uploaded(runtime, filename=None):
    """The one upload the storage host holds (of that name)."""
    (upload,) = [u for u in runtime.uploads.values() if "size" in u and filename in (None, u["filename"])]
    return upload


class Unseekable(io.RawIOBase):
    """A pipe-like source: read() only."""

    def __init__(self, data):
        self._data = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buffer):
        return self._data.readinto(buffer)


DATA = bytes(range(256)) * 5000 + b"tail"  # 1.2 MiB: more than one block


@pytest.mark.parametrize(
    "make_source, filename",
    [
        (lambda path: path, None),
        (lambda path: str(path), None),
        (lambda path: DATA, "data.bin"),
        (lambda path: bytearray(DATA), "data.bin"),
        (lambda path: memoryview(DATA), "data.bin"),
        (lambda path: open(path, "rb"), "data.bin"),
        (lambda path: io.BytesIO(DATA), "data.bin"),
        (lambda path: Unseekable(DATA), "data.bin"),
    ],
    ids=["pathlib", "str", "bytes", "bytearray", "memoryview", "file", "bytesio", "unseekable"],
)
def test_uploads_are_byte_exact(runtime, client, tmp_path, make_source, filename):
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    source = make_source(path)
    url = client.upload(source, filename=filename)
    assert url.startswith(runtime.storage_url) and url.endswith("/data.bin")
    assert requests.get(url).content == DATA
    (put,) = runtime.storage_calls
    assert put["headers"]["Content-Length"] == str(len(DATA)) and "Transfer-Encoding" not in put["headers"]


def test_a_file_object_is_sent_from_where_it_stands(runtime, client):
    source = io.BytesIO(b"header to skip|the rest")
    source.seek(15)
    client.upload(source, filename="rest.txt")
    assert uploaded(runtime)["content"] == b"the rest"


def test_an_empty_upload(runtime, client):
    client.upload(b"", filename="empty.txt")
    assert uploaded(runtime)["content"] == b"" and runtime.storage_calls[0]["headers"]["Content-Length"] == "0"


def test_the_put_carries_no_key_cookies_or_session_headers(runtime):
    session = requests.Session()
    session.headers["X-Session-Secret"] = "s3cret"
    session.cookies.set("sessionid", "c00kie")
    with cw.Client(runtime.api_key, base_url=runtime.url, session=session) as client:
        client.upload(b"abc", filename="a.txt")
    (put,) = runtime.storage_calls
    sent = repr(put).lower()
    assert "authorization" not in sent and runtime.api_key.lower() not in sent
    assert "cookie" not in sent and "s3cret" not in sent
    assert runtime.calls_to("POST", "/file")[0]["headers"]["Authorization"] == f"Bearer {runtime.api_key}"
    session.close()


@pytest.mark.parametrize(
    "filename, content_type, sent",
    [
        ("table.csv", None, "text/csv"),
        ("notes.txt", "text/markdown", "text/markdown"),
        ("blob.zzz", None, "application/octet-stream"),
    ],
)
def test_content_type_and_acl_without_upload_headers(runtime, client, filename, content_type, sent):
    client.upload(b"x", filename=filename, content_type=content_type)
    headers = runtime.storage_calls[0]["headers"]
    assert headers["Content-Type"] == sent and headers["x-amz-acl"] == "public-read"


def test_upload_headers_are_sent_as_given(runtime, client):
    runtime.upload_headers = {"Content-Type": "text/csv", "x-amz-meta-owner": "team-a"}
    client.upload(b"a,b\n", filename="t.csv")
    headers = runtime.storage_calls[0]["headers"]
    assert headers["Content-Type"] == "text/csv" and headers["x-amz-meta-owner"] == "team-a"
    assert "x-amz-acl" not in headers


def test_upload_headers_without_a_content_type_get_octet_stream(runtime, client):
    runtime.upload_headers = {"x-amz-meta-owner": "team-a"}
    client.upload(b"a,b\n", filename="t.csv")
    headers = runtime.storage_calls[0]["headers"]
    assert headers["Content-Type"] == "application/octet-stream" and "x-amz-acl" not in headers


def test_a_missing_file_or_a_directory_is_an_error_before_any_request(runtime, client, tmp_path):
    with pytest.raises(FileNotFoundError):
        client.upload(tmp_path / "nope.csv")
    with pytest.raises(IsADirectoryError):
        client.upload(tmp_path)
    assert runtime.calls == [] and runtime.storage_calls == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_an_error_before_any_request(runtime, client, tmp_path):
    path = tmp_path / "secret.csv"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(PermissionError):
        client.upload(path)
    assert runtime.calls == []


@pytest.mark.parametrize(
    "source, filename, error",
    [
        (b"x", None, ValueError),
        (io.BytesIO(b"x"), None, ValueError),
        (b"x", "", ValueError),
        (b"x", "dir/name.txt", ValueError),
        (b"x", "..", ValueError),
        (b"x", "new\nline", ValueError),
        ("text, not bytes", "a.txt", FileNotFoundError),
        (12345, "a.txt", TypeError),
        (io.StringIO("text"), "a.txt", TypeError),
    ],
)
def test_bad_upload_arguments_send_nothing(runtime, client, source, filename, error):
    with pytest.raises(error):
        client.upload(source, filename=filename)
    assert runtime.calls == [] and runtime.storage_calls == []


def test_a_refused_put_raises_with_the_storage_hosts_message(runtime, client):
    body = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
    runtime.fault("PUT", "/upload/", status=403, body=body, headers={"Content-Type": "application/xml"})
    with pytest.raises(
        cw.APIStatusError, match=r"403 Forbidden from PUT .*/upload/[0-9a-f]+: AccessDenied: Request has expired"
    ) as info:
        client.upload(b"abc", filename="a.txt")
    assert "X-Amz-Signature" not in str(info.value)  # the presigned URL's signature stays out of messages
    assert len(runtime.storage_calls) == 1


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 503}, {"drop": True}])
@pytest.mark.parametrize("kind", ["path", "file", "unseekable"])
def test_a_failed_put_is_rewound_and_retried(runtime, client, quick_retries, tmp_path, fault, kind):
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    source = {"path": path, "file": open(path, "rb"), "unseekable": Unseekable(DATA)}[kind]
    runtime.fault("PUT", "/upload/", times=2, **fault)
    client.upload(source, filename="data.bin")
    assert uploaded(runtime)["content"] == DATA
    assert len(runtime.storage_calls) == 3


def test_on_progress_reports_bytes_sent_a_few_times_a_second(runtime, client):
    reports = []
    data = os.urandom(8 << 20)
    client.upload(data, filename="big.bin", on_progress=lambda sent, total: reports.append((sent, total)))
    assert reports[0] == (0, len(data)) and reports[-1] == (len(data), len(data))
    assert reports.count((len(data), len(data))) == 1  # the end was reported twice
    assert all(total == len(data) for _, total in reports)
    assert [sent for sent, _ in reports] == sorted(sent for sent, _ in reports)
    assert len(reports) <= 5  # 8 MiB on loopback takes well under a second


def test_an_exception_in_on_progress_stops_the_upload(runtime, client):
    def cancel(sent, total):
        if sent:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.upload(os.urandom(3 << 20), filename="big.bin", on_progress=cancel)
    assert not [u for u in runtime.uploads.values() if "size" in u]


MEMORY_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import codewords_lite as cw

    def rss(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field)) // 1024

    client = cw.Client(sys.argv[3], base_url=sys.argv[4])
    client.upload(b"warm-up", filename="warm.txt")
    before = rss("VmRSS:")
    client.upload(sys.argv[2])
    print(rss("VmHWM:") - before)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_a_large_upload_is_streamed_in_little_memory(runtime, tmp_path):
    path = tmp_path / "large.bin"
    with open(path, "wb") as sparse:
        sparse.truncate(384 << 20)
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, os.path.dirname(HERE), str(path), runtime.api_key, runtime.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    growth_mib = int(result.stdout)
    print(f"peak memory growth of a 384 MiB upload: {growth_mib} MiB")
    assert growth_mib <= 16, f"peak memory grew {growth_mib} MiB for a 384 MiB upload"
    assert uploaded(runtime, "large.bin")["size"] == 384 << 20


# -- the wire, pinned --------------------------------------------------------------------------


def test_upload_wire_format():
    with responses.RequestsMock() as api:
        api.post(
            "https://runtime.example/file?filename=my%20data%20%C3%A9.csv",
            json={
                "upload_uri": "https://bucket.s3.example/k?X-Amz-Signature=abc",
                "download_uri": "https://cdn.example/k",
            },
            match=[responses.matchers.header_matcher({"Authorization": "Bearer cwk-k"})],
        )
        api.put("https://bucket.s3.example/k?X-Amz-Signature=abc", status=200)
        assert (
            cw.Client("cwk-k", base_url="https://runtime.example").upload(b"1,2", filename="my data é.csv")
            == "https://cdn.example/k"
        )
        put = api.calls[1].request
        assert "Authorization" not in put.headers and put.headers["Content-Length"] == "3"
        assert put.headers["Content-Type"] == "text/csv" and put.headers["x-amz-acl"] == "public-read"


@pytest.mark.parametrize(
    "answer",
    [
        {"upload_uri": "http://bucket.s3.example/k", "download_uri": "https://cdn.example/k"},
        {"upload_uri": "https://bucket.s3.example/k"},
        {"upload_uri": "https://bucket.s3.example/k", "download_uri": "d", "upload_headers": ["x"]},
        ["not", "an", "object"],
    ],
)
def test_a_bad_answer_to_post_file_sends_no_put(answer):
    with responses.RequestsMock() as api:
        api.post("https://runtime.example/file", json=answer)
        with pytest.raises(cw.APIStatusError, match="expected an https upload_uri"):
            cw.Client("cwk-k", base_url="https://runtime.example").upload(b"1", filename="a.csv")
        assert len(api.calls) == 1
