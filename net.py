"""Every HTTP call this project makes, made safe against the other side: total deadlines, bounded replies, JSON that
cannot crash a decoder, no redirects for API calls, and an address guard where the connection is made.

The rule (tools.py and retrievers.py rely on it): a remote party - a web page, a retrieval server, Serper,
a judge, a reader or a teacher endpoint - can make a call fail, never make it raise anything but the caller's
one error type, hang past its deadline, or fill memory past its byte limit.

  - `Deadline(seconds)`: a total limit for all blocking socket I/O of a block of code on this thread (connect and
    every read and write). requests' `timeout` bounds each wait for data, so a server trickling one byte a second
    holds a call for as long as it likes; here every socket the block touches is shut down when the time is up,
    which ends any blocked read at once (one timer thread serves all deadlines; retrieval_server.py uses them for
    its clients too). DNS resolution (`getaddrinfo`) cannot be interrupted and is bounded by the system
    resolver's own timeout.
  - `session(pool_size, guard=...)`: a requests.Session whose connections check the address they are about to
    connect to. Checking the URL before the request is not enough: urllib.parse and urllib3 read some URLs
    differently (`http://127.0.0.1:1\\@8.8.8.8/` is 8.8.8.8 to the first and 127.0.0.1 to the second), and DNS
    may answer differently the second time. The guard runs on the very host and address urllib3 connects to, and
    the socket connects to the address that was checked.
  - `post_json(...)`: POST and decode a JSON reply within a deadline per attempt, retried with backoff on
    transient faults; the reply is read up to `max_bytes`; a redirect is an error (it would carry the request's
    credentials to another host); error messages are built here, with every secret header value redacted before
    any reply text is cut to a snippet.
  - `read_body`, `loads`: the bounded read and the JSON decode that turns every decoder failure (deep nesting,
    5,000-digit integers, bad UTF-8) into ValueError and every lone surrogate escape into "?".
  - `ChatClient`: the one OpenAI-compatible chat client (chat completions and the model list) that the RRM judge,
    the answer judge, the page reader and the teacher share; one URL normalisation, the key read at each call.

Our choices: a request's deadline defaults to its `timeout`; an API call never follows redirects; `guard=None`
(any address) for the endpoints the user configures, `public_only` for URLs that come from the web.
"""
from __future__ import annotations

import heapq
import ipaddress
import itertools
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.connection import create_connection


class RemoteError(RuntimeError):
    """A remote service could not answer: down, too slow, HTTP error, a malformed or oversized reply."""


class ReplyTooLarge(ValueError):
    """A reply body over its byte limit."""


class AddressRefused(Exception):
    """The guard refused the address a connection was about to be made to (not an OSError, so urllib3 and
    requests pass it through unwrapped)."""


# ----------------------------------------------------------------------------- total deadlines

_current = threading.local()   # the innermost Deadline of this thread


class _Timers:
    """One daemon thread running callbacks at their times (a threading.Timer per call would start a thread per
    request, ~0.5 ms here). Cancelled entries are dropped when they reach the top of the heap."""

    def __init__(self):
        self._heap: list[list] = []
        self._cond = threading.Condition()
        self._count = itertools.count()
        self._pid = None

    def add(self, when: float, callback) -> list:
        entry = [when, next(self._count), callback]
        with self._cond:
            if self._pid != os.getpid():           # first use, or a forked child (threads do not survive a fork)
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="net-deadlines", daemon=True).start()
            heapq.heappush(self._heap, entry)
            self._cond.notify()
        return entry

    @staticmethod
    def cancel(entry: list) -> None:
        entry[2] = None

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                delay = self._heap[0][0] - time.monotonic() if self._heap else None
                if delay is None or delay > 0:
                    self._cond.wait(delay)
                    continue
                callback = heapq.heappop(self._heap)[2]
                callback()


_timers = _Timers()


