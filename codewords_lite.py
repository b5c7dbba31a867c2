# codewords-lite, MIT licence: https://opensource.org/licenses/MIT
"""A small synchronous client for the CodeWords runtime API, built on requests alone.

    >>> import codewords_lite as cw
    >>> with cw.Client() as client:                  # the key comes from $CODEWORDS_API_KEY
    ...     output = client.run("my-service", {"name": "Ada"})
    ...     run = client.start("slow-service", {"rows": 10_000})
    ...     output = run.wait(timeout=1800)

A blocking run that outlives the gateway (HTTP 504 after about 120 s) is resumed, not run
twice: ``run()`` provisions a request id first and, on a 504, waits for that same run.

Every error is a ``CodewordsError``::

    CodewordsError
    ├── ConfigurationError(CodewordsError, ValueError)    missing key, bad URL, service id or path
    ├── APIConnectionError                                the network failed and retries ran out
    │   └── APITimeoutError(APIConnectionError, TimeoutError)
    ├── APIStatusError                                    .status_code .detail .body .request_id
    │   ├── AuthenticationError                           401, 403
    │   ├── NotFoundError                                 404
    │   ├── RateLimitError                                429, .retry_after
    │   └── ServerError                                   5xx
    │       └── GatewayTimeout                            504 that could not be resumed
    ├── RunFailed                                         the workflow answered >= 400; .record
    └── RunTimeout(CodewordsError, TimeoutError)          a deadline passed; .request_id
"""

import datetime
import email.utils
import ipaddress
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
from typing import Any, Dict, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

import requests

__version__ = "0.1.0"
__all__ = [
    "Client",
    "Run",
    "CodewordsError",
    "ConfigurationError",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "AuthenticationError",
    "NotFoundError",
    "RateLimitError",
    "ServerError",
    "GatewayTimeout",
    "RunFailed",
    "RunTimeout",
]

logger = logging.getLogger("codewords_lite")

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

DEFAULT_BASE_URL = "https://runtime.codewords.ai"
API_KEY_ENV = "CODEWORDS_API_KEY"
BASE_URL_ENVS = ("CODEWORDS_BASE_URL", "CODEWORDS_RUNTIME_URI")
USER_AGENT = "codewords-lite/" + __version__

ONE_TIME_KEY_PREFIX = "cwotk-"  # such a key is spent by the first request that carries it
PROVISION_HEADER = "X-Provisioned-Request-Id"
FALLBACKS = ("resume", "rerun", None)

QUICK_READ_TIMEOUT = 30.0  # read timeout of the calls that answer at once
LONG_POLL_MAX = 110  # seconds the server may hold one GET /result (the gateway cuts at ~120)
LONG_POLL_MARGIN = 5.0  # how much longer than that the client waits for the answer
HELD_POLL_MIN = 0.5  # a "not yet" faster than this means the server does not hold polls
POLL_BACKOFF = (0.25, 5.0)  # first and longest sleep between polls of such a server
RETRY_BACKOFF = (0.5, 8.0)  # first and longest sleep between retries, before jitter
RETRY_AFTER_MAX = 60.0  # the longest Retry-After honoured

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


