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
    │   └── RunFailed                                     the workflow's own error answer; .record
    └── RunTimeout(CodewordsError, TimeoutError)          a deadline passed; .request_id
"""

from __future__ import annotations  # annotations stay unevaluated: a cheaper import

import collections.abc
import contextlib
import datetime
import email.utils
import heapq
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
import stat
import tempfile
import threading
import time
import weakref
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    Counter,
    Dict,
    Generator,
    Iterable,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Protocol,
    Set,
    Tuple,
    TypeVar,
    Union,
)
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

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

LOG_READ_TIMEOUT = 60.0  # a log stream with no entry this long: ask whether the run has ended
LOG_BACKOFF = (0.5, 5.0)  # first and longest sleep before reconnecting a dropped log stream
LOG_RECONNECTS = 10  # drops in a row, with no entry between them, before giving up
LOG_NOT_FOUND_GRACE = 5.0  # seconds a just-started run's logs may answer 404 before we ask about the run
LOG_GRACE = 2.0  # how long a finished run's log stream may take to reach its end
LOG_BLOCK = 64 << 10  # the most bytes read from a log stream at once
LOG_LINE_MAX = 16 << 20  # a longer log line is not a log line: the stream is refused
POOL_SIZE = 100  # connections kept open to the API host; more calls at once than this open and close their own

UPLOAD_BLOCK = 1 << 20  # bytes read from the source per write to the socket
UPLOAD_READ_TIMEOUT = 120.0  # for the storage host's answer to a PUT
PROGRESS_INTERVAL = 0.25  # seconds between two on_progress calls

LogEntry = Dict[str, Any]
_T = TypeVar("_T")
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
            self.record = self._client._wait_for_record(self.request_id, deadline, on_log)
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
# The client
# ---------------------------------------------------------------------------------------------


class _ClientDefault:
    """Stands for "the client's own setting" in keyword defaults, and says so in ``help()``."""

    def __repr__(self) -> str:
        return "<the client's setting>"


_CLIENT_DEFAULT: Any = _ClientDefault()


class Client:
    """A connection to the CodeWords runtime; safe to share between threads.

    The API key is read when first needed, so making a client never fails for a missing key.
    ``headers`` go with every run it sends (X-Correlation-Id, Run-As-Template: yes).
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
    ) -> None:
        if base_url is None:
            base_url = next((os.environ[n] for n in BASE_URL_ENVS if os.environ.get(n)), None)
        self.base_url = _check_base_url(base_url or DEFAULT_BASE_URL)
        self.timeout = _check_seconds("timeout", timeout)
        self.sync_timeout = _check_seconds("sync_timeout", sync_timeout)
        self.connect_timeout = _check_seconds("connect_timeout", connect_timeout)
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise ConfigurationError(f"max_retries must be a whole number >= 0, not {max_retries!r}")
        self.max_retries = max_retries
        self.fallback: Optional[Literal["resume", "rerun"]] = _check_fallback(fallback)
        self.headers = _check_headers(headers)  # sent with every run, under those of the call
        self._api_key = api_key
        self._given_session = session
        # Proxies and the CA bundle come from the environment once, not on every call.
        self._proxies = requests.utils.get_environ_proxies(self.base_url)
        self._verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        # One pool for all threads (urllib3's pools are thread-safe): it holds as many connections
        # as calls ever ran at once, however many threads come and go.
        self._pool = _WatchedAdapter(pool_maxsize=POOL_SIZE)
        self._pool_pid = os.getpid()  # a child process after fork() makes its own (see _connections)
        self._closed = False
        self._streams: weakref.WeakSet[LogStream] = weakref.WeakSet()  # live logs(), stopped by close()
        self._streams_lock = threading.Lock()
        self._gate = _RateGate()

    def __repr__(self) -> str:
        return f"<codewords_lite.Client {self.base_url}>"

    def __getstate__(self) -> Dict[str, Any]:
        """A pickle carries the settings and a key given as an argument; never a key read from
        the environment (read again where it is unpickled), nor sessions or a given session."""
        settings = ("base_url", "timeout", "sync_timeout", "connect_timeout", "max_retries", "fallback", "headers")
        return {"api_key": self._api_key, **{name: getattr(self, name) for name in settings}}

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
        if self._pool_pid != os.getpid():
            return  # a child after fork(): what is open is the parent's (its streams' sockets too)
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.close()
        self._pool.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this codewords_lite.Client is closed: make a new one")

    def _connections(self) -> _WatchedAdapter:
        """The client's pool of connections. A child process after fork() gets a new one: sharing
        the parent's sockets would mix the two processes' answers (the child's copies are dropped)."""
        if self._pool_pid != os.getpid():
            self._pool, self._pool_pid = _WatchedAdapter(pool_maxsize=POOL_SIZE), os.getpid()
            self._streams = weakref.WeakSet()  # the parent's: closing them would cut its sockets
        return self._pool

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
        plan = self._plan_run(service_id, inputs, path, timeout, fallback, on_log, request_id, method, headers)
        return self._run(plan)

    def _plan_run(
        self,
        service_id: str,
        inputs: Any,
        path: str,
        timeout: Optional[float],
        fallback: Optional[str],
        on_log: Optional[Callable[[LogEntry], Any]],
        request_id: Optional[str],
        method: str = "POST",
        headers: Optional[Mapping[str, str]] = None,
    ) -> _RunPlan:
        """Check a run's arguments and decide, before anything is sent, what it will send.

        A one-time key allows one request: no provision, no log stream, no fallback, no retry;
        what needs more is refused here.
        """
        method, run_headers = _check_method(method), self._run_headers(headers)
        url_path = _service_path("run", service_id, path)
        body: Optional[bytes] = None
        if method == "GET":
            url_path += _query_of(inputs)
        else:
            body = _encode_inputs(inputs)
        deadline = self._deadline(timeout)
        if request_id is not None:
            _check_name("request id", request_id)
        chosen = self.fallback if fallback is _CLIENT_DEFAULT else _check_fallback(fallback)
        if self._one_time_key():
            if on_log is not None:
                raise ConfigurationError(_ONE_REQUEST.format("on_log streams logs"))
            if fallback is not _CLIENT_DEFAULT and fallback is not None:
                raise ConfigurationError(_ONE_REQUEST.format(f"fallback={fallback!r} sends a second request"))
            plan = _RunPlan(service_id, path, url_path, body, None, deadline, request_id, False, None)
        else:
            if method == "GET" and chosen == "rerun":
                raise ConfigurationError("fallback='rerun' starts the run again with run_async, which takes POST only")
            provision = request_id is None and (chosen == "resume" or on_log is not None)
            plan = _RunPlan(service_id, path, url_path, body, chosen, deadline, request_id, provision, on_log)
        plan.method, plan.headers = method, run_headers
        return plan

    def _claim_id(self, plan: _RunPlan) -> None:
        """Provision the run's request id, if its plan asks for one."""
        if plan.provision:
            plan.request_id = self._provision(plan.deadline)
            plan.provision = False

    def _run(self, plan: _RunPlan) -> Any:
        """A planned run, with its logs streamed while it goes on.

        Ctrl-C raises KeyboardInterrupt saying whether the run was sent and how to pick it up.
        """
        sending, ended = False, False  # ended: the run has finished, so its log stream ends too
        try:
            self._claim_id(plan)
            sending = True
            if plan.on_log is not None and plan.request_id:
                plan.follower = _LogFollower(self, plan.request_id, plan.on_log)
            output = self._run_blocking(plan)
            ended = True
            return output
        except RunFailed:
            ended = True
            raise
        except KeyboardInterrupt:
            what = f"run of {plan.service_id}"
            message = _interrupted(what, plan.request_id) if sending else f"{what} interrupted before it was sent"
            for replaced in plan.cut_short:  # a rerun's first run, which may go on too
                message += f"; the run it reran ({replaced or 'sent without a request id'}) may go on too"
            raise KeyboardInterrupt(message) from None
        finally:
            if plan.follower is not None:
                plan.follower.finish(plan.deadline if ended else None)

    def _run_blocking(self, plan: _RunPlan) -> Any:
        """POST /run, and the plan's fallback if its answer is cut short."""
        headers = dict(plan.headers)
        if plan.request_id:
            headers[PROVISION_HEADER] = plan.request_id
        try:
            response = self._request(
                plan.method,
                plan.url_path,
                body=plan.body,
                headers=headers,
                read_timeout=self.sync_timeout,
                deadline=plan.deadline,
                kind=_RUN,
                request_id=plan.request_id,
                admit=plan.admit,
            )
        except _CutShort as cut:
            if _passed(plan.deadline):
                raise _run_timeout(plan.service_id, plan.request_id) from cut.error
            if plan.fallback == "resume" and plan.request_id:
                logger.info("blocking run %s cut short (%s); waiting for it by its id", plan.request_id, cut.error)
                return _output(self._poll_for_record(plan.request_id, plan.deadline), plan.request_id)
            if plan.fallback != "rerun":
                raise cut.error from cut.__cause__
            logger.warning("blocking run of %s cut short (%s); starting it again", plan.service_id, cut.error)
            if plan.follower is not None:  # only the run whose output is returned streams its logs
                plan.follower.finish()
                plan.follower = None
            url_path = _service_path("run_async", plan.service_id, plan.path)
            plan.cut_short.append(plan.request_id)
            plan.request_id = None  # until the rerun's answer names it
            plan.request_id = self._start(url_path, plan.body, plan.deadline, plan.admit, plan.headers).request_id
            if plan.on_log is not None:
                plan.follower = _LogFollower(self, plan.request_id, plan.on_log)
            return _output(self._poll_for_record(plan.request_id, plan.deadline), plan.request_id)
        return _output_of(response)

    def start(
        self, service_id: str, inputs: Any = None, *, path: str = "", headers: Optional[Mapping[str, str]] = None
    ) -> Run:
        """Start a workflow in the background (POST /run_async) and return its Run; ``inputs``
        and ``headers`` as for ``run()``."""
        url_path, run_headers = _service_path("run_async", service_id, path), self._run_headers(headers)
        return self._start(url_path, _encode_inputs(inputs), self._deadline(None), headers=run_headers)

    def _start(
        self,
        url_path: str,
        body: Optional[bytes],
        deadline: float,
        admit: Optional[Callable[[], None]] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> Run:
        response = self._request(
            "POST", url_path, body=body, deadline=deadline, kind=_START, admit=admit, headers=headers
        )
        return Run(self, _request_id_in(response))

    def provision(self) -> str:
        """A new request id, for ``run(request_id=...)``: the run can then be found by it."""
        return _request_id_in(self._request("POST", "/provision-request", deadline=self._deadline(None)))

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
        """
        _service_path("run", service_id, path)  # bad names and headers fail here, not in every worker
        self._run_headers(headers)
        if self._one_time_key():
            raise ConfigurationError(_ONE_REQUEST.format("map sends a request an item"))
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
            raise ConfigurationError(f"max_workers must be a whole number >= 1, not {max_workers!r}")
        if timeout is not None:
            _check_seconds("timeout", timeout)
        if fallback is not _CLIENT_DEFAULT:
            _check_fallback(fallback)
        total = len(inputs) if isinstance(inputs, collections.abc.Sized) else None
        options = {"path": path, "timeout": timeout, "fallback": fallback, "headers": headers}
        return self._map(service_id, inputs, options, max_workers, ordered, return_exceptions, on_progress, total)

    def _map(
        self,
        service_id: str,
        inputs: Iterable[Any],
        options: Dict[str, Any],
        max_workers: int,
        ordered: bool,
        return_exceptions: bool,
        on_progress: Optional[Callable[[int, Optional[int]], Any]],
        total: Optional[int],
    ) -> Iterator[Any]:
        import concurrent.futures  # map() alone needs it, and it would cost more than the rest of the import

        gate = _MapGate()
        items = enumerate(inputs)
        window: Dict[Future[Any], int] = {}  # runs submitted and not yet yielded, in input order
        counted: Set[Future[Any]] = set()  # finished, told to on_progress, not yet yielded
        done, reading = 0, True
        pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="codewords-map")
        try:
            while True:
                while reading and len(window) < 2 * max_workers:
                    item = next(items, None)
                    if item is None:
                        reading = False
                    else:
                        window[pool.submit(self._map_item, service_id, item[1], options, item[0], gate)] = item[0]
                if not window:
                    return
                running = [f for f in window if f not in counted]  # waiting on a finished one would spin
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    counted.add(future)
                    if future.cancelled():
                        continue
                    done += 1
                    if future.exception() is not None and not return_exceptions:
                        reading = False  # the map stops at this failure: cancel what comes after it
                        for later, index in window.items():
                            if index > window[future]:
                                later.cancel()
                if on_progress is not None:
                    on_progress(done, total)
                ready = itertools.takewhile(counted.__contains__, window) if ordered else list(finished)
                for future in list(ready):
                    index = window.pop(future)
                    counted.discard(future)
                    if future.cancelled():
                        continue
                    error = future.exception()
                    if error is not None and not return_exceptions:
                        raise error
                    output = error if error is not None else future.result()
                    yield output if ordered else (index, output)
        except KeyboardInterrupt:
            going_on = gate.stop()
            listed = ", ".join(f"item {i} ({r or 'no request id known'})" for i, r in going_on)
            message = f"map of {service_id} interrupted; runs that go on: {listed or 'none'}; no other run is sent"
            logger.warning(message)
            raise KeyboardInterrupt(message) from None
        finally:
            gate.stop()
            for future in window:
                future.cancel()
            pool.shutdown(wait=False)

    def _map_item(self, service_id: str, item: Any, options: Dict[str, Any], index: int, gate: _MapGate) -> Any:
        """One item of a map: a run planned and sent unless the map has stopped."""
        path, timeout, fallback, headers = options["path"], options["timeout"], options["fallback"], options["headers"]
        plan = self._plan_run(service_id, item, path, timeout, fallback, None, None, "POST", headers)
        plan.admit = lambda: gate.admit(index, plan)
        gate.check()
        try:
            return self._run(plan)
        finally:
            gate.finished(index)

    def get_run(self, request_id: str) -> Run:
        """The Run of a request id, to wait for a run started elsewhere or earlier."""
        return Run(self, _check_name("request id", request_id))

    def result(self, request_id: str, timeout: Optional[float] = None) -> Any:
        """Wait for the run with this request id and return its output."""
        return self.get_run(request_id).wait(timeout)

    def details(self, request_id: str) -> Dict[str, Any]:
        """The request record as it stands now, with timings and cost (GET /request/{id})."""
        request_id = _check_name("request id", request_id)
        response = self._request("GET", f"/request/{request_id}", deadline=self._deadline(None), request_id=request_id)
        return _record_in(response, request_id)

    def logs(self, request_id: str) -> LogStream:
        """Yield a run's log entries as it writes them, each once and in order, until it ends.

        NDJSON and server-sent events are both read; a line or event that is not a JSON object
        comes as ``{"rawText": text}``. A dropped stream is reconnected and resumes where it
        stopped; a silent one is asked about the run, and ends once the run has. Call
        ``.close()`` on the iterator to stop early. Refused with a one-time key: following a
        stream to its end may take more than one request.
        """
        request_id = _check_name("request id", request_id)
        if self._one_time_key():
            raise ConfigurationError(_ONE_REQUEST.format("logs() may reconnect and ask whether the run has ended"))
        return LogStream(self, request_id)

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
        deadline = self._deadline(timeout)
        with _upload_source(source) as (body, start, size, name):
            filename = _check_filename(filename if filename is not None else name)
            response = self._request("POST", "/file?filename=" + quote(filename, safe=""), deadline=deadline)
            upload_uri, download_uri, signed_headers = _upload_answer(response)
            if signed_headers is not None:
                headers = dict(signed_headers)
                if not any(name.lower() == "content-type" for name in headers):
                    headers["Content-Type"] = content_type or "application/octet-stream"
            else:
                guessed = mimetypes.guess_type(filename)[0]
                headers = {
                    "Content-Type": content_type or guessed or "application/octet-stream",
                    "x-amz-acl": "public-read",
                }
            self._put(upload_uri, _UploadBody(body, start, size, on_progress), headers, deadline)
        return download_uri

    def _put(self, url: str, body: _UploadBody, headers: Dict[str, str], deadline: float) -> None:
        """PUT the body to the storage host, rewinding and retrying it on 5xx or a dropped connection,
        all of it by the deadline, which the watchdog holds it to.

        A session of its own carries none of the API's headers, cookies or credentials.
        """
        where = _without_query(url)
        if self._given_session is not None:  # its proxies and CA bundle, and those of the environment if it trusts it
            network = self._given_session.merge_environment_settings(url, {}, None, None, None)
            proxies, verify = network["proxies"], network["verify"]
        else:
            proxies, verify = requests.utils.get_environ_proxies(url), self._verify
        with requests.Session() as storage:
            storage.trust_env = False  # no ~/.netrc credentials for someone else's host
            storage.headers = requests.structures.CaseInsensitiveDict({"User-Agent": USER_AGENT})
            for scheme in ("http://", "https://"):
                storage.mount(scheme, _WatchedAdapter())
            attempt = 0
            while True:
                self._check_open()
                body.rewind()
                timeout = _timeouts(deadline, self.connect_timeout, UPLOAD_READ_TIMEOUT)
                if timeout is None:
                    raise APITimeoutError(f"PUT {where}: the deadline passed")
                try:
                    with _WATCHDOG.watching(deadline):
                        response = storage.put(
                            url,
                            data=body,
                            headers=headers,
                            timeout=timeout,
                            allow_redirects=False,
                            proxies=proxies,
                            verify=verify,
                        )
                except _SourceFailed as exc:
                    raise exc.error from None  # the caller's, not the network's: no retry
                except requests.RequestException as exc:
                    error: CodewordsError = _connection_error("PUT", where, exc, None, self._key())
                    retryable = _is_transport_failure(exc)
                    wait = _backoff(attempt)
                else:
                    if response.status_code < 300:
                        return
                    error = _storage_error(where, response)
                    retryable = response.status_code >= 500 or response.status_code == 429
                    retry_after = _retry_after(response)
                    wait = _backoff(attempt) if retry_after is None else retry_after
                if not retryable or attempt == self.max_retries or time.monotonic() + wait >= deadline:
                    raise error from error.__cause__  # chosen by _connection_error
                attempt += 1
                logger.info(
                    "PUT %s failed (%s); retry %d of %d in %.2f s", where, error, attempt, self.max_retries, wait
                )
                time.sleep(wait)

    # -- the machinery ----------------------------------------------------------------------

    def _provision(self, deadline: float) -> Optional[str]:
        """A request id for a run, or None if the API says it does not offer them (404, 405, 501).

        Any other failure is raised: a run sent without an id would meet the same network.
        """
        try:
            return _request_id_in(self._request("POST", "/provision-request", deadline=deadline, kind=_PROVISION))
        except AuthenticationError as exc:
            raise AuthenticationError(
                f"the API key was refused ({exc.status_code}): {_describe(exc.detail)}",
                status_code=exc.status_code,
                detail=exc.detail,
                body=exc.body,
            ) from None
        except APIConnectionError as exc:  # the run has not been sent: say so, not which call failed
            raise type(exc)(f"the run was not sent: provisioning its request id failed: {exc}") from exc
        except APIStatusError as exc:
            if exc.status_code not in (404, 405, 501):
                raise
            logger.warning("the API offers no request ids (%s); a 504 will not be resumable", exc)
            return None

    def _wait_for_record(
        self, request_id: str, deadline: float, on_log: Optional[Callable[[LogEntry], Any]] = None
    ) -> Dict[str, Any]:
        """Long-poll GET /result until the run finishes and return its record, streaming its logs.

        Ctrl-C raises KeyboardInterrupt saying how to pick the run up.
        """
        if on_log is not None and self._one_time_key():
            raise ConfigurationError(_ONE_REQUEST.format("on_log streams logs"))
        follower = _LogFollower(self, request_id, on_log) if on_log is not None else None
        interrupted = False
        try:
            return self._poll_for_record(request_id, deadline)
        except KeyboardInterrupt:
            interrupted = True
            raise KeyboardInterrupt(_interrupted("wait", request_id)) from None
        finally:
            if follower is not None:
                follower.finish(None if interrupted else deadline)

    def _poll_for_record(self, request_id: str, deadline: float) -> Dict[str, Any]:
        backoff = POLL_BACKOFF[0]
        one_time = self._one_time_key()
        while True:
            hold = min(LONG_POLL_MAX, max(1, math.ceil(deadline - time.monotonic())))
            asked = time.monotonic()
            try:
                response = self._request(
                    "GET",
                    f"/result/{request_id}?timeout={hold}",
                    read_timeout=hold + LONG_POLL_MARGIN,
                    deadline=deadline,
                    request_id=request_id,
                    not_yet=(408, 504),
                )
            except APIConnectionError as exc:
                if _passed(deadline):
                    raise _run_timeout(None, request_id) from exc
                raise
            if response.status_code < 300:
                record = _record_in(response, request_id)
                if _finished(record):
                    return record
            if one_time:
                raise _run_timeout(None, request_id, "the one poll a one-time key allows")
            if _passed(deadline):
                raise _run_timeout(None, request_id)
            if time.monotonic() - asked >= HELD_POLL_MIN:
                backoff = POLL_BACKOFF[0]
                continue
            # The server said "not yet" without holding the poll: back off instead of spinning.
            _sleep_until_at_most(backoff, deadline)
            backoff = min(backoff * 2, POLL_BACKOFF[1])

    def _request(
        self,
        method: str,
        url_path: str,
        *,
        deadline: float,
        body: Optional[bytes] = None,
        headers: Optional[Dict[str, str]] = None,
        read_timeout: float = QUICK_READ_TIMEOUT,
        kind: str = "",
        request_id: Optional[str] = None,
        not_yet: Tuple[int, ...] = (),
        stream: bool = False,
        admit: Optional[Callable[[], None]] = None,
        retry: bool = True,
    ) -> requests.Response:
        """Send one API call, send it again while that is safe, and return a 2xx or ``not_yet`` answer.

        ``kind`` is _RUN for POST /run and _START for POST /run_async, the calls that start a
        workflow, and _PROVISION for a run's provision (see ``_judge``). ``admit`` is called before
        each send of one, and may refuse it. ``retry=False`` sends it once, for a caller that
        retries in its own way.
        """
        all_headers = self._headers()
        if headers:
            all_headers.update(headers)
        one_time = self._one_time_key()  # one request: no retry, and no question afterwards
        retries = 0 if not retry or one_time else self.max_retries
        starts_a_run = kind in (_RUN, _START)  # the calls a limit on concurrent executions counts
        attempt = 0
        while True:
            if not self._gate.enter(deadline, starts_a_run):
                raise APITimeoutError(f"{method} {_strip_query(url_path)}: the deadline passed", request_id=request_id)
            answered = False
            try:
                timeout = _timeouts(deadline, self.connect_timeout, read_timeout)
                if timeout is None:
                    raise APITimeoutError(
                        f"{method} {_strip_query(url_path)}: the deadline passed", request_id=request_id
                    )
                if admit is not None:
                    admit()
                outcome: Union[requests.Response, requests.RequestException]
                try:
                    outcome = self._send(method, url_path, body, all_headers, timeout, stream, deadline)
                except requests.RequestException as exc:
                    outcome = exc
                error, then, wait = self._judge(method, url_path, outcome, kind, request_id, not_yet, attempt)
                answered = error is None
                if then in (_ASK, _CHECK) and request_id and not one_time and isinstance(error, APIStatusError):
                    self._raise_if_started(error, request_id, deadline)  # asked before the pause below
                if isinstance(error, RateLimitError):
                    self._gate.slow_down(wait, starts_a_run)  # every thread waits it out, in gate.enter()
            finally:
                self._gate.leave(starts_a_run, answered)
            if error is None:
                return outcome  # type: ignore[return-value]
            cause = error.__cause__  # the failure of requests, unless it carries the key (_connection_error)
            if then == _CUT:
                raise _CutShort(error) from cause
            if then in (_RAISE, _CHECK) or (then == _ASK and (request_id is None or one_time)):
                raise error from cause  # a run that may have started, or that cannot be told apart
            if attempt == retries or time.monotonic() + wait >= deadline:
                raise error from cause
            attempt += 1
            logger.info("%s %s failed (%s); retry %d of %d", method, _strip_query(url_path), error, attempt, retries)
            if not isinstance(error, RateLimitError):
                time.sleep(wait)

    def _judge(
        self,
        method: str,
        url_path: str,
        outcome: Union[requests.Response, requests.RequestException],
        kind: str,
        request_id: Optional[str],
        not_yet: Tuple[int, ...],
        attempt: int,
    ) -> Tuple[Optional[CodewordsError], str, float]:
        """What an answer or a failure means: (the error or None, what to do next, seconds to wait).

        Any call may be sent again if it never left, but a run's provision (_PROVISION): a host
        that cannot be reached would not take the run either. A call that starts no run may be
        sent again after any failure that may pass. POST /run_async answers before its run
        starts, so its 429 and 503 may be sent again. POST /run may be sent again only when its
        run is known not to have started: a 429 or 503 not marked as the workflow's is _ASK (the
        record says whether it started), any other error answer is _CHECK (the record says whose
        answer it was), and a 504 from the gateway or a read timeout is _CUT (it was sent; it
        may go on).
        """
        starts_a_run = kind in (_RUN, _START)
        if isinstance(outcome, requests.RequestException):
            error: CodewordsError = _connection_error(method, url_path, outcome, request_id, self._key())
            if _nothing_sent(outcome):
                return error, _RAISE if kind == _PROVISION else _RESEND, _backoff(attempt)
            if not starts_a_run and _is_transport_failure(outcome):
                return error, _RESEND, _backoff(attempt)
            if kind == _RUN and isinstance(outcome, requests.ReadTimeout):
                return error, _CUT, 0.0
            return error, _RAISE, 0.0
        status = outcome.status_code
        if status < 300 or status in not_yet:
            return None, "", 0.0
        error = self._status_error(method, url_path, outcome, request_id)
        retry_after = _retry_after(outcome)
        wait = _backoff(attempt) if retry_after is None else retry_after
        if isinstance(error, RunFailed):
            return error, _RAISE, 0.0
        if kind == _RUN and status == 504:
            return error, _CUT, 0.0
        if status in (429, 503):
            return error, _ASK if kind == _RUN else _RESEND, wait
        if kind == _RUN:
            return error, _CHECK, 0.0
        if not starts_a_run and status in (500, 502, 504):
            return error, _RESEND, wait
        return error, _RAISE, 0.0

    def _raise_if_started(self, error: APIStatusError, request_id: str, deadline: float) -> None:
        """After an error answer to POST /run with no Error-Origin: raise it as the workflow's
        (RunFailed) if the run had started, or as it is if that cannot be known or the record
        shows the run succeeded (the error was the gateway's); return if it had not started."""
        try:
            response = self._request("GET", f"/request/{request_id}", deadline=deadline, request_id=request_id)
            record = _record_in(response, request_id)
        except CodewordsError:
            raise error from None
        status = _response_status(record)
        if status is not None and status < 400:
            error.args = (f"{error}; the run itself succeeded: {_pick_up(request_id)}",)
            raise error from None
        if record.get("startedAt") or record.get("serviceId") or record.get("responseStatus") is not None:
            raise RunFailed(
                f"{error} (the workflow's own answer: the run had started)",
                status_code=error.status_code,
                detail=error.detail,
                body=error.body,
                request_id=request_id,
                record=record,
            )

    def _run_headers(self, headers: Optional[Mapping[str, str]]) -> Dict[str, str]:
        """A run's own headers: any type of answer accepted, then the client's, then the call's."""
        merged = requests.structures.CaseInsensitiveDict({"Accept": "*/*"})
        merged.update(_check_headers(self.headers))  # checked again: the attribute can be changed
        merged.update(_check_headers(headers))
        return dict(merged)

    def _headers(self) -> Dict[str, str]:
        """The headers of every API call, with the key read now if it was not given."""
        return {
            "Authorization": "Bearer " + self._key(),
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }

    def _key(self) -> str:
        key = self._api_key or os.environ.get(API_KEY_ENV)
        if not key:
            raise ConfigurationError(f"no API key: pass Client(api_key=...) or set ${API_KEY_ENV}")
        if not _KEY.match(key):
            raise ConfigurationError("the API key has spaces or control characters in it")
        return key

    def _one_time_key(self) -> bool:
        return self._key().startswith(ONE_TIME_KEY_PREFIX)

    def _send(
        self,
        method: str,
        url_path: str,
        body: Optional[bytes],
        headers: Dict[str, str],
        timeout: Tuple[float, float],
        stream: bool,
        deadline: float,
    ) -> requests.Response:
        """An API call's exchange, following at most MAX_REDIRECTS redirects that stay on the
        API's scheme, host and port (see _redirect_target), and none with a one-time key: the
        answer to the last one."""
        url = self.base_url + url_path
        for _ in range(0 if self._one_time_key() else MAX_REDIRECTS):  # a one-time key is spent by one
            response = self._exchange(method, url, body, headers, timeout, stream, deadline)
            target, _why = _redirect_target(self.base_url, method, response)
            if target is None:
                return response
            response.close()
            logger.debug("%s %s redirected (%d) to %s", method, _strip_query(url), response.status_code, target)
            url = target
        return self._exchange(method, url, body, headers, timeout, stream, deadline)

    def _exchange(
        self,
        method: str,
        url: str,
        body: Optional[bytes],
        headers: Dict[str, str],
        timeout: Tuple[float, float],
        stream: bool,
        deadline: float,
    ) -> requests.Response:
        """One HTTP exchange, its whole answer read by the deadline (its headers, if streamed).

        It goes through a session given to the client, as it is set up but for its credentials
        (and whose reads the timeout bounds one by one), or else straight through the client's
        requests adapter, which skips the session's per-call merging of settings, cookies and
        environment (a fifth of a call's time on loopback), watched by the watchdog.
        """
        self._check_open()
        if self._given_session is not None:
            response = self._given_session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                stream=stream,
                auth=_BearerAuth(headers["Authorization"]),  # or ~/.netrc and session.auth would replace the key
            )
            if not stream:
                _check_complete(response)
            return response
        prepared = requests.PreparedRequest()
        prepared.prepare(method=method, url=url, headers=headers, data=body)
        with _WATCHDOG.watching(deadline):
            response = self._connections().send(
                prepared, stream=stream, timeout=timeout, verify=self._verify, proxies=self._proxies
            )
            if not stream:
                _check_complete(response)
        return response

    def _status_error(
        self, method: str, url_path: str, response: requests.Response, request_id: Optional[str]
    ) -> APIStatusError:
        """The APIStatusError for an HTTP error answer, with the server's message in its text."""
        status = response.status_code
        body = _answer(response)
        detail = body.get("detail") if isinstance(body, dict) and "detail" in body else body
        reason = _without_key(response.reason or "", response)
        message = f"{status} {reason} from {method} {_strip_query(url_path)}".replace("  ", " ")
        if 300 <= status < 400:
            location = _without_key(response.headers.get("Location"), response)
            why = _redirect_target(self.base_url, method, response)[1] or (
                "a one-time key is spent by the first request"
                if self._one_time_key()
                else f"more than {MAX_REDIRECTS} redirects in a row"
            )
            message += f": redirected to {location!r}, which is not followed: {why}"
        elif detail not in (None, ""):
            message += ": " + _describe(detail)
        if request_id:
            message += f" (request {request_id})"
        cls = _STATUS_ERRORS.get(status) or (ServerError if status >= 500 else APIStatusError)
        if response.headers.get("Error-Origin") == "service":
            cls = RunFailed  # the workflow's own answer, not the API's
        error = cls(message, status_code=status, detail=detail, body=body, request_id=request_id)
        if isinstance(error, RateLimitError):
            error.retry_after = _retry_after(response)
        return error

    def _deadline(self, timeout: Optional[float]) -> float:
        seconds = self.timeout if timeout is None else _check_seconds("timeout", timeout)
        return time.monotonic() + seconds