class Deadline:
    """A total time limit for the blocking socket I/O of a `with` block on the calling thread.

    Every connection the block uses is registered (`watch`); when `seconds` have passed the timer thread shuts
    them down, so a blocked read returns at once and the call fails; `expired` then says why."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"a deadline must be positive, got {seconds}")
        self.seconds, self.expires = seconds, time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return max(0.01, self.expires - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                _shutdown(sock)
            else:
                self._sockets.append(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def __enter__(self) -> Deadline:
        self._outer = getattr(_current, "deadline", None)
        _current.deadline = self
        self._timer = _timers.add(self.expires, self._expire)
        return self

    def __exit__(self, *exc) -> None:
        _timers.cancel(self._timer)
        with self._lock:
            self._sockets.clear()   # a pooled connection lives on: a later deadline must not find it here
        _current.deadline = self._outer


def _shutdown(sock: socket.socket) -> None:
    try:   # the plain socket's shutdown (an SSLSocket's own would also unwrap TLS, racing the reader)
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _watch(sock) -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None and sock is not None:
        deadline.watch(sock)


# ----------------------------------------------------------------------------- the address guard

def public_only(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """None for a public (global unicast) address, else why it is refused: loopback, the LAN, link-local (cloud
    metadata at 169.254.169.254), reserved and multicast ranges. IPv4-mapped IPv6 is judged as the IPv4 address."""
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
                             or ip.is_multicast):
        return None
    return "private, local or reserved address"


Guard = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], "str | None"]


def _connect(conn, guard: Guard | None) -> socket.socket:
    """Resolve the host urllib3 will connect to, check every address, then connect to a checked one."""
    host, port = conn._dns_host, conn.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        raise OSError(f"cannot resolve host {host!r}") from None    # urllib3 makes it a connection error
    addresses = [info[4][0] for info in infos]
    if guard is not None:
        for address in addresses:
            reason = guard(ipaddress.ip_address(address.split("%")[0]))   # an IPv6 zone id is not part of it
            if reason:
                raise AddressRefused(reason)
    error: OSError | None = None
    for address in dict.fromkeys(addresses):
        try:
            sock = create_connection((address, port), conn.timeout, source_address=conn.source_address,
                                     socket_options=conn.socket_options)
        except OSError as e:
            error = e
            continue
        _watch(sock)
        return sock
    raise error or OSError(f"no address for {host!r}")


def _connection_classes(guard: Guard | None):
    """urllib3 connection and pool classes whose new connections go through `_connect` and whose every request
    (a reused pooled connection too) is watched by the thread's Deadline."""

    class Guarded:
        def _new_conn(self):
            return _connect(self, guard)

        def request(self, *args, **kwargs):
            _watch(self.sock)
            return super().request(*args, **kwargs)

    class Conn(Guarded, HTTPConnection):
        pass

    class SConn(Guarded, HTTPSConnection):
        pass

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class SPool(HTTPSConnectionPool):
        ConnectionCls = SConn

    return {"http": Pool, "https": SPool}


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, pool_size: int, guard: Guard | None):
        self._pools = _connection_classes(guard)
        super().__init__(pool_connections=2, pool_maxsize=pool_size, max_retries=0)   # retries are ours, counted

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools


def session(pool_size: int = 8, *, guard: Guard | None = None, trust_env: bool = True) -> requests.Session:
    """A pooled session (at most `pool_size` sockets per host) whose connections obey the thread's Deadline and,
    with `guard`, connect only to addresses it accepts. Web URLs use `trust_env=False`: through a proxy from the
    environment the guard would check the proxy, not the page."""
    s = requests.Session()
    s.trust_env = trust_env
    adapter = _GuardedAdapter(pool_size, guard)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


# ----------------------------------------------------------------------------- bounded replies and JSON

def read_body(reply: requests.Response, max_bytes: int, *, truncate: bool = False) -> bytes:
    """At most `max_bytes` of the (decompressed) body; more is cut off with `truncate`, else ReplyTooLarge."""
    body = bytearray()
    for chunk in reply.iter_content(64 * 1024):
        body += chunk
        if len(body) > max_bytes:
            if truncate:
                return bytes(body[:max_bytes])
            raise ReplyTooLarge(f"reply larger than {max_bytes} bytes")
    return bytes(body)


