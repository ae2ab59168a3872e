"""geoloc_cli.http, the keep-alive client of fetch's hot loop, against scripted asyncio servers."""

from __future__ import annotations

import asyncio
import os
import ssl
import unittest.mock
from collections.abc import Awaitable, Callable

import pytest

from geoloc_cli import http
from geoloc_cli.config import FetchConfig
from geoloc_cli.fetch import downloader

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> tuple[asyncio.Server, str, list[int]]:
    """A server that calls `handler(reader, writer, request_number)` for each request head it reads,
    until the handler returns False; `conns` counts connections (one entry per connection)."""
    conns: list[int] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(0)
        n = 0
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                n += 1
                conns[-1] = n
                if not await handler(reader, writer, n):
                    return
        finally:
            writer.close()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=tls)
    port = srv.sockets[0].getsockname()[1]
    return srv, f"{'https' if tls else 'http'}://127.0.0.1:{port}", conns


def run(coro: Awaitable) -> object:
    return asyncio.run(asyncio.wait_for(coro, 20))


def client(read: float = 2.0, **kw: float) -> http.Client:
    return http.Client(2.0, read, **kw)


def test_keep_alive_reuses_one_connection_and_frames_every_body_kind():
    async def handler(reader, writer, n):
        if n == 1:
            writer.write(ok(b"abc"))
        elif n == 2:  # chunked coding
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ndef\r\n2\r\ngh\r\n0\r\n\r\n")
        elif n == 3:  # a 100 Continue first, then a 404 with a body
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope")
        else:  # no length: the body ends when the server closes
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close")
            await writer.drain()
            return False
        await writer.drain()
        return True

    async def main():
        srv, base, conns = await serve(handler)
        c = client()
        got = [await c.get(f"{base}/{i}.jpg", 1000) for i in range(4)]
        await c.close()
        srv.close()
        return got, conns

    got, conns = run(main())
    assert [(r.status, r.body) for r in got] == [(200, b"abc"), (200, b"defgh"), (404, b"nope"), (200, b"until-close")]
    assert conns == [4], "all four requests on one kept-alive connection"


def test_bytes_beyond_a_response_never_reach_the_next_request():
    total = [0]

    async def handler(reader, writer, _):
        total[0] += 1
        n = total[0]
        if n == 1:  # more bytes than Content-Length, then (on the idle connection) an unasked-for 408
            writer.write(ok(b"abc") + b"STALE")
        elif n == 2:
            writer.write(ok(b"two"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(ok(b"three"))
        await writer.drain()
        return True

    async def main():
        srv, base, conns = await serve(handler)
        c = client()
        got = [(await c.get(f"{base}/{i}", 100)).body for i in range(2)]
        await asyncio.sleep(0.2)  # the 408 arrives while the connection is idle
        got.append((await c.get(f"{base}/2", 100)).body)
        await c.close()
        srv.close()
        return got, conns

    got, conns = run(main())
    assert got == [b"abc", b"two", b"three"]
    assert conns == [1, 1, 1], "neither connection was reused after the server spoke out of turn"


def test_idle_pool_expires_and_is_capped():
    async def handler(reader, writer, n):
        writer.write(ok(b"x"))
        await writer.drain()
        return True

    async def main():
        servers = [await serve(handler) for _ in range(3)]
        c = client(max_idle=2, idle_expiry=0.3)
        for _, base, _ in servers:
            await c.get(base + "/a", 10)
        capped = (c.n_idle, len(c.open))
        await c.get(servers[2][1] + "/b", 10)  # within the expiry: reused
        await asyncio.sleep(0.4)
        await c.get(servers[2][1] + "/c", 10)  # expired: a new connection
        await c.close()
        for srv, _, _ in servers:
            srv.close()
        return capped, [conns for _, _, conns in servers]

    capped, conns = run(main())
    assert capped == (2, 2), "the oldest idle connection was dropped at the cap"
    assert conns == [[1], [1], [2, 1]]


def test_idle_connection_closed_by_the_server_is_replaced_transparently():
    async def handler(reader, writer, n):
        if n == 1:  # answer, claim keep-alive, then hang up on the next request without answering
            writer.write(ok(b"first"))
            await writer.drain()
            return True
        return False

    async def main():
        srv, base, conns = await serve(handler)
        c = client()
        first = await c.get(f"{base}/a", 100)
        second = await c.get(f"{base}/b", 100)
        await c.close()
        srv.close()
        return first.body, second.body, conns

    first, second, conns = run(main())
    assert first == second == b"first"
    assert conns == [2, 1], "the second request went out again on a fresh connection"


@pytest.mark.parametrize(("reply", "error"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", http.IncompleteBody),  # cut short, then closed
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", http.IncompleteBody),
    (b"NOT HTTP AT ALL\r\n\r\n", http.ProtocolError),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", http.ProtocolError),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", http.BodyTooLarge),  # declared too big
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"x" * 2000, http.BodyTooLarge),
])
def test_broken_responses_raise_their_own_error(reply, error):
    async def handler(reader, writer, n):
        writer.write(reply)
        await writer.drain()
        return False

    async def main():
        srv, base, _ = await serve(handler)
        c = client()
        try:
            with pytest.raises(error) as e:
                await c.get(f"{base}/x", 1000)
            return e.value
        finally:
            await c.close()
            srv.close()

    e = run(main())
    if error is http.ProtocolError:
        assert not isinstance(e, http.IncompleteBody), "malformed is not the same as cut short"


