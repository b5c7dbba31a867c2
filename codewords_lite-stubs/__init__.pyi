# Generated from codewords_lite.py by tools/make_stubs.py: do not edit, run it again.
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, NamedTuple, Protocol, TypeVar

import requests

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "Client",
    "CodewordsError",
    "ConfigurationError",
    "GatewayTimeout",
    "LogStream",
    "NotFoundError",
    "RateLimitError",
    "Run",
    "RunFailed",
    "RunTimeout",
    "ServerError",
    "StorageError",
]

__version__: str
logger: logging.Logger
DEFAULT_BASE_URL: str
API_KEY_ENV: str
BASE_URL_ENVS: tuple[str, str, str]
USER_AGENT: str
ONE_TIME_KEY_PREFIX: str
PROVISION_HEADER: str
OWN_HEADERS: tuple[str, str, str, str, str]
METHODS: tuple[str, str]
MAX_REDIRECTS: int
FALLBACKS: tuple[str, str, None]
QUICK_READ_TIMEOUT: float
LONG_POLL_MAX: int
LONG_POLL_MARGIN: float
HELD_POLL_MIN: float
POLL_BACKOFF: tuple[float, float]
RETRY_BACKOFF: tuple[float, float]
RETRY_AFTER_MAX: float
RECORD_SETTLE: float
CONTROL_MAX: int
OUTPUT_MAX: int
LOG_READ_TIMEOUT: float
LOG_BACKOFF: tuple[float, float]
LOG_RECONNECTS: int
LOG_NOT_FOUND_GRACE: float
LOG_GRACE: float
LOG_CALLBACK_WAIT: float
LOG_RETRY_MIN: float
LOG_LINE_MAX: int
POOL_SIZE: int
UPLOAD_BLOCK: int
UPLOAD_READ_TIMEOUT: float
PROGRESS_INTERVAL: float
JOURNAL_SETTLE: float
LogEntry = dict[str, Any]
_C = TypeVar("_C", bound="Client")

class _BinaryReadable(Protocol):
    """What upload() reads a stream through: any binary object with read() (a file, a GzipFile, response.raw)."""
    def read(self, size: int, /) -> bytes: ...

class CodewordsError(Exception):
    """Base class of every error raised by codewords_lite."""

    request_id: str | None
    def __init__(self, message: str = "", *, request_id: str | None = None) -> None: ...
    def __str__(self) -> str: ...

class ConfigurationError(CodewordsError, ValueError):
    """A missing API key, or a bad base URL, service id, path or request id."""

class APIConnectionError(CodewordsError):
    """The network failed, and the retries that were safe to make ran out."""

class APITimeoutError(APIConnectionError, TimeoutError):
    """The server took longer to connect or answer than the client allowed."""

class APIStatusError(CodewordsError):
    """The API answered with an HTTP error; ``detail`` is the server's own message."""

    status_code: int
    detail: Any
    body: Any
    def __init__(
        self,
        message: str = "",
        *,
        status_code: int = 0,
        detail: Any = None,
        body: Any = None,
        request_id: str | None = None,
    ) -> None: ...

class AuthenticationError(APIStatusError):
    """401 or 403: the key is missing, wrong, spent or not allowed to do this."""

class NotFoundError(APIStatusError):
    """404: no such service, path or request."""

class RateLimitError(APIStatusError):
    """429: too many requests; ``retry_after`` is the server's wish in seconds, if it said."""

    retry_after: float | None

class ServerError(APIStatusError):
    """5xx from the runtime, the gateway or the workflow itself."""

class GatewayTimeout(ServerError):
    """504 from the gateway on a blocking run that could not be resumed."""

class RunFailed(APIStatusError):
    """The workflow itself answered with an error (400 or more, or a redirect read from its
    record); ``record`` is the request record when one is known. The API's own refusals keep
    their classes."""

    record: dict[str, Any] | None
    def __init__(
        self,
        message: str = "",
        *,
        status_code: int = 0,
        detail: Any = None,
        body: Any = None,
        request_id: str | None = None,
        record: dict[str, Any] | None = None,
    ) -> None: ...

class StorageError(APIStatusError):
    """The storage host refused an upload's bytes (its presigned URL expired, a bad signature,
    no such bucket): not the API's refusal of the key, which is AuthenticationError."""