def loads(data: bytes | str) -> object:
    """json.loads where every failure on hostile bytes is a ValueError (RecursionError on deep nesting is not), and
    every string is valid Unicode: a lone "\ud800" escape decodes to a lone surrogate, which a tokenizer and a
    UTF-8 file refuse, so it becomes "?" here (escaped pairs, e.g. emoji, decode to their character as usual)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise ValueError(f"malformed JSON ({type(e).__name__})") from None
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    return _valid_unicode(obj) if re.search(rb"\\u[dD][89a-fA-F]", raw) else obj   # a surrogate escape at all


def _valid_unicode(obj):
    """`obj` with every string (values and keys) re-encoded, lone surrogates replaced; iterative, any depth."""
    fix = lambda s: s.encode("utf-8", "replace").decode() if isinstance(s, str) else s   # noqa: E731
    root = [obj]
    stack = [(root, 0)]
    while stack:
        parent, key = stack.pop()
        value = parent[key]
        if isinstance(value, str):
            parent[key] = fix(value)
        elif isinstance(value, list):
            stack += [(value, i) for i in range(len(value))]
        elif isinstance(value, dict):
            fixed = {fix(k): v for k, v in value.items()}
            value.clear()
            value.update(fixed)
            stack += [(value, k) for k in value]
    return root[0]


def redact(text: str, secrets) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def post_json(session: requests.Session, url: str, payload: dict | None, *, what: str, timeout: float, retries: int,
              backoff_s: float, headers: dict | None = None, max_bytes: int = 64 << 20, method: str = "POST") -> object:
    """POST JSON (or GET with `method="GET"` and no payload) and return the decoded reply, or raise RemoteError
    saying what failed.

    Each attempt has `timeout` seconds in all (connect, send, every read); transient faults (connection, timeout,
    HTTP 429 / 5xx) are retried after backoff_s * 2**attempt seconds, so a call takes at most
    (retries + 1) * timeout + backoff_s * (2**retries - 1) seconds. Redirects are not followed. Messages carry the
    fault's kind and, for an HTTP error, a short snippet of the reply with every header value redacted first."""
    defaults = requests.utils.default_headers()
    secrets = [v for k, v in {**session.headers, **(headers or {})}.items() if isinstance(v, str) and k not in defaults]
    secrets = [v.split(" ", 1)[1] for v in secrets if " " in v] + secrets   # the key inside "Bearer <key>" first
    error = "no attempt"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        with Deadline(timeout) as deadline:
            try:
                with session.request(method, url, json=payload, headers=headers, timeout=timeout, stream=True,
                                     allow_redirects=False) as reply:
                    status = reply.status_code
                    body = read_body(reply, max_bytes)
            except ReplyTooLarge as e:
                raise RemoteError(f"{what}: {e}") from None
            except Exception as e:                    # anything the network made the client raise
                if deadline.expired or isinstance(e, requests.Timeout):
                    error = "timeout"
                elif isinstance(e, requests.ConnectionError):
                    error = "connection failed"
                else:
                    raise RemoteError(f"{what}: request failed ({type(e).__name__})") from None
                continue
        if deadline.expired:                          # the shutdown may read as a short, clean end of the body
            error = "timeout"
            continue
        if 300 <= status < 400:
            raise RemoteError(f"{what}: HTTP {status}: redirects are not followed (they would carry credentials)")
        if status != 200:
            snippet = redact(body[:2000].decode("utf-8", errors="replace"), secrets)[:200]   # redacted, then cut
            error = f"HTTP {status}" + (f" ({snippet!r})" if snippet.strip() else "")
            if status == 429 or status >= 500:
                continue
            raise RemoteError(f"{what}: {error}")
        try:
            return loads(body)
        except ValueError as e:
            raise RemoteError(f"{what}: {e} in the reply") from None
    raise RemoteError(f"{what}: {error}" + (f" (after {retries + 1} attempts)" if retries else ""))