def test_a_cut_status_line_on_a_reused_connection_is_not_sent_again():
    async def handler(reader, writer, n):
        writer.write(ok(b"first") if n == 1 else b"HTTP/1.1 200 O")
        await writer.drain()
        return n == 1

    async def main():
        srv, base, conns = await serve(handler)
        c = client()
        await c.get(f"{base}/a", 100)
        with pytest.raises(http.IncompleteBody) as e:
            await c.get(f"{base}/b", 100)
        await c.close()
        srv.close()
        return e.value, conns

    e, conns = run(main())
    assert not isinstance(e, http.NoResponse) and conns == [2], "the server answered: no second try"


def test_timeouts_and_refused_connections():
    async def silent(reader, writer, n):
        await asyncio.sleep(5)
        return False

    async def main():
        srv, base, _ = await serve(silent)
        c = client(read=0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(http.ReadTimeout):
            await c.get(f"{base}/slow", 100)
        waited = loop.time() - t0
        srv.close()
        with pytest.raises(http.ConnectError):
            await c.get(base + "/again", 100)  # the server is gone: refused
        await c.close()
        return waited

    assert 0.15 < run(main()) < 2


def test_split_url():
    assert http.split_url("http://Example.COM/a b/ü.jpg?x=1") == (
        ("http", "example.com", 80), b"example.com", b"/a%20b/%C3%BC.jpg?x=1")
    assert http.split_url("https://[::1]:8443") == (("https", "::1", 8443), b"[::1]:8443", b"/")
    assert http.split_url("https://bücher.example/")[0][1] == "xn--bcher-kva.example"
    assert http.split_url("http://straße.de/")[0][1] == "xn--strae-oqa.de"  # IDNA 2008, not 2003's "strasse"
    for bad in ["http://host:99999/", "ftp://host/x", "http:///nohost", "http://[::1/x"]:
        with pytest.raises(http.InvalidURL):
            http.split_url(bad)

    async def connect(url):
        c = client()
        try:
            await c.get(url, 10)
        finally:
            await c.close()

    for host in ["a..b", "x" * 70 + ".example"]:  # the resolver refuses these (UnicodeError)
        with pytest.raises(http.InvalidURL):
            run(connect(f"http://{host}/x"))


def test_tls_is_verified(tmp_path, monkeypatch):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def handler(reader, writer, n):
        writer.write(ok(b"secret"))
        await writer.drain()
        return True

    async def fetch_with(cafile: str | None) -> bytes:
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        if cafile:
            monkeypatch.setenv("SSL_CERT_FILE", cafile)
        else:
            monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        http.ssl_context.cache_clear()
        srv, base, _ = await serve(handler, tls=server_ctx)
        c = client()
        try:
            return (await c.get(f"{base}/x", 100)).body
        finally:
            await c.close()
            srv.close()
            http.ssl_context.cache_clear()

    assert run(fetch_with(str(ca_file))) == b"secret"
    with pytest.raises(http.TLSError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        run(fetch_with(None))  # certifi's bundle does not know the test CA
    ctx = http.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname and ctx is http.ssl_context()


def test_a_failed_tls_connection_is_dropped_at_once():
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)

    async def stalled(reader, writer, n):
        writer.transport.pause_reading()  # a stalled server: the client's close_notify gets no answer
        await asyncio.sleep(10)
        return False

    async def main():
        srv, base, _ = await serve(stalled, tls=server_ctx)
        c = http.Client(2.0, 0.2)
        c_ctx = ssl.create_default_context(cafile=None)
        ca.configure_trust(c_ctx)
        try:
            with unittest.mock.patch.object(http, "ssl_context", lambda *tls: c_ctx), pytest.raises(http.ReadTimeout):
                await c.get(f"{base}/x", 100)
            await asyncio.sleep(0.1)
            return c.open, sockets[0].fileno()
        finally:
            await c.close()
            srv.close()

    sockets = []
    connect = http.Client._connect

    async def recording(self, origin):
        conn = await connect(self, origin)
        sockets.append(conn.transport.get_extra_info("socket"))
        return conn

    with unittest.mock.patch.object(http.Client, "_connect", recording):
        left, fileno = run(main())
    assert left == set() and fileno == -1, "the socket is closed, not left waiting for the peer's close_notify"


def test_fetcher_maps_transport_errors_to_statuses():
    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        return False

    async def main():
        srv, base, _ = await serve(handler)
        f = downloader.Fetcher(FetchConfig(retries=0, read_timeout=1, deadline=5))
        try:
            with pytest.raises(downloader.ItemFailure) as cut:
                await f.fetch(f"{base}/x.jpg")
            with pytest.raises(downloader.ItemFailure) as bad:
                await f.fetch("http://host:notaport/x.jpg")
            return cut.value, bad.value
        finally:
            await f.close()
            srv.close()

    cut, bad = run(main())
    assert (cut.status, cut.retryable) == ("truncated", True)
    assert bad.status == "bad_url"


async def start_proxy(log: list[bytes], connect_status: int = 200) -> str:
    """A loopback HTTP proxy: CONNECT tunnels to the target; an absolute-form GET is answered by the
    proxy itself with the request line as the body (enough to see what the client sent)."""

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return writer.close()
            log.append(head)
            method, target, _ = head.split(b"\r\n")[0].split(b" ")
            if method != b"CONNECT":
                writer.write(ok(head.split(b"\r\n")[0]))
                continue
            if connect_status != 200:
                writer.write(b"HTTP/1.1 %d No\r\nContent-Length: 0\r\n\r\n" % connect_status)
                return writer.close()
            host, port = target.rsplit(b":", 1)
            up_r, up_w = await asyncio.open_connection(host.decode(), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
            return None

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"


def test_proxies_from_the_environment(monkeypatch):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context(cafile=None)
    ca.configure_trust(client_ctx)
    monkeypatch.setattr(http, "ssl_context", lambda *tls: client_ctx)
    for k in list(os.environ):
        if k.lower().endswith("_proxy"):
            monkeypatch.delenv(k)

    async def handler(reader, writer, n):
        writer.write(ok(b"secret"))
        await writer.drain()
        return True

    async def main(no_proxy: str = "") -> tuple[list[bytes], list[bytes]]:
        log: list[bytes] = []
        proxy = await start_proxy(log)
        monkeypatch.setenv("HTTP_PROXY", f"http://user:p%40ss@{proxy}")
        monkeypatch.setenv("https_proxy", f"http://{proxy}")
        monkeypatch.setenv("NO_PROXY", no_proxy)
        _, base, _ = await serve(handler, tls=server_ctx)
        c = http.Client(2.0, 2.0, proxies=http.env_proxies())
        try:
            bodies = [(await c.get(u, 100)).body for u in
                      ["http://origin.test:8080/a b?x=1", "http://origin.test:8080/2", f"{base}/tls"]]
        finally:
            await c.close()
        return bodies, log

    bodies, log = run(main())
    assert bodies == [b"GET http://origin.test:8080/a%20b?x=1 HTTP/1.1", b"GET http://origin.test:8080/2 HTTP/1.1",
                      b"secret"]
    assert b"Proxy-Authorization: Basic dXNlcjpwQHNz" in log[0]  # user:p@ss
    assert len(log) == 3 and log[2].startswith(b"CONNECT 127.0.0.1:"), "TLS went through a tunnel"
    assert b"Proxy-Authorization" not in log[2]  # the https proxy URL carries no credentials
    bodies, log = run(main(no_proxy="127.0.0.1,localhost"))
    assert bodies[2] == b"secret" and len(log) == 2, "NO_PROXY hosts are fetched directly"

    async def refused() -> None:
        log: list[bytes] = []
        proxy = await start_proxy(log, connect_status=407)
        c = http.Client(2.0, 2.0, proxies={"https": http._parse_proxy(proxy)})
        try:
            await c.get("https://origin.test/x", 100)
        finally:
            await c.close()

    with pytest.raises(http.ConnectError, match="407"):
        run(refused())
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.delenv("https_proxy")
    with pytest.raises(ValueError, match="only http:// proxies"):
        http.env_proxies()


def test_proxy_settings_errors_name_the_variable_and_hide_the_password(monkeypatch):
    for k in list(os.environ):
        if k.lower().endswith("_proxy"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HTTPS_PROXY", "https://alice:S3cret@proxy.corp:3128")
    with pytest.raises(ValueError) as e:
        http.env_proxies()
    assert "HTTPS_PROXY=https://***@proxy.corp:3128" in str(e.value) and "S3cret" not in str(e.value)
    monkeypatch.setenv("NO_PROXY", "*")
    assert http.env_proxies() == {}, "NO_PROXY=* bypasses every proxy, usable or not"
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", "http://bob:pw@proxy.corp:abc")
    with pytest.raises(ValueError, match="HTTPS_PROXY=http://\\*\\*\\*@proxy.corp:abc is not a valid proxy URL"):
        http.env_proxies()
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp")  # no scheme, no port: http on 80, as curl does
    p = http.env_proxies()["https"]
    assert (p.host, p.port, p.auth) == ("proxy.corp", 80, None)
    assert "pw" not in repr(http._parse_proxy("http://bob:pw@h:1")), "credentials stay out of reprs"


def test_proxy_failures_are_the_proxys():
    async def closes(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def main(status: int | None) -> http.HttpError:
        log: list[bytes] = []
        if status is None:
            srv = await asyncio.start_server(closes, "127.0.0.1", 0)
            proxy = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        else:
            proxy = await start_proxy(log, connect_status=status)
        c = http.Client(2.0, 2.0, proxies={"https": http._parse_proxy(proxy)})
        try:
            with pytest.raises(http.ConnectError) as e:
                await c.get("https://origin.test/x", 100)
            return e.value
        finally:
            await c.close()

    silent, wants_auth = run(main(None)), run(main(407))
    assert "proxy 127.0.0.1" in str(silent) and not isinstance(silent, http.ProxyAuthError)
    assert isinstance(wants_auth, http.ProxyAuthError)
    assert downloader._http_failure(http.Response(407, {}, b"")).status == "proxy_auth"
    assert next(s for kind, s, _ in downloader._HTTP_ERRORS if isinstance(wants_auth, kind)) == "proxy_auth"
