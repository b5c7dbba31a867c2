# codewords-lite, MIT licence: https://opensource.org/licenses/MIT
"""A small synchronous client for the CodeWords runtime API, built on requests alone.

    >>> import codewords_lite as cw
    >>> with cw.Client() as client:                  # the key comes from $CODEWORDS_API_KEY
    ...     output = client.run("my-service", {"name": "Ada"})
    ...     run = client.start("slow-service", {"rows": 10_000})
    ...     output = run.wait(timeout=1800, on_log=print)
    ...     url = client.upload("data.csv")         # a download URL to pass as an input

A blocking run that outlives the gateway (HTTP 504 after about 120 s) is resumed, not run
twice: ``run()`` provisions a request id first and, on a 504, waits for that same run.

Every failure of the service or the network is a ``CodewordsError``; bad arguments raise
``TypeError``, ``ValueError`` or ``OSError`` (for a file) before anything is sent::

    CodewordsError
    ├── ConfigurationError(CodewordsError, ValueError)    missing key, bad URL, service id or path
    ├── APIConnectionError                                the network failed and retries ran out
    │   └── APITimeoutError(APIConnectionError, TimeoutError)
    ├── APIStatusError                                    .status_code .detail .body .request_id
    │   ├── AuthenticationError                           401, 403: the API refused the key
    │   ├── NotFoundError                                 404 from the API: no such service or run
    │   ├── RateLimitError                                429 from the API, .retry_after
    │   ├── ServerError                                   5xx from the API or the gateway
    │   │   └── GatewayTimeout                            504 that could not be resumed
    │   ├── RunFailed                                     the workflow's own error answer; .record
    │   └── StorageError                                  the storage host refused an upload's bytes
    └── RunTimeout(CodewordsError, TimeoutError)          a deadline passed; .request_id
"""

from __future__ import annotations  # annotations stay unevaluated: a cheaper import

import collections.abc
import contextlib
import datetime
import email.utils
import heapq
import http.client
import io
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import os
import random
import re
import shutil
import socket
import ssl
import stat
import tempfile
import threading
import time
import weakref
import zlib
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    Counter,
    Deque,
    Dict,
    FrozenSet,
    Generator,
    Iterable,
    Iterator,
    List,
    Literal,
    Mapping,
    NamedTuple,
    Optional,
    Protocol,
    Set,
    Tuple,
    TypeVar,
    Union,
)
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

import requests
import urllib3

if TYPE_CHECKING:
    from concurrent.futures import Future

__version__ = "0.1.0"
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

logger = logging.getLogger("codewords_lite")
logger.addHandler(logging.NullHandler())  # a library prints nothing unless its user configures logging

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

DEFAULT_BASE_URL = "https://runtime.codewords.ai"
API_KEY_ENV = "CODEWORDS_API_KEY"
BASE_URL_ENVS = ("CODEWORDS_BASE_URL", "CODEWORDS_RUNTIME_URI", "RUNTIME_URI")  # first set wins
USER_AGENT = "codewords-lite/" + __version__

ONE_TIME_KEY_PREFIX = "cwotk-"  # such a key is spent by the first request that carries it
PROVISION_HEADER = "X-Provisioned-Request-Id"
OWN_HEADERS = ("Authorization", PROVISION_HEADER, "Content-Length", "Host", "Transfer-Encoding")  # not yours to set
METHODS = ("POST", "GET")  # of a blocking run; a background run is always POST
MAX_REDIRECTS = 5  # same-origin redirects followed in a row
FALLBACKS = ("resume", "rerun", None)

QUICK_READ_TIMEOUT = 30.0  # read timeout of the calls that answer at once
LONG_POLL_MAX = 110  # seconds the server may hold one GET /result (the gateway cuts at ~120)
LONG_POLL_MARGIN = 5.0  # how much longer than that the client waits for the answer
HELD_POLL_MIN = 0.5  # a "not yet" faster than this means the server does not hold polls
POLL_BACKOFF = (0.25, 5.0)  # first and longest sleep between polls of such a server
RETRY_BACKOFF = (0.5, 8.0)  # first and longest sleep between retries, before jitter
RETRY_AFTER_MAX = 60.0  # the longest Retry-After honoured
RECORD_SETTLE = 1.0  # a record that says its run never started is believed when it says so again this much later
CONTROL_MAX = 1 << 20  # the largest answer read of a provision, an upload URL or an error: they are small
OUTPUT_MAX = 100 << 20  # the largest output (or record holding one) read of a run

LOG_READ_TIMEOUT = 60.0  # a log stream with no entry this long: ask whether the run has ended
LOG_BACKOFF = (0.5, 5.0)  # first and longest sleep before reconnecting a dropped log stream
LOG_RECONNECTS = 10  # drops in a row, with no entry between them, before giving up
LOG_NOT_FOUND_GRACE = 5.0  # seconds a just-started run's logs may answer 404 before we ask about the run
LOG_GRACE = 2.0  # how long a finished run's log stream may take to reach its end
LOG_CALLBACK_WAIT = 0.5  # how long an on_log call under way is waited for after Ctrl-C or an error
LOG_RETRY_MIN = 0.2  # the shortest reconnect delay of a log stream, whatever its SSE retry: says
LOG_LINE_MAX = 16 << 20  # a longer log line is not a log line: the stream is refused
POOL_SIZE = 100  # connections kept open to the API host (Client's pool_size); calls beyond it open their own

UPLOAD_BLOCK = 1 << 20  # bytes read from the source per write to the socket
UPLOAD_READ_TIMEOUT = 120.0  # for the storage host's answer to a PUT
PROGRESS_INTERVAL = 0.25  # seconds between two on_progress calls

JOURNAL_SETTLE = 10.0  # a journaled run the dead process sent is believed never to arrive this long after its commit

LogEntry = Dict[str, Any]
_C = TypeVar("_C", bound="Client")  # a subclass of Client keeps its type in a with block


class _BinaryReadable(Protocol):
    """What upload() reads a stream through: any binary object with read() (a file, a GzipFile, response.raw)."""

    def read(self, size: int, /) -> bytes: ...


# ---------------------------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------------------------