class RunTimeout(CodewordsError, TimeoutError):
    """A deadline passed; the run may go on, and ``client.result(request_id)`` picks it up."""

class Run:
    """A run on the server, known by its request id: wait for it or check on it."""

    request_id: str
    record: dict[str, Any] | None
    def __init__(self, client: Client, request_id: str) -> None: ...
    def __repr__(self) -> str: ...
    def wait(self, timeout: float | None = None, on_log: Callable[[LogEntry], Any] | None = None) -> Any:
        """Wait for the run to finish and return its output; raise RunFailed if it failed.

        ``on_log`` is called with each log entry as the run writes it, from another thread.
        """
    def logs(self) -> LogStream:
        """The run's log entries as they come, each once and in order, until it ends: see ``Client.logs``."""
    def done(self) -> bool:
        """Whether the run has finished, asked of the server without waiting."""

class Client:
    """A connection to the CodeWords runtime; safe to share between threads.

    The API key is read when first needed, so making a client never fails for a missing key.
    ``headers`` go with every run it sends (X-Correlation-Id, Run-As-Template: yes).
    ``pool_size`` connections to the API host are kept open for reuse (more threads than that
    calling at once open and close their own).
    With a one-time key (``cwotk-``) every call sends exactly one request, since the first
    request spends the key: no retries, no provisioned id, no fallback, no log stream, one
    poll; a call that needs more (``on_log``, ``map``) is refused before anything is sent.
    """

    base_url: str
    timeout: float
    sync_timeout: float
    connect_timeout: float
    max_retries: int
    pool_size: int
    fallback: Literal["resume", "rerun"] | None
    headers: dict[str, str]
    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float = 600.0,
        sync_timeout: float = 125.0,
        connect_timeout: float = 10.0,
        max_retries: int = 3,
        fallback: Literal["resume", "rerun"] | None = "resume",
        headers: Mapping[str, str] | None = None,
        session: requests.Session | None = None,
        pool_size: int = ...,
    ) -> None: ...
    def __repr__(self) -> str: ...
    def __getstate__(self) -> dict[str, Any]:
        """A pickle carries the settings and a key given as an argument; never a key read from
        the environment (read again where it is unpickled), nor sessions or a given session."""
    def __setstate__(self, state: dict[str, Any]) -> None: ...
    def __enter__(self: _C) -> _C: ...
    def __exit__(self, *exc_info: Any) -> None: ...
    def close(self) -> None:
        """Close the connections this client opened (not those of a session it was given); any
        later call raises RuntimeError, and so does a logs() iterator already streaming."""
    def run(
        self,
        service_id: str,
        inputs: Any = None,
        *,
        path: str = "",
        timeout: float | None = None,
        fallback: Literal["resume", "rerun"] | None = ...,
        on_log: Callable[[LogEntry], Any] | None = None,
        request_id: str | None = None,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Run a workflow, wait for it and return its output: decoded JSON, a str for text, the
        bytes of anything else (an image), None for an empty answer.

        ``inputs`` is any JSON value; with ``method="GET"``, for a workflow\'s read-only routes,
        a mapping sent as query parameters. ``headers`` go with the run, over the client\'s.

        If the gateway gives up (504) or the call outlives ``sync_timeout``, ``fallback``
        decides: "resume" waits for the same run by its provisioned id, "rerun" starts the
        inputs again with run_async (the first run may still be going: it can run twice),
        None raises GatewayTimeout or APITimeoutError. ``on_log`` is called with each log
        entry while the run goes on, from another thread. ``request_id``, from
        ``provision()``, names the run in advance, so that it can be found even if this
        process dies while it waits. A failure of the workflow itself raises RunFailed.
        """
    def start(
        self, service_id: str, inputs: Any = None, *, path: str = "", headers: Mapping[str, str] | None = None
    ) -> Run:
        """Start a workflow in the background (POST /run_async) and return its Run; ``inputs``
        and ``headers`` as for ``run()``."""
    def provision(self) -> str:
        """A new request id, for ``run(request_id=...)``: the run can then be found by it."""
    def map(
        self,
        service_id: str,
        inputs: Iterable[Any],
        *,
        max_workers: int = 8,
        ordered: bool = True,
        timeout: float | None = None,
        return_exceptions: bool = False,
        on_progress: Callable[[int, int | None], Any] | None = None,
        path: str = "",
        fallback: Literal["resume", "rerun"] | None = ...,
        headers: Mapping[str, str] | None = None,
        journal: str | os.PathLike[str] | None = None,
        key: Callable[[Any], str] | None = None,
        retry_failed: bool = False,
    ) -> Iterator[Any]:
        """Run a workflow once per item of ``inputs``, ``max_workers`` at a time, yielding outputs.

        Like ``Executor.map``, outputs come in the order of the inputs, while later ones still
        run, and inputs are read only as workers free up. ``ordered=False`` yields
        ``(index, output)`` pairs as runs finish. The first failure stops the map and is raised
        (after the outputs before it), unless ``return_exceptions`` puts it in place of its
        output. Each item is a ``run()`` with its fallback and ``timeout``; ``on_progress(done,
        total)`` is called as runs finish (total is None when ``inputs`` has no length). After
        Ctrl-C no new run is sent, and the KeyboardInterrupt names the runs that go on. Closing
        the iterator (or dropping it) stops the map too: ``contextlib.closing(client.map(...))``.

        ``journal``, a file (SQLite, created if missing), makes the batch durable: each item's
        request id is written down before its run is sent and its outcome when it comes, so that
        the same map run again after a crash or a kill -9 replays what finished, waits for what
        was sent, and sends only what never ran. An item is known by ``key(item)``, else by its
        inputs and how many equal items came before it. A failure recorded there is raised (or
        returned) again, unless ``retry_failed``. One map at a time per journal: another raises
        CodewordsError at once.
        """
    def get_run(self, request_id: str) -> Run:
        """The Run of a request id, to wait for a run started elsewhere or earlier."""
    def result(self, request_id: str, timeout: float | None = None) -> Any:
        """Wait for the run with this request id and return its output."""
    def details(self, request_id: str) -> dict[str, Any]:
        """The request record as it stands now, with timings and cost (GET /request/{id})."""
    def logs(self, request_id: str) -> LogStream:
        """Yield a run\'s log entries as it writes them, each once and in order, until it ends.

        NDJSON and server-sent events are both read; a line or event that is not a JSON object
        comes as ``{"rawText": text}``. A dropped stream is reconnected and resumes where it
        stopped; a silent one is asked about the run, and ends once the run has. Call
        ``.close()`` on the iterator to stop early. Refused with a one-time key: following a
        stream to its end may take more than one request.
        """
    def upload(
        self,
        source: str | os.PathLike[str] | bytes | bytearray | memoryview | _BinaryReadable,
        *,
        filename: str | None = None,
        content_type: str | None = None,
        on_progress: Callable[[int, int], Any] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Upload a file, bytes or a binary file object, and return its download URL.

        The bytes are streamed with a Content-Length, never read into memory whole, and go to
        the storage host with no API key. ``on_progress(sent, total)`` is called a few times a
        second; an exception raised in it stops the upload. ``timeout`` (else the client's)
        bounds the whole upload, retries included: APITimeoutError once it passes.
        """

class _Key(NamedTuple):
    """The API key of one public call, read and checked once; its repr never shows it."""

    value: str
    def __repr__(self) -> str: ...
    @property
    def once(self) -> bool:
        """A one-time key, spent by the first request that carries it: every call sends one."""
    def refuse(self, what: str) -> None:
        """ConfigurationError, before anything is sent, if this is a one-time key and ``what`` needs more."""

class LogStream:
    """An iterator over a run's log entries, each once and in order, that ``close()`` stops from any thread."""

    request_id: str
    def __init__(self, client: Client, request_id: str, key: _Key) -> None: ...
    def __iter__(self) -> LogStream: ...
    def __next__(self) -> LogEntry: ...
    def close(self) -> None:
        """Stop the stream, from any thread, in whatever it is doing: connecting, waiting for an
        answer, reading (a read blocked on the socket returns at once) or sleeping."""

EXIT_OK: int
EXIT_FAILED: int
EXIT_USAGE: int
EXIT_DEADLINE: int
EXIT_INTERRUPTED: int

def main(argv: list[str] | None = None) -> int:
    """The ``codewords-lite`` command: run workflows from shell scripts, cron jobs and CI."""
