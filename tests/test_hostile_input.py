"""Input that surprises: JSON nested 100,000 deep, FIFOs and devices as upload paths, callbacks
and file objects that raise, non-UTF-8 input files, lone surrogates, a library left to print."""

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import codewords_lite as cw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000


@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT])
@pytest.mark.parametrize(
    ("method", "path", "status", "call"),
    [
        ("POST", "/provision-request", 200, lambda c: c.provision()),
        ("POST", "/run_async/echo", 200, lambda c: c.start("echo")),
        ("POST", "/run/echo", 200, lambda c: c.run("echo", fallback=None)),
        ("GET", "/request/", 200, lambda c: c.details("req_1")),
        ("GET", "/result/", 200, lambda c: c.result("req_1")),
        ("POST", "/file", 200, lambda c: c.upload(b"x", filename="a.txt")),
        ("GET", "/request/", 500, lambda c: c.details("req_1")),
        ("GET", "/request/", 404, lambda c: c.details("req_1")),
    ],
)
def test_json_nested_100000_deep_is_a_codewords_error(runtime, client, method, path, status, call, body):
    """Regression: an answer or a record nested this deep raised RecursionError."""
    runtime.fault(method, path, status=status, body=body, times=10)
    with pytest.raises(cw.CodewordsError, match="nested too deeply"):
        call(client)


def test_a_record_nested_just_within_what_json_reads_is_a_codewords_error_or_an_output(runtime, client):
    """A record that json.loads reads but that is too deep to mask or show must not escape as RecursionError."""
    for depth in (50, 400, 900):
        body = b'{"responseStatus": 500, "responseJson": ' + b"[" * depth + b"]" * depth + b"}"
        runtime.fault("GET", "/request/", status=200, body=body)
        try:
            client.details("req_1")
        except cw.CodewordsError:
            assert depth > 50


