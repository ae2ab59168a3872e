"""Download engine of `geoloc fetch`: one item -> (status, JPEG), one shard job -> tar + manifest part.

A worker process runs one asyncio loop with a lean keep-alive HTTP/1.1 client (geoloc_cli.http), at
most `concurrency` requests in flight and `per_host` per host. Typical images are decoded and resized
on the loop itself (measured cheaper than a thread hand-off; with one worker per core the cores stay
busy), big bodies in a thread. A worker takes a second shard when the first has fewer unfinished
items than its concurrency, so the slow tail of one shard overlaps the start of the next. Every item
ends with exactly one status; nothing an item does can stop the run.

This module is core: no typer, no rich. It reports progress as small tuples on a multiprocessing queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import json
import math
import os
import queue
import random
import time
import traceback
import urllib.parse
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from geoloc_cli import http
from geoloc_cli.errors import GeolocError, worker_error
from geoloc_cli.photo import ORIENTATION, to_rgb
from geoloc_cli.places365 import META_COLUMNS, META_TYPES
from geoloc_cli.store import OK, ShardWriter, atomic_path, iter_shard, read_table

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
SHARDS_PER_WORKER = 2  # active shards per worker process (overlaps one shard's tail with the next)
DECODE_THREADS = 2
# Bodies up to this size are decoded on the event loop (cheaper than a thread hand-off, and the other
# processes keep the cores busy); bigger ones go to a thread so a huge image cannot stall the sockets.
INLINE_DECODE_BYTES = 1_500_000
# Freed Pillow image blocks (<= 16 MB each) a worker keeps for reuse; see worker_main.
PILLOW_BLOCKS_CACHED = 8
USER_AGENT = "geoloc/0.1 (photo geolocation research; +https://github.com/)"
# Flickr answers a deleted photo with a redirect to this placeholder image instead of a 404.
FLICKR_PLACEHOLDER = "photo_unavailable"

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("id", pa.string()), ("url", pa.string()),
    ("lat", pa.float64()), ("lon", pa.float64()),
    ("status", pa.string()), ("error", pa.string()), ("bytes", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("orig_width", pa.int32()), ("orig_height", pa.int32()),
    ("shard", pa.string()),
    # the metadata's other columns (manifests written before the administrative areas existed read them
    # as nulls: fetch._conform)
    *META_TYPES.items(),
])


class ItemFailure(Exception):
    """An item failed with a manifest status; `retry_after` is set when the server asked to wait."""

    def __init__(self, status: str, error: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(error)
        self.status, self.error, self.retryable, self.retry_after = status, error, retryable, retry_after


@dataclass
class Options:
    """The fetch settings a worker needs (a plain copy of config.FetchConfig)."""

    resize_shorter: int = 320
    jpeg_quality: int = 90
    concurrency: int = 64
    per_host: int = 16
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    deadline: float = 30.0
    retries: int = 3
    max_bytes: int = 20_000_000
    max_pixels: int = 100_000_000
    # From the environment of the process that starts the workers (a fork server's may be older):
    tls: tuple[str | None, str | None] = (None, None)  # (cafile, capath), see http.env_tls
    proxies: dict[str, Any] = field(default_factory=dict)  # see http.env_proxies

    @classmethod
    def from_config(cls, fetch_cfg: Any) -> Options:
        return cls(**{k: getattr(fetch_cfg, k) for k in cls.__dataclass_fields__ if hasattr(fetch_cfg, k)})


# ---------------------------------------------------------------------------------------------- images


class Processed(NamedTuple):
    jpeg: bytes
    width: int  # as stored
    height: int
    orig_width: int  # as downloaded (filter.min_size judges these)
    orig_height: int


def process_image(data: bytes, opts: Options) -> Processed:
    """Decode, orient, convert to RGB, resize (shorter side = opts.resize_shorter), encode JPEG.

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
    if w <= 0 or h <= 0 or w * h > opts.max_pixels:
        raise ItemFailure("decompression_bomb", f"declared size {w}x{h} exceeds {opts.max_pixels} pixels")
    # The output size from the original dimensions, so both paths agree to the pixel.
    size = _target_size(w, h, opts.resize_shorter) if opts.resize_shorter else (w, h)
    if math.prod(size) > opts.max_pixels:
        raise ItemFailure("decompression_bomb", f"{w}x{h} would exceed {opts.max_pixels} pixels after resizing")
    out = _process_fast(data, w, h, size, opts.jpeg_quality) if _cv2 is not None and _plain_jpeg(im, data) else None
    jpeg, sw, sh = out or _process_pillow(im, size, opts)
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


def _process_pillow(im: Image.Image, size: tuple[int, int], opts: Options) -> tuple[bytes, int, int]:
    w, h = im.size
    target = opts.resize_shorter
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
    im.save(buf, "JPEG", quality=opts.jpeg_quality)
    return buf.getvalue(), im.size[0], im.size[1]


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML page"
    if not data:
        return "empty body"
    return f"{len(data)} bytes starting {data[:8]!r}"


