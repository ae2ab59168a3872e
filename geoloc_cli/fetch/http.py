"""A lean HTTP/1.1 GET client for fetch's hot loop: asyncio protocols, h11 framing, keep-alive pools.

Why not httpx here: a request through httpx's transport, httpcore and anyio costs ~1 ms of CPU, a fifth
of all the work per image at MP-16 scale; this client does the same exchange in a fraction of that. It
does only what fetch needs: GET, keep-alive connections per origin, verified TLS, bodies framed by
Content-Length, chunked coding or connection close (h11 parses them all), a body size cap, connect
and read timeouts, and HTTP proxies from the environment (CONNECT tunnels for https). Redirects,
retries and deadlines are the caller's (download.Fetcher). httpx stays the client for everything else
(metadata downloads), where its completeness matters more than speed.

Core module: asyncio, ssl and h11 (certifi and idna when a URL needs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import h11

# Characters left as they are in a request target; everything else (spaces, non-ASCII, quotes) is
# percent-encoded, so a URL copied from a web page still makes a valid request line.
_TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~-._"
MAX_HEADER_BYTES = 64 * 1024


class HttpError(Exception):
    """Base of the errors a request can end with."""


class InvalidURL(HttpError):
    pass


class ConnectTimeout(HttpError):
    pass


class ConnectError(HttpError):
    pass


class ProxyAuthError(ConnectError):
    """The proxy asked for (other) credentials: 407."""


class TLSError(HttpError):
    """The server's certificate could not be verified (or the TLS handshake failed)."""


class ReadTimeout(HttpError):
    pass


class ProtocolError(HttpError):
    """The server broke HTTP/1.1 framing (a malformed status line or headers)."""


class IncompleteBody(ProtocolError):
    """The connection closed before the whole response arrived."""


class NoResponse(IncompleteBody):
    """The connection closed before any response byte: on a reused connection, the server had closed
    it while idle, and the request is safe to send again on a fresh one."""


class BodyTooLarge(HttpError):
    pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


def env_tls() -> tuple[str | None, str | None]:
    """(cafile, capath): SSL_CERT_FILE and SSL_CERT_DIR as httpx honours them, else certifi's bundle."""
    cafile, capath = os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None
    if not cafile and not capath:
        import certifi

        cafile = certifi.where()
    return cafile, capath


@functools.cache
def ssl_context(cafile: str | None = None, capath: str | None = None) -> ssl.SSLContext:
    """One verifying TLS context per CA setting (loading a bundle costs ~30 ms); with no argument, the
    environment's (env_tls)."""
    if cafile is None and capath is None:
        cafile, capath = env_tls()
    ctx = ssl.create_default_context(cafile=cafile, capath=capath)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: plain http:// URLs go to it in absolute form, https:// ones through a CONNECT
    tunnel (TLS is still end to end with the origin and verified)."""

    host: str
    port: int
    auth: bytes | None = field(repr=False)  # the Proxy-Authorization value, from user:password in the URL


def env_proxies() -> dict[str, Any]:
    """{"http": Proxy, "https": Proxy, "no": str} from HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY
    (either case), as curl, requests and httpx read them; {} when none is set. A proxy that is not
    http:// (socks, https) raises ValueError: no request would reach it."""
    if not any(k.lower().endswith("_proxy") for k in os.environ):
        return {}
    import urllib.request  # ~20 ms; only when a proxy variable is set

    found = urllib.request.getproxies_environment()
    if found.get("no", "").strip() == "*":  # every host bypasses the proxy
        return {}
    out: dict[str, Any] = {"no": found.get("no", "")}
    for scheme in ("http", "https"):
        key = scheme if found.get(scheme) else "all"
        if found.get(key):
            out[scheme] = _parse_proxy(found[key], f"{key}_proxy")
    return out


def _parse_proxy(url: str, variable: str = "proxy") -> Proxy:
    """A Proxy from its URL; errors name the variable and never show the password."""
    shown = re.sub(r"//[^/@]*@", "//***@", url if "://" in url else "http://" + url)
    try:
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{variable.upper()}={shown} is not a valid proxy URL ({e})") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{variable.upper()}={shown} is not supported: only http:// proxies are")
    auth = None
    if parts.username is not None:
        import base64

        user = urllib.parse.unquote(parts.username) + ":" + urllib.parse.unquote(parts.password or "")
        auth = b"Basic " + base64.b64encode(user.encode())
    return Proxy(parts.hostname, 80 if port is None else port, auth)