# ----------------------------------------------------------------------------- the one OpenAI-compatible chat client
@dataclass(frozen=True)
class ChatReply:
    """The first choice of a chat completion: its text (None when the server sent none, as a reasoning model does
    that spent its max_tokens thinking), and why it ended (OpenAI's finish_reason; vLLM's stop_reason names the
    stop string that ended it, which the text does not contain)."""
    text: str | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class NotAChatCompletion(RemoteError):
    """The endpoint answered 200 with JSON that is not a chat completion (a caller may ask again)."""


class ChatClient:
    """An OpenAI-compatible chat endpoint: the RRM judge, the answer judge, the page reader and the teacher all
    talk to their LLM through this. `base_url` may end in /v1 or /v1/chat/completions or neither.

    The API key is read from $`api_key_env` at each call and kept nowhere (no attribute, repr or message holds
    it; post_json redacts it from error snippets). Each call has `timeout` seconds per attempt and `retries`
    retries of transient faults (post_json). A reply that is not a chat completion is a RemoteError too, so a
    caller handles exactly one kind of failure."""

    def __init__(self, base_url: str, model: str, *, what: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, retries: int = 2, backoff_s: float = 1.0, pool_size: int = 16,
                 max_bytes: int = 16 << 20):
        if not isinstance(base_url, str) or not re.match(r"https?://[^/]", base_url):
            raise ValueError(f"{what} URL must start with http:// or https://, got {base_url!r}")
        if timeout <= 0 or retries < 0 or pool_size < 1:
            raise ValueError(f"{what}: need timeout > 0, retries >= 0, pool_size >= 1; got {timeout}, {retries}, "
                             f"{pool_size}")
        self.base = base_url.rstrip("/").removesuffix("/chat/completions").removesuffix("/v1") + "/v1"
        self.model, self.what, self.api_key_env = model, what, api_key_env
        self.timeout, self.retries, self.backoff_s, self.max_bytes = timeout, retries, backoff_s, max_bytes
        self.pool_size, self.session = pool_size, session(pool_size)

    def __repr__(self) -> str:
        key = "set" if os.environ.get(self.api_key_env) else "unset"
        return f"ChatClient({self.what}: {self.base!r}, model {self.model!r}, key from ${self.api_key_env}: {key})"

    def _call(self, path: str, payload: dict | None, retries: int | None = None) -> object:
        key = os.environ.get(self.api_key_env)
        return post_json(self.session, self.base + path, payload, what=self.what, timeout=self.timeout,
                         retries=self.retries if retries is None else retries, backoff_s=self.backoff_s,
                         headers={"Authorization": f"Bearer {key}"} if key else None, max_bytes=self.max_bytes,
                         method="POST" if payload is not None else "GET")

    def chat(self, messages: list[dict], **params) -> ChatReply:
        """POST /v1/chat/completions with this model, `messages` and `params` (temperature, max_tokens, stop...)."""
        reply = self._call("/chat/completions", {"model": self.model, "messages": messages, **params})
        try:
            choice = reply["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise NotAChatCompletion(f"{self.what}: the reply is not a chat completion") from None
        if content is not None and not isinstance(content, str):
            raise NotAChatCompletion(f"{self.what}: the reply's content is a {type(content).__name__}, not text")
        return ChatReply(content, choice.get("finish_reason"), choice.get("stop_reason"))

    def models(self) -> list[str]:
        """GET /v1/models: the model names the endpoint serves."""
        reply = self._call("/models", None, retries=0)
        try:
            return [m["id"] for m in reply["data"]]
        except (KeyError, TypeError):
            raise RemoteError(f"{self.what}: {self.base}/models is not an OpenAI-compatible model list") from None

    def map(self, fn, items: list) -> list:
        """fn over items on up to `pool_size` threads, in order (the callers' calls are I/O-bound)."""
        if not items:
            return []
        with ThreadPoolExecutor(min(self.pool_size, len(items))) as pool:
            return list(pool.map(fn, items))

    def close(self) -> None:
        self.session.close()