# ----------------------------------------------------------------------------------------------- HTTP


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

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.client = http.Client(opts.connect_timeout, opts.read_timeout, keep_per_origin=opts.per_host,
                                  max_idle=opts.concurrency, headers={"User-Agent": USER_AGENT},
                                  proxies=opts.proxies, tls=opts.tls)
        self.slots = asyncio.Semaphore(opts.concurrency)
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
            return process_image(body, self.opts), len(body)
        return await asyncio.get_running_loop().run_in_executor(self.pool, process_image, body, self.opts), len(body)

    def _read_file(self, url: str) -> bytes:
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        try:
            if path.stat().st_size > self.opts.max_bytes:
                raise ItemFailure("too_large", f"file larger than {self.opts.max_bytes} bytes")
            return path.read_bytes()
        except OSError as e:
            raise ItemFailure("io_error", f"{type(e).__name__}: {e}") from None

    async def _download(self, url: str) -> bytes:
        try:
            host = http.split_url(url)[0][1]
        except http.InvalidURL as e:
            raise ItemFailure("bad_url", str(e)) from None
        host_slots = self.hosts.setdefault(host, asyncio.Semaphore(self.opts.per_host))
        # Host slot first: items waiting for a busy host must not hold global slots.
        async with host_slots, self.slots:
            start = time.monotonic()
            try:
                async with asyncio.timeout(self.opts.deadline):
                    return await self._with_retries(url, start)
            except TimeoutError:
                raise ItemFailure("deadline", f"no result within {self.opts.deadline:g} s") from None

    async def _with_retries(self, url: str, start: float) -> bytes:
        attempt = 0
        while True:
            try:
                return await self._get(url)
            except ItemFailure as e:
                if not e.retryable or attempt >= self.opts.retries:
                    raise
                wait = min(BACKOFF_MAX, BACKOFF_BASE * 2**attempt) * random.uniform(0.5, 1.0)
                if e.retry_after is not None:
                    wait = max(wait, e.retry_after)
                left = self.opts.deadline - (time.monotonic() - start)
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
                r = await self.client.get(url, self.opts.max_bytes)
                location = r.headers.get("location")
                if r.status in REDIRECTS and location:
                    url = urllib.parse.urljoin(url, location)
                    continue
                return self._body(r, url)
            raise ItemFailure("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")
        except http.HttpError as e:
            status, retryable = next((s, r) for kind, s, r in _HTTP_ERRORS if isinstance(e, kind))
            raise ItemFailure(status, str(e) or type(e).__name__, retryable) from None


# ----------------------------------------------------------------------------------------------- shards


def _row(job: dict[str, Any], i: int, shard: str) -> dict[str, Any]:
    row = {"key": job["keys"][i], "id": job["ids"][i], "url": job["urls"][i],
           "lat": job["lat"][i], "lon": job["lon"][i], "status": "", "error": "", "bytes": 0,
           "width": 0, "height": 0, "orig_width": 0, "orig_height": 0, "shard": shard}
    for col in META_COLUMNS:
        row[col] = job["meta"][col][i] if col in job["meta"] else None
    return row