def split_url(url: str) -> tuple[tuple[str, str, int], bytes, bytes]:
    """((scheme, host, port), Host header, request target) of an http(s) URL, or InvalidURL."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidURL(f"invalid URL {url[:80]!r}: {e}") from None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("http", "https") or not host:
        raise InvalidURL(f"not an http(s) URL: {url[:80]!r}")
    if not host.isascii():  # IDNA 2008 with UTS 46 mapping, as httpx and browsers do
        import idna

        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError:
            raise InvalidURL(f"invalid host name in {url[:80]!r}") from None
    default = 443 if scheme == "https" else 80
    port = default if port is None else port
    name = f"[{host}]" if ":" in host else host
    host_header = name if port == default else f"{name}:{port}"
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    target = urllib.parse.quote(target, safe=_TARGET_SAFE)
    return (scheme, host, port), host_header.encode("ascii"), target.encode("ascii")


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: h11 keeps the framing state, the protocol callbacks feed it bytes and
    wake the one request that waits on it. The callbacks only record an end of stream; next_event hands
    it to h11 once the bytes before it are parsed, so what an error means never depends on whether the
    last data and the close arrived in one read."""

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.active = False  # a request is in flight
        self.received = 0  # bytes received for the request in flight
        self.eof = False  # the peer closed its side (or the connection was lost)
        self.eof_fed = False  # ... and h11 was told
        self.lost: BaseException | None = None
        self.closed = False  # never reuse: closed, lost, or the server spoke out of turn

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active:  # e.g. a 408 sent to an idle connection before closing it: not a response
            self.closed = True
            return
        self.received += len(data)
        self.h11.receive_data(data)
        self._wake()

    def eof_received(self) -> bool:
        self.eof = self.closed = True
        self._wake()
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.closed = True
        self.lost = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # request side
    def abort(self) -> None:
        """Drop the connection at once (a TLS close would wait up to 30 s for the peer's close_notify)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def next_event(self, read_timeout: float) -> Any:
        """The next h11 event, waiting at most `read_timeout` for each piece of data."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                if not self.eof_fed:
                    raise ProtocolError(f"malformed response: {e}") from None
                reason = f" ({self.lost})" if self.lost else ""
                raise IncompleteBody(f"connection closed before the response was complete{reason}") from None
            if event is not h11.NEED_DATA:
                return event
            if self.eof:  # everything before the end is parsed: now h11 may see the end
                assert not self.eof_fed, "h11 asked for data after the end of the stream"
                self.h11.receive_data(b"")
                self.eof_fed = True
                continue
            loop = asyncio.get_running_loop()
            self.waiter = loop.create_future()
            timer = loop.call_later(read_timeout, _expire, self.waiter)
            try:
                await self.waiter
            finally:
                timer.cancel()
                self.waiter = None


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimeout("no data from the server within the read timeout"))