class CodewordsError(Exception):
    """Base class of every error raised by codewords_lite."""

    def __init__(self, message: str = "", *, request_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.request_id = request_id

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigurationError(CodewordsError, ValueError):
    """A missing API key, or a bad base URL, service id, path or request id."""


class APIConnectionError(CodewordsError):
    """The network failed, and the retries that were safe to make ran out."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """The server took longer to connect or answer than the client allowed."""


class APIStatusError(CodewordsError):
    """The API answered with an HTTP error; ``detail`` is the server's own message."""

    def __init__(
        self,
        message: str = "",
        *,
        status_code: int = 0,
        detail: Any = None,
        body: Any = None,
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.status_code = status_code
        self.detail = detail
        self.body = body


class AuthenticationError(APIStatusError):
    """401 or 403: the key is missing, wrong, spent or not allowed to do this."""


class NotFoundError(APIStatusError):
    """404: no such service, path or request."""


class RateLimitError(APIStatusError):
    """429: too many requests; ``retry_after`` is the server's wish in seconds, if it said."""

    retry_after: Optional[float] = None


class ServerError(APIStatusError):
    """5xx from the runtime, the gateway or the workflow itself."""


class GatewayTimeout(ServerError):
    """504 from the gateway on a blocking run that could not be resumed."""


class RunFailed(APIStatusError):
    """The workflow itself answered with an error (400 or more, or a redirect read from its
    record); ``record`` is the request record when one is known. The API's own refusals keep
    their classes."""

    def __init__(
        self,
        message: str = "",
        *,
        status_code: int = 0,
        detail: Any = None,
        body: Any = None,
        request_id: Optional[str] = None,
        record: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(message, status_code=status_code, detail=detail, body=body, request_id=request_id)
        self.record = record


class StorageError(APIStatusError):
    """The storage host refused an upload's bytes (its presigned URL expired, a bad signature,
    no such bucket): not the API's refusal of the key, which is AuthenticationError."""


class RunTimeout(CodewordsError, TimeoutError):
    """A deadline passed; the run may go on, and ``client.result(request_id)`` picks it up."""


# ---------------------------------------------------------------------------------------------
# The run handle
# ---------------------------------------------------------------------------------------------


class Run:
    """A run on the server, known by its request id: wait for it or check on it."""

    def __init__(self, client: Client, request_id: str) -> None:
        self.request_id = request_id
        self.record: Optional[Dict[str, Any]] = None  # the request record, once finished
        self._client = client

    def __repr__(self) -> str:
        state = "done" if self.record is not None else "not known to be done"
        return f"<Run {self.request_id} {state}>"

    def wait(self, timeout: Optional[float] = None, on_log: Optional[Callable[[LogEntry], Any]] = None) -> Any:
        """Wait for the run to finish and return its output; raise RunFailed if it failed.

        ``on_log`` is called with each log entry as the run writes it, from another thread.
        """
        if self.record is None:
            deadline = self._client._deadline(timeout)
            self.record = _wait(self._client, self._client._key(), self.request_id, deadline, on_log)
        return _output(self.record, self.request_id)

    def logs(self) -> LogStream:
        """The run's log entries as they come, each once and in order, until it ends: see ``Client.logs``."""
        return self._client.logs(self.request_id)

    def done(self) -> bool:
        """Whether the run has finished, asked of the server without waiting."""
        if self.record is None:
            record = self._client.details(self.request_id)
            if _finished(record):
                self.record = record
        return self.record is not None


# ---------------------------------------------------------------------------------------------
# The client: its public methods, which check their arguments and hand the work to the sections below
# ---------------------------------------------------------------------------------------------


class _ClientDefault:
    """Stands for "the client's own setting" in keyword defaults, and says so in ``help()``."""

    def __repr__(self) -> str:
        return "<the client's setting>"


_CLIENT_DEFAULT: Any = _ClientDefault()
_SETTINGS = "base_url timeout sync_timeout connect_timeout max_retries fallback headers pool_size".split()  # pickled


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

    def __init__(
        self,
        api_key: Optional[str] = None,
        *,
        base_url: Optional[str] = None,
        timeout: float = 600.0,
        sync_timeout: float = 125.0,
        connect_timeout: float = 10.0,
        max_retries: int = 3,
        fallback: Optional[Literal["resume", "rerun"]] = "resume",
        headers: Optional[Mapping[str, str]] = None,
        session: Optional[requests.Session] = None,
        pool_size: int = POOL_SIZE,
    ) -> None:
        if base_url is None:
            base_url = next((os.environ[n] for n in BASE_URL_ENVS if os.environ.get(n)), None)
        self.base_url = _check_base_url(base_url or DEFAULT_BASE_URL)
        self.timeout = _check_seconds("timeout", timeout)
        self.sync_timeout = _check_seconds("sync_timeout", sync_timeout)
        self.connect_timeout = _check_seconds("connect_timeout", connect_timeout)
        self.max_retries = _check_count("max_retries", max_retries, 0)
        self.pool_size = _check_count("pool_size", pool_size, 1)
        self.fallback: Optional[Literal["resume", "rerun"]] = _check_fallback(fallback)
        self.headers = _check_headers(headers)  # sent with every run, under those of the call
        self._api_key = api_key
        self._given_session = session
        self._transport = _Transport(self.base_url, session, self.pool_size)
        self._ids = _Reserve(1)  # request ids ahead of need
        self._gate = _RateGate()
        self._closed = False
        self._streams: weakref.WeakSet[LogStream] = weakref.WeakSet()  # live logs(), stopped by close()
        self._streams_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<codewords_lite.Client {self.base_url}>"

    def __getstate__(self) -> Dict[str, Any]:
        """A pickle carries the settings and a key given as an argument; never a key read from
        the environment (read again where it is unpickled), nor sessions or a given session."""
        return {"api_key": self._api_key, **{name: getattr(self, name) for name in _SETTINGS}}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __enter__(self: _C) -> _C:
        self._check_open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections this client opened (not those of a session it was given); any
        later call raises RuntimeError, and so does a logs() iterator already streaming."""
        self._closed = True
        if not self._transport.is_ours():
            return  # a child after fork(): what is open is the parent's (its streams' sockets too)
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.close()
        self._transport.close()

    # -- running workflows ------------------------------------------------------------------

    def run(
        self,
        service_id: str,
        inputs: Any = None,
        *,
        path: str = "",
        timeout: Optional[float] = None,
        fallback: Optional[Literal["resume", "rerun"]] = _CLIENT_DEFAULT,
        on_log: Optional[Callable[[LogEntry], Any]] = None,
        request_id: Optional[str] = None,
        method: str = "POST",
        headers: Optional[Mapping[str, str]] = None,
    ) -> Any:
        """Run a workflow, wait for it and return its output: decoded JSON, a str for text, the
        bytes of anything else (an image), None for an empty answer.

        ``inputs`` is any JSON value; with ``method="GET"``, for a workflow's read-only routes,
        a mapping sent as query parameters. ``headers`` go with the run, over the client's.

        If the gateway gives up (504) or the call outlives ``sync_timeout``, ``fallback``
        decides: "resume" waits for the same run by its provisioned id, "rerun" starts the
        inputs again with run_async (the first run may still be going: it can run twice),
        None raises GatewayTimeout or APITimeoutError. ``on_log`` is called with each log
        entry while the run goes on, from another thread. ``request_id``, from
        ``provision()``, names the run in advance, so that it can be found even if this
        process dies while it waits. A failure of the workflow itself raises RunFailed.
        """
        plan = self._plan(service_id, path, method, headers, fallback, on_log).given(inputs)
        deadline = self._deadline(timeout)
        if request_id is not None:
            _check_name("request id", request_id)
        return _run(self, plan, deadline, request_id)

    def start(
        self, service_id: str, inputs: Any = None, *, path: str = "", headers: Optional[Mapping[str, str]] = None
    ) -> Run:
        """Start a workflow in the background (POST /run_async) and return its Run; ``inputs``
        and ``headers`` as for ``run()``."""
        url_path, run_headers = _service_path(_START_RUN, service_id, path), self._run_headers(headers)
        request = _Request(_START_RUN, url_path, self._key(), self._deadline(None), _encode_inputs(inputs), run_headers)
        return Run(self, _request_id_in(self._send(request)))

    def provision(self) -> str:
        """A new request id, for ``run(request_id=...)``: the run can then be found by it."""
        answer = self._send(_Request(_PROVISION, _PROVISION.path, self._key(), self._deadline(None)))
        return _request_id_in(answer)

    def map(
        self,
        service_id: str,
        inputs: Iterable[Any],
        *,
        max_workers: int = 8,
        ordered: bool = True,
        timeout: Optional[float] = None,
        return_exceptions: bool = False,
        on_progress: Optional[Callable[[int, Optional[int]], Any]] = None,
        path: str = "",
        fallback: Optional[Literal["resume", "rerun"]] = _CLIENT_DEFAULT,
        headers: Optional[Mapping[str, str]] = None,
        journal: Optional[Union[str, os.PathLike[str]]] = None,
        key: Optional[Callable[[Any], str]] = None,
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
        plan = self._plan(service_id, path, "POST", headers, fallback, None)  # bad names fail here, not per item
        plan.key.refuse("map sends a request an item")
        _check_count("max_workers", max_workers, 1)
        seconds = self.timeout if timeout is None else _check_seconds("timeout", timeout)
        total = len(inputs) if isinstance(inputs, collections.abc.Sized) else None
        book = _Journal.open(journal, plan, key, retry_failed, total) if journal is not None else None
        if book is None and (key is not None or retry_failed):
            raise ConfigurationError("key= and retry_failed= are a journal's: pass journal= too")
        mapper = _Mapper(self, plan, seconds, max_workers, return_exceptions, book)
        outputs = mapper.outputs(inputs, ordered, on_progress, total)
        if book is None:
            return outputs
        journaled = _Journaled(outputs, book)
        weakref.finalize(journaled, book.close)  # dropped before its first item: its lock is let go at once
        return journaled

    def get_run(self, request_id: str) -> Run:
        """The Run of a request id, to wait for a run started elsewhere or earlier."""
        return Run(self, _check_name("request id", request_id))

    def result(self, request_id: str, timeout: Optional[float] = None) -> Any:
        """Wait for the run with this request id and return its output."""
        try:
            return self.get_run(request_id).wait(timeout)
        except RunTimeout as exc:  # the id may name no run yet: a provisioned one waits the same
            exc.args = (f'{exc}; if no run was sent with this id, client.details("{request_id}") has no startedAt',)
            raise

    def details(self, request_id: str) -> Dict[str, Any]:
        """The request record as it stands now, with timings and cost (GET /request/{id})."""
        request_id = _check_name("request id", request_id)
        return _record(self, self._key(), request_id, self._deadline(None))

    def logs(self, request_id: str) -> LogStream:
        """Yield a run's log entries as it writes them, each once and in order, until it ends.

        NDJSON and server-sent events are both read; a line or event that is not a JSON object
        comes as ``{"rawText": text}``. A dropped stream is reconnected and resumes where it
        stopped; a silent one is asked about the run, and ends once the run has. Call
        ``.close()`` on the iterator to stop early. Refused with a one-time key: following a
        stream to its end may take more than one request.
        """
        request_id = _check_name("request id", request_id)
        key = self._key()
        key.refuse("logs() may reconnect and ask whether the run has ended")
        return LogStream(self, request_id, key)

    # -- files ------------------------------------------------------------------------------

    def upload(
        self,
        source: Union[str, os.PathLike[str], bytes, bytearray, memoryview, _BinaryReadable],
        *,
        filename: Optional[str] = None,
        content_type: Optional[str] = None,
        on_progress: Optional[Callable[[int, int], Any]] = None,
        timeout: Optional[float] = None,
    ) -> str:
        """Upload a file, bytes or a binary file object, and return its download URL.

        The bytes are streamed with a Content-Length, never read into memory whole, and go to
        the storage host with no API key. ``on_progress(sent, total)`` is called a few times a
        second; an exception raised in it stops the upload. ``timeout`` (else the client's)
        bounds the whole upload, retries included: APITimeoutError once it passes.
        """
        _check_source(source)
        deadline, key = self._deadline(timeout), self._key()
        self._check_open()  # all is checked before a pipe is read to its end
        if filename is None and isinstance(source, (str, os.PathLike)):
            filename = os.path.basename(os.fspath(source))
        filename = _check_filename(filename)
        with _upload_source(source) as (body, start, size):
            upload_uri, download_uri, headers = _upload_urls(self, key, filename, content_type, deadline)
            _put(self, upload_uri, _UploadBody(body, start, size, on_progress), headers, deadline)
        return download_uri

    # -- what the sections below use --------------------------------------------------------

    def _plan(
        self,
        service_id: str,
        path: str,
        method: str,
        headers: Optional[Mapping[str, str]],
        fallback: Optional[str],
        on_log: Optional[Callable[[LogEntry], Any]],
    ) -> _RunPlan:
        """Check a run's arguments and decide, before anything is sent, what it will send. A
        one-time key allows one request: no fallback, no log stream; what needs more is refused."""
        method, run_headers = _check_method(method), self._run_headers(headers)
        url_path = _service_path(_RUN_POST, service_id, path)
        chosen = self.fallback if fallback is _CLIENT_DEFAULT else _check_fallback(fallback)
        key = self._key()
        if key.once:
            if on_log is not None:
                key.refuse("on_log streams logs")
            if fallback is not _CLIENT_DEFAULT and fallback is not None:
                key.refuse(f"fallback={fallback!r} sends a second request")
            chosen = None
        elif method == "GET" and chosen == "rerun":
            raise ConfigurationError("fallback='rerun' starts the run again with run_async, which takes POST only")
        return _RunPlan(service_id, path, method, url_path, None, run_headers, key, chosen, on_log)

    def _send(self, request: _Request, attempts: Optional[_Attempts] = None) -> _Answer:
        """Send an API call as the call table says: see _Sender.send."""
        return _Sender(self, request, attempts).send()

    def _run_headers(self, headers: Optional[Mapping[str, str]]) -> Dict[str, str]:
        """A run's own headers: any type of answer accepted, then the client's, then the call's."""
        merged = requests.structures.CaseInsensitiveDict({"Accept": "*/*"})
        merged.update(_check_headers(self.headers))  # checked again: the attribute can be changed
        merged.update(_check_headers(headers))
        return dict(merged)

    def _key(self) -> _Key:
        """The API key, read and checked once per public call (from the environment if not given)."""
        key = self._api_key or os.environ.get(API_KEY_ENV)
        if not key:
            raise ConfigurationError(f"no API key: pass Client(api_key=...) or set ${API_KEY_ENV}")
        if not re.match(_KEY, key):
            raise ConfigurationError("the API key has spaces or control characters in it")
        return _Key(key)

    def _deadline(self, timeout: Optional[float]) -> float:
        seconds = self.timeout if timeout is None else _check_seconds("timeout", timeout)
        return time.monotonic() + seconds

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this codewords_lite.Client is closed: make a new one")


# ---------------------------------------------------------------------------------------------
# Checks: bad input is refused here, before anything is sent
# ---------------------------------------------------------------------------------------------

# Patterns are kept as text: re compiles each on its first use and caches it, so that importing the
# module compiles none.
_NAME = r"[A-Za-z0-9_.\-]+\Z"
_PATH_SAFE = "!$&'()*+,;=:@"  # kept as they are in a path segment (RFC 3986 pchar); all else is encoded
_KEY = r"[\x21-\x7e]+\Z"
_HEADER_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z"  # an RFC 9110 token
# A header value HTTP carries as it is: Latin-1, no control characters, no space at its ends.
_HEADER_VALUE = r"([!-~\x80-\xff]([ -~\x80-\xff]*[!-~\x80-\xff])?)?\Z"
_ONE_REQUEST = "{}, and a one-time key allows one request"


class _Key(NamedTuple):
    """The API key of one public call, read and checked once; its repr never shows it."""

    value: str

    def __repr__(self) -> str:
        return "<API key ***>"

    @property
    def once(self) -> bool:
        """A one-time key, spent by the first request that carries it: every call sends one."""
        return self.value.startswith(ONE_TIME_KEY_PREFIX)

    def refuse(self, what: str) -> None:
        """ConfigurationError, before anything is sent, if this is a one-time key and ``what`` needs more."""
        if self.once:
            raise ConfigurationError(_ONE_REQUEST.format(what))


def _check_base_url(url: str) -> str:
    """The base URL without a trailing slash: https, or http to a loopback host."""
    parts = urlsplit(url)
    try:
        host, _ = parts.hostname or "", parts.port  # the port raises ValueError when it is not a number
    except ValueError:
        raise ConfigurationError(f"bad base URL {url!r}: its port is not a number") from None
    if not host or parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigurationError(f"bad base URL {url!r}: want https://host[:port][/path]")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigurationError(f"bad base URL {url!r}: plain http is allowed only to localhost")
    if parts.scheme not in ("https", "http"):
        raise ConfigurationError(f"bad base URL {url!r}: want https://")
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigurationError(f"{name} must be a number of seconds above 0, not {value!r}")
    return float(value)


def _check_count(name: str, value: Any, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigurationError(f"{name} must be a whole number >= {least}, not {value!r}")
    return value


def _check_fallback(fallback: Any) -> Optional[Literal["resume", "rerun"]]:
    if fallback not in FALLBACKS:
        raise ConfigurationError(f"fallback must be 'resume', 'rerun' or None, not {fallback!r}")
    return fallback  # type: ignore[no-any-return]


def _check_name(what: str, name: Any) -> str:
    """A service id or request id: letters, digits, '_', '-' and '.'."""
    if not isinstance(name, str) or not re.match(_NAME, name) or name in (".", ".."):
        raise ConfigurationError(f"bad {what} {name!r}: use letters, digits, '_', '-' and '.'")
    return name


def _service_path(call: _Call, service_id: str, path: str) -> str:
    """The path of a run's call (``/run/{service_id}[/{path}]``, or run_async): a checked service
    id, and each segment of the path percent-encoded, so that any characters arrive as given
    (``a b``, ``items:batch``)."""
    checked, segments = _check_name("service id", service_id), ""
    if not isinstance(path, str):
        raise ConfigurationError(f"bad path {path!r}: want a string such as 'reports/daily'")
    if path.strip("/"):
        for segment in path.strip("/").split("/"):
            if segment in ("", ".", ".."):
                raise ConfigurationError(f"bad path {path!r}: a segment is empty, '.' or '..'")
            try:
                segments += "/" + quote(segment, safe=_PATH_SAFE)
            except UnicodeEncodeError:
                raise ConfigurationError(f"bad path {path!r}: it is not valid Unicode") from None
    return call.at(service_id=checked, path=segments)


def _check_headers(headers: Any) -> Dict[str, str]:
    """Headers of the caller's own (X-Correlation-Id, Run-As-Template): strings that HTTP can
    carry, and none of those the client sets itself."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ConfigurationError(f"headers must be a mapping of names to values, not {type(headers).__name__}")
    owned = {name.lower() for name in OWN_HEADERS}
    for name, value in headers.items():
        if not isinstance(name, str) or not re.match(_HEADER_NAME, name):
            raise ConfigurationError(f"bad header name {name!r}")
        if name.lower() in owned:
            raise ConfigurationError(f"the {name} header is the client's own: it cannot be set")
        if not isinstance(value, str) or not re.match(_HEADER_VALUE, value):
            raise ConfigurationError(
                f"bad value for the {name} header: want Latin-1 text with no control characters or outer spaces"
            )
    return dict(headers)


def _check_method(method: Any) -> str:
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise ConfigurationError(f"method must be 'POST' or 'GET', not {method!r}")
    return method.upper()


def _query_of(inputs: Any) -> str:
    """The inputs of a GET as a query string: a mapping of names to strings, numbers or booleans
    (or lists of them, for a repeated parameter); a None value leaves its name out."""
    if inputs is None:
        return ""
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs of a GET become query parameters: want a mapping, not {type(inputs).__name__}")
    pairs = []
    for name, value in inputs.items():
        if not isinstance(name, str):
            raise TypeError(f"query parameter names must be strings, not {name!r}")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None:
                try:
                    pairs.append(quote(name, safe="") + "=" + quote(_query_text(name, item), safe=""))
                except UnicodeEncodeError:
                    raise TypeError(f"query parameter {name!r} is not valid Unicode") from None
    return "?" + "&".join(pairs) if pairs else ""


def _query_text(name: str, item: Any) -> str:
    """A query parameter's value as JSON would send it, not a subclass's own str() (an Enum's name)."""
    if isinstance(item, bool):
        return "true" if item else "false"  # as FastAPI and JSON spell them
    if isinstance(item, str):
        return str.__str__(item)
    if isinstance(item, int):
        return int.__repr__(item)
    if isinstance(item, float) and math.isfinite(item):
        return float.__repr__(item)
    raise TypeError(f"query parameter {name!r} must be a string, number or boolean, not {item!r}")


def _encode_inputs(inputs: Any) -> bytes:
    """The request body: the inputs, any JSON value, as compact UTF-8 JSON (``{}`` for None)."""
    if inputs is None:
        return b"{}"
    try:
        return _json_text(inputs, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"inputs are not JSON-serialisable: {exc}") from exc


def _json_text(value: Any, **layout: Any) -> str:
    """JSON that UTF-8 can encode: non-ASCII as is, unless a lone surrogate (which UTF-8 has no
    bytes for) forces every non-ASCII character into a \\u escape."""
    text = json.dumps(value, ensure_ascii=False, **layout)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **layout)
    return text


# ---------------------------------------------------------------------------------------------
# The request path: the call table, the policy, the send, the transport, the watchdog
# ---------------------------------------------------------------------------------------------
#
# Every request the client makes is a row of the call table. _judge reads an answer or a failure
# against its row and says what comes next; _Sender.send is the one loop that sends, follows,
# asks and sends again; _Transport is the one way bytes leave; the watchdog is the one way a call
# blocked on its socket is stopped. "Will this be sent again?" is answered by the row and _judge.

# What a failure of a call may mean once it has left (a row's `starts`):
_NOTHING = "nothing"  # it starts no run: whatever may pass may be sent again
_RUN = "a run"  # POST /run: sent again only once its record shows that the run never started
_START = "a run, once answered"  # POST /run_async: its 429 and 503 come before the run; nothing else is sent again
# Which redirects a call follows (a row's `redirects`), at most MAX_REDIRECTS in a row:
_ORIGIN = "to the API's own scheme, host and port"
_NONE = "none"
_SAFE = frozenset({429, 500, 502, 503, 504})  # refusals and gateway failures that pass, for calls that start nothing
_BEFORE_RUN = frozenset({429, 503})  # what the gateway answers before a run starts
_STORAGE_RETRIES = frozenset({429, *range(500, 600)})


class _Call(NamedTuple):
    """A row of the call table: one endpoint of the API, and what its failures mean."""

    method: str
    path: str  # filled in with str.format; for the storage host, the whole URL
    starts: str  # _NOTHING, _RUN or _START: what a failure after it left may mean
    resend: FrozenSet[int]  # error statuses that may be sent again (a run's: once its record shows it never started)
    not_yet: FrozenSet[int] = frozenset()  # statuses that mean "not yet": an answer, not an error
    unsent: bool = True  # a call that never left (no connection was made) may be sent again
    retries: bool = True  # sent again up to max_retries times; False: once, its caller counts (a log stream)
    read: str = "quick"  # its read timeout: "quick", "run" (the client's sync_timeout) or "upload"
    stream: bool = False  # a 2xx answer is read as it comes, not whole
    redirects: str = _ORIGIN
    host: str = "api"  # or "storage": a presigned URL, sent no key
    held: bool = True  # waits out the pause of the client's threads after a 429
    holds_output: bool = False  # its answer may hold a run's output: read up to OUTPUT_MAX, not CONTROL_MAX

    def at(self, **names: str) -> str:
        return self.path.format(**names)


# The call table: every request the client makes is one of these.
_PROVISION = _Call("POST", "/provision-request", _NOTHING, _SAFE)
_PROVISION_FOR_RUN = _PROVISION._replace(unsent=False)  # a host that cannot be reached would not take the run
_RUN_POST = _Call("POST", "/run/{service_id}{path}", _RUN, _BEFORE_RUN, read="run", holds_output=True)
_RUN_GET = _RUN_POST._replace(method="GET")  # a workflow's read-only route
_START_RUN = _Call("POST", "/run_async/{service_id}{path}", _START, _BEFORE_RUN)
_RESULT = _Call(
    "GET", "/result/{request_id}?timeout={hold}", _NOTHING, _SAFE - {504}, frozenset({408, 504}), holds_output=True
)
_RECORD = _Call("GET", "/request/{request_id}", _NOTHING, _SAFE, holds_output=True)
_RECORD_OF_REFUSED = _RECORD._replace(held=False)  # a run refused by a 429: did it start? (not held by its pause)
_LOGS = _Call("GET", "/logs/{request_id}{query}", _NOTHING, _SAFE, retries=False, stream=True)
_FILE = _Call("POST", "/file?filename={filename}", _NOTHING, _SAFE)
_PUT = _Call("PUT", "{url}", _NOTHING, _STORAGE_RETRIES, read="upload", redirects=_NONE, host="storage")


class _Request(NamedTuple):
    """One call about to be sent: its row of the call table, and all it carries."""

    call: _Call
    path: str  # the row's path filled in
    key: Optional[_Key]  # None for the storage host, which never sees it
    deadline: float
    body: Any = None  # bytes, or an _UploadBody
    headers: Mapping[str, str] = {}  # its own, over those of every call
    request_id: Optional[str] = None  # the run it concerns: named in errors, asked about after an unclear answer
    read_timeout: Optional[float] = None  # else its row's
    admit: Optional[Callable[[], None]] = None  # called before each send, and may refuse it (a stopped map)
    stop: Optional[_Stop] = None  # lets another thread stop it (LogStream.close)

    def describe(self) -> str:
        return f"{self.call.method} {_without_query(self.path)}"


class _Answer(NamedTuple):
    """An answer as it came: its status and headers, and its whole body, or for a stream, its open response."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes
    url: str
    key: str  # the key its request carried, masked wherever the answer is read: a server may echo it
    response: Optional[requests.Response] = None  # a 2xx stream, its body unread
    watch: Optional[_Watch] = None  # the stream's, which close() fires

    def __repr__(self) -> str:  # never the key, nor headers or a body that may echo it
        return f"<answer {self.status} of {len(self.body)} bytes>"


class _Failure(NamedTuple):
    """An exchange that brought no answer: what happened to it, in words without the key."""

    kind: str  # one of the kinds below
    text: str
    timeout: bool = False  # it timed out (connecting or reading)


# What happened to an exchange that brought no answer (a _Failure's kind):
_LATE = "late"  # the deadline passed before it was sent
_UNSENT = "unsent"  # no connection could be made: nothing left
_LOST = "lost"  # the connection failed after the request left: dropped, reset, cut short
_TIMEOUT = "timeout"  # no answer within the read timeout
_DEADLINE = "deadline"  # the deadline passed while it was under way: the watchdog cut it
_UNTRUSTED = "untrusted"  # the server's TLS certificate was refused: it will be refused again
_STOPPED = "stopped"  # another thread stopped it
# What _judge says comes next:
_DONE, _FOLLOW, _RESEND, _ASK, _CUT, _RAISE = "done", "follow", "resend", "ask", "cut", "raise"


class _Verdict(NamedTuple):
    """What _judge says of an answer or a failure: what comes next, and what it needs."""

    step: str
    error: Any = None  # the error to raise, if it comes to that
    target: Optional[str] = None  # where a redirect leads
    retry_after: Optional[float] = None  # the server's wish, before the call is sent again
    resend: bool = False  # _ASK: sent again if its record shows the run never started
    settle: bool = False  # _ASK: "never started" is believed only when a second look says so too


def _judge(request: _Request, outcome: Union[_Answer, _Failure], follows: int) -> _Verdict:
    """What an answer or a failure of a call means.

    _RESEND sends it again, as its attempts allow. _ASK asks the record of its run whether it had
    started: if it had, its record holds its answer; if not, it is sent again only for a status
    in its row's resend, or a connection lost on the way. _CUT says that a run's answer was lost
    and its fallback decides. A one-time key allows one request: nothing is followed, asked or
    sent again.
    """
    call, once = request.call, request.key is not None and request.key.once
    if isinstance(outcome, _Failure):
        step = _judge_failure(request, outcome)
        return _Verdict(step, _failure_error(request, outcome), resend=step == _ASK, settle=step == _ASK)
    if 200 <= outcome.status < 300 or outcome.status in call.not_yet:
        return _Verdict(_DONE)
    target, why = _redirect_target(call, outcome, once or follows >= MAX_REDIRECTS)
    if target is not None:
        return _Verdict(_FOLLOW, target=target)
    error = _status_error(request, outcome, why)
    if isinstance(error, RunFailed) or once:
        return _Verdict(_RAISE, error)
    if call.starts == _RUN:
        if outcome.status == 504:
            return _Verdict(_CUT, error)
        resend = outcome.status in call.resend
        settle = resend or outcome.status >= 500  # a server's error: the run may go on behind it
        return _Verdict(_ASK if request.request_id else _RAISE, error, None, _retry_after(outcome), resend, settle)
    return _Verdict(_RESEND if outcome.status in call.resend else _RAISE, error, None, _retry_after(outcome))


def _judge_failure(request: _Request, failure: _Failure) -> str:
    """What comes after an exchange that brought no answer (see _judge)."""
    call, once = request.call, request.key is not None and request.key.once
    if failure.kind == _UNSENT:
        return _RESEND if call.unsent and not once else _RAISE
    if call.starts == _RUN and failure.kind in (_TIMEOUT, _DEADLINE):
        return _CUT  # it was sent, and may go on
    if call.starts == _RUN and failure.kind == _LOST:
        return _ASK if request.request_id and not once else _RAISE  # it may have reached the workflow
    if call.starts == _NOTHING and failure.kind in (_LOST, _TIMEOUT) and not once:
        return _RESEND
    return _RAISE


class _Attempts:
    """How many more times a call may be sent, and the pause before each: the one backoff
    formula, or the server's Retry-After in its place. urllib3's Retry, as a counter that a
    caller may keep across calls (a log stream counts its reconnects in one)."""

    def __init__(self, retries: float, backoff: Tuple[float, float], stop: Optional[_Stop] = None) -> None:
        self.retries, self.made, self.backoff, self._stop = retries, 0, backoff, stop
        self.out_of_time = False  # a try was refused because the deadline would come first

    def pause(self, retry_after: Optional[float] = None) -> float:
        """Seconds to wait before the next try: doubling from the first pause to the longest, with jitter."""
        if retry_after is not None:
            return retry_after
        first, longest = self.backoff
        return min(first * 2.0 ** min(self.made, 32), longest) * random.uniform(0.5, 1.0)

    def spend(self, wait: float, deadline: float = math.inf, sleep: bool = True) -> bool:
        """Count one more try and wait for it; False if none is left, or the deadline would come first."""
        if self.made >= self.retries:
            return False
        if time.monotonic() + wait >= deadline:
            self.out_of_time = True
            return False
        self.made += 1
        if sleep:
            _sleep(wait, self._stop)
        return True


class _Sender:
    """Sends one call: the one loop that sends it, follows its redirects, asks about its run and
    sends it again, each as _judge says."""

    def __init__(self, client: Client, request: _Request, attempts: Optional[_Attempts] = None) -> None:
        self.client, self.request = client, request
        retries = client.max_retries if request.call.retries else 0
        self.attempts = attempts or _Attempts(retries, RETRY_BACKOFF, request.stop)
        self.url = request.path if request.call.host == "storage" else client.base_url + request.path

    def send(self) -> _Answer:
        follows = 0
        while True:
            outcome = self._exchange()
            verdict = _judge(self.request, outcome, follows)
            if verdict.step == _DONE and isinstance(outcome, _Answer):
                return outcome
            if verdict.step == _CUT:
                raise _Unanswered(verdict.error)
            if verdict.step == _ASK and self._may_resend_run(verdict):
                continue
            if verdict.step == _FOLLOW and verdict.target:
                self.url, follows = verdict.target, follows + 1
                logger.debug("%s redirected to %s", self.request.describe(), verdict.target)
                continue
            if verdict.step == _RESEND and self._again(verdict.error, verdict.retry_after):
                continue
            raise verdict.error

    def _exchange(self) -> Union[_Answer, _Failure]:
        """The request sent once and its answer read, within the rate gate and the deadline."""
        request, client = self.request, self.client
        client._check_open()
        is_run = request.call.starts != _NOTHING
        if not client._gate.enter(request.deadline, is_run, request.stop, request.call.held):
            return _Failure(_LATE, "the deadline passed", timeout=True)
        answered = False
        try:
            timeouts = _timeouts(request.deadline, client.connect_timeout, self._read_timeout())
            if timeouts is None:
                return _Failure(_LATE, "the deadline passed", timeout=True)
            if request.admit is not None:
                request.admit()
            if isinstance(request.body, _UploadBody):
                request.body.rewind()  # for a PUT sent again, from its start
            outcome = client._transport.exchange(request, self.url, timeouts)
            answered = isinstance(outcome, _Answer) and outcome.status != 429  # let through: the limit grows
            if isinstance(outcome, _Answer) and outcome.status == 429:  # every thread waits, in enter()
                client._gate.slow_down(self.attempts.pause(_retry_after(outcome)), is_run)
            return outcome
        finally:
            client._gate.leave(is_run, answered)

    def _read_timeout(self) -> float:
        if self.request.read_timeout is not None:
            return self.request.read_timeout
        return {"run": self.client.sync_timeout, "upload": UPLOAD_READ_TIMEOUT}.get(
            self.request.call.read, QUICK_READ_TIMEOUT
        )

    def _again(self, error: CodewordsError, retry_after: Optional[float]) -> bool:
        """Whether to send the call again, after the pause; a 429 pauses every thread of the client."""
        wait = self.attempts.pause(retry_after)
        rate_limited = isinstance(error, RateLimitError)  # the rate gate waits it out (see _exchange)
        if not self.attempts.spend(wait, self.request.deadline, sleep=not rate_limited):
            return False
        retries = self.attempts.retries
        logger.info("%s failed (%s); retry %d of %d", self.request.describe(), error, self.attempts.made, retries)
        return True

    def _may_resend_run(self, verdict: _Verdict) -> bool:
        """After an answer to POST /run that is not the workflow's own, or its connection lost on
        the way: whether to send it again. A record that shows the run started holds its answer
        (raised as _Unanswered, for the run to wait for). "Never started" is believed when the
        record says it twice, RECORD_SETTLE apart (a record may lag its run), where the verdict
        settles: then what it lets be sent again (a 429 or 503 of the gateway, a lost connection)
        is sent again under the same id, as the attempts allow; anything else is raised as it is."""
        error, deadline = verdict.error, self.request.deadline
        self._raise_if_started(error)
        if not verdict.settle:
            return False
        resend = verdict.resend and self.attempts.made < self.attempts.retries
        wait = max(RECORD_SETTLE, self.attempts.pause(verdict.retry_after)) if resend else RECORD_SETTLE
        if time.monotonic() + wait >= deadline or (resend and not self.attempts.spend(wait, deadline, sleep=False)):
            return False  # no time for a second look
        _sleep(wait, self.request.stop)
        self._raise_if_started(error)
        if resend:
            logger.info("%s did not start (%s); sent again", self.request.describe(), error)
        return resend

    def _raise_if_started(self, error: CodewordsError) -> None:
        """_Unanswered with the record if it shows the run started; the error as it is if the record cannot be read."""
        request_id = self.request.request_id
        assert request_id is not None  # _judge asks only about a run with an id
        try:
            path, key, deadline = _RECORD.at(request_id=request_id), self.request.key, self.request.deadline
            question = _Request(_RECORD_OF_REFUSED, path, key, deadline, stop=self.request.stop)
            record = _record_in(self.client._send(question), request_id)
        except CodewordsError:
            raise error from None
        if _started(record):
            raise _Unanswered(error, record)


class _Unanswered(Exception):
    """POST /run left and got no answer of the workflow's: a 504 or a read timeout (no record:
    the fallback decides), or an error answer or a lost connection whose record shows the run
    started (the run's answer is its record's). Raised by _Sender, caught by _send_run, never seen by a caller."""

    def __init__(self, error: CodewordsError, record: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(str(error))
        self.error, self.record = error, record


def _record(
    client: Client, key: _Key, request_id: str, deadline: float, stop: Optional[_Stop] = None
) -> Dict[str, Any]:
    """The request record as it stands now (GET /request/{id})."""
    request = _Request(_RECORD, _RECORD.at(request_id=request_id), key, deadline, request_id=request_id, stop=stop)
    return _record_in(client._send(request), request_id)


def _timeouts(deadline: float, connect: float, read: float) -> Optional[Tuple[float, float]]:
    """The (connect, read) timeouts of a call, cut to what is left before its deadline; None if
    it has passed."""
    left = deadline - time.monotonic()
    return None if left < _TIMEOUT_MIN else (min(connect, left), min(read, left))


def _passed(deadline: float) -> bool:
    """Whether a deadline has passed, or is too close for one more request (see _timeouts)."""
    return deadline - time.monotonic() < _TIMEOUT_MIN


_TIMEOUT_MIN = 0.001  # a deadline closer than this has passed: requests refuses a timeout of 0


class _Stopped(Exception):
    """Raised in a call whose _Stop has been set (a log stream after close()): it ends at once."""


class _Stop:
    """Lets another thread stop calls: their pauses end, and the sockets of those under way are
    shut (LogStream.close; a map's runs, once it has stopped)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._watches: Set[_Watch] = set()  # of the calls under way
        self._lock = threading.Lock()

    def set(self) -> None:
        self._event.set()
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            _WATCHDOG.fire(watch)

    def is_set(self) -> bool:
        return self._event.is_set()

    def hold(self, watch: _Watch) -> None:
        """The watch of a call under way, fired by set(): at once if it has been set already."""
        with self._lock:
            self._watches.add(watch)
        if self._event.is_set():
            _WATCHDOG.fire(watch)

    def let_go(self, watch: _Watch) -> None:
        """The call is over: its connection may serve another."""
        with self._lock:
            self._watches.discard(watch)

    def wait(self, seconds: float) -> None:
        """Sleep, unless stopped first: _Stopped."""
        if self._event.wait(max(0.0, seconds)):
            raise _Stopped


def _sleep(seconds: float, stop: Optional[_Stop] = None) -> None:
    if stop is not None:
        stop.wait(seconds)
    elif seconds > 0:
        time.sleep(seconds)


# -- the transport ---------------------------------------------------------------------------


class _Transport:
    """The one way bytes leave: through the client's own pool of connections, which the watchdog
    watches, or through a session given to the client; chosen once, when the client is made. The
    storage host is reached through the pool in either case, with no key, cookie or credential.
    A child process after fork() opens connections of its own."""

    def __init__(self, base_url: str, session: Optional[requests.Session], pool_size: int) -> None:
        self._session, self._pool_size = session, pool_size
        self._pool = _WatchedAdapter(pool_maxsize=pool_size)
        self._pid = os.getpid()
        # Proxies and the CA bundle come from the environment once, not on every call.
        self._proxies = requests.utils.get_environ_proxies(base_url)
        self._verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True

    def is_ours(self) -> bool:
        """False in a child process after fork(): what is open belongs to the parent."""
        return self._pid == os.getpid()

    def close(self) -> None:
        self._pool.close()

    def exchange(self, request: _Request, url: str, timeouts: Tuple[float, float]) -> Union[_Answer, _Failure]:
        """Send the request once and read its answer (a stream's headers only), by its deadline."""
        watched = self._session is None or request.call.host == "storage"
        watch = _WATCHDOG.watch(request.deadline) if watched else None
        if request.stop is not None and watch is not None:
            request.stop.hold(watch)
        kept = False
        try:
            response = self._open(request, url, timeouts)
            answer = _read(response, request, watch)
            kept = answer.response is not None
            return answer
        except _SourceFailed as exc:
            raise exc.error from None  # the caller's source or on_progress: raised as it was, no retry
        except _EXCHANGE_FAILURES as exc:
            return _failure_of(exc, request, url, watch)
        finally:
            if watch is not None and not kept:
                _release(watch, request.stop)
            elif watch is not None:
                _WATCHDOG.lift(watch)  # a stream may last longer than any deadline; close() still fires it

    def _open(self, request: _Request, url: str, timeouts: Tuple[float, float]) -> requests.Response:
        """The answer's headers, its body left to read."""
        call, headers = request.call, self._headers(request)
        if call.host == "api" and self._session is not None:
            return self._session.request(
                call.method,
                url,
                data=request.body,
                headers=headers,
                timeout=timeouts,
                allow_redirects=False,
                stream=True,
                auth=_BearerAuth(headers["Authorization"]),  # or ~/.netrc and session.auth would replace the key
                verify=self._session.verify,  # or $REQUESTS_CA_BUNDLE would win over the session's own
            )
        prepared = requests.PreparedRequest()
        prepared.prepare(method=call.method, url=url, headers=headers, data=request.body)
        proxies, verify = (self._proxies, self._verify) if call.host == "api" else self._storage_network(url)
        return self._connections().send(prepared, stream=True, timeout=timeouts, verify=verify, proxies=proxies)

    def _headers(self, request: _Request) -> Dict[str, str]:
        """The headers of a request: every API call's, with the key, then its own; to the storage
        host, only its own."""
        if request.key is None:
            return {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip, deflate", **request.headers}
        return {
            "Authorization": "Bearer " + request.key.value,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",  # what _Decoder reads, whatever requests or a session would ask for
            "User-Agent": USER_AGENT,
            **request.headers,
        }

    def _storage_network(self, url: str) -> Tuple[Mapping[str, str], Any]:
        """Proxies and CA bundle for the storage host: a given session's (and the environment's,
        if it trusts it), else the environment's."""
        if self._session is not None:
            network = self._session.merge_environment_settings(url, {}, None, self._session.verify, None)
            return network["proxies"], network["verify"]
        return requests.utils.get_environ_proxies(url), self._verify

    def _connections(self) -> _WatchedAdapter:
        """The pool. A child process after fork() gets a new one: sharing the parent's sockets
        would mix the two processes' answers (the child's copies are dropped)."""
        if not self.is_ours():
            self._pool, self._pid = _WatchedAdapter(pool_maxsize=self._pool_size), os.getpid()
        return self._pool


def _release(watch: _Watch, stop: Optional[_Stop]) -> None:
    """A call is over: the watchdog, and its stop if it has one, let go of it."""
    _WATCHDOG.release(watch)
    if stop is not None:
        stop.let_go(watch)


class _BearerAuth(requests.auth.AuthBase):
    """The Authorization header of an API call, as requests' ``auth=``: given so, it keeps a
    session from putting its own ``auth`` or ``~/.netrc`` credentials in the key's place."""

    def __init__(self, value: str) -> None:
        self._value = value

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._value
        return request


# What an exchange may raise when the network or the server fails it (anything else is a bug, and raised).
_EXCHANGE_FAILURES = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


def _failure_of(exc: BaseException, request: _Request, url: str, watch: Optional[_Watch]) -> _Failure:
    """What happened to an exchange that raised, told by what the exception is (never by the
    exceptions that were being handled when it was raised), in words without the key."""
    if request.stop is not None and request.stop.is_set():
        return _Failure(_STOPPED, "stopped")
    if watch is not None and watch.cut:
        return _Failure(_DEADLINE, "the deadline passed before the whole answer came", timeout=True)
    text = _foreign_text(exc, request.key)
    timed_out = isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout))
    unverified = _unverified(exc)
    if unverified is not None:  # it can never pass: not sent again
        host = urlsplit(url).hostname
        return _Failure(
            _UNTRUSTED,
            f"the TLS certificate of {host} could not be verified ({unverified}): for a private CA, give"
            " its bundle in $REQUESTS_CA_BUNDLE, or in session.verify with Client(session=...)",
        )
    if _nothing_sent(exc):  # in words, not urllib3's pool and connection objects
        return _Failure(_UNSENT, f"could not connect to {_origin_of(url)}: {_unreachable(text)}", timed_out)
    return _Failure(_TIMEOUT if timed_out else _LOST, text, timed_out)


def _failure_error(request: _Request, failure: _Failure) -> Exception:
    """The error of an exchange that brought no answer."""
    if failure.kind == _STOPPED:
        return _Stopped()
    cls = APITimeoutError if failure.timeout else APIConnectionError
    what = ": " if failure.kind == _LATE else " failed: "
    return cls(f"{request.describe()}{what}{failure.text}", request_id=request.request_id)


def _unverified(exc: BaseException) -> Optional[str]:
    """Why a certificate was refused (a wrong CA, a host name it does not name), if that is what
    failed: found in the exceptions that requests and urllib3 wrap around ssl's."""
    todo: List[BaseException] = [exc]
    for _ in range(16):  # requests' error wraps urllib3's, which wraps ssl's: a few levels at most
        if not todo:
            break
        found = todo.pop()
        if isinstance(found, ssl.SSLCertVerificationError):
            return str(found.verify_message or found.reason or found)
        todo += [e for e in (getattr(found, "reason", None), *found.args) if isinstance(e, BaseException)]
    return None


def _nothing_sent(exc: BaseException) -> bool:
    """Whether a failure happened before the request left: no connection could be made (refused,
    timed out, or its host name not resolved), as requests and urllib3 build such a failure."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    failure = exc.args[0] if isinstance(exc, requests.ConnectionError) and exc.args else exc
    reason = getattr(failure, "reason", failure)  # urllib3's MaxRetryError wraps it
    return isinstance(reason, urllib3.exceptions.NewConnectionError)  # NameResolutionError is one too


def _foreign_text(exc: BaseException, key: Optional[_Key]) -> str:
    """The text of an exception from requests, urllib3 or http.client, with its type and the key
    masked (a server may echo the key in a status line or a chunk size, which they quote)."""
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, requests.RequestException) else str(exc)
    return text.replace(key.value, "***") if key is not None else text


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the server"


def _unreachable(text: str) -> str:
    """Why no connection could be made, in the words of requests' text of it without the pool and
    connection objects around them ("Failed to establish a new connection: [Errno 111] ...")."""
    reason = re.search(r"Failed to .*?(?=[\"']\)\)?\Z|\Z)", text)
    return reason.group(0) if reason else "timed out" if "timed out" in text else text


def _redirect_target(call: _Call, answer: _Answer, spent: bool) -> Tuple[Optional[str], str]:
    """Where a redirect may be followed, or None and why not: only as its row allows, and to the
    API's own scheme, host and port, so that the key never travels (nor in the URL itself); 307
    and 308 keep the method and body, 301, 302 and 303 are followed for a GET only (a POST would
    become a GET without its inputs). A run follows only a redirect that adds or drops a trailing
    slash, as a web framework answers before any route runs: any other may be the workflow's own
    answer, given after its work. ``spent``: a one-time key, or MAX_REDIRECTS followed already."""
    status, location = answer.status, answer.headers.get("Location", "")
    if not 300 <= status < 400:
        return None, ""
    if status not in (301, 302, 303, 307, 308) or not location:
        return None, "it says nowhere to go"
    if call.redirects == _NONE:
        return None, "this call follows no redirect"
    if status in (301, 302, 303) and call.method != "GET":
        return None, f"a {status} would turn the {call.method} into a GET without its body"
    try:
        target = urljoin(answer.url, location.strip())
    except ValueError:  # an unclosed "[" of an IPv6 address, say
        return None, "its Location is not a URL"
    why = _why_not_to(call, answer, target)
    if why or spent:
        once = answer.key.startswith(ONE_TIME_KEY_PREFIX)
        return None, why or (
            "a one-time key is spent by the first request" if once else f"more than {MAX_REDIRECTS} redirects in a row"
        )
    api, parts = urlsplit(answer.url), urlsplit(target)
    return urlunsplit((api.scheme, api.netloc, parts.path, parts.query, "")), ""  # the API's spelling, no fragment


def _why_not_to(call: _Call, answer: _Answer, target: str) -> str:
    """Why a redirect may not lead to this URL, or "" if it may."""
    if _origin(target) is None or _origin(target) != _origin(answer.url):
        return "it leaves the API's scheme, host and port, and the key must not"
    if answer.key and answer.key in unquote(target):
        return "its URL holds the API key"
    if call.starts == _RUN and _slashless(target) != _slashless(answer.url):
        return "a run follows only a redirect that adds or drops a trailing slash"
    return ""


def _slashless(url: str) -> Tuple[str, str]:
    parts = urlsplit(url)
    return parts.path.rstrip("/"), parts.query


def _origin(url: str) -> Optional[Tuple[str, str, int]]:
    """Scheme, host and port of a URL (the port its scheme's default if none); None if it has a
    user or password, which requests would send as credentials in place of the key."""
    parts = urlsplit(url)
    try:
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme, 0)
    except ValueError:
        return None
    if parts.username is not None or parts.password is not None or not parts.hostname:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port


def _without_query(url: str) -> str:
    """A URL or path without its query, which for a presigned URL holds the signature."""
    return url.split("?", 1)[0]


def _retry_after(answer: _Answer) -> Optional[float]:
    """The Retry-After header in seconds (a number or an HTTP date), capped at a minute."""
    value = answer.headers.get("Retry-After", "").strip()
    if not value:
        return None
    seconds: float
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:
                when = when.replace(tzinfo=datetime.timezone.utc)
            seconds = when.timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError, AttributeError):
            return None  # not a date either
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


# -- the rate gate ---------------------------------------------------------------------------


class _RateGate:
    """What a client's threads share after a 429: a pause, and a limit on runs in flight.

    When the server says "too many", every thread waits until its Retry-After has passed, and
    the number of runs in flight is halved; each run let through raises the limit again, by a
    quarter of a run per run allowed (AIMD, as TCP does; TCP adds a whole one, but a run holds
    its slot for far longer than a round trip, so probing for more costs more). Without the
    halving, all threads would fire together after every pause.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._pause_until = 0.0
        self._limit: Optional[float] = None  # runs allowed in flight; None until the first 429
        self._in_flight = 0

    def enter(self, deadline: float, is_run: bool, stop: Optional[_Stop] = None, held: bool = True) -> bool:
        """Wait until a call may be sent; False if the deadline came first, _Stopped if its stop
        did (see wake). ``held``: it waits out a pause."""
        if not is_run:
            pause = self._pause_until - time.monotonic() if held else 0.0
            if pause > 0:
                _sleep(min(pause, deadline - time.monotonic()), stop)
            return not _passed(deadline)
        with self._changed:
            while True:
                now = time.monotonic()
                if stop is not None and stop.is_set():
                    raise _Stopped
                if now >= deadline:
                    return False
                if now < self._pause_until:
                    self._changed.wait(min(self._pause_until, deadline) - now)
                elif self._limit is not None and self._in_flight >= self._limit:
                    self._changed.wait(deadline - now)
                else:
                    break
            self._in_flight += 1
            return True

    def leave(self, is_run: bool, succeeded: bool) -> None:
        if is_run:
            with self._changed:
                self._in_flight -= 1
                if succeeded and self._limit is not None:
                    self._limit += 0.25 / self._limit
                self._changed.notify_all()

    def wake(self) -> None:
        """Let the runs waiting here look again whether they have been stopped (a map that stopped)."""
        with self._changed:
            self._changed.notify_all()

    def slow_down(self, seconds: float, is_run: bool) -> None:
        """A 429, while its call is still counted in flight: pause every thread, and halve the
        runs in flight, once per pause."""
        with self._changed:
            now = time.monotonic()
            if is_run and now >= self._pause_until:
                self._limit = max(1.0, self._in_flight / 2)
            self._pause_until = max(self._pause_until, now + seconds)
            logger.info("rate limited: every thread waits %.2f s, then at most %s runs in flight", seconds, self._limit)


# -- the watchdog and the connections it watches ------------------------------------------------


class _Watch:
    """One call under the watchdog: its deadline, and the connection it has taken from its pool."""

    __slots__ = ("connection", "cut", "deadline", "fired", "live", "wake")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.connection: Any = None
        self.fired = False  # its deadline passed, or it was stopped: its sockets are shut
        self.cut = False  # a socket of it has been shut: whatever it read since is cut
        self.live = True  # on the watchdog's heap
        self.wake: Optional[threading.Event] = None  # set when it fires: a name lookup waits on it

    def __lt__(self, other: _Watch) -> bool:
        return self.deadline < other.deadline


class _Watchdog:
    """Stops calls blocked on their sockets. It shuts the socket of a call whose deadline has
    passed, so that a deadline bounds the whole answer (requests' read timeout bounds each read,
    and a server that trickles its answer a byte at a time would hold a call for ever); and
    LogStream.close() has it shut a stream's socket the same way. Once a call is fired, a socket
    it opens later is shut as soon as it exists. One thread for every client, asleep until the
    earliest deadline watched."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._heap: List[_Watch] = []
        self._live = 0
        self._thread: Optional[threading.Thread] = None
        self._current = threading.local()  # the watch of the call this thread is making

    def watch(self, deadline: float) -> _Watch:
        watch = _Watch(deadline)
        with self._changed:
            heapq.heappush(self._heap, watch)
            self._live += 1
            if self._heap[0] is watch:  # the thread sleeps until a later deadline: wake it
                if self._thread is None:
                    self._thread = threading.Thread(target=self._guard, name="codewords-deadlines", daemon=True)
                    self._thread.start()
                self._changed.notify()
        self._current.watch = watch
        return watch

    def current(self) -> Optional[_Watch]:
        return getattr(self._current, "watch", None)

    def attach(self, connection: Any) -> Any:
        """Note the connection that this thread's call has just taken from its pool."""
        watch = self.current()
        if watch is not None:
            with self._changed:
                watch.connection, connection.watch = connection, watch
                if watch.fired:
                    self._shut(watch)
        return connection

    def detach(self, connection: Any) -> Any:
        """Note that a call gives its connection back to its pool: from now on the watchdog does
        not shut it, as another call may take it (the lock makes the two exclusive)."""
        with self._changed:
            watch = getattr(connection, "watch", None)
            if watch is not None and watch.connection is connection:
                watch.connection = None
            connection.watch = None
        return connection

    def fire(self, watch: _Watch) -> None:
        """Shut the call's socket now, or as soon as it has one."""
        with self._changed:
            self._fire(watch)

    def wait(self, watch: Optional[_Watch], done: threading.Event) -> None:
        """Wait for ``done``, but not past the watch's deadline, nor once it is fired."""
        if watch is None:
            done.wait()
            return
        with self._changed:
            if watch.fired:
                return
            watch.wake = done
        done.wait(max(0.0, watch.deadline - time.monotonic()))

    def lift(self, watch: _Watch) -> None:
        """Take a stream off the deadline once its answer has begun; fire() still stops it."""
        self._current.watch = None
        with self._changed:
            if watch.live:
                watch.live = False
                self._live -= 1

    def release(self, watch: _Watch) -> None:
        self.lift(watch)
        with self._changed:
            watch.connection = None
            if len(self._heap) > 2 * self._live + 64:  # drop the finished calls now and then
                self._heap = [w for w in self._heap if w.live]
                heapq.heapify(self._heap)

    def forget_after_fork(self) -> None:
        """The thread does not survive a fork: a child starts afresh."""
        self.__init__()  # type: ignore[misc]

    def _fire(self, watch: _Watch) -> None:
        """Under the lock: the watch fired, its socket shut, and a name lookup waiting on it woken."""
        watch.fired = True
        self._shut(watch)
        if watch.wake is not None:
            watch.wake.set()

    def _shut(self, watch: _Watch) -> None:
        """Under the lock: shut the socket the call's connection uses, if it has one."""
        sock = watch.connection.socket_in_use() if watch.connection is not None else None
        if sock is not None:
            watch.cut = True
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # a blocked recv() returns at once
            except OSError:
                pass  # already closed

    def _guard(self) -> None:
        with self._changed:
            while True:
                while self._heap and not self._heap[0].live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._changed.wait()
                    continue
                left = self._heap[0].deadline - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                self._fire(heapq.heappop(self._heap))


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WATCHDOG.forget_after_fork)


class _FinalResponse(http.client.HTTPResponse):
    """http.client's answer, but an interim answer (102 Processing, 103 Early Hints: any 1xx but
    101) is skipped, as RFC 9110 says, not taken for the answer; http.client skips only 100."""

    def _read_status(self) -> Tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 100 < status < 200 or status == 101:
                return version, status, reason
            while self.fp.readline(_HEAD_LINE_MAX + 1).strip():
                pass  # its headers


_HEAD_LINE_MAX = 65536  # as http.client bounds a line of the head


class _WatchedConnection(urllib3.connection.HTTPConnection):
    """A connection whose socket the watchdog can shut at any step: while its name is looked up
    (by the deadline, on a thread of its own), while it connects, while its answer comes, and
    after http.client has let go of it to hand it to an answer whose body ends with the connection."""

    response_class = _FinalResponse
    watch: Optional[_Watch] = None
    _held: Any = None  # the socket being connected, or handed over to an answer's body

    def socket_in_use(self) -> Any:
        return self.sock or self._held

    def close(self) -> None:
        self._held = self.sock
        super().close()

    def _new_conn(self) -> socket.socket:
        """A connected socket, as urllib3 makes it, but known to the watchdog before it connects."""
        watch, self._held = _WATCHDOG.current(), None
        host = self._dns_host.strip("[]")
        try:
            addresses = _resolve(host, self.port, watch)
            error: Optional[OSError] = None
            for family, kind, proto, _, address in addresses:
                sock = socket.socket(family, kind, proto)
                try:
                    self._prepare(sock)
                    sock.connect(address)
                    return sock
                except OSError as exc:
                    error = exc
                    sock.close()
            raise error or OSError(f"no address found for {host}")
        except socket.timeout as exc:
            raise urllib3.exceptions.ConnectTimeoutError(self, f"Connection to {self.host} timed out: {exc}") from exc
        except OSError as exc:
            raise urllib3.exceptions.NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc

    def _prepare(self, sock: socket.socket) -> None:
        """Set a new socket up as urllib3 would, and hand it to the watchdog (shut at once if fired)."""
        for option in self.socket_options or ():
            sock.setsockopt(*option)
        if isinstance(self.timeout, (int, float)):
            sock.settimeout(self.timeout)
        if self.source_address:
            sock.bind(self.source_address)
        with _WATCHDOG._changed:
            self._held = sock
            if self.watch is not None and self.watch.fired:
                raise socket.timeout("the call was stopped before it connected")


def _resolve(host: str, port: int, watch: Optional[_Watch]) -> List[Any]:
    """getaddrinfo by the call's deadline: a name is looked up on a thread of its own, so that a
    resolver that stalls cannot hold the call past it (an IP address needs no lookup)."""
    family = urllib3.util.connection.allowed_gai_family()
    try:
        ipaddress.ip_address(host)
        return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except ValueError:
        pass
    found: List[Any] = []
    done = threading.Event()

    def look_up() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)
        finally:
            done.set()

    threading.Thread(target=look_up, name="codewords-resolve", daemon=True).start()
    _WATCHDOG.wait(watch, done)
    if not found:
        raise socket.timeout(f"looking up {host} outlived the deadline")
    if isinstance(found[0], OSError):
        raise found[0]
    return found[0]  # type: ignore[no-any-return]


class _WatchedHTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _WatchedPool(urllib3.HTTPConnectionPool):
    """A pool that tells the watchdog which connection a call takes, and when it gives it back."""

    ConnectionCls = _WatchedConnection

    def _get_conn(self, timeout: Optional[float] = None) -> Any:
        return _WATCHDOG.attach(super()._get_conn(timeout))

    def _put_conn(self, conn: Any) -> None:
        super()._put_conn(_WATCHDOG.detach(conn) if conn is not None else conn)


class _WatchedHTTPSPool(_WatchedPool, urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, with pools that tell the watchdog which connection a call uses."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


_WATCHED_POOLS = {"http": _WatchedPool, "https": _WatchedHTTPSPool}
# -- answers: whole or not, decoded, and the errors made of them -------------------------------

_BLOCK = 64 << 10  # the most bytes read from a socket, or decoded from a block, at once
_OUTPUT_FIELDS = ("responseStatus", "responseJson", "responseContent")  # a finished record has one
_STATUS_TEXT = r"\s*([0-9]{3})(?:\.0*)?\s*\Z"
_LENGTH = r"[0-9]{1,18}\Z"  # a Content-Length: ASCII digits, fewer than 2**63 (urllib3 ignores any other)
_CHARSET = r"""(?i)charset\s*=\s*["']?([^"';\s]+)"""
_XML_CODE = r"(?s)<Code>(.*?)</Code>"
_XML_MESSAGE = r"(?s)<Message>(.*?)</Message>"
_STATUS_ERRORS = {
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    429: RateLimitError,
    504: GatewayTimeout,
}


class _Cut(requests.ConnectionError):
    """An answer that did not come whole: shorter than its Content-Length, an encoded body that
    stopped before its end, or one cut by the watchdog. Never taken for the answer."""


def _read(response: requests.Response, request: _Request, watch: Optional[_Watch]) -> _Answer:
    """The answer to a request, its body read whole and decoded (a 2xx stream's left open, to be
    read as it comes). An answer cut short, or by the watchdog, raises: it is never an answer."""
    key = request.key.value if request.key is not None else ""
    status, reason = response.status_code, _masked(response.reason or "", key)
    if status < 200:  # through a session's adapter, which takes an interim answer for the answer
        response.close()
        raise _Cut(f"an interim answer ({status}) came, and no final one")
    if request.call.stream and status < 300:
        return _Answer(status, reason, response.headers, b"", response.url, key, response, watch)
    limit = OUTPUT_MAX if request.call.holds_output else CONTROL_MAX
    try:
        body = _whole_body(response, CONTROL_MAX if status >= 300 else limit, key, cut=status >= 300)
    except _Unreadable as exc:
        raise APIStatusError(
            f"{status} from {request.describe()}: {exc}", status_code=status, request_id=request.request_id
        ) from None
    except _TooLarge as exc:
        raise APIStatusError(
            f"{status} from {request.describe()}: the answer is larger than {_size(exc.limit)}, which no answer"
            f" of {'a run' if limit == OUTPUT_MAX else 'the API'} should be",
            status_code=status,
            request_id=request.request_id,
        ) from None
    finally:
        response.close()
    if watch is not None and watch.cut:
        raise _Cut("the deadline passed before the whole answer came")
    return _Answer(status, reason, response.headers, body, response.url, key)


def _size(count: int) -> str:
    """A size in bytes as people say it: 16 MiB, 64 KiB, 1000 bytes."""
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift} {unit}"
    return f"{count} bytes"


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def _whole_body(response: requests.Response, limit: int, secret: str, cut: bool = False) -> bytes:
    """An answer's whole body, decoded from its Content-Encoding: _Cut if it is shorter than its
    Content-Length or its encoding did not end; beyond ``limit`` bytes, _TooLarge, or with
    ``cut`` its first ``limit`` bytes (an error's detail needs no more), the secret masked first."""
    room = limit + len(secret) if cut else limit  # a secret across the cut is read whole, to be masked
    if not callable(getattr(response.raw, "stream", None)):  # a session's own adapter, not urllib3's
        content = response.content
        return _cut_masked(content, limit, secret) if cut and len(content) > room else content
    decoder = _Decoder(response.headers.get("Content-Encoding", ""), secret)
    pieces: List[bytes] = []
    size = received = 0
    for block in response.raw.stream(_BLOCK, decode_content=False):
        received += len(block)
        for piece in decoder.feed(block):
            size += len(piece)
            pieces.append(piece)
            if size > room:
                if cut:
                    return _cut_masked(b"".join(pieces), limit, secret)
                raise _TooLarge(limit)
    _check_length(response, received)
    pieces.append(decoder.end())
    return b"".join(pieces)


def _cut_masked(content: bytes, limit: int, secret: str) -> bytes:
    """The first ``limit`` bytes of a body with the secret masked, and no start of it left at the cut."""
    if not secret:
        return content[:limit]
    mark = secret.encode()
    cut = content.replace(mark, b"***")[:limit]
    for length in range(len(mark) - 1, 0, -1):
        if cut.endswith(mark[:length]):
            return cut[:-length]
    return cut


def _check_length(response: requests.Response, received: int) -> None:
    """_Cut if a body ended short of its Content-Length (urllib3 before 2.0 lets it through)."""
    declared = response.headers.get("Content-Length", "").strip()
    if re.match(_LENGTH, declared) and received < int(declared):
        raise _Cut(f"the connection closed after {received} of {declared} bytes of the answer")


class _Decoder:
    """Undoes a body's Content-Encoding as its blocks come: gzip and deflate, which the client
    asks for; any other is refused, and an encoded body must reach its end."""

    def __init__(self, encoding: str, secret: str = "") -> None:
        self.encoding = encoding.strip().lower()
        self._raw = False  # deflate without its zlib header, as some servers send it
        if self.encoding in ("", "identity"):
            self._inflate: Any = None
        elif self.encoding in ("gzip", "x-gzip", "deflate"):
            self._inflate = self._new()
        else:
            named = _masked(encoding, secret)  # a server may echo anything, the key included
            raise _Unreadable(f"the answer came in Content-Encoding {named!r}, which the client did not ask for")

    def feed(self, block: bytes) -> Iterator[bytes]:
        """What a block decodes to, in pieces of at most _BLOCK bytes: a small block may hold a lot."""
        if self._inflate is None:
            yield block
            return
        data = block
        while data:
            try:
                piece = self._inflate.decompress(data, _BLOCK)
            except zlib.error as exc:
                if self.encoding != "deflate" or self._raw or self._inflate.total_out:
                    raise _Cut(f"the answer's {self.encoding} encoding is broken ({exc})") from None
                self._raw, self._inflate = True, self._new()  # no zlib header: raw deflate, as urllib3 reads it
                continue
            data = self._inflate.unconsumed_tail
            if self._inflate.eof and self._inflate.unused_data:  # gzip members one after another
                data, self._inflate = self._inflate.unused_data, self._new()
            if piece:
                yield piece

    def end(self) -> bytes:
        """What is left once the body has ended: _Cut if it stopped before the encoding's end."""
        if self._inflate is None:
            return b""
        rest = self._inflate.flush()
        if not self._inflate.eof:
            raise _Cut(f"the answer's {self.encoding} encoding stopped before its end: the answer was cut short")
        return rest  # type: ignore[no-any-return]

    def _new(self) -> Any:
        if self._raw:
            return zlib.decompressobj(-zlib.MAX_WBITS)
        return zlib.decompressobj(zlib.MAX_WBITS | 32)  # a gzip or a zlib header, told by its first bytes


class _Unreadable(APIStatusError):
    """An answer in an encoding the client cannot read."""


def _decode(content: Union[bytes, str]) -> Any:
    """A body as decoded JSON, else as text, and None when empty."""
    if not content:
        return None
    try:
        return _json_value(content)
    except ValueError:
        return content.decode("utf-8", "replace") if isinstance(content, bytes) else content


def _json_value(content: Union[bytes, str]) -> Any:
    """JSON decoded, or ValueError; CodewordsError if nested too deeply to read. An integer of more
    digits than Python 3.11+ turns from text at once (4,300) is read all the same."""
    try:
        try:
            return json.loads(content)
        except ValueError as exc:
            if "integer string conversion" not in str(exc):
                raise
            return json.loads(content, parse_int=_whole_number)
    except RecursionError:
        raise CodewordsError("the server answered with JSON nested too deeply to read") from None


def _whole_number(digits: str) -> int:
    """A JSON integer of any length: through Decimal, which Python's limit on digits does not bound."""
    import decimal  # for the rare answer that needs it, not on every import

    return int(decimal.Decimal(digits))


def _output_of(answer: _Answer) -> Any:
    """A workflow's answer as its Content-Type says: JSON decoded, ``text/*`` as str in its
    charset (UTF-8 if it names none), anything else as bytes; with no type, JSON if it parses,
    else bytes. An empty body is None."""
    content = answer.body
    if not content:
        return None
    media_type, _, parameters = answer.headers.get("Content-Type", "").partition(";")
    media_type = media_type.strip().lower()
    charset = re.search(_CHARSET, parameters)
    encoding = charset.group(1) if charset else "utf-8"
    if media_type == "application/json" or media_type.endswith("+json"):
        return _decode(_decoded_text(content, encoding).lstrip("\ufeff") if charset else content)
    if media_type.startswith("text/"):
        return _decoded_text(content, encoding)
    if not media_type:
        try:
            return _json_value(content)
        except ValueError:
            pass
    return content


def _decoded_text(content: bytes, encoding: str) -> str:
    """Bytes as text in the named encoding, or in UTF-8 if Python has no such text encoding."""
    try:
        return content.decode(encoding, "replace")
    except (LookupError, ValueError):  # no such codec, not a text codec, or a name with a NUL in it
        return content.decode("utf-8", "replace")


def _value_of(answer: _Answer) -> Any:
    """An API answer's body, decoded, with the key its request carried masked: the only way to
    read an answer that may end up in an exception or a log record."""
    return _masked(_decode(answer.body), answer.key)


def _status_error(request: _Request, answer: _Answer, why: str) -> APIStatusError:
    """The APIStatusError for an HTTP error answer, with the server's message in its text."""
    status, storage = answer.status, request.call.host == "storage"
    if storage:  # S3 answers in XML
        body: Any = _masked(answer.body.decode("utf-8", "replace"), answer.key)
        detail: Any = _storage_detail(body, answer.body)
    else:
        body = _value_of(answer)
        detail = body.get("detail") if isinstance(body, dict) and "detail" in body else body
    message = f"{status} {answer.reason} from {request.describe()}".replace("  ", " ")
    if 300 <= status < 400:
        location = _masked(unquote(answer.headers.get("Location", "")), answer.key)  # an encoded key too
        message += f": redirected to {location!r}, which is not followed: {why}"
    elif detail not in (None, ""):
        message += ": " + _describe(detail)
    if request.request_id:
        message += f" (request {request.request_id})"
    cls = _STATUS_ERRORS.get(status) or (ServerError if status >= 500 else APIStatusError)
    if storage:
        cls = StorageError
    elif answer.headers.get("Error-Origin") == "service":
        cls = RunFailed  # the workflow's own answer, not the API's
    error = cls(message, status_code=status, detail=detail, body=body, request_id=request.request_id)
    if isinstance(error, RateLimitError):
        error.retry_after = _retry_after(answer)
    return error


def _storage_detail(text: str, content: bytes) -> Any:
    """The storage host's own message: S3's XML Code and Message, else the body decoded."""
    code, message = re.search(_XML_CODE, text), re.search(_XML_MESSAGE, text)
    if code or message:
        return ": ".join(m.group(1).strip() for m in (code, message) if m)
    return _describe(_decode(content)) if content else ""


def _describe(detail: Any) -> str:
    """The server's ``detail`` in one line: validation errors as "field: message; ..."."""
    if isinstance(detail, str):
        text = detail
    elif isinstance(detail, list) and all(isinstance(d, dict) and "msg" in d for d in detail):
        text = "; ".join(".".join(map(str, d.get("loc") or ())) + ": " + str(d["msg"]) for d in detail)
    else:
        try:
            text = json.dumps(detail, ensure_ascii=False, default=str)
        except RecursionError:
            text = "(JSON nested too deeply to show)"
        except ValueError:  # an integer longer than Python turns into text (4,300 digits)
            text = "(a number too long to show)"
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:497] + "..."


def _masked(value: Any, secret: str) -> Any:
    """The value with every occurrence of the secret in its strings replaced by ***: a copy of
    its lists and dicts made without recursion, so that no depth of nesting is too deep."""
    if not secret:
        return value

    def copied(item: Any) -> Any:
        if isinstance(item, str):
            return item.replace(secret, "***")
        return [] if isinstance(item, list) else {} if isinstance(item, dict) else item

    top = copied(value)
    todo = [(value, top)] if isinstance(value, (list, dict)) else []
    while todo:
        original, copy = todo.pop()
        for key, item in original.items() if isinstance(original, dict) else enumerate(original):
            twin = copied(item)
            if isinstance(copy, list):
                copy.append(twin)
            else:
                copy[copied(key)] = twin
            if isinstance(item, (list, dict)):
                todo.append((item, twin))
    return top


def _request_id_in(answer: _Answer) -> str:
    """The ``request_id`` of an answer to /run_async or /provision-request."""
    body = _value_of(answer)
    request_id = body.get("request_id") if isinstance(body, dict) else None
    try:
        return _check_name("request id", request_id)
    except ConfigurationError:
        raise APIStatusError(
            f"{answer.status} from {urlsplit(answer.url).path}: expected a JSON object with a request_id,"
            f" got {_describe(body)}",
            status_code=answer.status,
            body=body,
        ) from None


def _record_in(answer: _Answer, request_id: str) -> Dict[str, Any]:
    """The request record in an answer, which must be a JSON object (the key masked in it, as
    it may end up in a RunFailed)."""
    record = _value_of(answer)
    if not isinstance(record, dict):
        raise APIStatusError(
            f"{answer.status} with a request record that is not a JSON object: {_describe(record)}",
            status_code=answer.status,
            body=record,
            request_id=request_id,
        )
    return record


def _output(record: Dict[str, Any], request_id: str) -> Any:
    """A finished run's output, or RunFailed if the workflow answered with an error status."""
    if all(record.get(field) is None for field in _OUTPUT_FIELDS):
        raise APIStatusError(
            f"the record of run {request_id} has none of {', '.join(_OUTPUT_FIELDS)}:"
            f" its fields are {', '.join(map(str, record)) or 'none'}",
            body=record,
            request_id=request_id,
        )
    status = _response_status(record, request_id)
    output = record.get("responseJson")
    if output is None and isinstance(record.get("responseContent"), str):
        output = _decode(record["responseContent"])
    if status is not None and status >= 300:
        detail = output.get("detail", output) if isinstance(output, dict) else output
        message = f"run {request_id} failed with status {status}"
        if status < 400:
            message += " (a redirect, which a run read from its record cannot follow: check the path)"
        if detail not in (None, ""):
            message += ": " + _describe(detail)
        raise RunFailed(message, status_code=status, detail=detail, body=output, request_id=request_id, record=record)
    return output


def _response_status(record: Dict[str, Any], request_id: str) -> Optional[int]:
    """The workflow's own HTTP status in a record: a whole number from 200 to 599, as a number or
    as text (500, 500.0, "500", " 500.0\n"); None if the record has none. Anything else is no
    status, and no output can be told from it: CodewordsError."""
    status = record.get("responseStatus")
    if status is None:
        return None
    number: Any = status
    if isinstance(status, str):
        match = re.match(_STATUS_TEXT, status)
        number = int(match.group(1)) if match else None
    elif isinstance(status, float) and status.is_integer():
        number = int(status)
    if isinstance(number, int) and not isinstance(number, bool) and 200 <= number <= 599:
        return number
    raise CodewordsError(
        f"the record of run {request_id} has responseStatus {_describe(status)}, which is no HTTP status",
        request_id=request_id,
    )


def _started(record: Dict[str, Any]) -> bool:
    """Whether a record shows that a run claimed its id (a provisioned husk has none of these)."""
    return bool(record.get("startedAt") or record.get("serviceId")) or record.get("responseStatus") is not None


def _finished(record: Dict[str, Any]) -> bool:
    return bool(record.get("completedAt")) or record.get("responseStatus") is not None


# ---------------------------------------------------------------------------------------------
# Runs and waiting: a run's plan, its send and its fallback, the long poll, and its logs meanwhile
# ---------------------------------------------------------------------------------------------


class _RunPlan(NamedTuple):
    """What a blocking run will send and do, decided before anything is sent (see Client._plan)."""

    service_id: str
    path: str
    method: str
    url_path: str
    body: Optional[bytes]
    headers: Dict[str, str]  # the run's own: the client's and the call's
    key: _Key
    fallback: Optional[str]
    on_log: Optional[Callable[[LogEntry], Any]]
    admit: Optional[Callable[[_Sent], None]] = None  # a map's: lets the run be sent, unless the map has stopped
    ids: Optional[_Reserve] = None  # where its request id comes from: a map's reserve, else the client's
    stop: Optional[_Stop] = None  # a map's: cuts the run's calls when the map stops

    def given(self, inputs: Any) -> _RunPlan:
        """The plan with its inputs: the body of a POST, or the query of a GET."""
        if self.method == "GET":
            return self._replace(url_path=self.url_path + _query_of(inputs))
        return self._replace(body=_encode_inputs(inputs))

    @property
    def needs_id(self) -> bool:
        """Whether the run needs a provisioned request id: to resume a 504, or to follow its logs."""
        return self.fallback == "resume" or self.on_log is not None


class _Sent:
    """The request ids of what a run() has sent: its run, and before it the runs a rerun replaced,
    which may go on too (None for a run sent without an id)."""

    def __init__(self, request_id: Optional[str]) -> None:
        self.ids: List[Optional[str]] = [request_id]
        self.sending = False  # once its id is known: the run may be on its way
        self.reserved = False  # its id came from a reserve: the API may refuse it, if it expired

    @property
    def current(self) -> Optional[str]:
        return self.ids[-1]

    def interrupted(self, service_id: str) -> str:
        """The message of a KeyboardInterrupt during the run."""
        what = f"run of {service_id}"
        message = _interrupted(what, self.current) if self.sending else f"{what} interrupted before it was sent"
        for replaced in self.ids[:-1]:
            message += f"; the run it reran ({replaced or 'sent without a request id'}) may go on too"
        return message


def _run(client: Client, plan: _RunPlan, deadline: float, request_id: Optional[str], reserved: bool = False) -> Any:
    """A planned run: its request id provisioned if it needs one (``reserved``: the id given came
    from a reserve, and may have expired), its logs followed while it goes on, and its output.
    Ctrl-C says whether it was sent and how to pick it up."""
    sent = _Sent(request_id)
    sent.reserved = reserved
    follower = _LogFollower(client, plan.key, plan.on_log) if plan.on_log is not None else None
    with _waiting(follower, deadline, lambda: sent.interrupted(plan.service_id)):
        if request_id is None and plan.needs_id:
            sent.ids[-1], sent.reserved = (plan.ids or client._ids).take(client, plan.key, deadline)
        sent.sending = True
        if follower is not None:
            follower.follow(sent.current)
        return _send_run(client, plan, deadline, sent, follower)


@contextlib.contextmanager
def _waiting(follower: Optional[_LogFollower], deadline: float, interrupted: Callable[[], str]) -> Iterator[None]:
    """While a run is waited for: Ctrl-C raises KeyboardInterrupt saying how to pick it up, and
    its log stream is finished at the end, drained (up to the deadline) if the run has ended."""
    ended = False
    try:
        yield
        ended = True
    except RunFailed:
        ended = True
        raise
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted()) from None
    finally:
        if follower is not None:
            follower.finish(deadline if ended else None)


def _send_run(client: Client, plan: _RunPlan, deadline: float, sent: _Sent, follower: Optional[_LogFollower]) -> Any:
    """POST /run (or a GET), and what its answer leads to: its output, the answer of the workflow
    that its record holds, or the plan's fallback when the answer was lost."""
    request_id = sent.current
    headers = {**plan.headers, PROVISION_HEADER: request_id} if request_id else plan.headers
    admit = plan.admit
    request = _Request(
        _RUN_GET if plan.method == "GET" else _RUN_POST,
        plan.url_path,
        plan.key,
        deadline,
        body=plan.body,
        headers=headers,
        request_id=request_id,
        admit=(lambda: admit(sent)) if admit is not None else None,
        stop=plan.stop,
    )
    try:
        return _output_of(client._send(request))
    except _Unanswered as unanswered:
        lost: Optional[_Unanswered] = unanswered  # handled below, so that what follows is not chained to it
    except APIStatusError as refusal:
        if not sent.reserved or not _id_refused(client, plan, refusal, deadline):
            raise
        lost = None
    if lost is None:  # the reserved id was refused: once more, under a new one
        logger.info("the reserved request id %s was refused; the run is sent under a new one", request_id)
        sent.ids[-1], sent.reserved = _provision_for_run(client, plan.key, deadline, plan.stop), False
        if follower is not None:
            follower.follow(sent.current)
        return _send_run(client, plan, deadline, sent, follower)
    if lost.record is None:
        return _fall_back(client, plan, deadline, sent, follower, lost.error)
    record, error = lost.record, lost.error  # the run started: its answer is its record's
    assert request_id is not None
    if not _finished(record):
        logger.info("run %s answered %s while it goes on; waiting for it by its id", request_id, error)
        record = _wait_for_record(client, plan.key, request_id, deadline, plan.stop)
    if isinstance(error, APIStatusError) and _response_status(record, request_id) == error.status_code:
        # the answer was the workflow's own
        raise RunFailed(
            f"{error} (the workflow's own answer: the run had started)",
            status_code=error.status_code,
            detail=error.detail,
            body=error.body,
            request_id=request_id,
            record=record,
        )
    return _output(record, request_id)


def _fall_back(
    client: Client, plan: _RunPlan, deadline: float, sent: _Sent, follower: Optional[_LogFollower], error: Exception
) -> Any:
    """A run whose answer was lost (a 504 from the gateway, a read timeout), as its fallback says:
    "resume" waits for it by its id, "rerun" starts its inputs again with run_async, None raises."""
    request_id = sent.current
    if _passed(deadline):
        raise _run_timeout(plan.service_id, request_id) from error
    if plan.fallback == "resume" and request_id:
        logger.info("blocking run %s cut short (%s); waiting for it by its id", request_id, error)
        return _output(_wait_for_record(client, plan.key, request_id, deadline, plan.stop), request_id)
    if plan.fallback != "rerun":
        raise error
    logger.warning("blocking run of %s cut short (%s); starting it again", plan.service_id, error)
    if follower is not None:
        follower.follow(None)  # only the run whose output is returned streams its logs
    sent.ids.append(None)  # until the rerun's answer names it
    admit = plan.admit
    url_path = _service_path(_START_RUN, plan.service_id, plan.path)
    rerun = _Request(
        _START_RUN,
        url_path,
        plan.key,
        deadline,
        plan.body,
        plan.headers,
        admit=admit and (lambda: admit(sent)),
        stop=plan.stop,
    )
    sent.ids[-1] = request_id = _request_id_in(client._send(rerun))
    if follower is not None:
        follower.follow(request_id)
    return _output(_wait_for_record(client, plan.key, request_id, deadline, plan.stop), request_id)


class _Reserve:
    """Request ids provisioned ahead of need, so that a run leaves without waiting for its own
    provision: at most ``size`` held, refilled in the background as they are taken. A client's
    reserve starts with its second run (a client that runs once provisions once, and leaves no id
    unused); a map's holds ids for the items waiting behind the running ones. Never pickled (a
    client's pickle holds its settings only) and dropped in a child after fork(): no two runs
    ever carry the same id."""

    def __init__(self, size: int, ahead: Optional[Callable[[], int]] = None, stop: Optional[_Stop] = None) -> None:
        self._size, self._ahead = size, ahead  # ahead: how many items wait for an id (a map's)
        self._stop = stop  # a map's: its provisions under way end with it
        self._ids: List[Tuple[str, str]] = []  # (the key it was provisioned with, the id)
        self._coming = 0  # provisions under way
        self._takes = 0
        self._changed = threading.Condition()
        self._pid = os.getpid()

    def take(self, client: Client, key: _Key, deadline: float) -> Tuple[Optional[str], bool]:
        """An id for a run, and whether it came from the reserve: one held, or one under way, else
        one provisioned now (None if the API offers none). Then the reserve is refilled. A map's
        stop ends the wait (see wake)."""
        stop = self._stop
        stopped = stop.is_set if stop is not None else lambda: False
        with self._changed:

            def ready() -> bool:
                return bool(self._usable(key)) or not self._coming or stopped()

            self._changed.wait_for(ready, max(0.0, deadline - time.monotonic()))
            if stopped():
                raise _Stopped
            self._takes += 1
            held = self._ids.pop()[1] if self._ids else None
        self.refill(client, key)
        if held is not None:
            return held, True
        return _provision_for_run(client, key, deadline, stop), False

    def held(self, key: _Key) -> Optional[str]:
        """An id held now, or None: never waits (a journaled map commits it ahead of its item)."""
        with self._changed:
            usable = self._usable(key)
            return usable.pop()[1] if usable else None

    def _usable(self, key: _Key) -> List[Tuple[str, str]]:
        """The ids held that were provisioned with this API key (none in a child after fork())."""
        if self._pid != os.getpid():  # the parent's ids are the parent's
            self._ids, self._coming, self._pid = [], 0, os.getpid()
        self._ids = [(k, i) for k, i in self._ids if k == key.value]
        return self._ids

    def wake(self) -> None:
        """Let the runs waiting for an id look again whether they have been stopped (a map that stopped)."""
        with self._changed:
            self._changed.notify_all()

    def refill(self, client: Client, key: _Key) -> None:
        """Provision in the background until the ids held and under way are what is wanted: after
        each take, and as a map submits items."""
        wanted = self._ahead() if self._ahead is not None else int(self._takes > 1)
        with self._changed:
            count = max(0, min(wanted, self._size) - len(self._ids) - self._coming)
            self._coming += count
        for _ in range(count):
            threading.Thread(target=self._provision, args=(client, key), name="codewords-ids", daemon=True).start()

    def _provision(self, client: Client, key: _Key) -> None:
        request_id = None
        try:
            deadline = client._deadline(QUICK_READ_TIMEOUT)
            request_id = _request_id_in(
                client._send(_Request(_PROVISION, _PROVISION.path, key, deadline, stop=self._stop))
            )
        except (CodewordsError, RuntimeError, _Stopped) as exc:  # the next run provisions its own
            logger.debug("a request id for the reserve could not be provisioned: %r", exc)
        except Exception:  # a bug, which no caller is there to see: logged, and the reserve goes on
            logger.warning("a request id for the reserve could not be provisioned", exc_info=True)
        finally:  # the runs waiting for it look again
            with self._changed:
                self._coming -= 1
                if request_id is not None and self._pid == os.getpid():
                    self._ids.append((key.value, request_id))
                self._changed.notify_all()


def _id_refused(client: Client, plan: _RunPlan, error: APIStatusError, deadline: float) -> bool:
    """Whether the API refused a reserved id (it may have expired): a 404, 409 or 410 of the
    API's to the run, and the id's record gone or of no run, twice, RECORD_SETTLE apart."""
    request_id = error.request_id
    if isinstance(error, RunFailed) or error.status_code not in (404, 409, 410) or request_id is None:
        return False
    for look in range(2):
        if look:
            if time.monotonic() + RECORD_SETTLE >= deadline:
                return False
            _sleep(RECORD_SETTLE, plan.stop)
        try:
            if _started(_record(client, plan.key, request_id, deadline, plan.stop)):
                return False
        except NotFoundError:
            pass  # no such record: the id is unknown
        except CodewordsError:
            return False
    return True


def _provision_for_run(client: Client, key: _Key, deadline: float, stop: Optional[_Stop] = None) -> Optional[str]:
    """A request id for a run about to be sent, or None if the API says it offers none (404, 405,
    501). Any other failure is raised: a run sent without an id would meet the same network."""
    try:
        return _request_id_in(client._send(_Request(_PROVISION_FOR_RUN, _PROVISION.path, key, deadline, stop=stop)))
    except AuthenticationError as exc:
        raise AuthenticationError(
            f"the API key was refused ({exc.status_code}): {_describe(exc.detail)}",
            status_code=exc.status_code,
            detail=exc.detail,
            body=exc.body,
        ) from None
    except APIConnectionError as exc:  # the run has not been sent: say so, not which call failed
        raise type(exc)(f"the run was not sent: provisioning its request id failed: {exc}") from None
    except APIStatusError as exc:
        if exc.status_code not in (404, 405, 501):
            raise
        logger.warning("the API offers no request ids (%s); a 504 will not be resumable", exc)
        return None


def _wait(
    client: Client, key: _Key, request_id: str, deadline: float, on_log: Optional[Callable[[LogEntry], Any]]
) -> Dict[str, Any]:
    """The record of a run once it has finished, its logs followed meanwhile (Run.wait)."""
    if on_log is not None:
        key.refuse("on_log streams logs")
    follower = _LogFollower(client, key, on_log) if on_log is not None else None
    with _waiting(follower, deadline, lambda: _interrupted("wait", request_id)):
        if follower is not None:
            follower.follow(request_id)
        return _wait_for_record(client, key, request_id, deadline)


def _wait_for_record(
    client: Client, key: _Key, request_id: str, deadline: float, stop: Optional[_Stop] = None
) -> Dict[str, Any]:
    """Long-poll GET /result until the run finishes, and return its record. A server that says
    "not yet" without holding the poll is asked again after a pause, not in a loop."""
    quick = _Attempts(0, POLL_BACKOFF)  # polls answered at once, in a row
    while True:
        hold = min(LONG_POLL_MAX, max(1, math.ceil(deadline - time.monotonic())))
        path = _RESULT.at(request_id=request_id, hold=str(hold))
        timeout = hold + LONG_POLL_MARGIN
        request = _Request(_RESULT, path, key, deadline, request_id=request_id, read_timeout=timeout, stop=stop)
        asked, attempts = time.monotonic(), _Attempts(client.max_retries, RETRY_BACKOFF, stop)
        try:
            answer = client._send(request, attempts)
        except (APIConnectionError, RateLimitError, ServerError) as exc:
            if _passed(deadline) or attempts.out_of_time:  # it would have been sent again, but for the deadline
                raise _run_timeout(None, request_id) from exc
            raise
        if answer.status < 300:
            record = _record_in(answer, request_id)
            if _finished(record):
                return record
        if key.once:
            raise _run_timeout(None, request_id, "the one poll a one-time key allows")
        if _passed(deadline):
            raise _run_timeout(None, request_id)
        if time.monotonic() - asked >= HELD_POLL_MIN:
            quick.made = 0
        else:
            _sleep(min(quick.pause(), deadline - time.monotonic()), stop)
            quick.made += 1


def _pick_up(request_id: str) -> str:
    return f'pick it up with client.result("{request_id}")'


def _run_timeout(service_id: Optional[str], request_id: Optional[str], what: str = "its deadline") -> RunTimeout:
    """A RunTimeout that says how to pick the run up, if it can be."""
    run = " ".join(filter(None, ["run", request_id, service_id and "of " + service_id]))
    if request_id is None:
        message = f"{run} passed {what}; it was sent without a request id, so it cannot be picked up"
    else:
        message = f"{run} did not finish before {what}; it may still finish: {_pick_up(request_id)}"
    return RunTimeout(message, request_id=request_id)


def _interrupted(what: str, request_id: Optional[str]) -> str:
    """The message of a KeyboardInterrupt during a run or a wait."""
    if request_id is None:
        return f"{what} interrupted; a run sent without a request id cannot be picked up"
    return f"{what} interrupted; run {request_id} goes on if it was sent: {_pick_up(request_id)}"


# ---------------------------------------------------------------------------------------------
# map: many runs at once, as Executor.map, stopped by its first failure, Ctrl-C or close()
# ---------------------------------------------------------------------------------------------


class _Mapper:
    """One map(): its plan, made once, and the runs of its items on a pool of threads."""

    def __init__(
        self,
        client: Client,
        plan: _RunPlan,
        seconds: float,
        workers: int,
        return_exceptions: bool,
        journal: Optional[_Journal] = None,
    ) -> None:
        self._client, self._plan, self._seconds, self._workers = client, plan, seconds, workers
        self._return_exceptions = return_exceptions
        self._journal = journal  # a durable batch's: it decides what each item sends
        self._gate = _MapGate()
        self._window: Dict[Future[Any], int] = {}  # runs submitted and not yet yielded, in input order
        self._counted: Set[Future[Any]] = set()  # finished, told to on_progress, not yet yielded
        self._reading = True
        self._ids = _Reserve(2 * workers, ahead=self._gate.ids_wanted, stop=self._gate.calls)  # one an item
        self._input_error: Optional[Exception] = None  # raised once the runs sent before it are in
        self._done = self._read = 0
        self._total: Optional[int] = None

    def outputs(
        self,
        inputs: Iterable[Any],
        ordered: bool,
        on_progress: Optional[Callable[[int, Optional[int]], Any]],
        total: Optional[int],
    ) -> Generator[Any, None, None]:
        import concurrent.futures  # map() alone needs it, and it would cost more than the rest of the import

        items = enumerate(inputs)
        self._total = total
        pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="codewords-map")
        try:
            while True:
                self._fill(pool, items)
                if not self._window:
                    if self._input_error is not None:
                        raise self._input_error
                    return
                running = [f for f in self._window if f not in self._counted]  # waiting on a finished one would spin
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                self._count(finished)
                if self._journal is not None:
                    self._journal.flush()  # the outcomes that came, committed before they are yielded
                if on_progress is not None:
                    on_progress(self._done, total)
                yield from self._ready(finished, ordered)
        except KeyboardInterrupt:
            going_on = self._stop()
            listed = ", ".join(f"item {i} ({r or 'no request id known'})" for i, r in going_on)
            message = f"map of {self._plan.service_id} interrupted; runs that go on: {listed or 'none'}"
            logger.warning(message + "; no other run is sent")
            interrupt = KeyboardInterrupt(message + "; no other run is sent")
            interrupt.request_ids = [r for _, r in going_on if r]  # type: ignore[attr-defined]
            raise interrupt from None
        finally:
            self._stop()
            for future in self._window:
                future.cancel()
            pool.shutdown(wait=False)
            if self._journal is not None:
                self._journal.close()  # runs still going on are waited for by a resume, by their ids

    def _stop(self) -> List[Tuple[int, Optional[str]]]:
        """Send no more runs, and cut the calls of those under way (they go on at the server); the
        threads waiting for a slot of the client's rate gate or for an id look again, and end."""
        going_on = self._gate.stop()
        self._client._gate.wake()
        self._ids.wake()
        return going_on

    def _fill(self, pool: Any, items: Iterator[Tuple[int, Any]]) -> None:
        """Submit items while the window has room: inputs are read only as workers free up. An
        error in reading them stops the reading; the runs already sent are waited for first. A
        journal commits what it was given since the last fill, before anything is handed out."""
        batch: List[Tuple[bool, int, Any, Any, bool]] = []
        while self._reading and len(self._window) + len(batch) < 2 * self._workers:
            try:
                item = next(items, None)
            except Exception as exc:
                item, self._input_error = None, exc
            if item is None:
                self._reading = False
                continue
            self._read += 1
            item_key: Any = None
            fresh, inline = self._plan.needs_id, False
            if self._journal is not None:  # keys in input order: an item's occurrence among equal ones
                try:
                    item_key = self._journal.key_of(item[1])
                    inline, fresh = self._journal.hand_out(item_key, self._ids)
                except Exception as exc:  # raised as the item's failure
                    item_key, fresh = exc, False
            batch.append((inline, item[0], item[1], item_key, fresh))
        if self._journal is not None:
            self._journal.flush()
            if self._total is not None:  # the ids of the items to read next, ahead
                self._gate.unread = self._journal.new_among(self._total - self._read) if self._reading else 0
        for inline, index, inputs, item_key, fresh in batch:
            self._gate.submitted(fresh)
            self._window[self._submit(pool, inline, index, inputs, item_key, fresh)] = index
        if self._plan.needs_id or self._journal is not None:
            self._ids.refill(self._client, self._plan.key)  # the ids of the items now waiting, fetched ahead

    def _submit(self, pool: Any, inline: bool, *item: Any) -> Future[Any]:
        """An item's run handed to a worker; one that sends no request (a replay) is run here, at once."""
        if not inline:
            return pool.submit(self._run_item, *item)  # type: ignore[no-any-return]
        import concurrent.futures

        future: Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(self._run_item(*item))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _count(self, finished: Set[Future[Any]]) -> None:
        """Count the runs that finished; the first failure cancels what comes after it."""
        for future in finished:
            self._counted.add(future)
            if future.cancelled():
                continue
            self._done += 1
            if future.exception() is not None and not self._return_exceptions:
                self._reading = False
                for later, index in self._window.items():
                    if index > self._window[future]:
                        later.cancel()

    def _ready(self, finished: Set[Future[Any]], ordered: bool) -> Iterator[Any]:
        """The outputs that may be yielded now: in input order, or as they finished."""
        ready = itertools.takewhile(self._counted.__contains__, self._window) if ordered else list(finished)
        for future in list(ready):
            index = self._window.pop(future)
            self._counted.discard(future)
            if future.cancelled():
                continue
            error = future.exception()
            if error is not None and not self._return_exceptions:
                raise error
            output = error if error is not None else future.result()
            yield output if ordered else (index, output)

    def _run_item(self, index: int, item: Any, item_key: Any = None, fresh: bool = False) -> Any:
        """One item: its run planned and sent, unless the map has stopped; with a journal, as the
        journal says (replayed, waited for, or sent under the id it holds or a new one)."""
        gate = self._gate
        plan = self._plan.given(item)._replace(
            admit=lambda sent: gate.admit(index, sent), ids=self._ids, stop=gate.calls
        )
        gate.begin(fresh)
        try:
            deadline = time.monotonic() + self._seconds
            if self._journal is None:
                return _run(self._client, plan, deadline, None)
            if isinstance(item_key, Exception):
                raise item_key
            return self._journal.run(self._client, plan, item_key, deadline)
        finally:
            gate.finished(index)