# ---------------------------------------------------------------------------------------------
# Private helpers
# ---------------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")
_OUTPUT_FIELDS = ("responseStatus", "responseJson", "responseContent")  # a finished record has one
_CHARSET = re.compile(r"""charset\s*=\s*["']?([^"';\s]+)""", re.I)
_PATH_SAFE = "!$&'()*+,;=:@"  # kept as they are in a path segment (RFC 3986 pchar); all else is encoded
_KEY = re.compile(r"[\x21-\x7e]+\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 token
_ISO_8601 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:[.,](\d+))?\s*([Zz]|[+-]\d\d:?\d\d)?\Z")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_SSE_FIELD = re.compile(r":|(data|id|event|retry)(:|\Z)")
_DIGITS = re.compile(r"[0-9]+\Z")
# A header value HTTP carries as it is: Latin-1, no control characters, no space at its ends.
_HEADER_VALUE = re.compile(r"([!-~\x80-\xff]([ -~\x80-\xff]*[!-~\x80-\xff])?)?\Z")
_LOG_EVENT_TYPES = ("", "message", "log")  # SSE event types that carry log entries
_BAD_FILENAME = re.compile(r"[/\\\x00-\x1f\x7f]")
_XML_CODE = re.compile(r"<Code>(.*?)</Code>", re.S)
_XML_MESSAGE = re.compile(r"<Message>(.*?)</Message>", re.S)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_STATUS_ERRORS = {
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    429: RateLimitError,
    504: GatewayTimeout,
}
# What makes a log stream reconnect, counted toward LOG_RECONNECTS: its connection failed or
# was refused for now, or the question whether the run goes on could not be answered.
_LOG_FAILURES = (
    APIConnectionError,
    RateLimitError,
    ServerError,
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)


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