class RunFailed(CodewordsError):
    """The workflow finished with a status of 400 or more; ``record`` is the request record."""

    def __init__(
        self,
        message: str = "",
        *,
        request_id: Optional[str] = None,
        record: Optional[Dict[str, Any]] = None,
        status_code: int = 0,
        detail: Any = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.record = record
        self.status_code = status_code
        self.detail = detail


class RunTimeout(CodewordsError, TimeoutError):
    """A deadline passed; the run may go on, and ``client.get_run(request_id)`` finds it."""


# ---------------------------------------------------------------------------------------------
# The run handle
# ---------------------------------------------------------------------------------------------


class Run:
    """A run on the server, known by its request id: wait for it or check on it."""

    def __init__(self, client: "Client", request_id: str) -> None:
        self.request_id = request_id
        self.record: Optional[Dict[str, Any]] = None  # the request record, once finished
        self._client = client

    def __repr__(self) -> str:
        state = "done" if self.record is not None else "not known to be done"
        return f"<Run {self.request_id} {state}>"

    def wait(self, timeout: Optional[float] = None) -> Any:
        """Wait for the run to finish and return its output; raise RunFailed if it failed."""
        if self.record is None:
            deadline = self._client._deadline(timeout)
            self.record = self._client._wait_for_record(self.request_id, deadline)
        return _output(self.record, self.request_id)

    def done(self) -> bool:
        """Whether the run has finished, asked of the server without waiting."""
        if self.record is None:
            record = self._client.details(self.request_id)
            if record.get("completedAt") or record.get("responseStatus") is not None:
                self.record = record
        return self.record is not None


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------

_CLIENT_DEFAULT: Any = object()  # stands for "the client's own setting" in keyword defaults


class Client:
    """A connection to the CodeWords runtime; safe to share between threads.

    The API key is read when first needed, so making a client never fails for a missing key.
    With a one-time key (``cwotk-``) every call sends exactly one request: no retries, no
    provisioned id and no fallback, since the first request spends the key.
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
        fallback: Optional[str] = "resume",
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
        self.fallback = _check_fallback(fallback)
        self._api_key = api_key
        self._given_session = session
        # Proxies and the CA bundle come from the environment once, not on every call.
        self._proxies = requests.utils.get_environ_proxies(self.base_url)
        self._verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self._local = threading.local()
        self._sessions: list = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<codewords_lite.Client {self.base_url}>"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections this client opened (not those of a session it was given)."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
            self._local = threading.local()
        for session in sessions:
            session.close()

    # -- running workflows ------------------------------------------------------------------

    def run(
        self,
        service_id: str,
        inputs: Optional[Mapping[str, Any]] = None,
        *,
        path: str = "",
        timeout: Optional[float] = None,
        fallback: Optional[str] = _CLIENT_DEFAULT,
    ) -> Any:
        """Run a workflow, wait for it and return its output (decoded JSON, text or None).

        If the gateway gives up (504) or the call outlives ``sync_timeout``, ``fallback``
        decides: "resume" waits for the same run by its provisioned id, "rerun" starts the
        inputs again with run_async (the first run may still be going: it can run twice),
        None raises GatewayTimeout or APITimeoutError.
        """
        url_path = _service_path("run", service_id, path)
        body = _encode_inputs(inputs)
        fallback = self.fallback if fallback is _CLIENT_DEFAULT else _check_fallback(fallback)
        deadline = self._deadline(timeout)
        if self._one_time_key():
            fallback = None
        request_id = self._provision(deadline) if fallback == "resume" else None
        try:
            response = self._request(
                "POST",
                url_path,
                body=body,
                headers={PROVISION_HEADER: request_id} if request_id else None,
                read_timeout=self.sync_timeout,
                deadline=deadline,
                resend=False,
                request_id=request_id,
            )
        except (GatewayTimeout, APITimeoutError) as exc:
            sent = not isinstance(exc, APITimeoutError) or isinstance(exc.__cause__, requests.ReadTimeout)
            if time.monotonic() >= deadline:
                message = f"run of {service_id} passed its deadline"
                raise RunTimeout(message, request_id=request_id if sent else None) from exc
            if not sent:
                raise  # the run never left: there is nothing to resume
            if fallback == "resume" and request_id:
                logger.info("blocking run %s cut short (%s); waiting for it by its id", request_id, exc)
                return _output(self._wait_for_record(request_id, deadline), request_id)
            if fallback == "rerun":
                logger.warning("blocking run of %s cut short (%s); starting it again", service_id, exc)
                started = self.start(service_id, inputs, path=path)
                return _output(self._wait_for_record(started.request_id, deadline), started.request_id)
            raise
        return _decode(response.content)

    def start(self, service_id: str, inputs: Optional[Mapping[str, Any]] = None, *, path: str = "") -> Run:
        """Start a workflow in the background (POST /run_async) and return its Run."""
        url_path = _service_path("run_async", service_id, path)
        body = _encode_inputs(inputs)
        response = self._request("POST", url_path, body=body, deadline=self._deadline(None), resend=False)
        return Run(self, _request_id_in(response))

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

    # -- the machinery ----------------------------------------------------------------------

    def _provision(self, deadline: float) -> Optional[str]:
        """A request id from POST /provision-request, or None if the server would not give one."""
        try:
            return _request_id_in(self._request("POST", "/provision-request", deadline=deadline))
        except AuthenticationError:
            raise
        except CodewordsError as exc:
            logger.warning("could not provision a request id (%s); a 504 will not be resumable", exc)
            return None

    def _wait_for_record(self, request_id: str, deadline: float) -> Dict[str, Any]:
        """Long-poll GET /result until the run finishes, and return its record."""
        backoff = POLL_BACKOFF[0]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunTimeout(f"run {request_id} did not finish before the deadline", request_id=request_id)
            hold = min(LONG_POLL_MAX, max(1, math.ceil(left)))
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
                if time.monotonic() >= deadline:
                    raise RunTimeout(f"run {request_id} did not finish before the deadline", request_id=request_id) from exc
                raise
            if response.status_code < 300:
                return _record_in(response, request_id)
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
        resend: bool = True,
        request_id: Optional[str] = None,
        not_yet: Tuple[int, ...] = (),
    ) -> requests.Response:
        """Send one API call, retry it while that is safe, and return a 2xx or ``not_yet`` answer.

        ``resend=False`` marks a call that must not be sent twice once it may have reached the
        workflow: it is retried only when nothing was sent, or the server turned it away (429, 503).
        """
        all_headers = self._headers()
        if headers:
            all_headers.update(headers)
        retries = 0 if self._one_time_key() else self.max_retries
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise APITimeoutError(f"{method} {_strip_query(url_path)}: deadline passed", request_id=request_id)
            cause: Optional[BaseException] = None
            try:
                response = self._session().request(
                    method,
                    self.base_url + url_path,
                    data=body,
                    headers=all_headers,
                    timeout=(min(self.connect_timeout, left), min(read_timeout, left)),
                    allow_redirects=False,
                    proxies=self._proxies,
                    verify=self._verify,
                )
            except requests.RequestException as exc:
                cause = exc
                error: CodewordsError = _connection_error(method, url_path, exc, request_id)
                retryable = _nothing_sent(exc) or (resend and _is_transport_failure(exc))
                wait = _backoff(attempt)
            else:
                status = response.status_code
                if status < 300 or status in not_yet:
                    return response
                error = self._status_error(method, url_path, response, request_id)
                from_workflow = response.headers.get("Error-Origin") == "service"
                retryable = not from_workflow and (status in (429, 503) or (resend and status in (500, 502, 504)))
                retry_after = _retry_after(response)
                wait = _backoff(attempt) if retry_after is None else retry_after
            if not retryable or attempt == retries or time.monotonic() + wait >= deadline:
                raise error from cause
            attempt += 1
            logger.info("%s %s failed (%s); retry %d of %d in %.2f s", method, _strip_query(url_path), error, attempt, retries, wait)
            time.sleep(wait)

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

    def _session(self) -> requests.Session:
        """This thread's session: requests does not promise that one is safe to share."""
        if self._given_session is not None:
            return self._given_session
        session: Optional[requests.Session] = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # read once in __init__, not on every call
            with self._lock:
                self._sessions.append(session)
                self._local.session = session
        return session

    def _status_error(
        self, method: str, url_path: str, response: requests.Response, request_id: Optional[str]
    ) -> APIStatusError:
        """The APIStatusError for an HTTP error answer, with the server's message in its text."""
        status = response.status_code
        body = _decode(response.content)
        detail = body.get("detail") if isinstance(body, dict) and "detail" in body else body
        message = f"{status} {response.reason or ''} from {method} {_strip_query(url_path)}".replace("  ", " ")
        if 300 <= status < 400:
            message += f": redirected to {response.headers.get('Location')!r}, which is not followed"
        elif detail not in (None, ""):
            message += ": " + _describe(detail)
        if request_id:
            message += f" (request {request_id})"
        key = self._api_key or os.environ.get(API_KEY_ENV)
        if key:
            message = message.replace(key, "***")
        cls = _STATUS_ERRORS.get(status) or (ServerError if status >= 500 else APIStatusError)
        if status == 504 and response.headers.get("Error-Origin") == "service":
            cls = ServerError  # the workflow's own 504, not the gateway giving up
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
_KEY = re.compile(r"[\x21-\x7e]+\Z")
_STATUS_ERRORS = {401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError, 429: RateLimitError, 504: GatewayTimeout}


def _check_base_url(url: str) -> str:
    """The base URL without a trailing slash: https, or http to a loopback host."""
    parts = urlsplit(url)
    try:
        host = parts.hostname or ""
        parts.port  # raises ValueError for a port that is not a number
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


def _check_fallback(fallback: Any) -> Optional[str]:
    if fallback not in FALLBACKS:
        raise ConfigurationError(f"fallback must be 'resume', 'rerun' or None, not {fallback!r}")
    return fallback  # type: ignore[no-any-return]


def _check_name(what: str, name: Any) -> str:
    """A service id, path segment or request id: letters, digits, '_', '-' and '.'."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ConfigurationError(f"bad {what} {name!r}: use letters, digits, '_', '-' and '.'")
    return name


def _service_path(kind: str, service_id: str, path: str) -> str:
    """``/run/{service_id}[/{path}]`` (or run_async), with every part checked."""
    url_path = f"/{kind}/{_check_name('service id', service_id)}"
    if not isinstance(path, str):
        raise ConfigurationError(f"bad path {path!r}: want a string such as 'reports/daily'")
    if path.strip("/"):
        for segment in path.strip("/").split("/"):
            url_path += "/" + _check_name("path segment", segment)
    return url_path


def _encode_inputs(inputs: Optional[Mapping[str, Any]]) -> bytes:
    """The request body: the inputs as compact UTF-8 JSON (``{}`` for None)."""
    if inputs is None:
        return b"{}"
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping of input names to values, not {type(inputs).__name__}")
    try:
        return json.dumps(inputs, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"inputs are not JSON-serialisable: {exc}") from exc


def _decode(content: Union[bytes, str]) -> Any:
    """A body as decoded JSON, else as text, and None when empty."""
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace") if isinstance(content, bytes) else content


def _describe(detail: Any) -> str:
    """The server's ``detail`` in one line: validation errors as "field: message; ..."."""
    if isinstance(detail, str):
        text = detail
    elif isinstance(detail, list) and all(isinstance(d, dict) and "msg" in d for d in detail):
        text = "; ".join(".".join(map(str, d.get("loc") or ())) + ": " + str(d["msg"]) for d in detail)
    else:
        text = json.dumps(detail, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:497] + "..."


def _request_id_in(response: requests.Response) -> str:
    """The ``request_id`` of an answer to /run_async or /provision-request."""
    body = _decode(response.content)
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
    """The request record in an answer, which must be a JSON object."""
    record = _decode(response.content)
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
    status = record.get("responseStatus")
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    output = record.get("responseJson")
    if output is None and isinstance(record.get("responseContent"), str):
        output = _decode(record["responseContent"])
    if isinstance(status, int) and not isinstance(status, bool) and status >= 400:
        detail = output.get("detail", output) if isinstance(output, dict) else output
        message = f"run {request_id} failed with status {status}"
        if detail not in (None, ""):
            message += ": " + _describe(detail)
        raise RunFailed(message, request_id=request_id, record=record, status_code=status, detail=detail)
    return output


def _nothing_sent(exc: BaseException) -> bool:
    """Whether a failure happened before the request left: a refused or timed-out connect."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    seen = set()
    todo = [exc]
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, (ConnectionRefusedError, socket.gaierror)):
            return True
        todo.extend(e for e in (error.__cause__, error.__context__, getattr(error, "reason", None)) if isinstance(e, BaseException))
        todo.extend(a for a in error.args if isinstance(a, BaseException))
    return False


def _is_transport_failure(exc: requests.RequestException) -> bool:
    """A dropped connection, a timeout or a truncated body: worth asking again if it is safe."""
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError))


def _connection_error(method: str, url_path: str, exc: requests.RequestException, request_id: Optional[str]) -> APIConnectionError:
    cls = APITimeoutError if isinstance(exc, requests.Timeout) else APIConnectionError
    return cls(f"{method} {_strip_query(url_path)} failed: {exc}", request_id=request_id)


def _retry_after(response: requests.Response) -> Optional[float]:
    """The Retry-After header in seconds (a number or an HTTP date), capped at a minute."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: about 0.5 s, 1 s, 2 s ... never above 8 s."""
    first, longest = RETRY_BACKOFF
    return min(first * 2**attempt, longest) * random.uniform(0.5, 1.0)


def _sleep_until_at_most(seconds: float, deadline: float) -> None:
    time.sleep(max(0.0, min(seconds, deadline - time.monotonic())))


def _strip_query(url_path: str) -> str:
    return url_path.split("?", 1)[0]