class Client:
    """Keep-alive GETs. Idle connections are kept per (scheme, host, port), at most `keep_per_origin`
    each and `max_idle` in all, for `idle_expiry` seconds (servers drop idle ones, and a list with many
    hosts must not hold a socket per host). How many requests run at once is the caller's to limit
    (download.Fetcher's semaphores)."""

    def __init__(self, connect_timeout: float, read_timeout: float, keep_per_origin: int = 16,
                 max_idle: int = 64, idle_expiry: float = 5.0, headers: dict[str, str] | None = None,
                 proxies: dict[str, Any] | None = None, tls: tuple[str | None, str | None] = (None, None)) -> None:
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.proxies, self.tls = proxies or {}, tls
        self.routes: dict[tuple[str, str, int], Proxy | None] = {}
        self.keep_per_origin, self.max_idle, self.idle_expiry = keep_per_origin, max_idle, idle_expiry
        self.headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self.headers.append((b"Accept-Encoding", b"identity"))
        # origin -> [(connection, when it became idle)], oldest first
        self.idle: dict[tuple[str, str, int], list[tuple[_Connection, float]]] = {}
        self.n_idle = 0
        self.open: set[_Connection] = set()

    async def get(self, url: str, max_bytes: int) -> Response:
        """GET `url`; the body is read whole, up to `max_bytes` (BodyTooLarge beyond)."""
        origin, host, target = split_url(url)
        headers = [(b"Host", host), *self.headers]
        proxy = self._route(origin)
        if proxy is not None and origin[0] == "http":  # absolute form: the proxy makes the request
            target = b"http://" + host + target
            if proxy.auth:
                headers.append((b"Proxy-Authorization", proxy.auth))
        conn = self._take_idle(origin)
        if conn is not None:
            with contextlib.suppress(NoResponse):  # closed by the server while idle: a fresh one
                return await self._exchange(conn, origin, headers, target, max_bytes)
        conn = await self._connect(origin)
        return await self._exchange(conn, origin, headers, target, max_bytes)

    async def close(self) -> None:
        for conn in list(self.open):
            conn.abort()
        self.open.clear()
        self.idle.clear()
        self.n_idle = 0

    def _route(self, origin: tuple[str, str, int]) -> Proxy | None:
        if origin not in self.routes:
            proxy = self.proxies.get(origin[0])
            if proxy is not None and self.proxies.get("no"):
                import urllib.request

                if urllib.request.proxy_bypass_environment(origin[1], {"no": self.proxies["no"]}):
                    proxy = None
            self.routes[origin] = proxy
        return self.routes[origin]

    def _take_idle(self, origin: tuple[str, str, int]) -> _Connection | None:
        pool = self.idle.get(origin)
        now = asyncio.get_running_loop().time()
        while pool:
            conn, since = pool.pop()  # the most recently used: least likely to be dropped by the server
            self.n_idle -= 1
            if not conn.closed and now - since < self.idle_expiry:
                return conn
            self._drop(conn)
        return None

    def _drop(self, conn: _Connection) -> None:
        conn.abort()
        self.open.discard(conn)

    async def _connect(self, origin: tuple[str, str, int]) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = ssl_context(*self.tls) if scheme == "https" else None
        proxy = self._route(origin)
        try:
            async with asyncio.timeout(self.connect_timeout):
                if proxy is None:
                    _, conn = await loop.create_connection(
                        _Connection, host, port, ssl=tls, server_hostname=host if tls else None,
                        happy_eyeballs_delay=0.25)
                else:
                    conn = await self._via_proxy(proxy, host, port, tls)
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {host}:{port} within {self.connect_timeout:g} s") from None
        except ssl.SSLError as e:
            raise TLSError(f"TLS with {host}:{port} failed: {e}") from None
        except OSError as e:  # refused, unreachable, DNS failure
            raise ConnectError(f"cannot connect to {host}:{port}: {_reason(e)}") from None
        except (UnicodeError, ValueError) as e:  # a host name the resolver refuses (empty label, NUL)
            raise InvalidURL(f"invalid host {host!r}: {e}") from None
        self.open.add(conn)
        return conn

    async def _via_proxy(self, proxy: Proxy, host: str, port: int, tls: ssl.SSLContext | None) -> _Connection:
        """A connection to `proxy`; for TLS, a CONNECT tunnel to host:port with TLS started inside it."""
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(_Connection, proxy.host, proxy.port, happy_eyeballs_delay=0.25)
        except OSError as e:
            raise ConnectError(f"cannot connect to proxy {proxy.host}:{proxy.port}: {_reason(e)}") from None
        if tls is None:  # plain http: requests go to the proxy itself (see get)
            return conn
        authority = (f"[{host}]" if ":" in host else host).encode("ascii") + b":%d" % port
        headers = [(b"Host", authority)] + ([(b"Proxy-Authorization", proxy.auth)] if proxy.auth else [])
        conn.active = True
        try:
            request = h11.Request(method="CONNECT", target=authority, headers=headers)
            conn.transport.write(conn.h11.send(request) + conn.h11.send(h11.EndOfMessage()))
            try:
                event = await conn.next_event(self.connect_timeout)
                while isinstance(event, h11.InformationalResponse):
                    event = await conn.next_event(self.connect_timeout)
            except (ProtocolError, ReadTimeout) as e:  # the proxy's fault, not the image server's
                raise ConnectError(f"proxy {proxy.host}:{proxy.port}: {e}") from None
            status = getattr(event, "status_code", None)
            if status == 407:
                raise ProxyAuthError(f"proxy {proxy.host}:{proxy.port} wants credentials (407): check the "
                                     "user:password in the proxy URL")
            if status != 200:
                raise ConnectError(f"proxy {proxy.host}:{proxy.port} refused the tunnel to {host}:{port} "
                                   f"({status or 'no answer'})")
            if conn.h11.trailing_data[0]:  # a TLS server never speaks first: these bytes are not its
                raise ConnectError(f"proxy {proxy.host}:{proxy.port} sent data before the tunnel was used")
            conn.transport = await loop.start_tls(conn.transport, conn, tls, server_hostname=host)
        except BaseException:
            conn.abort()
            raise
        conn.active = False
        conn.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)  # inside the tunnel
        return conn

    async def _exchange(self, conn: _Connection, origin: tuple[str, str, int], headers: list[tuple[bytes, bytes]],
                        target: bytes, max_bytes: int) -> Response:
        conn.active, conn.received = True, 0
        done = False
        try:
            response = await self._request(conn, headers, target, max_bytes)
            done = True
            return response
        finally:
            conn.active = False
            self._release(conn, origin, done)

    async def _request(self, conn: _Connection, headers: list[tuple[bytes, bytes]], target: bytes,
                       max_bytes: int) -> Response:
        if conn.closed:
            raise NoResponse("connection closed before the request was sent")
        data = conn.h11.send(h11.Request(method="GET", target=target, headers=headers))
        data += conn.h11.send(h11.EndOfMessage())
        conn.transport.write(data)
        while True:
            try:
                event = await conn.next_event(self.read_timeout)
            except IncompleteBody as e:
                if conn.received:  # a cut status line or headers: the server did answer
                    raise
                raise NoResponse(f"connection closed before a response arrived{_lost(conn)}") from e
            if isinstance(event, h11.Response):
                break
            if isinstance(event, h11.ConnectionClosed):  # cannot happen mid-exchange; h11 raises first
                raise NoResponse(f"connection closed before a response arrived{_lost(conn)}")
            # h11.InformationalResponse (1xx): wait for the real one
        status = event.status_code
        head = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
        declared = head.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise BodyTooLarge(f"Content-Length {declared} > {max_bytes}")
        chunks, size = [], 0
        while True:
            event = await conn.next_event(self.read_timeout)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_bytes:
                    raise BodyTooLarge(f"body exceeds {max_bytes} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, head, b"".join(chunks))
            else:  # ConnectionClosed without EndOfMessage cannot happen: h11 raises instead
                raise IncompleteBody("connection closed before the response was complete")

    def _release(self, conn: _Connection, origin: tuple[str, str, int], done: bool) -> None:
        """Back to the idle pool if the exchange finished cleanly, both sides keep the connection and
        nothing beyond the response arrived; otherwise dropped at once."""
        h = conn.h11
        if not (done and not conn.closed and h.our_state is h11.DONE and h.their_state is h11.DONE
                and not h.trailing_data[0]):
            self._drop(conn)
            return
        h.start_next_cycle()
        pool = self.idle.setdefault(origin, [])
        if len(pool) >= self.keep_per_origin:
            self._drop(conn)
            return
        if self.n_idle >= self.max_idle:
            self._evict_oldest()
        pool.append((conn, asyncio.get_running_loop().time()))
        self.n_idle += 1

    def _evict_oldest(self) -> None:
        origin = min((o for o, p in self.idle.items() if p), key=lambda o: self.idle[o][0][1])
        conn, _ = self.idle[origin].pop(0)
        self.n_idle -= 1
        self._drop(conn)


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _lost(conn: _Connection) -> str:
    return f" ({conn.lost})" if conn.lost else ""