def _check_fallback(fallback: Any) -> Optional[Literal["resume", "rerun"]]:
    if fallback not in FALLBACKS:
        raise ConfigurationError(f"fallback must be 'resume', 'rerun' or None, not {fallback!r}")
    return fallback  # type: ignore[no-any-return]


def _check_name(what: str, name: Any) -> str:
    """A service id or request id: letters, digits, '_', '-' and '.'."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ConfigurationError(f"bad {what} {name!r}: use letters, digits, '_', '-' and '.'")
    return name


def _service_path(kind: str, service_id: str, path: str) -> str:
    """``/run/{service_id}[/{path}]`` (or run_async): a checked service id, and each segment of
    the path percent-encoded, so that any characters arrive as given (``a b``, ``items:batch``)."""
    url_path = f"/{kind}/{_check_name('service id', service_id)}"
    if not isinstance(path, str):
        raise ConfigurationError(f"bad path {path!r}: want a string such as 'reports/daily'")
    if path.strip("/"):
        for segment in path.strip("/").split("/"):
            if segment in ("", ".", ".."):
                raise ConfigurationError(f"bad path {path!r}: a segment is empty, '.' or '..'")
            try:
                url_path += "/" + quote(segment, safe=_PATH_SAFE)
            except UnicodeEncodeError:
                raise ConfigurationError(f"bad path {path!r}: it is not valid Unicode") from None
    return url_path


def _check_headers(headers: Any) -> Dict[str, str]:
    """Headers of the caller's own (X-Correlation-Id, Run-As-Template): strings that HTTP can
    carry, and none of those the client sets itself."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ConfigurationError(f"headers must be a mapping of names to values, not {type(headers).__name__}")
    owned = {name.lower() for name in OWN_HEADERS}
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ConfigurationError(f"bad header name {name!r}")
        if name.lower() in owned:
            raise ConfigurationError(f"the {name} header is the client's own: it cannot be set")
        if not isinstance(value, str) or not _HEADER_VALUE.match(value):
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
            if item is None:
                continue
            if isinstance(item, bool):
                text = "true" if item else "false"  # as FastAPI and JSON spell them
            # Each as its value, as JSON would send it, not a subclass's own str() (an Enum's name).
            elif isinstance(item, str):
                text = str.__str__(item)
            elif isinstance(item, int):
                text = int.__repr__(item)
            elif isinstance(item, float) and math.isfinite(item):
                text = float.__repr__(item)
            else:
                raise TypeError(f"query parameter {name!r} must be a string, number or boolean, not {item!r}")
            try:
                pairs.append(quote(name, safe="") + "=" + quote(text, safe=""))
            except UnicodeEncodeError:
                raise TypeError(f"query parameter {name!r} is not valid Unicode") from None
    return "?" + "&".join(pairs) if pairs else ""


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


