"""Shards over HTTP(S) and S3: a read-only byte stream that survives faults, and the few object
operations the spec, the loader and ``moe-dist-data shard --out s3://`` need.

Clients (chosen for control over mid-stream faults, not convenience):
    http://, https://  Python's ``urllib`` (no dependency; proxies and CA bundles from the standard
                       environment variables). webdataset's own URL handling runs ``curl`` in a pipe,
                       which cannot resume a dropped stream at a byte.
    s3://              ``boto3``: credentials, region and a custom endpoint (S3-compatible stores) come
                       from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
                       AWS_PROFILE, AWS_ENDPOINT_URL(_S3), ~/.aws/config). Its own retries are switched
                       off so that every retry is ours: counted, logged and resumed at the byte.

Reading outline (``RemoteStream``):
    0. the URL rule (``url_problem``): http, https or s3, a host (bucket), a numeric port, no userinfo
       (credentials come from ~/.netrc, the AWS chain or a presigned query string, never the URL) and no
       whitespace or control characters; a URL that breaks it is a permanent error, never retried;
    1. open the object from byte ``offset`` (an HTTP Range request / S3 GetObject Range). HTTP redirects
       obey the URL rule at every hop, at most ``MAX_REDIRECTS`` of them; a ~/.netrc login is sent only to
       the host it names, never carried over a redirect. A reply must start at or before ``offset``
       (Content-Range; a server that ignores Range answers the whole object and the bytes already read are
       skipped) and describe the same object (size, ETag) as the first reply;
    2. read; on a transient fault (connection reset or refused, timeout, a stream shorter than its
       Content-Length, HTTP 5xx/408/429, S3 throttling, or a stream slower than ``min_bytes_per_s`` over
       ``timeout_s`` of waiting) wait ``backoff_s * 2**attempt`` and reopen at the byte reached, so the
       reader above (the tar stream) never sees the fault;
    3. after ``retries`` failed reopenings in a row, or at once on a permanent error (any other 4xx: a
       missing object, forbidden, a bad request; a URL or redirect the rule refuses; a host name that does
       not resolve; an object that changed while it was read), raise ``RemoteError`` naming the URL and
       the error.
Secrets never appear in messages: URLs are shown by ``shown_url`` (no query string, no userinfo).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import netrc
import os
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .localfiles import INDEX_MAX_BYTES
from .urls import SCHEMES, is_remote, shown_spec, shown_url, url_problem  # noqa: F401 (is_remote, SCHEMES: API)

log = logging.getLogger(__name__)
TRANSIENT_4XX = (408, 429)  # request timeout, too many requests: the only 4xx a retry may cure
TRANSIENT_S3 = {"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                "TooManyRequestsException", "InternalError", "ServiceUnavailable"}  # some come with a 400
PERMANENT_S3 = {"NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "AllAccessDisabled", "404", "403", "401"}
READ_SIZE = 1 << 20
MAX_REDIRECTS = 5  # HTTP redirects followed per request (S3 and CDNs use one or two)
# The most read of a remote index file (manifest.json, sizes.json): ~200,000 shards in our manifest format
# (with sha256), ~1,000,000 in a sizes.json. A larger one is refused, never read whole.
MAX_INDEX_BYTES = INDEX_MAX_BYTES  # a remote manifest.json / sizes.json: the cap of a local one


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are read (``data.remote_*`` in the run config)."""

    retries: int = 5  # reopenings after a transient fault, in a row, before the shard fails
    timeout_s: float = 60.0  # per connect / read; also the window of the throughput floor
    backoff_s: float = 1.0  # first wait; doubled per retry (with jitter), at most 60 s
    min_bytes_per_s: float = 65536.0  # throughput floor over each timeout_s of waiting (0: none)

    def __post_init__(self):
        if self.retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0 or self.min_bytes_per_s < 0:
            raise ValueError(f"remote options retries={self.retries}, timeout_s={self.timeout_s}, "
                             f"backoff_s={self.backoff_s}, min_bytes_per_s={self.min_bytes_per_s}: need retries >= "
                             "0, timeout_s > 0, backoff_s >= 0, min_bytes_per_s >= 0")