class _Journaled:
    """A journaled map's outputs: closed, it lets go of its journal even before its first output
    (a generator closed before it has started runs none of its code, its ``finally`` included)."""

    def __init__(self, outputs: Generator[Any, None, None], journal: _Journal) -> None:
        self._outputs, self._journal = outputs, journal

    def __iter__(self) -> _Journaled:
        return self

    def __next__(self) -> Any:
        return next(self._outputs)

    def close(self) -> None:
        self._outputs.close()
        self._journal.close()


class _MapGate:
    """What a map's threads share: whether it has stopped, how many of its items wait to begin,
    and which of its runs have been sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self.calls = _Stop()  # the calls of the map's runs, stopped with it: no thread outlives it
        self._sent: Dict[int, _Sent] = {}  # item index -> what its run sent, while it goes on
        self._submitted = self._started = 0
        self._fresh = 0  # items submitted that will need a new id, not yet begun
        self.unread = 0  # a journaled map's items of known number not yet read, whose ids it takes ahead

    def check(self) -> None:
        if self._stopped:
            raise CodewordsError("not sent: the map has stopped")

    def submitted(self, fresh: bool) -> None:
        """An item was handed to a worker; ``fresh``: it will need a new id."""
        with self._lock:
            self._submitted += 1
            self._fresh += fresh

    def begin(self, fresh: bool) -> None:
        """An item's run begins (counted, for the ids wanted ahead), unless the map has stopped."""
        with self._lock:
            self._started += 1
            self._fresh -= fresh
            self.check()

    def ids_wanted(self) -> int:
        """How many ids to fetch ahead: one per item waiting to begin that will need a new one,
        and one per item still to be read by a journaled map (none once the map has stopped). Read
        by the map's reserve, which holds the gate and not the map: no cycle keeps a finished
        map's client and its sockets alive."""
        with self._lock:
            return 0 if self._stopped else min(self._submitted - self._started, self._fresh) + self.unread

    def admit(self, index: int, sent: _Sent) -> None:
        """Let a run of the map be sent, unless the map has stopped."""
        with self._lock:
            self.check()
            self._sent[index] = sent

    def finished(self, index: int) -> None:
        with self._lock:
            self._sent.pop(index, None)

    def stop(self) -> List[Tuple[int, Optional[str]]]:
        """Let no more runs be sent; the runs that were sent and may go on (a rerun's first run
        too), by item index, with their request ids (None if it is not known)."""
        with self._lock:
            self._stopped = True
            going_on = [(i, r) for i, sent in sorted(self._sent.items()) for r in sent.ids]
        self.calls.set()
        return going_on