def _decode(content: Union[bytes, str]) -> Any:
    """A body as decoded JSON, else as text, and None when empty."""
    if not content:
        return None
    try:
        return json.loads(content)
    except RecursionError:
        raise CodewordsError("the server answered with JSON nested too deeply to read") from None
    except ValueError:
        return content.decode("utf-8", "replace") if isinstance(content, bytes) else content


def _output_of(response: requests.Response) -> Any:
    """A workflow's answer as its Content-Type says: JSON decoded, ``text/*`` as str in its
    charset (UTF-8 if it names none), anything else as bytes; with no type, JSON if it parses,
    else bytes. An empty body is None."""
    content = response.content
    if not content:
        return None
    media_type, _, parameters = response.headers.get("Content-Type", "").partition(";")
    media_type = media_type.strip().lower()
    charset = _CHARSET.search(parameters)
    encoding = charset.group(1) if charset else "utf-8"
    if media_type == "application/json" or media_type.endswith("+json"):
        return _decode(_decoded_text(content, encoding).lstrip("\ufeff") if charset else content)
    if media_type.startswith("text/"):
        return _decoded_text(content, encoding)
    if not media_type:
        try:
            return json.loads(content)
        except RecursionError:
            raise CodewordsError("the server answered with JSON nested too deeply to read") from None
        except ValueError:
            pass
    return content


def _decoded_text(content: bytes, encoding: str) -> str:
    """Bytes as text in the named encoding, or in UTF-8 if Python has no such text encoding."""
    try:
        return content.decode(encoding, "replace")
    except (LookupError, ValueError):  # no such codec, not a text codec, or a name with a NUL in it
        return content.decode("utf-8", "replace")