def _nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Manifest rows as an Arrow table, built by Arrow's JSON reader: pa.array() on Python objects
    imports pandas (pyarrow 26), ~0.4 s of CPU per worker process, taken while the GIL stalls its
    downloads. Text that is not valid Unicode (an undecodable file name in an error) becomes '?'."""
    lines = "".join(json.dumps({k: _nan_to_none(v) for k, v in r.items()}, ensure_ascii=False) + "\n" for r in rows)
    opts = pa_json.ParseOptions(explicit_schema=MANIFEST_SCHEMA, unexpected_field_behavior="error")
    return pa_json.read_json(io.BytesIO(lines.encode("utf-8", "replace")), parse_options=opts)


async def run_shard(fetcher: Fetcher, job: dict[str, Any], report: Any) -> Counter:
    """Fetch one shard job and write its tar, then its manifest part (both atomically, in that order).

    With job["retry"], successes already in the tar are kept, gone items (404/410) keep their old row
    unless job["retry_gone"], and every other failure is fetched again.
    """
    tar_path, part_path = Path(job["tar"]), Path(job["part"])
    shard = tar_path.name
    rows = [_row(job, i, shard) for i in range(len(job["keys"]))]
    kept: dict[str, dict[str, bytes]] = {}
    old: dict[str, dict[str, Any]] = {}
    if job.get("retry"):
        kept = dict(iter_shard(tar_path)) if tar_path.is_file() else {}
        if part_path.is_file():
            old = {r["key"]: r for r in read_table(part_path).to_pylist()}
    images: dict[str, tuple[bytes, bytes]] = {}

    async def one(row: dict[str, Any]) -> None:
        key = row["key"]
        if key in kept:  # stored in an earlier run: the tar is the record of successes
            meta = json.loads(kept[key]["json"])
            images[key] = (kept[key]["jpg"], kept[key]["json"])
            prev = old.get(key, {})
            row.update(status=OK, bytes=prev.get("bytes") or len(kept[key]["jpg"]),
                       **{k: meta.get(k, 0) for k in ("width", "height", "orig_width", "orig_height")})
            report(OK)
            return
        prev = old.get(key)
        if prev is not None and prev["status"] in GONE and not job.get("retry_gone"):
            row.update(status=prev["status"], error=prev["error"], bytes=prev["bytes"])
            report(row["status"])
            return
        row.update(_fetch_row(await _attempt(fetcher, row, job), images, row))
        report(row["status"])

    await asyncio.gather(*(one(r) for r in rows))
    await asyncio.get_running_loop().run_in_executor(None, _write_shard, tar_path, part_path, rows, images)
    return Counter(r["status"] for r in rows)


async def _attempt(fetcher: Fetcher, row: dict[str, Any], job: dict[str, Any]) -> Any:
    if job.get("require_gps") and (_nan_to_none(row["lat"]) is None or _nan_to_none(row["lon"]) is None):
        return ItemFailure("no_gps", "no GPS position in EXIF")
    try:
        return await fetcher.fetch(row["url"])
    except ItemFailure as e:
        return e
    except Exception as e:  # an item must never crash the run: record what happened
        return ItemFailure("error", f"{type(e).__name__}: {e}")


def _fetch_row(result: Any, images: dict[str, tuple[bytes, bytes]], row: dict[str, Any]) -> dict[str, Any]:
    if isinstance(result, ItemFailure):
        return {"status": result.status, "error": result.error[:500]}
    image, nbytes = result
    sizes = {"width": image.width, "height": image.height, "orig_width": image.orig_width,
             "orig_height": image.orig_height}
    info = {"key": row["key"], "id": row["id"], "lat": _nan_to_none(row["lat"]),
            "lon": _nan_to_none(row["lon"]), **sizes, "url": row["url"]}
    images[row["key"]] = (image.jpeg, json.dumps(info).encode())
    return {"status": OK, "error": "", "bytes": nbytes, **sizes}


def _write_shard(tar_path: Path, part_path: Path, rows: list[dict[str, Any]],
                 images: dict[str, tuple[bytes, bytes]]) -> None:
    with ShardWriter(tar_path) as w:
        for row in rows:  # key order
            if row["key"] in images:
                jpg, meta = images[row["key"]]
                w.add(row["key"], {"jpg": jpg, "json": meta})
    table = manifest_table(rows)
    with atomic_path(part_path) as tmp:
        pq.write_table(table, tmp)


# ---------------------------------------------------------------------------------------------- archives


class _Joined(io.RawIOBase):
    """Byte-split parts of one file (MP16-Pro's mp-16-images00..18) read as one seekable stream, so a
    tar can be walked across part boundaries without joining the parts on disk."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self.starts = [0]
        for p in self.paths:
            self.starts.append(self.starts[-1] + p.stat().st_size)
        self.pos, self._open = 0, (-1, None)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.starts[-1] + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        i = next((k for k in range(len(self.paths)) if self.pos < self.starts[k + 1]), None)
        if i is None:
            return 0
        if self._open[0] != i:
            if self._open[1] is not None:
                self._open[1].close()
            self._open = (i, open(self.paths[i], "rb"))  # noqa: SIM115 - closed on the next part or close()
        f = self._open[1]
        f.seek(self.pos - self.starts[i])
        n = f.readinto(memoryview(buf)[: self.starts[i + 1] - self.pos])
        self.pos += n
        return n

    def close(self) -> None:
        if self._open[1] is not None:
            self._open[1].close()
        super().close()


class Member(NamedTuple):
    name: str
    size: int
    read: Any  # () -> bytes; valid only until the next member is yielded


def archive_members(kind: str, paths: list[Path]) -> Iterator[Member]:
    """The image files of an archive in stored order, without unpacking it: zip (several zips are read
    one after the other), tar, tar.gz, or "tar-parts" (byte-split pieces of one tar). A member's bytes
    are read only when asked for; uncompressed tars seek over the rest."""
    import tarfile
    import zipfile

    if kind == "zip":
        for path in paths:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if not info.is_dir():
                        yield Member(info.filename, info.file_size, lambda z=z, i=info: z.read(i))
        return
    stream = _Joined(paths)
    mode = "r:gz" if kind == "tar.gz" else "r:"
    with stream, tarfile.open(fileobj=io.BufferedReader(stream, 1 << 20), mode=mode) as tar:  # type: ignore[arg-type]
        for m in tar:
            if m.isfile():
                yield Member(m.name, m.size, lambda t=tar, m=m: t.extractfile(m).read())


def archive_shard(job: dict[str, Any], opts: Options) -> Counter:
    """One shard of an archive import: job["data"][i] is the member's bytes (None: no image for that row;
    an int: the size of a member too large to read). Same checks, resizing, statuses and writing as a
    downloaded shard."""
    tar_path, part_path = Path(job["tar"]), Path(job["part"])
    rows = [_row(job, i, tar_path.name) for i in range(len(job["keys"]))]
    images: dict[str, tuple[bytes, bytes]] = {}
    for row, data in zip(rows, job["data"], strict=True):
        row.update(_fetch_row(_from_bytes(data, opts), images, row))
    _write_shard(tar_path, part_path, rows, images)
    return Counter(r["status"] for r in rows)


def _from_bytes(data: bytes | int | None, opts: Options) -> Any:
    if data is None:
        return ItemFailure("missing", "no image for this id in the archive")
    if isinstance(data, int) or len(data) > opts.max_bytes:
        return ItemFailure("too_large", f"member larger than {opts.max_bytes} bytes")
    try:
        return process_image(data, opts), len(data)
    except ItemFailure as e:
        return e
    except Exception as e:  # an item must never crash the run: record what happened
        return ItemFailure("error", f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------- worker


def worker_main(opts: Options, jobs: Any, events: Any, parent_pid: int) -> None:
    """Entry point of a worker process: run shard jobs from `jobs` until a None arrives.

    Events sent: ("items", Counter of statuses) every ~0.2 s, ("shard", shard_index, Counter) per
    finished shard, ("error", shard_index, (error name, message)) if writing a shard failed: the
    errors.worker_error of a user or operating-system error (disk full), else ("", the traceback of a bug).
    """
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    Image.MAX_IMAGE_PIXELS = opts.max_pixels  # Pillow's own guard at the configured size
    if "PILLOW_BLOCKS_MAX" not in os.environ:  # the user's own setting wins
        # By default Pillow hands every image buffer back to the OS, so the next image maps and
        # page-faults it in again: ~450 faults, ~1 ms of system time per image. Reusing a few freed
        # blocks removes that; pixels are the same.
        Image.core.set_blocks_max(PILLOW_BLOCKS_CACHED)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_worker(opts, jobs, events, parent_pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _watch_parent(pid: int) -> None:
    """A worker whose main process was killed exits at once: it must not race a resumed run."""
    while True:
        await asyncio.sleep(0.5)
        if not _alive(pid):
            os._exit(0)


async def _worker(opts: Options, jobs: Any, events: Any, parent_pid: int) -> None:
    loop = asyncio.get_running_loop()
    fetcher = Fetcher(opts)
    pending: Counter = Counter()
    unfinished = [0]  # items of this worker's active shards not yet reported
    getter = ThreadPoolExecutor(1, thread_name_prefix="jobs")

    def report(status: str) -> None:
        pending[status] += 1
        unfinished[0] -= 1

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(0.2)
            if pending:
                events.put(("items", Counter(pending)))
                pending.clear()

    async def shard_task(job: dict[str, Any]) -> None:
        try:
            counts = await run_shard(fetcher, job, report)
            if pending:
                events.put(("items", Counter(pending)))
                pending.clear()
            events.put(("shard", job["shard"], counts))
        except (GeolocError, OSError) as e:  # disk full, read-only...: the one line the user needs
            events.put(("error", job["shard"], worker_error(e)))
        except Exception:
            events.put(("error", job["shard"], ("", traceback.format_exc())))

    flusher = asyncio.create_task(flush_forever())
    watchdog = asyncio.create_task(_watch_parent(parent_pid))
    tasks: set[asyncio.Task] = set()
    try:
        while True:
            # Take another shard only when this worker would otherwise run out of requests to make, so
            # one worker never hoards the shards another one is idle for, and a shard's tail overlaps
            # the next one's start.
            while len(tasks) >= SHARDS_PER_WORKER or unfinished[0] > opts.concurrency:
                await asyncio.sleep(0.05)
            job = await loop.run_in_executor(getter, jobs.get)
            if job is None:
                break
            unfinished[0] += len(job["keys"])
            t = asyncio.create_task(shard_task(job))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        flusher.cancel()
        watchdog.cancel()
        await fetcher.close()
        getter.shutdown(wait=False)


def drain(q: Any, timeout: float) -> list[Any]:
    """Everything on a multiprocessing queue now, waiting up to `timeout` for the first event."""
    out = []
    with contextlib.suppress(queue.Empty):
        out.append(q.get(timeout=timeout))
        while True:
            out.append(q.get_nowait())
    return out