class RemoteError(OSError):
    """A remote object that cannot be read; ``permanent``: retrying cannot help (never retried). The
    message and ``detail`` show URLs without secrets (``shown_url``); ``url`` is the URL itself."""

    def __init__(self, url: str, detail: str, permanent: bool):
        detail = shown_spec(" ".join(str(detail).split()))  # one line; a library's text may quote a URL
        super().__init__(f"{shown_url(url)}: {detail}")
        self.url, self.detail, self.permanent = url, detail, permanent


class TooSlow(RemoteError):
    """A stream below ``RemoteOptions.min_bytes_per_s`` over a window: transient, retried in its own count."""


def permanent_status(status: int) -> bool:
    """An HTTP status that a retry cannot cure: every 4xx but 408 and 429 (and a 3xx not followed)."""
    return 300 <= status < 500 and status not in TRANSIENT_4XX


def path_of(url: str) -> str:
    """The path of ``url`` (no query string: a presigned shard URL still ends in .tar here); ``url``
    itself when it does not parse (the URL rule refuses it later, with a message)."""
    try:
        return urllib.parse.urlsplit(url).path
    except ValueError:
        return url


def join(base: str, name: str) -> str:
    """``name`` inside the remote directory ``base``."""
    return base.rstrip("/") + "/" + name


def parent(url: str) -> str:
    """The directory of the object ``url`` (without its query string, which may hold a "/")."""
    return url.split("?", 1)[0].rsplit("/", 1)[0]


# ---------------------------------------------------------------- the two clients
_S3_CLIENTS: Dict[Tuple[int, float], object] = {}


def s3_client(timeout_s: float = 60.0):
    """A boto3 S3 client for this process (boto3 clients must not cross a fork), retries switched off."""
    key = (os.getpid(), timeout_s)
    if key not in _S3_CLIENTS:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ValueError("s3:// shards need boto3: pip install boto3 (credentials and endpoint come from its "
                             "standard environment variables and ~/.aws files)") from None
        config = Config(retries={"total_max_attempts": 1}, connect_timeout=timeout_s, read_timeout=timeout_s)
        _S3_CLIENTS[key] = boto3.session.Session().client("s3", config=config)
    return _S3_CLIENTS[key]


def split_s3(url: str) -> Tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    if not parts.netloc:
        raise ValueError(f"{shown_url(url)!r} names no bucket; write s3://BUCKET/KEY")
    return parts.netloc, parts.path.lstrip("/")


def _s3_fault(url: str, err: Exception) -> RemoteError:
    """Classify a botocore error: missing/forbidden are permanent, the rest (5xx, throttling,
    connection and read errors) transient."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        permanent = code not in TRANSIENT_S3 and (code in PERMANENT_S3 or permanent_status(status))
        return RemoteError(url, f"S3 {code or status}" + (" (not found)" if status == 404 or "NoSuch" in code else
                                                           " (forbidden)" if status == 403 else ""), permanent)
    return RemoteError(url, f"{type(err).__name__}: {err}", permanent=False)


def netrc_login(url: str) -> Optional[str]:
    """The Authorization header for ``url``'s host from $NETRC or ~/.netrc (None without an entry). Only
    a ``machine`` entry that names the host counts: a ``default`` entry would send a login to any host."""
    path = os.environ.get("NETRC")
    if not os.path.isfile(path or os.path.join(os.path.expanduser("~"), ".netrc")):
        return None
    try:
        entry = netrc.netrc(path).hosts.get(urllib.parse.urlsplit(url).hostname or "")
    except (netrc.NetrcParseError, OSError) as err:  # its message may quote a token: name the file and line
        where = path or "~/.netrc"
        raise RemoteError(url, f"cannot use {where} (line {getattr(err, 'lineno', '?')}): it does not parse, or "
                               "it is readable by other users (chmod 600)", permanent=True) from None
    if entry is None:
        return None
    login, _, password = entry
    return "Basic " + base64.b64encode(f"{login}:{password or ''}".encode()).decode()


def _authorize(request: urllib.request.Request) -> None:
    """Send ``request``'s host its ~/.netrc login; as an unredirected header, which a redirect never copies."""
    login = netrc_login(request.full_url)
    if login:
        request.add_unredirected_header("Authorization", login)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Redirects under the URL rule: every target is an http(s) URL that ``url_problem`` accepts (never
    from https down to http), at most ``MAX_REDIRECTS`` per request, to any host; a login goes only to
    the host its ~/.netrc entry names (``_authorize`` per hop). A refused redirect is a permanent error."""

    max_repeats = max_redirections = MAX_REDIRECTS + 1  # urllib's own loop check: never before ours

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location is not None:
            target = urllib.parse.urljoin(req.full_url, location)
            problem = url_problem(target) or ("" if target.lower().startswith(("http://", "https://")) else
                                              "is not an http(s) URL")
            if not problem and req.full_url.lower().startswith("https://") and target.lower().startswith("http://"):
                problem = "would leave https for plain http"
            if not problem and getattr(req, "hops", 0) >= MAX_REDIRECTS:
                problem = f"would be redirect {MAX_REDIRECTS + 1}; at most {MAX_REDIRECTS} are followed"
            if problem:
                fp.close()
                raise RemoteError(req.full_url, f"HTTP {code} redirect to {shown_url(target)}, which {problem}",
                                  permanent=True)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.hops = getattr(req, "hops", 0) + 1
            _authorize(new)
        return new


_OPENERS: Dict[int, urllib.request.OpenerDirector] = {}


def _opener() -> urllib.request.OpenerDirector:
    """urllib's default handlers (proxies, https) with ``_Redirects``, one per process."""
    if os.getpid() not in _OPENERS:
        _OPENERS[os.getpid()] = urllib.request.build_opener(_Redirects)
    return _OPENERS[os.getpid()]