def _answer(response: requests.Response) -> Any:
    """An API answer's body, decoded, with the key its request carried masked: the only way to
    read an answer that may end up in an exception or a log record."""
    return _without_key(_decode(response.content), response)


def _without_key(value: Any, response: requests.Response) -> Any:
    """The value with the API key sent in the answered request replaced by *** in every string.

    A server may echo the key back: mask whatever an answer puts in an exception's text,
    ``detail`` or ``body`` or in a log record, before it is cut short or escaped.
    """
    sent = response.request.headers.get("Authorization", "") if response.request is not None else ""
    key = sent[len("Bearer ") :] if sent.startswith("Bearer ") else sent
    return _masked(value, key) if key else value


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
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:497] + "..."


def _masked(value: Any, secret: str) -> Any:
    """The value with every occurrence of the secret in its strings replaced by ***: a copy of
    its lists and dicts made without recursion, so that no depth of nesting is too deep."""

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


def _request_id_in(response: requests.Response) -> str:
    """The ``request_id`` of an answer to /run_async or /provision-request."""
    body = _answer(response)
    request_id = body.get("request_id") if isinstance(body, dict) else None
    try:
        return _check_name("request id", request_id)
    except ConfigurationError:
        raise APIStatusError(
            f"{response.status_code} from {response.request.method} {_strip_query(response.request.path_url)}:"
            f" expected a JSON object with a request_id, got {_describe(body)}",
            status_code=response.status_code,
            body=body,
        ) from None


def _record_in(response: requests.Response, request_id: str) -> Dict[str, Any]:
    """The request record in an answer, which must be a JSON object (the key masked in it, as
    it may end up in a RunFailed)."""
    record = _answer(response)
    if not isinstance(record, dict):
        raise APIStatusError(
            f"{response.status_code} with a request record that is not a JSON object: {_describe(record)}",
            status_code=response.status_code,
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
    status = _response_status(record)
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


def _response_status(record: Dict[str, Any]) -> Optional[int]:
    """The workflow's own HTTP status in a record, which may come as a number or as digits."""
    status = record.get("responseStatus")
    if isinstance(status, str) and status.isdigit():
        return int(status)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def _nothing_sent(exc: requests.RequestException) -> bool:
    """Whether a failure happened before the request left: no connection could be made (refused,
    timed out, or its host name not resolved). Told by what the failure is, as requests and urllib3
    build it, never by the exceptions that were being handled when it was raised."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    failure = exc.args[0] if isinstance(exc, requests.ConnectionError) and exc.args else None
    reason = getattr(failure, "reason", failure)  # urllib3's MaxRetryError wraps it
    return isinstance(reason, urllib3.exceptions.NewConnectionError)  # NameResolutionError is one too


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and every exception it holds: its causes, contexts, reasons and arguments."""
    seen = set()
    todo = [exc]
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        todo.extend(
            e
            for e in (error.__cause__, error.__context__, getattr(error, "reason", None))
            if isinstance(e, BaseException)
        )
        todo.extend(a for a in error.args if isinstance(a, BaseException))


def _foreign_text(exc: BaseException, key: str) -> Tuple[str, Optional[BaseException]]:
    """The text of an exception from requests, urllib3 or http.client, with the key masked, and
    the exception to chain as ``__cause__``: None if the key is in its text or a cause's (a
    server may echo it in a status line or a chunk size), and then its type name is in the text."""
    text = str(exc)
    if not any(key in str(error) or key in repr(error.args) for error in _causes(exc)):
        return text, exc
    return f"{type(exc).__name__}: {text.replace(key, '***')}", None


def _check_complete(response: requests.Response) -> None:
    """Read the body now and raise ConnectionError if it is shorter than its Content-Length,
    which urllib3 before 2.0 lets through, so that a cut answer is retried, not decoded."""
    declared = response.headers.get("Content-Length", "")
    received = len(response.content)
    if declared.isdigit() and "Content-Encoding" not in response.headers and received < int(declared):
        raise requests.ConnectionError(f"the connection closed after {received} of {declared} bytes of the answer")


def _is_transport_failure(exc: requests.RequestException) -> bool:
    """A dropped connection, a timeout or a truncated body: worth asking again if it is safe."""
    return isinstance(
        exc,
        (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
        ),
    )


def _connection_error(
    method: str, url_path: str, exc: requests.RequestException, request_id: Optional[str], key: str
) -> APIConnectionError:
    """The error for a failed exchange, with ``exc`` as its ``__cause__`` unless it carries the key."""
    text, cause = _foreign_text(exc, key)
    if _nothing_sent(exc):  # in words, not urllib3's pool and connection objects
        text = f"could not connect to {_host_of(exc)}: {_unreachable(text)}"
    cls = APITimeoutError if isinstance(exc, requests.Timeout) else APIConnectionError
    error = cls(f"{method} {_strip_query(url_path)} failed: {text}", request_id=request_id)
    error.__cause__ = cause
    return error


def _host_of(exc: requests.RequestException) -> str:
    url = getattr(exc.request, "url", None) or ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the server"


def _unreachable(text: str) -> str:
    """Why no connection could be made, in the words of requests' text of it without the pool and
    connection objects around them ("Failed to establish a new connection: [Errno 111] ...")."""
    reason = re.search(r"Failed to .*?(?=[\"']\)\)?\Z|\Z)", text)
    return reason.group(0) if reason else "timed out" if "timed out" in text else text


class _BearerAuth(requests.auth.AuthBase):
    """The Authorization header of an API call, as requests' ``auth=``: given so, it keeps a
    session from putting its own ``auth`` or ``~/.netrc`` credentials in the key's place."""

    def __init__(self, value: str) -> None:
        self._value = value

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._value
        return request


def _retry_after(response: requests.Response) -> Optional[float]:
    """The Retry-After header in seconds (a number or an HTTP date), capped at a minute."""
    value = response.headers.get("Retry-After", "").strip()
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


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: about 0.5 s, 1 s, 2 s ... never above 8 s."""
    first, longest = RETRY_BACKOFF
    return min(first * 2.0**attempt, longest) * random.uniform(0.5, 1.0)


def _sleep_until_at_most(seconds: float, deadline: float) -> None:
    time.sleep(max(0.0, min(seconds, deadline - time.monotonic())))


def _redirect_target(base_url: str, method: str, response: requests.Response) -> Tuple[Optional[str], str]:
    """Where a redirect may be followed, or None and why not: to the API's own scheme, host and
    port only, so that the key never travels; 307 and 308 keep the method and body, 301, 302 and
    303 are followed for a GET only (a POST would become a GET without its inputs)."""
    status, location = response.status_code, response.headers.get("Location", "")
    if status not in (301, 302, 303, 307, 308) or not location:
        return None, "it says nowhere to go"
    if status in (301, 302, 303) and method != "GET":
        return None, f"a {status} would turn the {method} into a GET without its body"
    target = urljoin(response.url or base_url, location.strip())
    if _origin(target) is None or _origin(target) != _origin(base_url):
        return None, "it leaves the API's scheme, host and port, and the key must not"
    api, parts = urlsplit(base_url), urlsplit(target)
    return urlunsplit((api.scheme, api.netloc, parts.path, parts.query, "")), ""  # the API's spelling, no fragment


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


def _strip_query(url_path: str) -> str:
    return url_path.split("?", 1)[0]


def _without_query(url: str) -> str:
    """A URL without its query, which for a presigned URL holds the signature."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# -- runs ----------------------------------------------------------------------------------------

_RUN, _START = "run", "start"  # the kinds of call that start a workflow: POST /run, POST /run_async
_PROVISION = "provision"  # POST /provision-request for a run about to be sent
# What _judge says to do after a failure: send again, raise, ask the record whether the run
# started (send again if not), ask it whose answer it was (raise either way), or fall back.
_RESEND, _RAISE, _ASK, _CHECK, _CUT = "resend", "raise", "ask", "check", "cut"
_ONE_REQUEST = "{}, and a one-time key allows one request"
_TIMEOUT_MIN = 0.001  # a deadline closer than this has passed: requests refuses a timeout of 0


class _RunPlan:
    """What one blocking run will do, decided before anything is sent."""

    def __init__(
        self,
        service_id: str,
        path: str,
        url_path: str,
        body: Optional[bytes],
        fallback: Optional[str],
        deadline: float,
        request_id: Optional[str],
        provision: bool,
        on_log: Optional[Callable[[LogEntry], Any]],
    ) -> None:
        self.service_id, self.path, self.url_path, self.body = service_id, path, url_path, body
        self.fallback, self.deadline, self.request_id = fallback, deadline, request_id
        self.provision = provision  # a request id is to be provisioned before the run is sent
        self.on_log = on_log
        self.admit: Optional[Callable[[], None]] = None  # called before each send: map's stop
        self.method = "POST"
        self.headers: Dict[str, str] = {}  # the run's own: the client's and the call's
        self.follower: Optional[_LogFollower] = None  # streaming the logs of the run sent
        self.cut_short: List[Optional[str]] = []  # the request ids of runs sent before a rerun, which may go on


class _CutShort(Exception):
    """POST /run left, and its answer was lost (a 504 from the gateway, a read timeout): the
    run may go on. Raised by _request, caught by _run, never seen by a caller."""

    def __init__(self, error: CodewordsError) -> None:
        super().__init__(str(error))
        self.error = error


class _MapGate:
    """What a map's threads share: whether it has stopped, and which of its runs have been sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._sent: Dict[int, _RunPlan] = {}  # item index -> its run, once sent and while it goes on

    def check(self) -> None:
        if self._stopped:
            raise CodewordsError("not sent: the map has stopped")

    def admit(self, index: int, plan: _RunPlan) -> None:
        """Let a run of the map be sent, unless the map has stopped."""
        with self._lock:
            self.check()
            self._sent[index] = plan

    def finished(self, index: int) -> None:
        with self._lock:
            self._sent.pop(index, None)

    def stop(self) -> List[Tuple[int, Optional[str]]]:
        """Let no more runs be sent; the runs that were sent and may go on (a rerun's first run
        too), by item index, with their request ids (None if it is not known)."""
        with self._lock:
            self._stopped = True
            return [(i, r) for i, plan in sorted(self._sent.items()) for r in [*plan.cut_short, plan.request_id]]


def _timeouts(deadline: float, connect: float, read: float) -> Optional[Tuple[float, float]]:
    """The (connect, read) timeouts of a call, cut to what is left before its deadline; None if
    it has passed."""
    left = deadline - time.monotonic()
    return None if left < _TIMEOUT_MIN else (min(connect, left), min(read, left))


def _passed(deadline: float) -> bool:
    """Whether a deadline has passed, or is too close for one more request (see _timeouts)."""
    return deadline - time.monotonic() < _TIMEOUT_MIN


def _finished(record: Dict[str, Any]) -> bool:
    return bool(record.get("completedAt")) or record.get("responseStatus") is not None


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


# -- deadlines -----------------------------------------------------------------------------------


class _Watch:
    """One call watched by the watchdog, with the connection it uses once it has one."""

    __slots__ = ("connection", "deadline", "fired", "live")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.connection: Any = None
        self.fired = False
        self.live = True

    def __lt__(self, other: _Watch) -> bool:
        return self.deadline < other.deadline


class _Watchdog:
    """Shuts the socket of a call whose deadline has passed, so that a deadline bounds the whole
    answer: requests' read timeout bounds each read, and a server that trickles its answer a
    byte at a time would hold a call for ever. One thread for every client, asleep until the
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

    def attach(self, connection: Any) -> Any:
        """Note the connection that this thread's call has just taken from its pool."""
        watch = getattr(self._current, "watch", None)
        if watch is not None:
            watch.connection = connection
        return connection

    def detach(self, connection: Any) -> Any:
        """Note that this thread's call gives its connection back to its pool: from now on the
        watchdog does not shut it, as another call may take it (a lock makes the two exclusive)."""
        watch = getattr(self._current, "watch", None)
        if watch is not None and watch.connection is connection:
            with self._changed:
                watch.connection = None
        return connection

    def release(self, watch: _Watch) -> None:
        self._current.watch = None
        with self._changed:
            watch.live = False
            self._live -= 1
            if len(self._heap) > 2 * self._live + 64:  # drop the finished calls now and then
                self._heap = [w for w in self._heap if w.live]
                heapq.heapify(self._heap)

    @contextlib.contextmanager
    def watching(self, deadline: float) -> Iterator[None]:
        """Watch the call made in the block: once the watchdog has shut its socket, the call raises
        ReadTimeout, even if what it read looks whole (a body that ends with its connection)."""
        watch = self.watch(deadline)
        try:
            yield
        except requests.RequestException as exc:
            if watch.fired:
                raise requests.ReadTimeout(f"the deadline passed before the whole answer came ({exc})") from exc
            raise
        finally:
            self.release(watch)
        if watch.fired:
            raise requests.ReadTimeout("the deadline passed before the whole answer came")

    def forget_after_fork(self) -> None:
        """The thread does not survive a fork: a child starts afresh."""
        self.__init__()  # type: ignore[misc]

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
                watch = heapq.heappop(self._heap)
                sock = getattr(watch.connection, "sock", None) or getattr(watch.connection, "handed_over", None)
                if sock is not None:
                    watch.fired = True  # the call's socket is shut: whatever it read since is cut
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # a blocked recv() returns at once
                    except OSError:
                        pass  # already closed


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WATCHDOG.forget_after_fork)