# ---------------------------------------------------------------------------------------------
# Durable batches: a map's journal, which owns every decision of what a journaled item sends
# ---------------------------------------------------------------------------------------------
#
# _Journal alone decides, for each item of a map given journal=, which item it is (its key), what
# it does (_Journal.step: replay the outcome recorded, wait for the run by its id, send under the
# id recorded, or run as new) and what is committed when. Write-ahead: an item's request id is
# committed, state 'sent' with the wall-clock time, before each attempt of its POST /run leaves;
# its outcome (the output, or a final failure: an APIStatusError that is not a 504) when the map
# takes it in, before yielding it. Commits are few: the map's thread commits, in one statement
# (flush), the outcomes that came and the ids of the items it hands out (hand_out takes them from
# the reserve), so that most runs leave with no commit of their own (_commit_sent).
# Nothing is committed on a RunTimeout, a GatewayTimeout, an APIConnectionError or Ctrl-C: the run
# may go on, and a resume waits for it by its id. The instants of a kill -9, and what a resume
# does at each:
#   - before the commit of 'sent' (provisioning, or the id just provisioned): the item is new and
#     runs under a new id; the id left behind was never sent, and runs nothing.
#   - after the commit, before its POST left, or while it was on its way: the record of its id
#     says whether the run started. A POST already on its way may still arrive, so "never started"
#     is believed only once JOURNAL_SETTLE has passed since the commit (asked again then); the
#     run is then sent under that same id, so a late arrival and the resend are one run.
#   - while it runs, or after its answer and before the commit of its outcome: its record has
#     started (or finished): it is waited for by its id, and its output read from its record.
#   - after the commit of its outcome: replayed, with no request at all.
# The commits are SQLite transactions in WAL mode with synchronous=NORMAL: a killed process loses
# none, a power loss may lose the last ones (each then falls back to the step before it, above).

