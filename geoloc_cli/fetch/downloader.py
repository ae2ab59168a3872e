"""The downloader side of fetch: one worker process's HTTP client on `http` (keep-alive, per-host
limits, redirects, retries within a deadline) and the per-item checks and processing (size, decode,
decompression-bomb guard, orientation, resize, JPEG). A failed item is an ItemFailure with a status
(http_404, too_large, corrupt, ...): a row of the manifest, never a crash."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import math
import random
import time
import urllib.parse
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, ImageOps, UnidentifiedImageError

from geoloc_cli import http
from geoloc_cli.config import FetchConfig
from geoloc_cli.photo import ORIENTATION, to_rgb

try:  # the fast path of process_image; without them (no wheel for the platform) Pillow does it all
    import cv2 as _cv2
    import simplejpeg as _simplejpeg

    # Fetch runs one worker process per core, so OpenCV's own threads would only contend. Set at import,
    # before any OpenCV call can start its thread pool: a process forked from one with a running pool
    # deadlocks in OpenCV.
    _cv2.setNumThreads(1)
except ImportError:
    _cv2 = _simplejpeg = None

# Pillow imports its common format plugins on the first Image.open; doing it here does it once in the
# parent, before the workers are forked, instead of once per worker on the hot path.
Image.preinit()
# Statuses that mean "this image is gone for good": --retry-failed skips them unless retry_gone.
GONE = frozenset({"http_404", "http_410", "unavailable", "missing"})  # missing: no image in the archive
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_RETRY_AFTER = 60.0  # seconds: a server asking for longer is not waited for
BACKOFF_BASE = 0.5  # seconds; doubles per attempt, with jitter
BACKOFF_MAX = 20.0
DECODE_THREADS = 2


# Bodies up to this size are decoded on the event loop (cheaper than a thread hand-off, and the other
# processes keep the cores busy); bigger ones go to a thread so a huge image cannot stall the sockets.
INLINE_DECODE_BYTES = 1_500_000
# Freed Pillow image blocks (<= 16 MB each) a worker keeps for reuse; see worker_main.
PILLOW_BLOCKS_CACHED = 8
USER_AGENT = "geoloc/0.1 (photo geolocation research; +https://github.com/)"
# Flickr answers a deleted photo with a redirect to this placeholder image instead of a 404.
FLICKR_PLACEHOLDER = "photo_unavailable"


class ItemFailure(Exception):
    """An item failed with a manifest status; `retry_after` is set when the server asked to wait."""

    def __init__(self, status: str, error: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(error)
        self.status, self.error, self.retryable, self.retry_after = status, error, retryable, retry_after


@dataclass(frozen=True)
class Network:
    """Where a worker's requests go, read from the environment of the process that starts the workers
    (a fork server's may be older); the fetch settings themselves travel as config.FetchConfig."""

    tls: tuple[str | None, str | None] = (None, None)  # (cafile, capath), see http.env_tls
    proxies: dict[str, Any] = field(default_factory=dict)  # see http.env_proxies


class Processed(NamedTuple):
    jpeg: bytes
    width: int  # as stored
    height: int
    orig_width: int  # as downloaded (filter.min_size judges these)
    orig_height: int


def process_image(data: bytes, cfg: FetchConfig) -> Processed:
    """Decode, orient, convert to RGB, resize (shorter side = cfg.resize_shorter), encode JPEG.

    The declared size is checked before any pixel is decoded (decompression-bomb guard), and JPEGs are
    decoded at a reduced scale (libjpeg's DCT scaling) when the target is much smaller. Plain JPEGs
    take the fast path (simplejpeg + OpenCV, about half the CPU of Pillow's); anything else, and
    anything the fast path cannot decode, takes the Pillow path.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ItemFailure("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        raise ItemFailure("not_image", f"not an image ({_sniff(data)})") from None
    w, h = im.size
    if w <= 0 or h <= 0 or w * h > cfg.max_pixels:
        raise ItemFailure("decompression_bomb", f"declared size {w}x{h} exceeds {cfg.max_pixels} pixels")
    # The output size from the original dimensions, so both paths agree to the pixel.
    size = _target_size(w, h, cfg.resize_shorter) if cfg.resize_shorter else (w, h)
    if math.prod(size) > cfg.max_pixels:
        raise ItemFailure("decompression_bomb", f"{w}x{h} would exceed {cfg.max_pixels} pixels after resizing")
    out = _process_fast(data, w, h, size, cfg.jpeg_quality) if _cv2 is not None and _plain_jpeg(im, data) else None
    jpeg, sw, sh = out or _process_pillow(im, size, cfg)
    if (sw, sh) != size:  # turned upright from EXIF: report the original's sides the same way round
        w, h = h, w
    return Processed(jpeg, sw, sh, w, h)


def _plain_jpeg(im: Image.Image, data: bytes) -> bool:
    """A complete (ends with EOI), upright, YCbCr/RGB JPEG: the case the fast path decodes like Pillow.
    A cut file is only a warning to libjpeg; Pillow's path reports it as truncated."""
    return (im.format == "JPEG" and im.mode == "RGB" and data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9")
            and im.getexif().get(ORIENTATION, 1) == 1)


def _process_fast(data: bytes, w: int, h: int, size: tuple[int, int], quality: int) -> tuple[bytes, int, int] | None:
    """simplejpeg decodes at the smallest DCT scale (1/8 steps) that still covers `size` (~10% faster
    than Pillow's draft, ~2x OpenCV's decoder); OpenCV resizes (SIMD, ~5x Pillow) and encodes."""
    cv2 = _cv2
    try:
        a = _simplejpeg.decode_jpeg(data, colorspace="BGR", min_width=min(size[0], w), min_height=min(size[1], h))
    except ValueError:
        return None  # let Pillow name the problem
    decoded = (a.shape[1], a.shape[0])
    if size != decoded:
        # After DCT scaling the remaining factor is below 2 (bilinear sees every pixel); larger factors
        # (images > 8x the target) need area averaging to avoid aliasing.
        interp = cv2.INTER_AREA if min(decoded) >= 2 * min(size) else cv2.INTER_LINEAR
        a = cv2.resize(a, size, interpolation=interp)
    ok, buf = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # JPEG's 65,500-pixel side limit; Pillow's path names the problem
        return None
    return buf.tobytes(), a.shape[1], a.shape[0]


def _target_size(w: int, h: int, target: int) -> tuple[int, int]:
    s = target / min(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _process_pillow(im: Image.Image, size: tuple[int, int], cfg: FetchConfig) -> tuple[bytes, int, int]:
    w, h = im.size
    target = cfg.resize_shorter
    if im.format == "JPEG" and target:
        scale = target / min(w, h)
        if scale < 1:
            im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    try:
        im.load()
        orientation = im.getexif().get(ORIENTATION, 1)
        if orientation != 1:  # phones store rotation as a tag; stored images are upright
            im = ImageOps.exif_transpose(im)
        im = to_rgb(im)
    except OSError as e:
        status = "truncated" if "truncated" in str(e) else "corrupt"
        raise ItemFailure(status, f"cannot decode: {e}") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ItemFailure("corrupt", f"cannot decode: {e}") from None
    if orientation in (5, 6, 7, 8):  # these orientations swap the sides
        size = size[::-1]
    if size != im.size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue(), im.size[0], im.size[1]


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML page"
    if not data:
        return "empty body"
    return f"{len(data)} bytes starting {data[:8]!r}"


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _http_failure(r: http.Response) -> ItemFailure:
    code = r.status
    if code in (404, 410):
        return ItemFailure(f"http_{code}", f"HTTP {code}")
    if code == 407:  # from a proxy: retrying cannot help until its credentials are fixed
        return ItemFailure("proxy_auth", "HTTP 407 from the proxy: check the user:password in the proxy URL")
    if code == 429:
        return ItemFailure("http_429", "HTTP 429", True, _retry_after(r.headers.get("retry-after")))
    if code >= 500:
        return ItemFailure("http_5xx", f"HTTP {code}", True, _retry_after(r.headers.get("retry-after")))
    return ItemFailure("http_4xx" if code >= 400 else "http_other", f"HTTP {code}")


# What each transport error becomes: (status, retryable). Connect failures and cut connections are
# often passing; a read timeout means a stalled server, and the per-item deadline bounds retries anyway.
_HTTP_ERRORS: list[tuple[type[http.HttpError], str, bool]] = [
    (http.ConnectTimeout, "timeout", True), (http.ReadTimeout, "timeout", False),
    (http.TLSError, "tls_error", False), (http.ProxyAuthError, "proxy_auth", False),
    (http.ConnectError, "connect_error", True),
    (http.IncompleteBody, "truncated", True), (http.ProtocolError, "bad_response", False),
    (http.BodyTooLarge, "too_large", False), (http.InvalidURL, "bad_url", False),
]


class Fetcher:
    """Fetches items within one worker process: one keep-alive client, global and per-host concurrency
    limits, redirects, retries within an overall deadline, decoding."""

    def __init__(self, cfg: FetchConfig, net: Network | None = None) -> None:
        net = net or Network()
        self.cfg = cfg
        self.client = http.Client(cfg.connect_timeout, cfg.read_timeout, keep_per_origin=cfg.per_host,
                                  max_idle=cfg.concurrency, headers={"User-Agent": USER_AGENT},
                                  proxies=net.proxies, tls=net.tls)
        self.slots = asyncio.Semaphore(cfg.concurrency)
        self.hosts: dict[str, asyncio.Semaphore] = {}
        self.pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")

    async def close(self) -> None:
        await self.client.close()
        self.pool.shutdown(wait=True)

    async def fetch(self, url: str) -> tuple[Processed, int]:
        """(processed image, body bytes) or raise ItemFailure."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "file":
            body = await asyncio.get_running_loop().run_in_executor(self.pool, self._read_file, url)
        elif scheme in ("http", "https"):
            body = await self._download(url)
        else:
            raise ItemFailure("bad_url", f"unsupported URL {url[:80]!r}")
        if len(body) <= INLINE_DECODE_BYTES:
            return process_image(body, self.cfg), len(body)
        return await asyncio.get_running_loop().run_in_executor(self.pool, process_image, body, self.cfg), len(body)

    def _read_file(self, url: str) -> bytes:
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        try:
            if path.stat().st_size > self.cfg.max_bytes:
                raise ItemFailure("too_large", f"file larger than {self.cfg.max_bytes} bytes")
            return path.read_bytes()
        except OSError as e:
            raise ItemFailure("io_error", f"{type(e).__name__}: {e}") from None

    async def _download(self, url: str) -> bytes:
        try:
            host = http.split_url(url)[0][1]
        except http.InvalidURL as e:
            raise ItemFailure("bad_url", str(e)) from None
        host_slots = self.hosts.setdefault(host, asyncio.Semaphore(self.cfg.per_host))
        # Host slot first: items waiting for a busy host must not hold global slots.
        async with host_slots, self.slots:
            start = time.monotonic()
            try:
                async with asyncio.timeout(self.cfg.deadline):
                    return await self._with_retries(url, start)
            except TimeoutError:
                raise ItemFailure("deadline", f"no result within {self.cfg.deadline:g} s") from None

    async def _with_retries(self, url: str, start: float) -> bytes:
        attempt = 0
        while True:
            try:
                return await self._get(url)
            except ItemFailure as e:
                if not e.retryable or attempt >= self.cfg.retries:
                    raise
                wait = min(BACKOFF_MAX, BACKOFF_BASE * 2**attempt) * random.uniform(0.5, 1.0)
                if e.retry_after is not None:
                    wait = max(wait, e.retry_after)
                left = self.cfg.deadline - (time.monotonic() - start)
                if wait > MAX_RETRY_AFTER or wait >= left:
                    raise  # waiting would not help before the deadline: keep the server's answer
                attempt += 1
                await asyncio.sleep(wait)

    def _body(self, r: http.Response, url: str) -> bytes:
        if r.status != 200:
            raise _http_failure(r)
        if FLICKR_PLACEHOLDER in url:
            raise ItemFailure("unavailable", f"redirected to placeholder {url}")
        return r.body

    async def _get(self, url: str) -> bytes:
        try:
            for _ in range(MAX_REDIRECTS + 1):
                r = await self.client.get(url, self.cfg.max_bytes)
                location = r.headers.get("location")
                if r.status in REDIRECTS and location:
                    url = urllib.parse.urljoin(url, location)
                    continue
                return self._body(r, url)
            raise ItemFailure("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")
        except http.HttpError as e:
            status, retryable = next((s, r) for kind, s, r in _HTTP_ERRORS if isinstance(e, kind))
            raise ItemFailure(status, str(e) or type(e).__name__, retryable) from None


def nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


async def attempt(fetcher: Fetcher, row: dict[str, Any], require_gps: bool = False) -> Any:
    if require_gps and (nan_to_none(row["lat"]) is None or nan_to_none(row["lon"]) is None):
        return ItemFailure("no_gps", "no GPS position in EXIF")
    try:
        return await fetcher.fetch(row["url"])
    except ItemFailure as e:
        return e
    except Exception as e:  # an item must never crash the run: record what happened
        return ItemFailure("error", f"{type(e).__name__}: {e}")


def from_bytes(data: bytes | int | None, cfg: FetchConfig) -> Any:
    if data is None:
        return ItemFailure("missing", "no image for this id in the archive")
    if isinstance(data, int) or len(data) > cfg.max_bytes:
        return ItemFailure("too_large", f"member larger than {cfg.max_bytes} bytes")
    try:
        return process_image(data, cfg), len(data)
    except ItemFailure as e:
        return e
    except Exception as e:  # an item must never crash the run: record what happened
        return ItemFailure("error", f"{type(e).__name__}: {e}")