class _WatchedConnection(urllib3.connection.HTTPConnection):
    """A connection whose socket the watchdog can still find once http.client has closed the
    connection to hand the socket over to an answer whose body ends when the connection does."""

    handed_over: Any = None

    def close(self) -> None:
        self.handed_over = self.sock
        super().close()


class _WatchedHTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _WatchedPool(urllib3.HTTPConnectionPool):
    """A pool that tells the watchdog which connection a call takes, and when it gives it back."""

    ConnectionCls = _WatchedConnection

    def _get_conn(self, timeout: Optional[float] = None) -> Any:
        return _WATCHDOG.attach(super()._get_conn(timeout))

    def _put_conn(self, conn: Any) -> None:
        super()._put_conn(_WATCHDOG.detach(conn))


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


# -- rate limits -------------------------------------------------------------------------------


class _RateGate:
    """What a client's threads share after a 429: a pause, and a limit on runs in flight.

    When the server says "too many", every thread waits until its Retry-After has passed, and
    the number of runs in flight is halved; each run let through raises the limit again (AIMD,
    as TCP does). Without the halving, all threads would fire together after every pause.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._pause_until = 0.0
        self._limit: Optional[float] = None  # runs allowed in flight; None until the first 429
        self._in_flight = 0

    def enter(self, deadline: float, is_run: bool) -> bool:
        """Wait until a call may be sent; False if the deadline came first."""
        if not is_run and self._pause_until <= time.monotonic():
            return True
        with self._changed:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now < self._pause_until:
                    self._changed.wait(min(self._pause_until, deadline) - now)
                elif is_run and self._limit is not None and self._in_flight >= self._limit:
                    self._changed.wait(deadline - now)
                else:
                    break
            if is_run:
                self._in_flight += 1
            return True

    def leave(self, is_run: bool, succeeded: bool) -> None:
        if is_run:
            with self._changed:
                self._in_flight -= 1
                if succeeded and self._limit is not None:
                    self._limit += 1 / self._limit
                self._changed.notify_all()

    def slow_down(self, seconds: float, is_run: bool) -> None:
        """A 429: pause every thread, and halve the runs in flight once per pause."""
        with self._changed:
            now = time.monotonic()
            if is_run and now >= self._pause_until:
                self._limit = max(1.0, self._in_flight / 2)
            self._pause_until = max(self._pause_until, now + seconds)
            logger.info("rate limited: every thread waits %.2f s, then at most %s runs in flight", seconds, self._limit)


# -- log streams -------------------------------------------------------------------------------
#
# Three pieces: LogStream opens and reopens the connection and reads its body in small blocks;
# _LogParser turns the lines of one connection into entries (NDJSON or server-sent events); and
# _LogPosition remembers how far delivery has gone, to ask a reconnect to resume from there and
# to skip what the server sends again.


class _Closed(Exception):
    """Raised inside a log stream once close() has been called: the stream ends at once."""


class LogStream:
    """An iterator over a run's log entries, each once and in order, that ``close()`` stops from any thread."""

    def __init__(self, client: Client, request_id: str) -> None:
        self.request_id = request_id
        self._client = client
        self._response: Optional[requests.Response] = None
        self._closed = threading.Event()
        self._woken: Optional[threading.Event] = None  # what a call waiting on another thread waits on
        self._started = time.monotonic()
        self._quiet_since = self._started  # when the last entry with a createdAt came, on any connection
        self._failures = 0  # failed connections in a row, with no entry with a createdAt between them
        self._closes = 0  # clean closes in a row while the run goes on, with nothing new between them
        self._retry: Optional[float] = None  # the server's SSE "retry:", which replaces the backoff
        self._ends_at: Optional[float] = None  # once the run has ended: when to stop draining
        self._next_check = 0.0  # when next to ask a stream that sends no entries if the run has ended
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
        self._closed.set()
        woken, response = self._woken, self._response
        if woken is not None:
            woken.set()
        if response is not None:
            _interrupt(response)

    def _follow(self) -> Iterator[LogEntry]:
        position = _LogPosition()
        try:
            while True:
                failure: Optional[Exception] = None
                try:
                    if (yield from self._connection(position)):
                        return
                except _LOG_FAILURES as exc:
                    failure = exc
                if failure is not None:  # counted outside the except: what _failed raises has no __context__
                    self._failed(failure)
                position.reconnected()
        except _Closed:
            return

    def _connection(self, position: _LogPosition) -> Generator[LogEntry, None, bool]:
        """Deliver what one connection brings that is new: True once the stream has ended, False
        to reconnect. A failure raises; a clean close while the run goes on is one too."""
        response = self._open(position)
        if response is None:
            return False
        parser = _LogParser(response.headers.get("Content-Type", ""))
        try:
            with response:
                for line in _split_lines(_blocks(response)):
                    self._check_closed()  # a closed stream yields nothing more
                    entry = parser.feed(line)
                    if entry is not None and position.is_new(entry, parser.event_id):
                        if isinstance(entry.get("createdAt"), str):  # news, not a keep-alive
                            self._failures, self._closes, self._quiet_since = 0, 0, time.monotonic()
                        yield entry
                    if self._drained():
                        return True
        except urllib3.exceptions.ReadTimeoutError:
            self._check_closed()
            logger.debug("log stream of %s silent; asking whether the run goes on", self.request_id)
            return self._run_has_ended()  # silence is not a failure
        finally:
            self._retry = self._retry if parser.retry is None else parser.retry
        self._check_closed()
        if self._run_has_ended():
            return True  # the server ended the stream with the run
        # Closed while the run goes on: a server may answer with what it has, and close. That is
        # no failure; ask again after a pause that grows while the closes bring nothing new.
        self._closes += 1
        self._sleep(self._backoff(self._closes))
        return False

    def _open(self, position: _LogPosition) -> Optional[requests.Response]:
        """GET /logs from where delivery stands; None after waiting out a 404 while the run goes on."""
        # A timestamp may hold a lone surrogate (a JSON "\ud800"): it goes back as the server wrote it.
        query = "?after=" + quote(position.after, safe="", errors="surrogatepass") if position.after else ""
        headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
        last_event_id = _header_value(position.event_id)
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        try:
            response = self._unless_closed(
                lambda: self._client._request(
                    "GET",
                    f"/logs/{self.request_id}{query}",
                    deadline=self._client._deadline(None) + LOG_READ_TIMEOUT,
                    headers=headers,
                    read_timeout=LOG_READ_TIMEOUT,
                    request_id=self.request_id,
                    stream=True,
                    retry=False,  # a failed reopen counts toward LOG_RECONNECTS, like a drop
                )
            )
        except NotFoundError:
            # A run just started, or still queued, may have no logs yet: wait while it goes on.
            if time.monotonic() - self._started < LOG_NOT_FOUND_GRACE:
                self._sleep(POLL_BACKOFF[0])
            elif self._run_has_ended():
                raise
            else:
                self._sleep(POLL_BACKOFF[1])
            return None
        self._response = response
        if self._closed.is_set():  # close() may have run before the line above
            _interrupt(response)
        return response

    def _drained(self) -> bool:
        """Whether a stream that sends no entries with a timestamp, only keep-alives of any kind,
        should end: the run has ended (asked once per LOG_READ_TIMEOUT of quiet) and LOG_GRACE
        has passed since."""
        now = time.monotonic()
        if self._ends_at is None and now - self._quiet_since >= LOG_READ_TIMEOUT and now >= self._next_check:
            self._next_check = now + LOG_READ_TIMEOUT
            if self._run_has_ended():
                self._ends_at = now + LOG_GRACE
        return self._ends_at is not None and now >= self._ends_at

    def _run_has_ended(self) -> bool:
        """Whether GET /request/{id} says the run has ended. A record that cannot be read (404,
        not a JSON object) says so too: there is nothing to wait for. Other errors are raised."""
        try:
            record = self._unless_closed(lambda: self._client.details(self.request_id))
        except APIStatusError as exc:
            if isinstance(exc, (AuthenticationError, RateLimitError, ServerError)):
                raise
            return True
        return bool(record.get("completedAt")) or record.get("responseStatus") is not None

    def _failed(self, exc: Exception) -> None:
        """Count a failed connection, or a failed question about the run, and wait before the next
        one; APIConnectionError after LOG_RECONNECTS of them in a row."""
        self._check_closed()
        self._failures += 1
        text, cause = _foreign_text(exc, self._client._key())
        if self._failures > LOG_RECONNECTS:
            raise APIConnectionError(
                f"the log stream of {self.request_id} failed {self._failures} times in a row: {text}",
                request_id=self.request_id,
            ) from cause
        wait = self._backoff(self._failures)
        retry_after = getattr(exc, "retry_after", None)
        wait = wait if retry_after is None else max(wait, retry_after)
        logger.info("log stream of %s failed (%s); reconnecting in %.1f s", self.request_id, text, wait)
        self._sleep(wait)

    def _backoff(self, times: int) -> float:
        """The pause before reconnecting after ``times`` fruitless tries: the server's SSE
        ``retry:``, else one that doubles from LOG_BACKOFF[0] to LOG_BACKOFF[1]."""
        if self._retry is not None:
            return self._retry
        return min(LOG_BACKOFF[0] * 2.0 ** min(times - 1, 32), LOG_BACKOFF[1])

    def _unless_closed(self, call: Callable[[], _T]) -> _T:
        """call() on a thread of its own, so that close() need not wait while it connects or waits
        for an answer: its result or error, or _Closed (a response that comes late is closed)."""
        outcome: List[Tuple[Optional[_T], Optional[BaseException]]] = []
        woken = self._woken = threading.Event()

        def work() -> None:
            try:
                outcome.append((call(), None))
            except BaseException as exc:  # handed to the stream's thread
                outcome.append((None, exc))
            finally:
                if self._closed.is_set() and outcome and isinstance(outcome[0][0], requests.Response):
                    outcome[0][0].close()
                woken.set()

        threading.Thread(target=work, name=f"codewords-logs-call-{self.request_id}", daemon=True).start()
        if self._closed.is_set():
            woken.set()
        woken.wait()
        self._woken = None
        if self._closed.is_set():
            if outcome and isinstance(outcome[0][0], requests.Response):
                outcome[0][0].close()
            raise _Closed
        result, error = outcome[0]
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def _sleep(self, seconds: float) -> None:
        self._closed.wait(seconds)
        self._check_closed()

    def _check_closed(self) -> None:
        if self._closed.is_set():
            raise _Closed