_REPLAY, _WAIT, _SEND, _NEW = "replay", "wait", "send", "new"  # what _Journal.step says
_JOURNAL_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS items ("
    " key TEXT PRIMARY KEY,"  # key(item), else the JSON of [service, path, method, inputs, occurrence]
    " state TEXT NOT NULL,"  # 'sent', 'done' or 'failed'
    " request_id TEXT NOT NULL,"
    " sent_at REAL NOT NULL,"  # seconds since the epoch: the commit before its last POST /run
    " finished_at REAL,"
    " output_type TEXT,"  # done: 'json', 'str', 'bytes' or 'none'
    " output BLOB,"  # done: the JSON text, the text, the bytes, or NULL
    " error TEXT"  # failed: JSON {"type", "status_code", "detail", "message", "request_id"}
    ") WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS batch (name TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID",  # schema, total
)
_JOURNAL_COLUMNS = ["key", "state", "request_id", "sent_at", "finished_at", "output_type", "output", "error"]
_JOURNAL_VERSION = "1"
_AHEAD_FRESH = 1.0  # an id the map wrote ahead is committed again by a run that begins later than this
_ROWS_A_STATEMENT = 100  # 8 values a row: an SQLite older than 3.32 takes at most 999 in a statement
_JOURNALED_ERRORS = {
    cls.__name__: cls
    for cls in (
        APIStatusError,
        AuthenticationError,
        NotFoundError,
        RateLimitError,
        ServerError,
        RunFailed,
        StorageError,
    )
}


class _Step(NamedTuple):
    """What _Journal.step says of an item: _REPLAY its outcome, _WAIT for its run, _SEND it under
    its recorded id, or _NEW (a new id)."""

    step: str
    request_id: Optional[str] = None
    outcome: Any = None  # _REPLAY: the output, or the exception to raise
    record: Optional[Dict[str, Any]] = None  # _WAIT: the record, if it has finished