def _fifo_with(tmp_path, data):
    path = tmp_path / "fifo"
    os.mkfifo(path)

    def write():
        with open(path, "wb") as fifo:
            fifo.write(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return path, writer


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_copied_before_anything_is_sent(runtime, client, tmp_path):
    """Regression: a FIFO path (`upload <(cmd)`, /dev/stdin) sent POST /file, then failed to seek."""
    data = os.urandom(3 << 20)
    path, writer = _fifo_with(tmp_path, data)
    url = client.upload(path)
    writer.join(10)
    (upload,) = runtime.uploads.values()
    assert upload["content"] == data and upload["filename"] == "fifo" and url.endswith("/fifo")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs procfs")
def test_files_with_no_size_are_read_whole(runtime, client):
    """A /proc file (a regular file whose size says 0) is copied first, not sent empty, as a path
    and as a file object (regression: a file object was sent empty)."""
    client.upload("/proc/self/status")
    with open("/proc/self/status", "rb") as status:
        client.upload(status, filename="status")
    assert [upload["size"] > 100 for upload in runtime.uploads.values()] == [True, True]


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero", "/dev/urandom"])
@pytest.mark.parametrize("as_file", [False, True])
def test_a_device_that_is_not_a_terminal_is_refused_before_anything_is_sent(runtime, client, device, as_file):
    """Regression: a file object on /dev/urandom seeked and said size 0, and an empty file was
    uploaded; a path to it was copied for ever. A device is no file: ValueError, nothing sent.
    (/dev/null, copied as an empty file before, is refused by the same rule.)"""
    with open(device, "rb") as opened, pytest.raises(ValueError, match=f"cannot read '{device}': it is a device"):
        client.upload(opened if as_file else device, filename="x")
    assert not runtime.uploads and not runtime.storage_calls


class _Mine(TimeoutError):
    pass


@pytest.mark.parametrize(
    "error",
    [
        _Mine("mine"),
        OSError("mine"),
        ValueError("mine"),
        KeyboardInterrupt(),
        BrokenPipeError(errno.EPIPE, "mine"),  # print() to a closed pipe
        ConnectionResetError(errno.ECONNRESET, "mine"),
    ],
)
def test_what_on_progress_raises_stops_the_upload_at_once_and_reaches_the_caller(
    runtime, client, error, quick_retries, monkeypatch
):
    """Regression: an OSError (a TimeoutError) raised in on_progress was taken for a dropped
    connection, and the PUT was sent again 3 times; a BrokenPipeError or ConnectionResetError was
    swallowed by urllib3, which then waited for the storage host's answer to a cut body."""
    monkeypatch.setattr(cw, "UPLOAD_READ_TIMEOUT", 10.0)  # how long a wait for that answer would take

    def on_progress(sent, total):
        if sent:  # while requests is sending the body
            raise error

    began = time.monotonic()
    with pytest.raises(type(error)) as info:
        client.upload(b"x" * (3 << 20), filename="a.bin", on_progress=on_progress)
    assert info.value is error
    assert time.monotonic() - began < cw.UPLOAD_READ_TIMEOUT  # it did not wait for an answer
    assert (
        len(runtime.storage_calls) <= 1 and runtime.uploads and not any("size" in u for u in runtime.uploads.values())
    )


class _FailingFile:
    """A seekable binary file object whose read fails on the second block."""

    def __init__(self):
        self.reads, self.position = 0, 0

    def seekable(self):
        return True

    def tell(self):
        return self.position

    def seek(self, offset, whence=0):
        self.position = (3 << 20) if whence == os.SEEK_END else offset
        return self.position

    def read(self, size=-1):
        self.reads += 1
        if self.reads == 2:
            raise OSError(5, "Input/output error")
        return b"x" * size


def test_a_file_object_that_fails_to_read_is_not_taken_for_the_network(runtime, client, quick_retries):
    """An OSError from the source's read() reaches the caller as is, with no retry."""
    source = _FailingFile()
    with pytest.raises(OSError, match="Input/output error") as info:
        client.upload(source, filename="a.bin")
    assert not isinstance(info.value, cw.CodewordsError)
    assert len(runtime.storage_calls) <= 1 and source.reads == 2


def test_a_file_that_shrinks_while_it_is_sent_is_an_error_not_a_hang(runtime, client, tmp_path):
    """A file cut short after its size was taken: an OSError at once, not a PUT the storage host waits on."""
    path = tmp_path / "shrinks.bin"
    path.write_bytes(b"x" * (3 << 20))

    def on_progress(sent, total):
        if sent == 0:
            os.truncate(path, 1 << 20)

    with pytest.raises(OSError, match="changed while it was sent"):
        client.upload(path, on_progress=on_progress)
    assert len(runtime.storage_calls) <= 1


def _cli(runtime, *args, stdin=None):
    env = dict(os.environ, CODEWORDS_API_KEY=runtime.api_key, CODEWORDS_BASE_URL=runtime.url)
    return subprocess.run(
        [sys.executable, "-m", "codewords_lite", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=60,
    )


def test_a_non_utf8_inputs_file_or_stdin_is_one_line_and_exit_2(runtime, tmp_path):
    """Regression: a non-UTF-8 @file printed a 15-line traceback and exited 1."""
    path = tmp_path / "in.json"
    path.write_bytes(b'{"name": "\xff\xfe"}')
    for args, stdin in [(["run", "echo", f"@{path}"], None), (["start", "echo", "-"], b'{"a": "\xff"}')]:
        result = _cli(runtime, *args, stdin=stdin)
        assert result.returncode == 2
        assert result.stderr.decode().count("\n") == 1 and "UTF-8" in result.stderr.decode()
    for argument in [b"a=\xff", b'{"a": "\xff"}']:  # not UTF-8 on the command line itself
        result = _cli(runtime, "run", "echo", *([b"-i"] if argument.startswith(b"a=") else []), argument)
        assert result.returncode == 2 and result.stderr.count(b"\n") == 1 and b"UTF-8" in result.stderr
    deep = _cli(runtime, "run", "echo", "-", stdin=b"[" * 100_000)
    field = _cli(runtime, "run", "echo", "-i", "a=" + "[" * 100_000)
    assert (deep.returncode, field.returncode) == (2, 2)
    assert deep.stderr.count(b"\n") == 1 and field.stderr.count(b"\n") == 1
    assert runtime.calls == []


def test_lone_surrogates_are_sent_as_json_escapes(runtime, client):
    """Regression: inputs with a lone surrogate, which json.dumps accepts, raised TypeError."""
    inputs = {"s": "a\ud800b", "\udfff": "é"}
    assert client.run("echo", inputs, fallback=None) == inputs
    (call,) = runtime.calls_to("POST", "/run/echo")
    assert b"\\ud800" in call["body"] and b"\\udfff" in call["body"]
    assert json.loads(call["body"]) == inputs


def test_the_command_line_prints_an_output_with_a_lone_surrogate(runtime):
    """The output of a run holding a lone surrogate is printed as JSON escapes, not a traceback."""
    result = _cli(runtime, "run", "echo", "-i", 's="\\ud800"')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"s": "\ud800"}


NO_LOGGING_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import codewords_lite as cw
    print(cw.Client(sys.argv[2], base_url=sys.argv[3], max_retries=0).run("echo", {"a": 1}))
    """
)


def test_the_library_prints_nothing_when_logging_is_not_configured(runtime):
    """Regression: a failed provision printed an unprefixed warning through Python's last-resort handler."""
    runtime.fault("POST", "/provision-request", status=404)  # not offered: a warning, and the run goes on
    result = subprocess.run(
        [sys.executable, "-c", NO_LOGGING_SCRIPT, ROOT, runtime.api_key, runtime.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "{'a': 1}\n", "")
    assert runtime.faults_applied["404"] == 1  # the provision did fail


def test_masking_the_key_works_at_any_depth(runtime):
    """Regression: the command line's masking recursed, and a record nested ~900 deep (which
    json.loads reads) printed a RecursionError traceback; the library's masking refused it."""
    deep = {"k": runtime.api_key}
    for _ in range(100_000):
        deep = [deep]
    masked = cw._masked(deep, runtime.api_key)
    for _ in range(100_000):
        masked = masked[0]
    assert masked == {"k": "***"}
    runtime.fault("GET", "/request/", status=200, body=b'{"id": "req_1", "a": ' + b"[" * 900 + b"]" * 900 + b"}")
    result = _cli(runtime, "details", "req_1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == "req_1"


def test_a_file_name_that_is_not_utf8_is_refused_before_anything_is_sent(runtime, client, tmp_path):
    """Regression: a file name of bytes that are not UTF-8 (legal on Linux) passed the check, and
    quote() then raised UnicodeEncodeError; the command line printed a traceback and exited 1."""
    with pytest.raises(ValueError, match="UTF-8"):
        client.upload(b"x", filename="r\udce9sum\udce9.csv")
    path = os.path.join(os.fsencode(tmp_path), b"r\xe9sum\xe9.csv")
    with open(path, "wb") as file:
        file.write(b"a,b\n")
    for args in ([b"upload", path], [b"upload", path, b"--filename", b"\xff.csv"]):
        result = _cli(runtime, *args)
        assert result.returncode == 2 and result.stderr.count(b"\n") == 1 and b"UTF-8" in result.stderr
    assert runtime.calls == []