class _LogFollower:
    """Streams a run's logs to ``on_log`` on a background thread while the caller waits."""

    def __init__(self, client: Client, request_id: str, on_log: Callable[[LogEntry], Any]) -> None:
        self._client = client
        self._stream = LogStream(client, request_id)
        self._on_log = on_log
        self._calling = threading.Lock()  # held while on_log runs
        self._thread = threading.Thread(target=self._pump, name=f"codewords-logs-{request_id}", daemon=True)
        self._thread.start()

    def finish(self, drain_until: Optional[float] = None) -> None:
        """Stop following; with ``drain_until`` (a deadline), first let the stream reach its end (it
        ends with the run) for LOG_GRACE seconds, but not past it. Once this returns, on_log is
        not running and is never called again, so that two followers never call it at once."""
        if drain_until is not None:
            self._thread.join(max(0.0, min(LOG_GRACE, drain_until - time.monotonic())))
        self._stream.close()  # the thread's blocked read returns at once, and it ends
        with self._calling:
            pass  # a call of on_log under way has ended; the closed stream lets no other begin
        self._thread.join(LOG_GRACE)  # at once, but for a stream stuck where close() cannot reach

    def _pump(self) -> None:
        request_id = self._stream.request_id
        while True:
            try:
                entry = next(self._stream)
            except StopIteration:
                return
            except CodewordsError as exc:
                logger.warning("stopped streaming the logs of %s: %s", request_id, exc)
                return
            except RuntimeError:
                if not self._client._closed:
                    raise
                logger.debug("stopped streaming the logs of %s: the client was closed", request_id)
                return
            with self._calling:
                if self._stream._closed.is_set():
                    return
                try:
                    self._on_log(entry)
                except Exception:
                    logger.exception("on_log raised on a log entry of %s; its logs are no longer streamed", request_id)
                    self._stream.close()
                    return


class _LogParser:
    """The entries in the lines of one connection: NDJSON, or server-sent events read as the
    WHATWG spec says (an event's ``data:`` lines joined, comments and unknown fields ignored).

    A ``text/event-stream`` answer, or one whose first line is an SSE field, is read as events;
    in it, a line that starts with ``{`` is still an entry of its own, as the official clients
    expect. An event of a type other than the default "message" (or "log") is not an entry: it
    is a keep-alive such as ``event: ping``. Anything else is NDJSON, where a line that starts
    with ``:`` is a comment too, and a line that is not a JSON object is ``{"rawText": line}``.
    """

    def __init__(self, content_type: str) -> None:
        self.sse = content_type.split(";", 1)[0].strip().lower() == "text/event-stream"
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
            self.sse = self.sse or bool(_SSE_FIELD.match(text))
        if not self.sse:
            text = text.strip()
            return _parse_log_line(text) if text and not text.startswith(":") else None
        if not text:  # the end of an event
            data, self._data = "\n".join(self._data), []
            kind, self._type = self._type, ""
            return _parse_log_line(data) if data.strip() and kind in _LOG_EVENT_TYPES else None
        if text.startswith("{"):
            return _parse_log_line(text.strip())
        name, _, value = text.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self.event_id = value
        elif name == "retry" and _DIGITS.match(value):
            self.retry = min(int(value) / 1000, RETRY_AFTER_MAX)
        return None  # a comment (an empty name) or an unknown field says nothing to us


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