class _Journal:
    """A map's journal: an SQLite file, locked by its map (a sidecar file, PATH-lock)."""

    def __init__(self, path: str, connection: Any, lock: IO[bytes], plan: _RunPlan, retry_failed: bool) -> None:
        self.path, self._db, self._lock_file, self._plan = path, connection, lock, plan
        self._key_of: Optional[Callable[[Any], str]] = None
        self._retry_failed = retry_failed
        self._seen: Counter[bytes] = collections.Counter()  # digests of keys so far: occurrence numbers
        self._states: Dict[str, str] = {}  # of every row, read once at open
        self._known_read = 0  # items read by the map so far that have a row
        self._in_flight: Dict[str, Tuple[str, float]] = {}  # key -> the id and time of its last 'sent' commit
        self._ahead: Set[str] = set()  # keys whose ids the map committed ahead, their runs not yet let go
        self._unwritten: Deque[Tuple[Any, ...]] = collections.deque()  # rows for the next flush
        self._lock = threading.Lock()  # the file's: one statement at a time
        self._closed = False
        self._no_ids = False  # the API offers no request ids: every item fails, none is sent
        self.tagged = False  # run() returns (request_id, output): the command line's

    @classmethod
    def open(
        cls,
        path: Union[str, os.PathLike[str]],
        plan: _RunPlan,
        key: Optional[Callable[[Any], str]],
        retry_failed: bool,
        total: Optional[int],
    ) -> _Journal:
        """The journal at ``path``, created if missing and locked for this map: CodewordsError at
        once if another map (of this process or another) holds it."""
        if plan.fallback == "rerun":
            raise ConfigurationError("a journal needs each run under one request id, and fallback='rerun' adds one")
        if key is not None and not callable(key):
            raise ConfigurationError(f"key must be a function of an item that returns a str, not {key!r}")
        try:
            import sqlite3
        except ImportError:
            raise ConfigurationError(
                "journal= needs the sqlite3 module, and this Python was built without it"
            ) from None
        name = os.fspath(path)
        lock = _lock_journal(name)
        try:
            connection = sqlite3.connect(name, timeout=5.0, isolation_level=None, check_same_thread=False)
            try:
                if connection.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                    raise ConfigurationError(f"the journal {name} cannot be put in WAL mode")
                connection.execute("PRAGMA synchronous=NORMAL")
                for statement in _JOURNAL_SCHEMA:
                    connection.execute(statement)
                columns = [row[1] for row in connection.execute("PRAGMA table_info(items)")]
                if columns != _JOURNAL_COLUMNS:
                    raise ConfigurationError(f"{name} is not a journal: it has a table items of other columns")
                version = connection.execute("SELECT value FROM batch WHERE name = 'schema'").fetchone()
                if version is not None and version[0] != _JOURNAL_VERSION:
                    raise ConfigurationError(f"the journal {name} is of schema {version[0]}, not {_JOURNAL_VERSION}")
                connection.execute("INSERT OR REPLACE INTO batch VALUES ('schema', ?)", (_JOURNAL_VERSION,))
                connection.execute("INSERT OR REPLACE INTO batch VALUES ('total', ?)", (total,))
                journal = cls(name, connection, lock, plan, retry_failed)
                journal._key_of = key
                journal._states.update(connection.execute("SELECT key, state FROM items"))  # Ctrl-C here too
            except BaseException:
                connection.close()
                raise
        except sqlite3.Error as exc:
            _unlock_journal(lock)
            raise ConfigurationError(f"{name} cannot be used as a journal: {exc}") from None
        except BaseException:
            _unlock_journal(lock)
            raise
        return journal

    def close(self) -> None:
        """Commit the outcomes that came, forget the ids written ahead for runs never let go (a
        resume then runs those items at once, as new), close the file and let go of its lock; a
        run still under way commits nothing more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._write_rows()
                ahead = list(self._ahead)
                for start in range(0, len(ahead), _ROWS_A_STATEMENT):
                    keys = ahead[start : start + _ROWS_A_STATEMENT]
                    self._db.execute(f"DELETE FROM items WHERE key IN ({','.join('?' * len(keys))})", keys)
            except Exception as exc:  # the rows left are waited for by a resume
                logger.warning("the journal %s could not be written as it closed: %s", self.path, exc)
            finally:
                self._db.close()
                _unlock_journal(self._lock_file)

    # -- which item is which ------------------------------------------------------------------

    def key_of(self, item: Any) -> str:
        """The item's key, called in input order: ``key(item)``, else the canonical JSON of the
        service id, path, method and inputs with the number of equal items before it. Two items
        of one map never share a key (a ``key()`` that gives one twice is refused). The API key
        is never written: see _masked_key."""
        secret = self._plan.key.value
        if self._key_of is not None:
            key = self._key_of(item)
            if not isinstance(key, str):
                raise TypeError(f"key() must return a str, not {type(key).__name__}")
            if not _encodable(key):
                raise ConfigurationError(f"key() gave a str that UTF-8 cannot encode: {ascii(key)[:80]}")
            digest = _digest(key)
            if self._seen[digest]:
                raise ConfigurationError(
                    f"key() gave {key.replace(secret, '***')!r} to two items of the map: each needs its own"
                )
            self._seen[digest] += 1
            return _masked_key(key, secret, digest)
        plan = self._plan
        try:
            base = _json_text([plan.service_id, plan.url_path, plan.method, item], **_CANONICAL)
        except (TypeError, ValueError, RecursionError) as exc:
            raise TypeError(f"inputs are not JSON-serialisable: {exc}") from exc
        digest = _digest(base)
        occurrence = self._seen[digest]
        self._seen[digest] += 1
        return _masked_key(base[:-1] + f",{occurrence}]", secret, digest)

    def hand_out(self, key: str, ids: _Reserve) -> Tuple[bool, bool]:
        """How the map hands an item out, called in input order: whether its recorded outcome is
        replayed at once, with no request, and whether it will need a new request id (one the
        journal does not know, or a failure to run again). An item the journal does not know
        takes an id the reserve holds, if any: committed by the next flush(), ahead of its run."""
        state = self._states.get(key)
        self._known_read += state is not None
        replays = state == "done" or (state == "failed" and not self._retry_failed)
        fresh = state is None or (state == "failed" and self._retry_failed)
        request_id = ids.held(self._plan.key) if state is None else None
        if request_id is not None:
            self._unwritten.append((key, "sent", request_id, time.time(), None, None, None, None))
        return replays, fresh and request_id is None

    def new_among(self, unread: int) -> int:
        """The fewest items the journal does not know among the ``unread`` still to be read: the
        ids the map may take ahead for them, none left unused."""
        return max(0, unread - (len(self._states) - self._known_read))

    def flush(self) -> None:
        """Commit the rows waiting, in one statement: the ids written ahead and the outcomes that
        came. Called by the map's thread before it hands items out, and so before it yields."""
        with self._lock:
            if not self._closed:
                self._write_rows()

    # -- what an item does ---------------------------------------------------------------------

    def step(self, client: Client, plan: _RunPlan, key: str, deadline: float) -> _Step:
        """What an item does, given what the journal holds of it (see the comment above)."""
        if key in self._ahead:
            return _Step(_SEND, self._in_flight[key][0])
        row = self._row(key) if key in self._states else None  # a key it does not hold costs no query
        if row is None:
            return _Step(_NEW)
        state, request_id, sent_at = row[0], row[1], row[2]
        if state == "done":
            return _Step(_REPLAY, request_id, _stored_output(row[4], row[5]))
        if state == "failed":
            return _Step(_NEW) if self._retry_failed else _Step(_REPLAY, request_id, _stored_error(row[6]))
        record = self._record(client, plan, request_id, deadline)
        if not _started(record):
            settle = min(sent_at + JOURNAL_SETTLE - time.time(), JOURNAL_SETTLE)  # a clock set back: at most that
            if settle > 0:
                if time.monotonic() + settle >= deadline:
                    raise _run_timeout(plan.service_id, request_id, "its deadline, while a resume let it settle")
                logger.info("run %s was journaled and has not started; looking again in %.1f s", request_id, settle)
                _sleep(settle, plan.stop)
                record = self._record(client, plan, request_id, deadline)
        self._in_flight[key] = (request_id, sent_at)
        if _started(record):
            return _Step(_WAIT, request_id, record=record if _finished(record) else None)
        return _Step(_SEND, request_id)

    def run(self, client: Client, plan: _RunPlan, key: str, deadline: float) -> Any:
        """An item of the map, as step() says: its output (or its failure raised)."""
        step = self.step(client, plan, key, deadline)
        if step.step == _REPLAY:
            if isinstance(step.outcome, BaseException):
                raise step.outcome
            return self._tag(step.request_id, step.outcome)
        request_id = step.request_id
        if step.step == _WAIT:
            return self._wait(client, plan, key, deadline, step)
        # An id of the reserve, or one recorded long ago, may have expired: refused, _send_run
        # replaces it, and the new one is committed before it is sent.
        reserved = step.step == _SEND
        if request_id is None:
            request_id, reserved = (
                (plan.ids or client._ids).take(client, plan.key, deadline) if not self._no_ids else (None, False)
            )
            if request_id is None:
                self._no_ids = True
                raise CodewordsError(f"not sent: the API offers no request ids, and the journal {self.path} needs them")
        ahead = self._writing_ahead(plan, key)
        return self._outcome(key, lambda: _run(client, ahead, deadline, request_id, reserved))

    def _wait(self, client: Client, plan: _RunPlan, key: str, deadline: float, step: _Step) -> Any:
        """A run the journal holds as sent, and its record as started: waited for by its id."""
        request_id, record = step.request_id, step.record
        assert request_id is not None
        if plan.admit is not None:
            plan.admit(_Sent(request_id))  # named if the map is stopped: it goes on
        if record is None:
            return self._outcome(
                key, lambda: _output(_wait_for_record(client, plan.key, request_id, deadline, plan.stop), request_id)
            )
        return self._outcome(key, lambda: _output(record, request_id))

    def _writing_ahead(self, plan: _RunPlan, key: str) -> _RunPlan:
        """The plan, its admit (called before each attempt of its POST /run) committing the id first."""
        admit = plan.admit

        def commit_then_send(sent: _Sent) -> None:
            if admit is not None:
                admit(sent)  # the map has not stopped
            if sent.current is None:  # a refused id, and no new one to be had
                raise CodewordsError(f"not sent: the API offers no request ids, and the journal {self.path} needs them")
            self._commit_sent(key, sent.current)

        return plan._replace(admit=commit_then_send)

    def _outcome(self, key: str, get: Callable[[], Any]) -> Any:
        """The run's output, or its final failure raised; either queued to be committed by the
        next flush() (see _keep)."""
        try:
            output = get()
        except RunFailed as failed:  # the workflow's own answer: final
            error, plan_key = failed, self._plan.key
            self._keep(key, "failed", lambda: (None, None, _error_text(error, plan_key)))
            raise
        # Anything else (a deadline, the network, a poll refused, an unreadable record) is no answer
        # of the run's, which may go on: nothing is committed, and a resume asks its record.
        secret = self._plan.key.value
        request_id = self._keep(key, "done", lambda: (*_storable(output, secret), None))
        return self._tag(request_id, output)

    def _keep(self, key: str, state: str, stored: Callable[[], Tuple[Any, Any, Any]]) -> str:
        """Queue an outcome, and say its run's id; one that SQLite or JSON cannot hold as it is (a
        lone surrogate, an integer of over 4,300 digits) is not kept: a resume reads it from the
        run's record."""
        request_id, sent_at = self._in_flight.pop(key)
        try:
            output_type, output, error = stored()
        except (ValueError, UnicodeError) as exc:
            logger.debug("the outcome of run %s is not journaled (%s); a resume reads its record", request_id, exc)
        else:
            self._unwritten.append((key, state, request_id, sent_at, time.time(), output_type, output, error))
        return request_id

    def _tag(self, request_id: Optional[str], output: Any) -> Any:
        return (request_id, output) if self.tagged else output

    def _record(self, client: Client, plan: _RunPlan, request_id: str, deadline: float) -> Dict[str, Any]:
        try:
            return _record(client, plan.key, request_id, deadline, plan.stop)
        except NotFoundError:
            raise CodewordsError(
                f"the journal {self.path} holds run {request_id}, which the API no longer knows: whether it ran"
                f' cannot be told. To run it again: sqlite3 {self.path} "DELETE FROM items WHERE request_id ='
                f" '{request_id}'\"",
                request_id=request_id,
            ) from None

    # -- the file ------------------------------------------------------------------------------

    def _row(self, key: str) -> Optional[Tuple[Any, ...]]:
        with self._lock:
            self._check_open()
            return self._db.execute(  # type: ignore[no-any-return]
                "SELECT state, request_id, sent_at, finished_at, output_type, output, error FROM items WHERE key = ?",
                (key,),
            ).fetchone()

    def _commit_sent(self, key: str, request_id: str) -> None:
        """Write down, before a POST /run leaves, that it is being sent under this id: written
        already if the map wrote it ahead less than _AHEAD_FRESH ago, else committed now."""
        import sqlite3

        with self._lock:
            self._check_open()  # a run must not leave unwritten
            if key in self._ahead:
                self._ahead.discard(key)
                written_id, written_at = self._in_flight[key]
                if written_id == request_id and time.time() - written_at < _AHEAD_FRESH:
                    return
            now = time.time()
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO items (key, state, request_id, sent_at) VALUES (?, 'sent', ?, ?)",
                    (key, request_id, now),
                )
            except sqlite3.Error as exc:
                raise CodewordsError(f"the journal {self.path} could not be written: {exc}") from None
            self._in_flight[key] = (request_id, now)

    def _write_rows(self) -> None:
        """Commit the rows waiting (under the file's lock): whole rows, so each statement holds
        many. One that fails is logged: an id written ahead is then committed by its run, before
        it leaves, and an outcome read by a resume from its run's record."""
        import sqlite3

        rows = [self._unwritten.popleft() for _ in range(len(self._unwritten))]
        for start in range(0, len(rows), _ROWS_A_STATEMENT):
            chunk = rows[start : start + _ROWS_A_STATEMENT]
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO items VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk)),
                    [value for row in chunk for value in row],
                )
            except sqlite3.Error as exc:
                logger.warning("the journal %s could not be written: %s", self.path, exc)
                continue
            for key, state, request_id, sent_at, *_ in chunk:
                if state == "sent":
                    self._ahead.add(key)
                    self._in_flight[key] = (request_id, sent_at)

    def _check_open(self) -> None:
        if self._closed:
            raise CodewordsError("not sent: the map has stopped")


_CANONICAL: Dict[str, Any] = {"sort_keys": True, "separators": (",", ":"), "allow_nan": False}


def _digest(text: str) -> bytes:
    import hashlib

    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _masked_key(key: str, secret: str, digest: bytes) -> str:
    """An item's key as the journal writes it: with the API key masked, and then the digest of the
    key as it was, so that it stays apart from a key that held "***" itself."""
    masked = key.replace(secret, "***")
    return masked if masked == key else f"{masked} #{digest.hex()}"


def _encodable(text: str) -> bool:
    """Whether UTF-8 can encode the text, and SQLite hold it (a lone surrogate cannot be)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable(output: Any, secret: str) -> Tuple[str, Any]:
    """An output as the journal keeps it, its type and its value, with the key masked."""
    if output is None:
        return "none", None
    if isinstance(output, (bytes, bytearray, memoryview)):
        return "bytes", bytes(output).replace(secret.encode("utf-8", "replace"), b"***")
    if isinstance(output, str):
        if not _encodable(output):
            raise UnicodeError("a str with a lone surrogate")
        return "str", output.replace(secret, "***")
    text = _json_text(output, separators=(",", ":"))
    if secret in text or '"' in secret or "\\" in secret:  # a key JSON would escape is looked for unescaped
        text = _json_text(_masked(output, secret), separators=(",", ":"))
    return "json", text


def _stored_output(output_type: str, output: Any) -> Any:
    """An output as run() returned it, from what the journal keeps."""
    if output_type == "none":
        return None
    if output_type == "bytes":
        return bytes(output)
    if output_type == "str":
        return output if isinstance(output, str) else bytes(output).decode("utf-8", "surrogatepass")
    return _json_value(output)


def _error_text(error: APIStatusError, key: _Key) -> str:
    """A final failure as the journal keeps it: its class, status, detail, message and request id."""
    fields = {
        "type": type(error).__name__,
        "status_code": error.status_code,
        "detail": error.detail,
        "message": str(error),
        "request_id": error.request_id,
    }
    return _json_text(_masked(fields, key.value), default=str)


def _stored_error(text: str) -> APIStatusError:
    """A failure recorded by the journal, as the exception of its class."""
    fields = json.loads(text)
    cls = _JOURNALED_ERRORS.get(fields.get("type"), APIStatusError)
    return cls(
        fields.get("message") or "",
        status_code=int(fields.get("status_code") or 0),
        detail=fields.get("detail"),
        request_id=fields.get("request_id"),
    )


def _lock_journal(path: str) -> IO[bytes]:
    """The lock of a journal: an exclusive lock on PATH-lock, which dies with its process (a kill
    -9 leaves none behind). POSIX: flock. Windows, which has no fcntl: msvcrt.locking of its first
    byte, which Windows also lets go of when the process ends. A second open of the file in this
    process is a second lock, refused too."""
    import sys

    lock = open(os.path.realpath(path) + "-lock", "a+b")  # a symlink to the journal shares its lock
    try:
        if sys.platform == "win32":
            import msvcrt

            lock.seek(0)
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise CodewordsError(
            f"the journal {path} is in use by another map (its lock {path}-lock is held): one map at a time per journal"
        ) from None
    except BaseException:
        lock.close()
        raise
    _JOURNAL_LOCKS.add(lock)
    return lock


def _unlock_journal(lock: IO[bytes]) -> None:
    _JOURNAL_LOCKS.discard(lock)
    lock.close()


def _forget_journal_locks() -> None:
    """In a child after fork(): close its copies of the journal locks of the parent, whose flock
    the child would share (it belongs to the open file), so that they still die with the parent."""
    for lock in list(_JOURNAL_LOCKS):
        _unlock_journal(lock)


_JOURNAL_LOCKS: Set[IO[bytes]] = set()  # the locks this process holds
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_journal_locks)


def _journal_summary(path: str) -> Dict[str, Any]:
    """What a journal holds: items finished, failed, in flight (sent, no outcome yet) and never
    sent (of the last map's items, when its inputs had a length). Read only, with no request."""
    import sqlite3

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no journal at {path}")
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=5.0)
        try:
            counts = dict(connection.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall())
            total = connection.execute("SELECT value FROM batch WHERE name = 'total'").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise ConfigurationError(f"{path} cannot be read as a journal: {exc}") from None
    finished, failed, in_flight = counts.get("done", 0), counts.get("failed", 0), counts.get("sent", 0)
    known = total is not None and total[0] is not None
    never_sent = max(0, int(total[0]) - finished - failed - in_flight) if known else None
    return {"finished": finished, "failed": failed, "in_flight": in_flight, "never_sent": never_sent}


# ---------------------------------------------------------------------------------------------
# Log streams: read as they come, each entry once, across reconnects, until the run ends
# ---------------------------------------------------------------------------------------------
#
# Three pieces: LogStream opens and reopens the connection and reads its body in small blocks;
# _LogParser turns the lines of one connection into entries (NDJSON or server-sent events); and
# _LogPosition remembers how far delivery has gone, to ask a reconnect to resume from there and
# to skip what the server sends again. _LogFollower feeds a stream to on_log while a run goes on.

_ISO_8601 = r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:[.,](\d+))?\s*([Zz]|[+-]\d\d:?\d\d)?\Z"
_LINE_END = re.compile(rb"\r\n|\r|\n")  # compiled: it is searched from a position
_SSE_FIELD = r":|(data|id|event|retry)(:|\Z)"
_DIGITS = r"[0-9]+\Z"
_LOG_EVENT_TYPES = ("", "message", "log")  # SSE event types that carry log entries
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
# What makes a log stream reconnect, counted toward LOG_RECONNECTS: its connection failed or
# was refused for now, or the question whether the run goes on could not be answered.
_STREAM_FAILURES = (APIConnectionError, RateLimitError, ServerError, *_EXCHANGE_FAILURES)