@dataclass
class Reply:
    """An opened object: its body, the byte the body starts at, the object's size (None: unknown) and
    its version (ETag or Last-Modified, None: unknown)."""

    body: object
    start: int
    total: Optional[int]
    version: Optional[str]


_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def _content_range(value: Optional[str]) -> Optional[Tuple[int, Optional[int]]]:
    """(first byte, object size or None) of a Content-Range value; None when it does not parse."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        return None
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _open_http(url: str, offset: int, timeout_s: float) -> Reply:
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        _authorize(request)
        response = _opener().open(request, timeout=timeout_s)
    except RemoteError as err:  # a refused redirect or netrc file: named by the URL asked for
        raise RemoteError(url, err.detail, err.permanent) from None
    except urllib.error.HTTPError as err:
        err.close()
        reason = "not found" if err.code == 404 else "forbidden" if err.code in (401, 403) else err.reason
        raise RemoteError(url, f"HTTP {err.code} ({reason})", permanent=permanent_status(err.code)) from None
    except (http.client.InvalidURL, ValueError) as err:  # a URL that http.client cannot send: never retried
        raise RemoteError(url, f"malformed URL ({type(err).__name__})", permanent=True) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, socket.gaierror):  # a host name that does not resolve: a wrong URL, not a fault
            raise RemoteError(url, f"unknown host ({reason})", permanent=True) from None
        raise RemoteError(url, f"{type(err).__name__}: {reason}", permanent=False) from None
    headers = response.headers
    version = headers.get("ETag") or headers.get("Last-Modified")
    if response.status != 206:  # 200: the whole object (a server that ignores Range, or offset 0)
        length = headers.get("Content-Length")
        return Reply(response, 0, int(length) if length is not None else None, version)
    span = _content_range(headers.get("Content-Range"))
    if span is None:
        response.close()
        raise RemoteError(url, f"HTTP 206 without a valid Content-Range (asked from byte {offset})", permanent=False)
    return Reply(response, span[0], span[1], version)


def _open_s3(url: str, offset: int, timeout_s: float) -> Reply:
    bucket, key = split_s3(url)
    kwargs = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = s3_client(timeout_s).get_object(Bucket=bucket, Key=key, **kwargs)
    except Exception as err:  # botocore raises ClientError and many connection types; _s3_fault sorts them
        raise _s3_fault(url, err) from None
    span = _content_range(response.get("ContentRange"))  # absent: the whole object
    start, total = span if span is not None else (0, int(response["ContentLength"]))
    return Reply(response["Body"], start, total, response.get("ETag"))


class RemoteStream(io.RawIOBase):
    """A forward-only binary stream of one remote object that reopens at the byte after a transient
    fault (see the module outline).

    Every read makes at most one socket read, so no read waits longer than ``timeout_s``. The pace is
    measured over the time spent inside ``readinto`` (waiting for the server, reopenings and backoff
    included; a consumer that pauses between reads costs nothing): each window of ``timeout_s`` that
    brings fewer than ``min_bytes_per_s`` is a transient fault (``TooSlow``), and ``retries`` such
    windows in a row (no window at the floor between them) end the stream. A server that sends a byte
    a minute therefore holds a reader about (retries + 1) x 2 x timeout_s at most, plus the backoff.

    Args:
        url: http(s):// or s3:// URL.
        options: retries, timeout, backoff, throughput floor.
        on_retry: called with (url, attempt, error) before each reopening, e.g. to count retries.
    """

    def __init__(self, url: str, options: RemoteOptions = RemoteOptions(),
                 on_retry: Optional[Callable[[str, int, RemoteError], None]] = None):
        super().__init__()
        self.url, self.options, self.on_retry = url, options, on_retry
        self.offset, self.total, self.retries = 0, None, 0
        problem = url_problem(url)
        if problem:  # the spec refuses such URLs first; this holds for every other caller
            raise RemoteError(url, problem, permanent=True)
        self._open = _open_s3 if url.startswith("s3:") else _open_http
        self._body, self._skip = None, 0  # _skip: bytes of the current reply before ``offset`` (to pass over)
        self._version: Optional[str] = None  # the object's ETag / Last-Modified at the first reply
        self._clock, self._window_s, self._window_bytes, self._slow = time.monotonic(), 0.0, 0, 0
        self._reopen()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        attempt = 0
        self._clock = time.monotonic()  # the pace counts the time spent in here only
        while True:
            try:
                self._check_pace()
                if self._body is None:
                    self._reopen_once()
                n = self._read_some(view[:self._skip] if self._skip else view)
                self._window_bytes += n
                if self._skip:  # a reply that starts before ``offset``: pass over what was delivered already
                    if not n:
                        raise RemoteError(self.url, f"connection closed while skipping to byte {self.offset}", False)
                    self._skip -= n
                    continue
                if n or self.total is None or self.offset >= self.total:
                    self.offset += n
                    self._tick()
                    return n
                raise RemoteError(self.url, f"connection closed at byte {self.offset} of {self.total}", False)
            except TooSlow as err:
                self._slow = self._retry_or_raise(err, self._slow)
            except RemoteError as err:
                attempt = self._retry_or_raise(err, attempt)
            except (OSError, http.client.HTTPException, ValueError) as err:  # resets, timeouts, short reads
                attempt = self._retry_or_raise(RemoteError(self.url, f"{type(err).__name__}: {err} at byte "
                                                                     f"{self.offset}", False), attempt)
            except Exception as err:  # botocore/urllib3 streaming errors (not OSError subclasses)
                attempt = self._retry_or_raise(_s3_fault(self.url, err), attempt)

    def _read_some(self, view: memoryview) -> int:
        """What one socket read brings (``read1``: http.client's reply, urllib3's under botocore's body);
        ``readinto`` / ``read`` would wait for the whole buffer, a byte at a time from a slow server."""
        body = self._body
        read1 = getattr(body, "read1", None) or getattr(getattr(body, "_raw_stream", None), "read1", None)
        data = read1(len(view)) if read1 is not None else body.read(len(view))
        view[:len(data)] = data
        return len(data)

    def _tick(self) -> None:
        now = time.monotonic()
        self._window_s += now - self._clock
        self._clock = now

    def _check_pace(self) -> None:
        """Raise ``TooSlow`` when the window just completed brought fewer than ``min_bytes_per_s``."""
        self._tick()
        floor, window = self.options.min_bytes_per_s, self._window_s
        if not floor or window < self.options.timeout_s:
            return
        rate = self._window_bytes / window
        self._window_s, self._window_bytes = 0.0, 0
        if rate >= floor:
            self._slow = 0
            return
        raise TooSlow(self.url, f"{rate:.0f} bytes/s over {window:.1f} s at byte {self.offset}, below the floor "
                                f"data.remote_min_bytes_per_s={floor:g}", permanent=False)

    def _retry_or_raise(self, err: RemoteError, attempt: int) -> int:
        self._close_body()
        if err.permanent or attempt >= self.options.retries:
            if not err.permanent:
                raise RemoteError(self.url, f"{err.detail}; gave up after {attempt} retries", False) from None
            raise err
        attempt += 1
        self.retries += 1
        log.warning("retry %d/%d of %s at byte %d after %s", attempt, self.options.retries, shown_url(self.url),
                    self.offset, err.detail)
        if self.on_retry is not None:
            self.on_retry(self.url, attempt, err)
        time.sleep(min(60.0, self.options.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
        return attempt

    def _reopen_once(self) -> None:
        """Open at ``offset``. The reply must start at or before it (a server that ignores Range sends the
        whole object: the bytes before ``offset`` are passed over) and be the object of the first reply
        (same size, same ETag / Last-Modified); never are bytes of another place or version spliced in."""
        reply = self._open(self.url, self.offset, self.options.timeout_s)
        self._body = reply.body
        if reply.start > self.offset:  # a misbehaving server or proxy; another try may be answered right
            raise RemoteError(self.url, f"the server answered from byte {reply.start} when asked from byte "
                                        f"{self.offset}", permanent=False)
        changed = (self.total is not None and reply.total is not None and reply.total != self.total) or \
            (self._version is not None and reply.version is not None and reply.version != self._version)
        if changed:
            raise RemoteError(self.url, f"the object changed while it was read (size {self.total}, now "
                                        f"{reply.total}; version {self._version}, now {reply.version}); reading on "
                                        "would splice two versions", permanent=True)
        self._skip = self.offset - reply.start
        self.total = reply.total if reply.total is not None else self.total
        self._version = self._version or reply.version

    def _reopen(self) -> None:
        """Open at ``offset`` with the same retry rule as reads (the first open included)."""
        attempt = 0
        while True:
            try:
                return self._reopen_once()
            except RemoteError as err:
                attempt = self._retry_or_raise(err, attempt)
            except (OSError, http.client.HTTPException) as err:
                attempt = self._retry_or_raise(RemoteError(self.url, f"{type(err).__name__}: {err}", False),
                                               attempt)

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # closing a broken connection may fail again; it is dropped either way
                pass

    def close(self) -> None:
        self._close_body()
        super().close()


def open_remote(url: str, options: RemoteOptions = RemoteOptions(),
                on_retry: Optional[Callable[[str, int, RemoteError], None]] = None) -> io.BufferedReader:
    """A buffered binary stream of ``url`` (see ``RemoteStream``)."""
    return io.BufferedReader(RemoteStream(url, options, on_retry), buffer_size=READ_SIZE)


def read_json(url: str, options: RemoteOptions = RemoteOptions()) -> Optional[object]:
    """The JSON object at ``url``, or None when it does not exist (404 / NoSuchKey).

    Raises:
        ValueError: more than ``MAX_INDEX_BYTES`` (refused from its size when the server states it, else
            after reading one byte past the cap), or not JSON.
        RemoteError: it cannot be read (after ``options.retries``).
    """
    try:
        with open_remote(url, options) as stream:
            size = stream.raw.total
            data = stream.read(MAX_INDEX_BYTES + 1) if size is None or size <= MAX_INDEX_BYTES else b""
    except RemoteError as err:
        if err.permanent and ("not found" in err.detail or "NoSuch" in err.detail):
            return None
        raise
    if len(data) > MAX_INDEX_BYTES or (size or 0) > MAX_INDEX_BYTES:
        raise ValueError(f"{shown_url(url)} holds {size or 'more than ' + str(MAX_INDEX_BYTES)} bytes; an index "
                         f"file may hold at most {MAX_INDEX_BYTES} (moe_dist.data.remote.MAX_INDEX_BYTES), so it "
                         "is not read. Split the dataset into directories of fewer shards, joined by '::'")
    try:
        return json.loads(data)
    except ValueError as err:
        raise ValueError(f"{shown_url(url)} is not valid JSON ({err})") from None


def upload(path: str, url: str) -> None:
    """Upload the local file ``path`` to the s3:// ``url`` (boto3's managed, multipart upload)."""
    bucket, key = split_s3(url)
    try:
        s3_client().upload_file(path, bucket, key)
    except Exception as err:
        raise _s3_fault(url, err) from None