def _blocks(response: requests.Response) -> Iterator[bytes]:
    """A streamed body in blocks as they arrive, of up to LOG_BLOCK bytes; ConnectionError if it
    ends short of its Content-Length. A urllib3 without read1 (before 2.1) gives a chunked body
    chunk by chunk too, but reads any other in blocks of LOG_BLOCK bytes or to its end."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is not None:
        blocks: Iterable[bytes] = iter(lambda: read1(LOG_BLOCK, decode_content=True), b"")
    else:
        blocks = response.raw.stream(LOG_BLOCK, decode_content=True)
    received = 0
    for block in blocks:
        received += len(block)
        yield block
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and "Content-Encoding" not in response.headers and received < int(declared):
        raise requests.ConnectionError(f"the log stream closed after {received} of {declared} bytes")


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
            raise CodewordsError(f"the log stream sent a line longer than {LOG_LINE_MAX >> 20} MiB: it is not a log")
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
    match = _ISO_8601.match(timestamp.strip())
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
    return value if _HEADER_VALUE.match(value) else ""


def _interrupt(response: requests.Response) -> None:
    """Wake a read blocked on a streamed response in another thread: it returns at once, with
    nothing or an error, and its own thread closes the response.

    The socket is found under the body's file (urllib3 1.26 and 2.x alike), not on the
    connection, which http.client lets go of when the body ends with the connection. Once the
    body has ended that file is gone, so a connection back in its pool is left alone.
    """
    body_file = getattr(getattr(response.raw, "_fp", None), "fp", None)  # http.client's, while the body is read
    sock = getattr(getattr(body_file, "raw", None), "_sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # close() alone does not wake a blocked recv()
        except OSError:
            pass  # already closed


# -- uploads -----------------------------------------------------------------------------------


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


class _upload_source:
    """Opens what ``upload`` was given: (source, start offset, size, default name); closes what it opened.

    A regular file with a size is streamed from where it stands. Anything else read through a
    file descriptor or that cannot seek (a FIFO, a pipe, a socket, ``/dev/stdin``, a terminal, a
    file of ``/proc``, whose size says 0) is first copied to a temporary file, to its end, for its
    size and for retries. A device that is not a terminal (``/dev/urandom``) is refused.
    """

    def __init__(self, source: Any) -> None:
        self._source = source
        self._opened: Optional[IO[bytes]] = None

    def __enter__(self) -> Tuple[Union[IO[bytes], memoryview], int, int, Optional[str]]:
        source, name = self._source, None
        if isinstance(source, (bytes, bytearray, memoryview)):
            view = memoryview(source).cast("B")
            return view, 0, view.nbytes, None
        if isinstance(source, (str, os.PathLike)):
            name = os.path.basename(os.fspath(source))
            source = self._opened = open(source, "rb")  # FileNotFoundError, PermissionError: before any request
        elif not callable(getattr(source, "read", None)):
            raise TypeError(f"upload takes a path, bytes or a binary file object, not {type(source).__name__}")
        elif isinstance(source, io.TextIOBase):
            raise TypeError("upload needs a binary file object: open the file with 'rb'")
        try:
            if not _has_size(source):
                source = self._copied(source)
            start = source.tell()
            size = source.seek(0, os.SEEK_END) - start
            source.seek(start)
        except BaseException:
            self.__exit__()
            raise
        return source, start, size, name

    def __exit__(self, *exc_info: Any) -> None:
        if self._opened is not None:
            self._opened.close()

    def _copied(self, source: IO[bytes]) -> IO[bytes]:
        """A temporary file holding what the source yields to its end (the source closed if opened here)."""
        copy = tempfile.TemporaryFile()
        try:
            shutil.copyfileobj(source, copy, UPLOAD_BLOCK)
        finally:
            if self._opened is not None:
                self._opened.close()
            self._opened = copy  # closed by __exit__
        copy.seek(0)
        return copy


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
        or _BAD_FILENAME.search(filename)
    ):
        raise ValueError(f"bad filename {filename!r}: want a plain file name such as 'data.csv'")
    try:
        filename.encode("utf-8")
    except UnicodeEncodeError:  # a name of bytes that are not UTF-8, or a lone surrogate
        raise ValueError(f"bad filename {filename!r}: it is not valid UTF-8") from None
    return filename


def _upload_answer(response: requests.Response) -> Tuple[str, str, Optional[Dict[str, str]]]:
    """upload_uri, download_uri and upload_headers from the answer to POST /file."""
    body = _answer(response)
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
        f"{response.status_code} from POST /file: expected an https upload_uri and a download_uri,"
        f" got {_describe(body)[:200]}",
        status_code=response.status_code,
        body=body,
    )


def _storage_error(where: str, response: requests.Response) -> APIStatusError:
    """An APIStatusError with the storage host's own message (S3 answers in XML)."""
    text = response.content.decode("utf-8", "replace")
    code, message = _XML_CODE.search(text), _XML_MESSAGE.search(text)
    if code or message:
        detail = ": ".join(m.group(1).strip() for m in (code, message) if m)
    else:
        detail = _describe(_decode(response.content)) if response.content else ""
    cls = _STATUS_ERRORS.get(response.status_code) or (ServerError if response.status_code >= 500 else APIStatusError)
    return cls(
        f"{response.status_code} {response.reason or ''} from PUT {where}: {detail}".replace("  ", " "),
        status_code=response.status_code,
        detail=detail,
        body=text,
    )


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DEADLINE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_CLI_EPILOG = f"""\
The API key comes from ${API_KEY_ENV} only: a key on the command line would leak into the
shell history and `ps`. Standard output holds only the result, as JSON (bytes, such as an
image, as they came); everything else goes to standard error. INPUTS is JSON, @file.json, or -
for standard input; -i key=value adds a field to an object, its value taken as JSON when it
parses (n=3, ok=true), else as a string.

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
    if not os.environ.get(API_KEY_ENV):
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
        sys.stdout.buffer.write(output)
        sys.stdout.buffer.flush()
    elif output is not _NO_OUTPUT:
        layout: Dict[str, Any] = {"indent": 2} if sys.stdout.isatty() else {"separators": (",", ":")}
        print(_json_text(_unechoed(output), **layout))
    return EXIT_OK


_NO_OUTPUT: Any = object()  # a command that has printed what it had to say


def _unechoed(value: Any) -> Any:
    """What the command line prints, with the key masked: a workflow or a server may echo it."""
    key = os.environ.get(API_KEY_ENV)
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
        if request_id:
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

    def inputs_arguments(sub: Any) -> None:
        sub.add_argument("service_id", metavar="SERVICE_ID")
        sub.add_argument("inputs", metavar="INPUTS", nargs="?", help="JSON, @file.json, or - for stdin")
        sub.add_argument("-i", dest="fields", metavar="KEY=VALUE", action="append", default=[], help="an input field")
        sub.add_argument("--path", default="", help="a path after the service id")

    run = command("run", _cli_run, "run a workflow and print its output")
    inputs_arguments(run)
    run.add_argument("--logs", action="store_true", help="print the run's log lines to standard error")
    run.add_argument("--timeout", type=float, help="seconds to wait in all (default 600)")
    run.add_argument(
        "--fallback",
        choices=["resume", "rerun", "off"],
        help="what to do when the gateway gives up (default resume; off with a one-time key)",
    )
    start = command("start", _cli_start, "start a workflow in the background and print its request id")
    inputs_arguments(start)
    result = command("result", _cli_result, "wait for a run and print its output")
    result.add_argument("request_id", metavar="REQUEST_ID")
    result.add_argument("--timeout", type=float, help="seconds to wait (default 600)")
    result.add_argument("--logs", action="store_true", help="print the run's log lines to standard error")
    logs = command("logs", _cli_logs, "print a run's log entries, one JSON object a line, until it ends")
    logs.add_argument("request_id", metavar="REQUEST_ID")
    details = command("details", _cli_details, "print a run's request record")
    details.add_argument("request_id", metavar="REQUEST_ID")
    upload = command("upload", _cli_upload, "upload a file and print its download URL")
    upload.add_argument("file", metavar="FILE")
    upload.add_argument("--filename", help="the name to store it under (default: the file's)")
    upload.add_argument("--content-type", help="default: guessed from the name")
    return parser


def _cli_run(client: Client, args: Any, status: _Status) -> Any:
    inputs = _cli_inputs(args)
    fallback = {None: _CLIENT_DEFAULT, "off": None}.get(args.fallback, args.fallback)
    on_log = _cli_on_log(client, args, status)
    plan = client._plan_run(args.service_id, inputs, args.path, args.timeout, fallback, on_log, None)
    client._claim_id(plan)  # the request id is known now, so that an interrupted wait can be resumed
    status.request_id = plan.request_id
    with status.showing(status.wait_line()):
        return client._run(plan)


def _cli_start(client: Client, args: Any, status: _Status) -> Any:
    print(client.start(args.service_id, _cli_inputs(args), path=args.path).request_id)
    return _NO_OUTPUT


def _cli_result(client: Client, args: Any, status: _Status) -> Any:
    run = client.get_run(args.request_id)
    status.request_id = run.request_id
    with status.showing(status.wait_line()):
        return run.wait(timeout=args.timeout, on_log=_cli_on_log(client, args, status))


def _cli_on_log(client: Client, args: Any, status: _Status) -> Optional[Callable[[LogEntry], None]]:
    """The on_log of a wait: none with a one-time key, whose one request cannot stream logs too
    (the status line then shows the elapsed time and request id only)."""
    if not client._one_time_key():
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
    try:
        with status.showing(describe):
            url = client.upload(
                args.file, filename=args.filename, content_type=args.content_type, on_progress=on_progress
            )
    except ValueError as exc:  # a file name that cannot be sent, say: bad usage
        raise _UsageError(str(exc)) from None
    print(url)
    return _NO_OUTPUT


def _cli_inputs(args: Any) -> Any:
    """INPUTS (JSON, @file or - for stdin) with the -i fields on top."""
    import sys

    inputs: Any = {}
    for argument in [args.inputs or "", *args.fields]:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:  # the shell passed bytes that are not UTF-8
            raise _UsageError(f"{argument!r} is not UTF-8 text") from None
    try:
        if args.inputs == "-":
            text = sys.stdin.buffer.read().decode("utf-8")
        elif args.inputs and args.inputs.startswith("@"):
            with open(args.inputs[1:], encoding="utf-8") as file:
                text = file.read()
        else:
            text = args.inputs
    except UnicodeDecodeError as exc:
        raise _UsageError(f"INPUTS {args.inputs} is not UTF-8 text: {exc}") from None
    if text is not None:
        try:
            inputs = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise _UsageError(f"INPUTS is not valid JSON: {exc}") from None
    if args.fields and not isinstance(inputs, dict):
        raise _UsageError(f"-i adds a field to a JSON object, and INPUTS is a {type(inputs).__name__}")
    for field in args.fields:
        key, value = _parse_field(field)
        inputs[key] = value
    return inputs


def _parse_field(field: str) -> Tuple[str, Any]:
    """``key=value`` as (key, value): the value as JSON when it parses, else as the string."""
    key, equals, text = field.partition("=")
    if not equals or not key.strip():
        raise _UsageError(f"-i takes KEY=VALUE, not {field!r}")
    try:
        return key.strip(), json.loads(text)
    except RecursionError:
        raise _UsageError(f"-i {key.strip()}: JSON nested too deeply") from None
    except ValueError:
        return key.strip(), text


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