class LogStream:
    """An iterator over a run's log entries, each once and in order, that ``close()`` stops from any thread."""

    def __init__(self, client: Client, request_id: str, key: _Key) -> None:
        self.request_id = request_id
        self._client, self._key = client, key
        self._stop = _Stop()
        # Failed connections in a row, with no entry with a createdAt between them; and clean
        # closes in a row while the run goes on, with nothing new between them.
        self._failures = _Attempts(LOG_RECONNECTS, LOG_BACKOFF, self._stop)
        self._closes = _Attempts(math.inf, LOG_BACKOFF, self._stop)
        self._started = time.monotonic()
        self._next_check = self._started + LOG_READ_TIMEOUT  # when next to ask whether the run has ended
        self._ends_at: Optional[float] = None  # once the run has ended: when to stop draining
        self._ended_at: Optional[int] = None  # the record's completedAt, as an instant, once it has one
        self._entries = self._follow()
        with client._streams_lock:
            client._streams.add(self)

    def __iter__(self) -> LogStream:
        return self

    def __next__(self) -> LogEntry:
        self._client._check_open()
        return next(self._entries)

    def close(self) -> None:
        """Stop the stream, from any thread, in whatever it is doing: connecting, waiting for an
        answer, reading (a read blocked on the socket returns at once) or sleeping."""
        self._stop.set()

    def _follow(self) -> Iterator[LogEntry]:
        position = _LogPosition()
        try:
            while True:
                failure: Optional[BaseException] = None
                try:
                    if (yield from self._connection(position)):
                        return
                except _STREAM_FAILURES as exc:
                    failure = exc
                if failure is not None:  # counted outside the except: what _failed raises has no __context__
                    self._failed(failure)
                position.reconnected()
        except _Stopped:
            return

    def _connection(self, position: _LogPosition) -> Generator[LogEntry, None, bool]:
        """Deliver what one connection brings that is new: True once the stream has ended, False
        to reconnect. A failure raises; a clean close while the run goes on is none."""
        try:
            answer = self._open(position)
        except APITimeoutError:
            if self._run_has_ended():
                return True  # no answer in LOG_READ_TIMEOUT, and the run has ended: nothing will come
            raise
        if answer is None:
            return False
        response = answer.response
        assert response is not None
        parser = _LogParser(answer.headers.get("Content-Type", ""))
        try:
            with response:
                for line in _split_lines(_stream_blocks(response, answer.key)):
                    self._check_stopped()  # a closed stream yields nothing more
                    entry = parser.feed(line)
                    if entry is not None and position.is_new(entry, parser.event_id):
                        if isinstance(entry.get("createdAt"), str):  # news, not a keep-alive
                            self._failures.made = self._closes.made = 0
                            self._drain_for(entry["createdAt"])
                        yield entry
                    if self._drained():
                        return True
        except urllib3.exceptions.ReadTimeoutError:
            self._check_stopped()
            logger.debug("log stream of %s silent; asking whether the run goes on", self.request_id)
            return self._run_has_ended()  # silence is not a failure
        finally:
            if answer.watch is not None:
                _release(answer.watch, self._stop)
            if parser.retry is not None:
                retry = max(parser.retry, LOG_RETRY_MIN)
                self._failures.backoff = self._closes.backoff = (retry, retry)
        self._check_stopped()
        if self._run_has_ended():
            return True  # the server ended the stream with the run
        # Closed while the run goes on: a server may answer with what it has, and close. That is
        # no failure; ask again after a pause that grows while the closes bring nothing new.
        self._closes.spend(self._closes.pause())
        return False

    def _open(self, position: _LogPosition) -> Optional[_Answer]:
        """GET /logs from where delivery stands; None after waiting out a 404 while the run goes on."""
        # A timestamp may hold a lone surrogate (a JSON "\ud800"): it goes back as the server wrote it.
        query = "?after=" + quote(position.after, safe="", errors="surrogatepass") if position.after else ""
        headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
        last_event_id = _header_value(position.event_id)
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        request = _Request(
            _LOGS,
            _LOGS.at(request_id=self.request_id, query=query),
            self._key,
            self._client._deadline(None) + LOG_READ_TIMEOUT,
            headers=headers,
            request_id=self.request_id,
            read_timeout=LOG_READ_TIMEOUT,
            stop=self._stop,
        )
        try:
            return self._client._send(request, _Attempts(0, LOG_BACKOFF))  # _failed counts a failed reopen
        except NotFoundError:
            # A run just started, or still queued, may have no logs yet: wait while it goes on.
            if time.monotonic() - self._started < LOG_NOT_FOUND_GRACE:
                self._stop.wait(POLL_BACKOFF[0])
            elif self._run_has_ended():
                raise
            else:
                self._stop.wait(POLL_BACKOFF[1])
            return None

    def _drained(self) -> bool:
        """Whether a stream that goes on should end: the run has ended (asked once every
        LOG_READ_TIMEOUT, whatever the stream sends: keep-alives may carry a createdAt too) and
        LOG_GRACE has passed since, or since the last entry written before the run's end."""
        now = time.monotonic()
        if self._ends_at is None and now >= self._next_check:
            self._next_check = now + LOG_READ_TIMEOUT
            if self._run_has_ended():
                self._ends_at = now + LOG_GRACE
        return self._ends_at is not None and now >= self._ends_at

    def _drain_for(self, created: str) -> None:
        """An entry came after the run ended: written before its end, it is worth LOG_GRACE more."""
        if self._ends_at is not None and self._ended_at is not None:
            instant = _instant(created)
            if instant is not None and instant <= self._ended_at:
                self._ends_at = time.monotonic() + LOG_GRACE

    def _run_has_ended(self) -> bool:
        """Whether GET /request/{id} says the run has ended. A record that cannot be read (404,
        not a JSON object) says so too: there is nothing to wait for. Other errors are raised."""
        try:
            record = _record(self._client, self._key, self.request_id, self._client._deadline(None), self._stop)
        except APIStatusError as exc:
            if isinstance(exc, (AuthenticationError, RateLimitError, ServerError)):
                raise
            return True
        completed = record.get("completedAt")
        self._ended_at = _instant(completed) if isinstance(completed, str) else None
        return _finished(record)

    def _failed(self, exc: BaseException) -> None:
        """Count a failed connection, or a failed question about the run, and wait before the next
        one; APIConnectionError after LOG_RECONNECTS of them in a row."""
        self._check_stopped()
        text = str(exc) if isinstance(exc, CodewordsError) else _foreign_text(exc, self._key)
        retry_after = getattr(exc, "retry_after", None)
        wait = max(self._failures.pause(), retry_after or 0.0)
        if not self._failures.spend(wait):
            raise APIConnectionError(
                f"the log stream of {self.request_id} failed {self._failures.made + 1} times in a row: {text}",
                request_id=self.request_id,
            ) from None
        logger.info("log stream of %s failed (%s); reconnected after %.1f s", self.request_id, text, wait)

    def _check_stopped(self) -> None:
        if self._stop.is_set():
            raise _Stopped


class _LogFollower:
    """Streams a run's logs to ``on_log`` on a thread of its own while the caller waits: one
    stream at a time, and one call of ``on_log`` at a time, across the streams of a rerun."""

    def __init__(self, client: Client, key: _Key, on_log: Callable[[LogEntry], Any]) -> None:
        self._client, self._key, self._on_log = client, key, on_log
        self._calling = threading.Lock()  # held while on_log runs
        self._stream: Optional[LogStream] = None
        self._thread: Optional[threading.Thread] = None

    def follow(self, request_id: Optional[str]) -> None:
        """Follow this run's logs (None: no run's), once the stream of the run before has stopped."""
        self.finish()
        if request_id is not None:
            self._stream = stream = LogStream(self._client, request_id, self._key)
            self._thread = threading.Thread(target=self._pump, args=(stream,), name=f"codewords-logs-{request_id}")
            self._thread.daemon = True
            self._thread.start()

    def finish(self, drain_until: Optional[float] = None) -> None:
        """Stop following; with ``drain_until`` (a deadline), first let the stream reach its end (it
        ends with the run) for LOG_GRACE seconds, but not past it. Once this returns, on_log is
        never called again for this stream; a call under way is waited for as long as the stream
        was, and after Ctrl-C or an error for LOG_CALLBACK_WAIT: a slow on_log holds no one."""
        stream, thread = self._stream, self._thread
        if stream is None or thread is None:
            return
        now = time.monotonic()
        until = now + LOG_CALLBACK_WAIT if drain_until is None else min(now + LOG_GRACE, drain_until)
        if drain_until is not None:
            thread.join(max(0.0, until - time.monotonic()))
        stream.close()  # the thread's blocked read returns at once, and it ends; no other on_log begins
        thread.join(max(0.0, until - time.monotonic()))
        self._stream = self._thread = None

    def _pump(self, stream: LogStream) -> None:
        while True:
            try:
                entry = next(stream)
            except StopIteration:
                return
            except CodewordsError as exc:
                logger.warning("stopped streaming the logs of %s: %s", stream.request_id, exc)
                return
            except RuntimeError:
                if not self._client._closed:
                    raise
                logger.debug("stopped streaming the logs of %s: the client was closed", stream.request_id)
                return
            with self._calling:
                if stream._stop.is_set():
                    return
                try:
                    self._on_log(entry)
                except Exception:
                    logger.exception(
                        "on_log raised on a log entry of %s; its logs are no longer streamed", stream.request_id
                    )
                    stream.close()
                    return


class _LogParser:
    """The entries in the lines of one connection: NDJSON, or server-sent events read as the
    WHATWG spec says (an event's ``data:`` lines joined, comments and unknown fields ignored).

    The declared type decides: ``text/event-stream`` is read as events, a JSON type (NDJSON,
    JSON Lines) as lines; of any other type, or none, an answer whose first line is an SSE field
    is read as events. In events, a line that starts with ``{`` is still an entry of its own, as
    the official clients expect. An event of a type other than the default "message" (or "log") is not an entry: it
    is a keep-alive such as ``event: ping``. Anything else is NDJSON, where a line that starts
    with ``:`` is a comment too, and a line that is not a JSON object is ``{"rawText": line}``.
    """

    def __init__(self, content_type: str) -> None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        self.sse = media_type == "text/event-stream"
        self._sniff = not self.sse and "json" not in media_type  # a type that says neither: the first line tells
        self.event_id = ""  # the SSE "last event ID" at the last event
        self.retry: Optional[float] = None  # the SSE "retry:" in seconds
        self._data: List[str] = []
        self._type = ""  # the SSE "event:" of the event being read
        self._started = False  # whether a line has come that is not blank

    def feed(self, line: bytes) -> Optional[LogEntry]:
        """The entry this line completes, if any."""
        text = line.decode("utf-8", "replace")
        if not self._started:
            text = text[1:] if text.startswith("\ufeff") else text  # a byte order mark
            self._started = bool(text.strip())
            self.sse = self.sse or (self._sniff and bool(re.match(_SSE_FIELD, text)))
        if not self.sse:
            text = text.strip()
            return _parse_log_line(text) if text and not text.startswith(":") else None
        if not text:  # the end of an event
            data, self._data = "\n".join(self._data), []
            kind, self._type = self._type, ""
            return _parse_log_line(data) if data.strip() and kind in _LOG_EVENT_TYPES else None
        if text.startswith("{"):
            return _parse_log_line(text.strip())
        self._field(*text.partition(":")[::2])
        return None

    def _field(self, name: str, value: str) -> None:
        """An SSE field line; a comment (an empty name) or an unknown field says nothing to us."""
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self.event_id = value
        elif name == "retry" and re.match(_DIGITS, value):
            self.retry = min(int(value) / 1000, RETRY_AFTER_MAX)


class _LogPosition:
    """How far delivery has gone: what to ask a reconnect for, and which entries it sends again.

    Why each entry comes once. Say the server lists its log in createdAt order, entries of equal
    createdAt in any order (a new one on each connection), and we have delivered every entry
    older than N and some of those at N (the newest timestamp delivered). We reconnect with
    ?after=A, A the newest delivered timestamp older than N (or none). A server whose after= is
    inclusive (>= A) or exclusive (> A), and one that ignores it, all answer every entry at N or
    later, after some older ones. We skip the older ones (all delivered) and, at N, those equal to
    one already delivered at N, each delivered one matching once (as a multiset: identical
    entries can be told apart only by how many there are, and that is enough). So each entry at
    N comes out once when the server has listed them all; then nothing more is skipped, and
    entries newer than N come as listed. An entry is "equal" by its content and SSE id together:
    with stable ids, a new id is delivered and a known one skipped, whatever the order. A server
    that resumes from Last-Event-ID instead answers what follows that id: the same holds if it
    lists ties in a stable order. Nothing is filtered within a connection that did not replay.
    """

    def __init__(self) -> None:
        self.after: Optional[str] = None  # the A above
        self.event_id = ""  # the SSE id of the last entry delivered
        self._newest: Optional[Tuple[str, Optional[int]]] = None  # N, as text and as an instant
        self._at_newest: Counter[Tuple[str, str]] = collections.Counter()  # (id, entry) delivered at N
        self._unmatched: Optional[Counter[Tuple[str, str]]] = None  # while replaying: not yet seen again

    def reconnected(self) -> None:
        self._unmatched = collections.Counter(self._at_newest) if self._newest is not None else None

    def is_new(self, entry: LogEntry, event_id: str) -> bool:
        """Whether to deliver this entry, and if so, count it as delivered. An entry without a
        createdAt is always delivered: nothing tells whether it was sent before."""
        created = entry.get("createdAt")
        if not isinstance(created, str):
            return True
        stamp = (created, _instant(created))
        order = 1 if self._newest is None else _time_order(stamp, self._newest)
        key = (event_id, json.dumps(entry, sort_keys=True))
        if self._unmatched is not None:
            if order < 0:
                return False
            if order == 0 and self._unmatched[key] > 0:
                self._unmatched[key] -= 1
                return False
            if order > 0:
                self._unmatched = None  # the replay is over
        if order > 0:
            self.after = self._newest[0] if self._newest is not None else None
            self._newest, self._at_newest = stamp, collections.Counter()
        if order >= 0:
            self._at_newest[key] += 1
        elif self.after is None or _time_order(stamp, (self.after, _instant(self.after))) > 0:
            self.after = created  # out of order within a connection: still older than N
        self.event_id = event_id
        return True


def _time_order(a: Tuple[str, Optional[int]], b: Tuple[str, Optional[int]]) -> int:
    """-1, 0 or 1 as timestamp a is older than, as old as or newer than b: as instants, else as text."""
    if a[1] is not None and b[1] is not None:
        return (a[1] > b[1]) - (a[1] < b[1])
    return (a[0] > b[0]) - (a[0] < b[0])


def _stream_blocks(response: requests.Response, secret: str) -> Iterator[bytes]:
    """A streamed body's bytes as they arrive, decoded, in blocks of up to _BLOCK; _Cut if it ends
    short of its Content-Length or of its encoding's end. A urllib3 without read1 (before 2.1)
    gives a chunked body chunk by chunk too, but reads any other in blocks of _BLOCK or to its end."""
    decoder = _Decoder(response.headers.get("Content-Encoding", ""), secret)
    read1 = getattr(response.raw, "read1", None)
    if read1 is not None:
        blocks: Iterable[bytes] = iter(lambda: read1(_BLOCK, decode_content=False), b"")
    else:
        blocks = response.raw.stream(_BLOCK, decode_content=False)
    received = 0
    for block in blocks:
        received += len(block)
        yield from decoder.feed(block)
    _check_length(response, received)
    yield decoder.end()


def _split_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a byte stream, ended by LF, CRLF or CR, each as soon as it is complete (a CR
    at the end of a block ends its line at once, and an LF right after it is dropped), and the
    last one even unended; in time linear in its length however long a line is."""
    pending = bytearray()
    after_cr = False  # the last line ended with a CR: an LF that comes next belongs to it
    for block in blocks:
        if after_cr and block.startswith(b"\n"):
            block = block[1:]
        start = len(pending)  # what is pending holds no line end
        pending += block
        cut = 0
        for end in _LINE_END.finditer(pending, start):
            yield bytes(pending[cut : end.start()])
            cut = end.end()
        after_cr = after_cr if not block else cut == len(pending) and pending.endswith(b"\r")
        del pending[:cut]
        if len(pending) > LOG_LINE_MAX:
            raise CodewordsError(f"the log stream sent a line longer than {_size(LOG_LINE_MAX)}: it is not a log")
    if pending:
        yield bytes(pending)


def _parse_log_line(text: str) -> LogEntry:
    """A log entry from an NDJSON line or an event's data: a JSON object, else ``{"rawText": text}``."""
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        return {"rawText": text}
    return entry if isinstance(entry, dict) else {"rawText": text}


def _instant(timestamp: str) -> Optional[int]:
    """An ISO 8601 timestamp in nanoseconds since the epoch (UTC if it names no zone), or None."""
    match = re.match(_ISO_8601, timestamp.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    offset = datetime.timedelta(0)
    if zone and zone not in "Zz":
        offset = (-1 if zone[0] == "-" else 1) * datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[-2:]))
    try:
        fields = (int(year), int(month), int(day), int(hour), int(minute), int(second))
        moment = datetime.datetime(*fields, tzinfo=datetime.timezone(offset))
    except ValueError:
        return None  # no such day, hour or zone
    seconds = (moment - _EPOCH) // datetime.timedelta(seconds=1)
    return seconds * 10**9 + int((fraction or "").ljust(9, "0")[:9])


def _header_value(event_id: str) -> str:
    """An SSE id as a Last-Event-ID header value: its UTF-8 bytes, carried in a str as Latin-1
    (how http.client sends header values), or "" when it cannot go into a header unchanged
    (spaces or control characters at its ends or in it); the resume then rests on ?after=."""
    value = event_id.encode("utf-8").decode("latin-1")
    return value if re.match(_HEADER_VALUE, value) else ""


# ---------------------------------------------------------------------------------------------
# Uploads: a file streamed to the storage host, which never sees the key
# ---------------------------------------------------------------------------------------------

_BAD_FILENAME = r"[/\\\x00-\x1f\x7f]"


def _upload_urls(
    client: Client, key: _Key, filename: str, content_type: Optional[str], deadline: float
) -> Tuple[str, str, Dict[str, str]]:
    """POST /file: where to PUT the bytes, the URL to download them from, and the PUT's headers."""
    answer = client._send(_Request(_FILE, _FILE.at(filename=quote(filename, safe="")), key, deadline))
    upload_uri, download_uri, signed_headers = _upload_answer(answer)
    if signed_headers is not None:
        headers = dict(signed_headers)
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = content_type or "application/octet-stream"
    else:
        guessed = mimetypes.guess_type(filename)[0]
        headers = {"Content-Type": content_type or guessed or "application/octet-stream", "x-amz-acl": "public-read"}
    return upload_uri, download_uri, headers


def _put(client: Client, url: str, body: _UploadBody, headers: Dict[str, str], deadline: float) -> None:
    """PUT the bytes to the storage host, rewound before each try, with no key or credential."""
    client._send(_Request(_PUT, url, None, deadline, body=body, headers=headers))


class _UploadBody:
    """The bytes of a PUT, read in large blocks from a file or buffer, reporting progress.

    It has a length, so requests sends a Content-Length and no chunked encoding. ``read``
    returns blocks of UPLOAD_BLOCK whatever size is asked, which both http.client and urllib3
    accept, so a large file goes out in few system calls.
    """

    def __init__(
        self,
        source: Union[IO[bytes], memoryview],
        start: int,
        size: int,
        on_progress: Optional[Callable[[int, int], Any]],
    ) -> None:
        self._source, self._start, self._size, self._on_progress = source, start, size, on_progress
        self._sent = 0
        self._reported = 0.0

    def __len__(self) -> int:
        return self._size

    def rewind(self) -> None:
        if not isinstance(self._source, memoryview):
            self._source.seek(self._start)
        self._sent = 0
        self._report(force=True)

    def read(self, size: int = -1) -> bytes:
        """The next block. What the source or on_progress raises comes out wrapped in _SourceFailed,
        which is no OSError: urllib3 would take an OSError (a TimeoutError too) for a dropped
        connection and retry, or swallow a BrokenPipeError and wait for an answer to a cut body."""
        try:
            count = min(UPLOAD_BLOCK, self._size - self._sent)
            block: Union[bytes, memoryview]
            if isinstance(self._source, memoryview):
                block = self._source[self._sent : self._sent + count]
            else:
                block = self._source.read(count)
            if count and not block:
                raise OSError(f"the file ended after {self._sent} of {self._size} bytes: it changed while it was sent")
            self._sent += len(block)
            self._report(force=bool(block) and self._sent == self._size)  # the last block, once
        except BaseException as exc:
            raise _SourceFailed(exc) from None
        return block  # type: ignore[return-value]

    def _report(self, force: bool) -> None:
        if self._on_progress is not None and (force or time.monotonic() - self._reported >= PROGRESS_INTERVAL):
            self._reported = time.monotonic()
            self._on_progress(self._sent, self._size)


class _SourceFailed(Exception):
    """Carries what the source or on_progress raised out of requests, to be raised as it was."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


@contextlib.contextmanager
def _upload_source(source: Any) -> Iterator[Tuple[Union[IO[bytes], memoryview], int, int]]:
    """What ``upload`` was given, opened: (source, start offset, size); what it opened is closed after.

    A regular file with a size is streamed from where it stands. Anything else read through a
    file descriptor or that cannot seek (a FIFO, a pipe, a socket, ``/dev/stdin``, a terminal, a
    file of ``/proc``, whose size says 0) is first copied to a temporary file, to its end, for its
    size and for retries. A device that is not a terminal (``/dev/urandom``) is refused.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        yield view, 0, view.nbytes
        return
    with contextlib.ExitStack() as opened:
        if isinstance(source, (str, os.PathLike)):
            source = opened.enter_context(open(source, "rb"))  # FileNotFoundError, PermissionError: nothing sent
        if not _has_size(source):
            copy = opened.enter_context(tempfile.TemporaryFile())
            shutil.copyfileobj(source, copy, UPLOAD_BLOCK)
            source = copy
            source.seek(0)
        start = source.tell()
        size = source.seek(0, os.SEEK_END) - start
        source.seek(start)
        yield source, start, size


def _check_source(source: Any) -> None:
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        if not callable(getattr(source, "read", None)):
            raise TypeError(f"upload takes a path, bytes or a binary file object, not {type(source).__name__}")
        if isinstance(source, io.TextIOBase):
            raise TypeError("upload needs a binary file object: open the file with 'rb'")


def _has_size(source: IO[bytes]) -> bool:
    """Whether a file object can be sent as it is: it seeks, and its file descriptor, if it has
    one, is a regular file with a size. ValueError for a device other than a terminal, which is
    no file (/dev/null) or never ends (/dev/zero, /dev/urandom)."""
    try:
        descriptor = source.fileno()
    except (AttributeError, OSError, ValueError):  # io.BytesIO has none
        return bool(getattr(source, "seekable", lambda: False)())
    info = os.fstat(descriptor)
    if stat.S_ISCHR(info.st_mode) and not os.isatty(descriptor):
        name = getattr(source, "name", None)
        what = repr(name) if isinstance(name, str) else "this file object"
        raise ValueError(f"upload cannot read {what}: it is a device, not a file; give a file, a pipe or bytes")
    return stat.S_ISREG(info.st_mode) and info.st_size > 0 and source.seekable()


def _check_filename(filename: Optional[str]) -> str:
    if filename is None:
        raise ValueError("upload needs filename= when the source is not a path")
    if (
        not isinstance(filename, str)
        or not filename.strip()
        or filename in (".", "..")
        or re.search(_BAD_FILENAME, filename)
    ):
        raise ValueError(f"bad filename {filename!r}: want a plain file name such as 'data.csv'")
    try:
        filename.encode("utf-8")
    except UnicodeEncodeError:  # a name of bytes that are not UTF-8, or a lone surrogate
        raise ValueError(f"bad filename {filename!r}: it is not valid UTF-8") from None
    return filename


def _upload_answer(answer: _Answer) -> Tuple[str, str, Optional[Dict[str, str]]]:
    """upload_uri, download_uri and upload_headers from the answer to POST /file."""
    body = _value_of(answer)
    if isinstance(body, dict):
        upload_uri, download_uri, headers = body.get("upload_uri"), body.get("download_uri"), body.get("upload_headers")
        good_headers = headers is None or (
            isinstance(headers, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        )
        if isinstance(upload_uri, str) and isinstance(download_uri, str) and good_headers:
            parts = urlsplit(upload_uri)
            if parts.hostname and (
                parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname))
            ):
                return upload_uri, download_uri, headers
    raise APIStatusError(
        f"{answer.status} from POST /file: expected an https upload_uri and a download_uri,"
        f" got {_describe(body)[:200]}",
        status_code=answer.status,
        body=body,
    )


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DEADLINE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_CLI_EPILOG = f"""\
The API key comes from ${API_KEY_ENV} only: a key on the command line would leak into the
shell history and `ps`. Standard output holds only the result, as JSON (bytes, such as an
image, as they came); everything else goes to standard error. INPUTS is JSON, @file.json, or -
for standard input (finite numbers only: no NaN, Infinity or 1e400). -i key=value adds a field to
an object, its value taken as JSON only if it is true, false, null, an integer written plainly
(3, -12; not 007), or starts with {{ [ or "; anything else is a string (ver=1.10 stays "1.10",
hex=89504e47 stays text). -s key=value adds a field that is always a string (-s n=3 is "3").

exit codes:
  {EXIT_OK}    success
  {EXIT_FAILED}    the API or the workflow failed
  {EXIT_USAGE}    bad usage or configuration
  {EXIT_DEADLINE}    a deadline passed (the run goes on: pick it up with `result REQUEST_ID`)
  {EXIT_INTERRUPTED}  interrupted
"""


