"""A loopback HTTP server for fetch tests: every way a real image host can answer or fail.

    with LoopbackServer() as srv:
        srv.url("/img/a.jpg")      # 200 JPEG (640x480; ?w=&h= to choose)

Routes (any path below them works, so items can have distinct URLs, e.g. /flaky/7):
  /img/...         200 JPEG                 /png/...       200 PNG with an alpha channel
  /404/... /410/...  not found / gone       /429/...       429 with Retry-After: 1, always
  /429once/...     429 with Retry-After: 1 the first time, then 200
  /500/...         500, always              /flaky/...     500 the first time, then 200
  /slow/...        sleeps `slow_seconds` before answering (longer than the client's read timeout)
  /truncated/...   declares Content-Length N, sends N/2 bytes and closes the connection
  /truncjpeg/...   a complete response whose JPEG body is cut in half
  /html/...        an HTML page with status 200    /big/...  a body larger than the tests' max_bytes
  /bomb.png /bomb.jpg  tiny files declaring 100000 x 100000 pixels
  /redirect/...    302 to /img/...          /loop/...      redirects to itself forever
  /imgslow/...     200 JPEG after `imgslow_seconds`   /toggle/...  500 while `failing`, else 200 JPEG
  /file/NAME       the bytes of srv.files[NAME] (metadata mirrors, archives; honours Range), else 404
  /datasets/REPO/resolve/REV/PATH, /REPO/resolve/REV/PATH   a fake Hugging Face Hub (HF_ENDPOINT=srv.url("")):
                   the bytes of srv.hub[(REPO, PATH)] with the Hub's headers (HEAD and GET); a repo in
                   srv.gated answers 401 GatedRepo without a token and 403 with a token not in srv.tokens
refused_url() is a URL on a closed port (connection refused). `hits` counts requests per path.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def make_jpeg(w: int = 640, h: int = 480, quality: int = 85) -> bytes:
    """A photo-like JPEG: a colour gradient with a few shapes (deterministic)."""
    im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    r, g, b = im.split()
    im = Image.merge("RGB", (r, g.transpose(Image.Transpose.FLIP_LEFT_RIGHT), b.rotate(90).resize((w, h))))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares w x h pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bomb_jpeg(w: int = 60_000, h: int = 60_000) -> bytes:
    """A small real JPEG whose SOF header is patched to declare w x h pixels."""
    data = bytearray(make_jpeg(64, 48))
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = data.find(marker)
        if i >= 0:
            data[i + 5:i + 9] = struct.pack(">HH", h, w)
            return bytes(data)
    raise AssertionError("no SOF marker in generated JPEG")


def png_with_alpha(w: int = 400, h: int = 300) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (w, h), (200, 10, 10, 128)).save(buf, "PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real image hosts
    server: _Server

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def _hub(self, path: str, head: bool) -> bool:
        """Answer a Hub file request (resolve URL) as huggingface_hub expects it; False: not one."""
        m = re.fullmatch(r"/(?:(datasets)/)?(.+?)/resolve/([^/]+)/(.+)", path)
        if not m:
            return False
        srv, repo, name = self.server, m[2], m[4]
        token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if repo in srv.gated and token not in srv.tokens:
            code = 403 if token else 401
            self._send(code, f"Access to {repo} is restricted.".encode(), "text/plain",
                       {"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to {repo} is restricted."}, head)
            return True
        body = srv.hub.get((repo, name))
        if body is None:
            self._send(404, b"Entry not found", "text/plain", {"X-Error-Code": "EntryNotFound"}, head)
            return True
        etag = hashlib.sha256(body).hexdigest()
        self._send(200, body, "application/octet-stream",
                   {"X-Repo-Commit": "0" * 40, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}, head)
        return True

    def do_GET(self, head: bool = False) -> None:  # noqa: C901 - one branch per route reads best here
        srv = self.server
        parts = urlsplit(self.path)
        if self._hub(parts.path, head):
            with srv.lock:
                srv.hits[parts.path] += 1
            return None
        route = parts.path.strip("/").split("/")[0]
        with srv.lock:
            srv.hits[parts.path] += 1
            first = srv.hits[parts.path] == 1
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if route == "imgslow":  # a realistic round trip, so a run lasts long enough to be killed
            time.sleep(srv.imgslow_seconds)
            return self._send(200, srv.jpeg(640, 480), "image/jpeg")
        if route == "toggle":  # 500 while srv.failing, else 200
            return self._send(500, b"down", "text/plain") if srv.failing else self._send(
                200, srv.jpeg(640, 480), "image/jpeg")
        if route == "file":
            body = srv.files.get(parts.path.split("/", 2)[-1])
            if body is None:
                return self._send(404, b"", "text/plain")
            start = int(re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-"))[1])
            if start:
                srv.ranges.append(start)
                return self._send(206, body[start:], "application/octet-stream",
                                  {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
            return self._send(200, body, "application/octet-stream")
        if route == "img":
            return self._send(200, srv.jpeg(int(q.get("w", 640)), int(q.get("h", 480))), "image/jpeg")
        if route == "png":
            return self._send(200, png_with_alpha(), "image/png")
        if route in ("404", "410", "500"):
            return self._send(int(route), b"nope", "text/plain")
        if route == "429":
            return self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
        if route == "429once":
            if first:
                return self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
            return self._send(200, srv.jpeg(640, 480), "image/jpeg")
        if route == "flaky":
            return self._send(500 if first else 200, b"oops" if first else srv.jpeg(640, 480), "image/jpeg")
        if route == "slow":
            time.sleep(srv.slow_seconds)
            return self._send(200, srv.jpeg(640, 480), "image/jpeg")
        if route == "truncated":
            body = srv.jpeg(640, 480)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if route == "truncjpeg":
            body = srv.jpeg(640, 480)
            return self._send(200, body[: len(body) // 2], "image/jpeg")
        if route == "html":
            return self._send(200, b"<!DOCTYPE html><html><body>Photo not found</body></html>", "text/html")
        if route == "big":
            return self._send(200, srv.jpeg(640, 480) + b"\0" * srv.big_bytes, "image/jpeg")
        if route == "bomb.png":
            return self._send(200, bomb_png(), "image/png")
        if route == "bomb.jpg":
            return self._send(200, bomb_jpeg(), "image/jpeg")
        if route == "redirect":
            return self._send(302, b"", "text/plain", {"Location": "/img/redirected.jpg?w=500&h=400"})
        if route == "loop":
            return self._send(302, b"", "text/plain", {"Location": parts.path})
        return self._send(404, b"unknown route", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: Counter = Counter()
        self.slow_seconds = 2.0
        self.big_bytes = 300_000
        self.imgslow_seconds = 0.1
        self.failing = True
        self.files: dict[str, bytes] = {}
        self.ranges: list[int] = []  # start offsets of the Range requests /file/ answered
        self.hub: dict[tuple[str, str], bytes] = {}  # (repo, path in repo) -> bytes
        self.gated: set[str] = set()
        self.tokens: set[str] = set()  # tokens with access to the gated repos
        self._jpegs: dict[tuple[int, int], bytes] = {}

    def jpeg(self, w: int, h: int) -> bytes:
        with self.lock:
            if (w, h) not in self._jpegs:
                self._jpegs[(w, h)] = make_jpeg(w, h)
            return self._jpegs[(w, h)]


class LoopbackServer:
    """Threaded test server on 127.0.0.1, port chosen by the OS (https with a server-side `tls` context).
    Use as a context manager."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.httpd = _Server()
        self.scheme = "https" if tls else "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def hits(self) -> Counter:
        return self.httpd.hits

    def __getattr__(self, name: str) -> object:  # files, hub, gated, tokens, ranges: the server's state
        return getattr(self.httpd, name)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/{path.lstrip('/')}"

    @staticmethod
    def refused_url() -> str:
        """A URL on a port nobody listens on: the connection is refused."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return f"http://127.0.0.1:{port}/nothing.jpg"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