class _UsageError(Exception):
    """A command-line argument that cannot be used."""


def main(argv: Optional[List[str]] = None) -> int:
    """The ``codewords-lite`` command: run workflows from shell scripts, cron jobs and CI."""
    import argparse
    import sys

    args = _cli_parser(argparse).parse_args(argv)
    if args.debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler.addFilter(_unechoed_record)
        logging.basicConfig(level=logging.DEBUG, handlers=[handler])
    status = _Status(sys.stderr, enabled=sys.stderr.isatty() and not args.debug)
    if not os.environ.get(API_KEY_ENV) and not getattr(args, "offline", False):
        print(f"codewords-lite: no API key: export {API_KEY_ENV}=... (from the environment only)", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client(base_url=args.base_url) as client:
            output = args.handler(client, args, status)
    except KeyboardInterrupt:
        again = f"; resume with: codewords-lite result {status.request_id}" if status.request_id else ""
        print(f"interrupted{again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CodewordsError, _UsageError, OSError) as error:
        if args.debug:
            import traceback

            traceback.print_exc()
        code, message = _cli_failure(error)
        print(f"codewords-lite: {message}", file=sys.stderr)
        return code
    if isinstance(output, bytes):  # an image, a PDF: as it came, for `> file.png`
        sys.stdout.flush()
        sys.stdout.buffer.write(_unechoed(output))
        sys.stdout.buffer.flush()
    elif output is not _NO_OUTPUT:
        layout: Dict[str, Any] = {"indent": 2} if sys.stdout.isatty() else {"separators": (",", ":")}
        # Python 3.11+ writes no integer of over 4,300 digits as text, and an output may hold one.
        digits, set_digits = getattr(sys, "get_int_max_str_digits", int)(), getattr(sys, "set_int_max_str_digits", None)
        if set_digits is not None:
            set_digits(0)
        try:
            print(_json_text(_unechoed(output), **layout))
        finally:
            if set_digits is not None:
                set_digits(digits)
    return EXIT_OK


_NO_OUTPUT: Any = object()  # a command that has printed what it had to say


def _unechoed(value: Any) -> Any:
    """What the command line prints, with the key masked: a workflow or a server may echo it."""
    key = os.environ.get(API_KEY_ENV)
    if key and isinstance(value, bytes):
        return value.replace(key.encode("utf-8", "replace"), b"***")
    return _masked(value, key) if key else value


def _unechoed_record(record: logging.LogRecord) -> bool:
    """A filter of the --debug log handler that masks the key in every record, urllib3's too
    (it quotes a header line it cannot parse): its message, traceback and stack."""
    record.msg, record.args = _unechoed(record.getMessage()), None
    if record.exc_info:
        record.exc_text = _unechoed(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = _unechoed(record.stack_info)
    return True


def _cli_failure(error: Exception) -> Tuple[int, str]:
    """The exit code and the one line that tell what went wrong."""
    message = str(error) or type(error).__name__
    request_id = getattr(error, "request_id", None)
    if request_id and request_id not in message:
        message += f" (request {request_id})"
    if isinstance(error, RunTimeout):
        if request_id and not isinstance(error, _NeverStarted):
            message = f"run {request_id} passed its deadline; it may still finish: codewords-lite result {request_id}"
        return EXIT_DEADLINE, message
    if isinstance(error, CodewordsError) and not isinstance(error, ConfigurationError):
        return EXIT_FAILED, message
    return EXIT_USAGE, message


def _cli_parser(argparse: Any) -> Any:
    parser = argparse.ArgumentParser(
        prog="codewords-lite",
        description="Call CodeWords workflows from the command line.",
        epilog=_CLI_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"codewords-lite {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", help="the runtime's URL (else $CODEWORDS_BASE_URL or the default)")
    common.add_argument("--debug", action="store_true", help="log every request, and show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[..., Any], help: str) -> Any:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    run = command("run", _cli_run, "run a workflow and print its output")
    _cli_inputs_arguments(run)
    run.add_argument("--logs", action="store_true", help="print the run's log lines to standard error")
    run.add_argument("--timeout", type=float, help="seconds to wait in all (default 600)")
    run.add_argument(
        "--fallback",
        choices=["resume", "rerun", "off"],
        help="what to do when the gateway gives up (default resume; off with a one-time key)",
    )
    start = command("start", _cli_start, "start a workflow in the background and print its request id")
    _cli_inputs_arguments(start)
    result = command("result", _cli_result, "wait for a run and print its output")
    result.add_argument("request_id", metavar="REQUEST_ID")
    result.add_argument("--timeout", type=float, help="seconds to wait (default 600)")
    result.add_argument("--logs", action="store_true", help="print the run's log lines to standard error")
    logs = command("logs", _cli_logs, "print a run's log entries, one JSON object a line, until it ends")
    logs.add_argument("request_id", metavar="REQUEST_ID")
    details = command("details", _cli_details, "print a run's request record")
    details.add_argument("request_id", metavar="REQUEST_ID")
    upload = command("upload", _cli_upload, "upload a file and print its download URL")
    upload.add_argument("file", metavar="FILE", help="a path, or - for standard input (named stdin)")
    upload.add_argument("--filename", help="the name to store it under (default: the file's)")
    upload.add_argument("--content-type", help="default: guessed from the name")
    _cli_batch_commands(command)
    return parser


def _cli_inputs_arguments(sub: Any) -> None:
    """SERVICE_ID, INPUTS, -i, -s and --path: the arguments of a command that sends a run."""
    sub.add_argument("service_id", metavar="SERVICE_ID")
    sub.add_argument("inputs", metavar="INPUTS", nargs="?", help="JSON, @file.json, or - for stdin")
    sub.add_argument(
        "-i",
        dest="fields",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        type=lambda text: ("-i", text),
        help='an input field: JSON if true, false, null, a plain integer, or starting with { [ "; else a string',
    )
    sub.add_argument(
        "-s",
        dest="fields",
        metavar="KEY=VALUE",
        action="append",
        type=lambda text: ("-s", text),
        help="an input field, always a string",
    )
    sub.add_argument("--path", default="", help="a path after the service id")


def _cli_batch_commands(command: Callable[..., Any]) -> None:
    """map and journal: a batch of runs, and what its journal holds."""
    batch = command("map", _cli_map, "run a workflow once per line of JSON Lines, printing a line per item in order")
    batch.add_argument("service_id", metavar="SERVICE_ID")
    batch.add_argument(
        "file", metavar="FILE", nargs="?", default="-", help="JSON Lines, one run's inputs a line; - for stdin"
    )
    batch.add_argument("--journal", metavar="FILE", help="a journal: the same command again resumes the batch")
    batch.add_argument("--workers", type=int, default=8, help="runs at once (default 8)")
    batch.add_argument("--timeout", type=float, help="seconds to wait for each item (default 600)")
    batch.add_argument("--retry-failed", action="store_true", help="run again the items the journal holds as failed")
    batch.add_argument("--path", default="", help="a path after the service id")
    summary = command("journal", _cli_journal, "print what a journal holds: finished, failed, in flight, never sent")
    summary.add_argument("journal", metavar="FILE")
    summary.set_defaults(offline=True)


def _cli_run(client: Client, args: Any, status: _Status) -> Any:
    inputs = _cli_inputs(args)
    fallback = {None: _CLIENT_DEFAULT, "off": None}.get(args.fallback, args.fallback)
    on_log = _cli_on_log(client, args, status)
    plan = client._plan(args.service_id, args.path, "POST", None, fallback, on_log).given(inputs)
    deadline = client._deadline(args.timeout)
    # The request id is known before the run is sent, so that an interrupted wait can be resumed.
    request_id = status.request_id = _provision_for_run(client, plan.key, deadline) if plan.needs_id else None
    try:
        with status.showing(status.wait_line()):
            return _run(client, plan, deadline, request_id)
    except GatewayTimeout as exc:
        if plan.fallback is None:  # --fallback off (or a one-time key): the gateway gave up, not the run
            exc.args = (f"{exc}; {_cli_goes_on(request_id or exc.request_id, plan.key.once)}",)
        raise


def _cli_goes_on(request_id: Optional[str], once: bool) -> str:
    """What a 504 left unresumed means for the run: it may go on, and how to pick it up."""
    if request_id:
        return f"the gateway gave up waiting, but the run may go on: codewords-lite result {request_id}"
    how = "a one-time key sends it with none" if once else "--fallback resume waits for it by its id"
    return (
        f"the gateway gave up waiting, but the run may go on; sent without a request id, it cannot be picked up ({how})"
    )


def _cli_start(client: Client, args: Any, status: _Status) -> Any:
    print(client.start(args.service_id, _cli_inputs(args), path=args.path).request_id)
    return _NO_OUTPUT


def _cli_result(client: Client, args: Any, status: _Status) -> Any:
    import sys

    run = client.get_run(args.request_id)
    request_id = status.request_id = run.request_id
    deadline = client._deadline(args.timeout)
    key, on_log = client._key(), _cli_on_log(client, args, status)
    # An id provisioned but never sent waits as a run does (another process may yet send one with
    # it), so say so at once rather than after the deadline; not with a one-time key's one request.
    unsent = not key.once and not _cli_started(client, key, request_id, deadline)
    if unsent:
        seconds = client.timeout if args.timeout is None else args.timeout
        print(
            f"codewords-lite: run {request_id} has not started: no run has been sent with this request id"
            f" yet; waiting for one, up to {seconds:g} s (--timeout)",
            file=sys.stderr,
            flush=True,
        )
    try:
        with status.showing(status.wait_line()):
            return run.wait(timeout=max(deadline - time.monotonic(), 1e-3), on_log=on_log)
    except RunTimeout:
        if unsent and not _cli_started(client, key, request_id, time.monotonic() + _CLI_LAST_LOOK):
            raise _NeverStarted(
                f"run {request_id} never started: no run was sent with this request id before the deadline;"
                f" if one is sent later: codewords-lite result {request_id}",
                request_id=request_id,
            ) from None
        raise


_CLI_LAST_LOOK = 2.0  # seconds that `result` may take past its deadline to tell a run never sent


class _NeverStarted(RunTimeout):
    """`result` of an id no run was sent with before the deadline."""


def _cli_started(client: Client, key: _Key, request_id: str, deadline: float) -> bool:
    """Whether the request record shows a run (the library's test of a started run); True if the
    record cannot be read: then nothing is said, and the wait tells what it finds."""
    try:
        record = _record(client, key, request_id, deadline)
    except CodewordsError:
        return True
    return bool(record.get("startedAt") or record.get("serviceId") or _finished(record))


def _cli_on_log(client: Client, args: Any, status: _Status) -> Optional[Callable[[LogEntry], None]]:
    """The on_log of a wait: none with a one-time key, whose one request cannot stream logs too
    (the status line then shows the elapsed time and request id only)."""
    if not client._key().once:
        return status.log_printer(args.logs)
    if args.logs:
        raise _UsageError("--logs streams the run's logs, and a one-time key allows one request")
    return None


def _cli_logs(client: Client, args: Any, status: _Status) -> Any:
    import sys

    status.request_id = args.request_id
    for entry in client.logs(args.request_id):
        sys.stdout.write(_json_text(_unechoed(entry)) + "\n")
        sys.stdout.flush()
    return _NO_OUTPUT


def _cli_details(client: Client, args: Any, status: _Status) -> Any:
    return client.details(args.request_id)


def _cli_upload(client: Client, args: Any, status: _Status) -> Any:
    describe, on_progress = _upload_line()
    source, filename = args.file, args.filename
    if source == "-":  # standard input, named as `upload /dev/stdin` names it unless --filename says
        source, filename = _cli_stdin(), filename or "stdin"
    try:
        with status.showing(describe):
            url = client.upload(source, filename=filename, content_type=args.content_type, on_progress=on_progress)
    except ValueError as exc:  # a file name that cannot be sent, say: bad usage
        raise _UsageError(str(exc)) from None
    print(url)
    return _NO_OUTPUT


def _cli_map(client: Client, args: Any, status: _Status) -> Any:
    """``map``: every line checked before anything is sent, then a line out per item, in order:
    {"index", "request_id", "output"}, bytes as "output_base64", or "error": {"type", "message",
    "status_code"}. Exit 1 if any failed, 3 if any passed its deadline (the same command picks it up)."""
    import base64
    import sys

    items = _cli_lines(args.file)
    plan = client._plan(args.service_id, args.path, "POST", None, _CLIENT_DEFAULT, None)
    plan.key.refuse("map sends a request an item")
    workers = _check_count("--workers", args.workers, 1)
    seconds = client.timeout if args.timeout is None else _check_seconds("--timeout", args.timeout)
    with contextlib.ExitStack() as stack:
        path = args.journal or os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "batch.db")
        book = _Journal.open(path, plan, None, args.retry_failed, len(items))
        book.tagged = True  # items come as (request_id, output)
        mapper = _Mapper(client, plan, seconds, workers, True, book)
        counts, started = {"done": 0, "failed": 0, "late": 0}, time.monotonic()
        stack.enter_context(status.showing(lambda: _batch_line(counts, len(items), started)))
        try:
            for index, result in enumerate(mapper.outputs(items, True, None, len(items))):
                line: Dict[str, Any] = {"index": index, "request_id": getattr(result, "request_id", None)}
                if isinstance(result, BaseException):
                    counts["failed"] += 1
                    counts["late"] += isinstance(result, RunTimeout)
                    status_code = getattr(result, "status_code", None)
                    line["error"] = {"type": type(result).__name__, "message": str(result), "status_code": status_code}
                else:
                    line["request_id"], output = result
                    if isinstance(output, bytes):
                        line["output_base64"] = base64.b64encode(_unechoed(output)).decode("ascii")
                    else:
                        line["output"] = output
                counts["done"] += 1
                sys.stdout.write(_json_text(_unechoed(line)) + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            if args.journal:
                print("the same command resumes the batch, with no run paid twice", file=sys.stderr)
            raise
    if counts["late"]:
        again = (
            "the same command picks them up" if args.journal else "with --journal, the same command would pick them up"
        )
        raise RunTimeout(f"{counts['late']} of {len(items)} items passed their deadline and may go on: {again}")
    if counts["failed"]:
        raise CodewordsError(f"{counts['failed']} of {len(items)} items failed")
    return _NO_OUTPUT


def _cli_lines(name: str) -> List[Any]:
    """A batch's inputs, JSON Lines, read whole and checked before anything is sent; blank lines
    are skipped (an item's index counts items, not lines)."""
    try:
        if name == "-":
            data = _cli_stdin().read()
        else:
            with open(name, "rb") as file:
                data = file.read()
    except OSError as exc:
        raise _UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    items = []
    for number, line in enumerate(data.splitlines(), 1):
        try:
            text = line.decode("utf-8")
            if text.strip():
                items.append(_finite_json(text, f"{name}, line {number}"))
        except UnicodeDecodeError:
            raise _UsageError(f"{name}, line {number}: not UTF-8 text; nothing was sent") from None
        except (ValueError, RecursionError) as exc:
            raise _UsageError(f"{name}, line {number}: not valid JSON ({exc}); nothing was sent") from None
    return items


def _batch_line(counts: Dict[str, int], total: int, started: float) -> str:
    """The status of a map: items done of all, failed, rate and time left."""
    done, elapsed = counts["done"], max(time.monotonic() - started, 1e-3)
    rate = done / elapsed
    left = f"{(total - done) / rate:.0f} s left" if rate else "time left unknown"
    return f"{done}/{total} done  {counts['failed']} failed  {rate:.1f}/s  {left}"


def _cli_journal(client: Client, args: Any, status: _Status) -> Any:
    return _journal_summary(args.journal)


def _cli_inputs(args: Any) -> Any:
    """INPUTS (JSON, @file or - for stdin) with the -i and -s fields on top, in their order."""
    inputs: Any = {}
    for argument in [args.inputs or "", *(text for _, text in args.fields)]:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:  # the shell passed bytes that are not UTF-8
            raise _UsageError(f"{argument!r} is not UTF-8 text") from None
    try:
        if args.inputs == "-":
            text = _cli_stdin().read().decode("utf-8")
        elif args.inputs and args.inputs.startswith("@"):
            with open(args.inputs[1:], encoding="utf-8") as file:
                text = file.read()
        else:
            text = args.inputs
    except UnicodeDecodeError as exc:
        raise _UsageError(f"INPUTS {args.inputs} is not UTF-8 text: {exc}") from None
    if text is not None:
        try:
            inputs = _finite_json(text, "INPUTS")
        except (ValueError, RecursionError) as exc:
            raise _UsageError(f"INPUTS is not valid JSON: {exc}") from None
    if args.fields and not isinstance(inputs, dict):
        option = args.fields[0][0]
        raise _UsageError(f"{option} adds a field to a JSON object, and INPUTS is a {type(inputs).__name__}")
    for option, field in args.fields:
        key, value = _parse_field(field, as_string=option == "-s")
        inputs[key] = value
    return inputs


_JSON_WORDS = {"true": True, "false": False, "null": None}


def _parse_field(field: str, as_string: bool = False) -> Tuple[str, Any]:
    """``key=value`` as (key, value). With -s (``as_string``) the value is the string; with -i it
    is JSON only when plainly meant as JSON: true, false, null, an integer whose text comes back
    the same (3, -12; not 007, +3 or 1_000), or text starting with { [ or " (which must then be
    JSON); anything else stays the string, so that 1.10 or 89504e47 keep their text."""
    option = "-s" if as_string else "-i"
    key, equals, text = field.partition("=")
    key = key.strip()
    if not equals or not key:
        raise _UsageError(f"{option} takes KEY=VALUE, not {field!r}")
    if as_string:
        return key, text
    if text in _JSON_WORDS:
        return key, _JSON_WORDS[text]
    if _plain_integer(text):
        return key, int(text)
    if not text.startswith(("{", "[", '"')):
        return key, text
    try:
        return key, _finite_json(text, f"-i {key}")
    except RecursionError:
        raise _UsageError(f"-i {key}: JSON nested too deeply") from None
    except ValueError as exc:
        raise _UsageError(f"-i {key} is not valid JSON: {exc} (-s {key}=... sends it as a string)") from None


def _plain_integer(text: str) -> bool:
    """Whether the text is an integer as Python writes it: one that round-trips exactly."""
    try:
        return str(int(text)) == text
    except ValueError:  # not an integer, or more digits than int() reads (Python 3.11+)
        return False


def _cli_stdin() -> IO[bytes]:
    """Standard input as bytes; a usage error if the process has none (its descriptor 0 closed)."""
    import sys

    if sys.stdin is None:
        raise _UsageError("- reads standard input, and this process has none")
    return sys.stdin.buffer


def _finite_json(text: str, where: str) -> Any:
    """JSON as json.loads reads it, less what the request body cannot carry: NaN, Infinity and
    numbers too large for a float (1e400) are a usage error that names them, not a traceback."""

    def constant(name: str) -> Any:
        raise _UsageError(f"{where} holds {name}, which is not JSON: only finite numbers can be sent")

    def number(digits: str) -> float:
        value = float(digits)
        if math.isinf(value):
            raise _UsageError(f"{where} holds {digits}, too large for a float: only finite numbers can be sent")
        return value

    return json.loads(text, parse_constant=constant, parse_float=number)


class _Status:
    """One line on standard error, redrawn in place while the command works: a terminal only."""

    def __init__(self, stream: Any, enabled: bool) -> None:
        self.request_id: Optional[str] = None
        self._stream, self._enabled = stream, enabled
        self._describe: Callable[[], str] = str
        self._newest_log = ""
        self._lock = threading.Lock()

    def log_printer(self, print_all: bool) -> Optional[Callable[[LogEntry], None]]:
        """An on_log that keeps the newest line for the status, and prints every line if asked."""
        if not (print_all or self._enabled):
            return None

        def on_log(entry: LogEntry) -> None:
            text = str(_unechoed(entry.get("message", entry.get("rawText", json.dumps(entry, ensure_ascii=False)))))
            with self._lock:
                self._newest_log = " ".join(text.split())
                if print_all:
                    self._write("\r\x1b[K" if self._enabled else "")
                    self._write(text.rstrip("\n") + "\n")

        return on_log

    def wait_line(self) -> Callable[[], str]:
        """The status of a wait: elapsed time, request id and newest log line."""
        started = time.monotonic()
        return lambda: f"{time.monotonic() - started:6.1f} s  {self.request_id or ''}  {self._newest_log}"

    @contextlib.contextmanager
    def showing(self, describe: Callable[[], str]) -> Iterator[None]:
        """Redraw ``describe()`` five times a second until the block ends, then clear it."""
        stop = threading.Event()

        def redraw() -> None:
            while True:
                with self._lock:
                    if stop.is_set():
                        return
                    width = shutil.get_terminal_size().columns - 1
                    self._write("\r\x1b[K" + describe()[:width])
                stop.wait(0.2)

        if self._enabled:
            threading.Thread(target=redraw, name="codewords-status", daemon=True).start()
        try:
            yield
        finally:
            stop.set()
            with self._lock:
                self._write("\r\x1b[K" if self._enabled else "")

    def _write(self, text: str) -> None:
        if text:
            self._stream.write(text)
            self._stream.flush()


def _upload_line() -> Tuple[Callable[[], str], Callable[[int, int], None]]:
    """The status of an upload (bytes sent, percent, rate) and the on_progress that feeds it."""
    started, progress = time.monotonic(), [0, 0]

    def describe() -> str:
        sent, total = progress
        rate = sent / max(time.monotonic() - started, 1e-3) / 2**20
        percent = 100 * sent // total if total else 100
        return f"{sent / 2**20:8.1f} / {total / 2**20:.1f} MiB  {percent:3d}%  {rate:.1f} MiB/s"

    def on_progress(sent: int, total: int) -> None:
        progress[:] = [sent, total]

    return describe, on_progress


if __name__ == "__main__":
    raise SystemExit(main())
