"""The writer side of fetch: shard planning (which shards are done: store.shard_done), one shard's
tar and manifest part from a job (fetched or read from an archive), and the merged manifest.parquet
with stats.json."""

from __future__ import annotations

import asyncio
import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from geoloc_cli import console
from geoloc_cli.config import FetchConfig
from geoloc_cli.data.places365 import META_COLUMNS, META_TYPES
from geoloc_cli.data.store import (
    OK,
    DataRoot,
    ShardWriter,
    atomic_path,
    drop_damaged,
    iter_shard,
    read_table,
    remove_shard_temps,
    shard_done,
    shard_name,
    shard_part,
    write_json_atomic,
)
from geoloc_cli.errors import InputError
from geoloc_cli.fetch.downloader import GONE, Fetcher, ItemFailure, attempt, from_bytes, nan_to_none


def shard_paths(root: DataRoot, name: str, s: int) -> tuple[Path, Path]:
    tar = root.shards(name) / shard_name(s)
    return tar, shard_part(tar)


def plan_shards(root: DataRoot, name: str, n_items: int, shard_size: int, part: tuple[int, int],
                retry_failed: bool, retry_gone: bool) -> tuple[list[int], list[int]]:
    """(shards to fetch, shards to retry) of this part: not-done shards, plus done shards with
    retryable failures when retry_failed."""
    i, n = part
    fetch, retry = [], []
    for s in range(i, math.ceil(n_items / shard_size), n):
        tar, pq_part = shard_paths(root, name, s)
        damage = drop_damaged(tar)
        if damage:
            console.warn(f"{tar} is damaged ({damage}): fetching it again")
        if not shard_done(tar):
            fetch.append(s)
        elif retry_failed and _has_retryable(pq_part, retry_gone):
            retry.append(s)
    return fetch, retry


def _has_retryable(part: Path, retry_gone: bool) -> bool:
    status = read_table(part, columns=["status"]).column("status").to_pylist()
    return any(st != OK and (retry_gone or st not in GONE) for st in status)


def check_layout(root: DataRoot, name: str, source: Path, n_items: int, shard_size: int, kind: str = "list") -> None:
    """Refuse to mix shards cut differently: keys and shard numbers depend on the list (or the archive's
    order: `kind`) and the shard size."""
    spec_path = root.dataset(name) / "fetch.json"
    spec = {"items": n_items, "shard_size": shard_size}
    if spec_path.is_file():
        old = json.loads(spec_path.read_text())
        if {k: old.get(k) for k in spec} != spec:
            raise InputError(
                f"{spec_path}: this dataset was fetched with {old.get('items')} items and shard_size "
                f"{old.get('shard_size')}, now {n_items} and {shard_size}; use the same list and "
                f"fetch.shard_size, or another --name")
        if old.get("kind", "list") != kind:  # an archive orders its keys otherwise than a URL list
            raise InputError(f"{spec_path}: this dataset was fetched from {old.get('kind', 'list')} "
                             f"{old.get('urls')}, now from {kind} {source}: use the same source, or another --name")
        return
    write_json_atomic(spec_path, {**spec, "urls": str(source), "kind": kind})


def remove_stale_temps(root: DataRoot, name: str, shards: dict[int, bool]) -> None:
    """Delete the temp files a killed run left for the shards this run is about to write."""
    remove_shard_temps([root.shards(name) / shard_name(s) for s in shards])


def finish(root: DataRoot, name: str, n_items: int, shard_size: int, counts: Counter,
           seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Combine all manifest parts present into manifest.parquet (streamed) and write stats.json."""
    by_status: Counter = Counter()
    n_shards = math.ceil(n_items / shard_size)
    present, nbytes, rows = 0, 0, 0
    with atomic_path(root.manifest(name)) as tmp, pq.ParquetWriter(tmp, MANIFEST_SCHEMA) as writer:
        for s in range(n_shards):
            tar, part = shard_paths(root, name, s)
            if not shard_done(tar):
                continue
            table = read_table(part)
            if table.schema != MANIFEST_SCHEMA:  # (only then: cast imports pyarrow.compute)
                table = _conform(table)
            writer.write_table(table)
            by_status.update(table.column("status").to_pylist())
            nbytes += sum(v or 0 for v in table.column("bytes").to_pylist())
            present += 1
            rows += table.num_rows
    fetched = sum(counts.values())
    stats = {
        "dataset": name, "items": n_items, "shards": n_shards, "shards_done": present, "rows": rows,
        "status": dict(sorted(by_status.items(), key=lambda kv: -kv[1])), "ok": by_status[OK],
        "bytes": int(nbytes), "this_run": {"items": fetched, "ok": counts[OK], "seconds": round(seconds, 2),
                                           "images_per_s": round(fetched / seconds, 1) if seconds else 0.0},
        **(extra or {}),
    }
    write_json_atomic(root.dataset(name) / "stats.json", stats)
    if present < n_shards:
        console.info(f"{name}: {present} of {n_shards} shards present; manifest.parquet covers those "
                     "(fetch the other --part slices into the same root to complete it)")
    return stats


def _conform(table: pa.Table) -> pa.Table:
    """A manifest part written by an older geoloc: columns it lacks as nulls, then the current types."""
    for field in MANIFEST_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(len(table), field.type))
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("id", pa.string()), ("url", pa.string()),
    ("lat", pa.float64()), ("lon", pa.float64()),
    ("status", pa.string()), ("error", pa.string()), ("bytes", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("orig_width", pa.int32()), ("orig_height", pa.int32()),
    ("shard", pa.string()),
    # the metadata's other columns (manifests written before the administrative areas existed read them
    # as nulls: fetch._conform)
    *((c, pa.type_for_alias(t)) for c, t in META_TYPES.items()),
])


@dataclass
class ShardJob:
    """What a worker needs to write one shard (it crosses to the worker process by pickle)."""

    shard: int  # its number: the tar is images-<shard>.tar
    tar: Path
    part: Path  # its manifest part (store.shard_part)
    keys: list[str]  # per item: its key in the tar (the item's position in the list, 9 digits)
    ids: list[str]
    urls: list[str]  # http(s):// or file:// (an archive import: "<archive>:<member>")
    lat: list[float]  # NaN where the metadata has no position
    lon: list[float]
    meta: dict[str, list[Any]]  # the other metadata columns (places365.META_COLUMNS) it has
    retry: bool = False  # a done shard again: keep its successes (and its gone items unless retry_gone)
    retry_gone: bool = False
    require_gps: bool = False  # an item without a position is a no_gps row, not fetched
    data: list[bytes | int | None] | None = None  # archive import: each member's bytes (int: its size, too large)


def _row(job: ShardJob, i: int, shard: str) -> dict[str, Any]:
    row = {"key": job.keys[i], "id": job.ids[i], "url": job.urls[i],
           "lat": job.lat[i], "lon": job.lon[i], "status": "", "error": "", "bytes": 0,
           "width": 0, "height": 0, "orig_width": 0, "orig_height": 0, "shard": shard}
    for col in META_COLUMNS:
        row[col] = job.meta[col][i] if col in job.meta else None
    return row


def manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Manifest rows as an Arrow table, built by Arrow's JSON reader: pa.array() on Python objects
    imports pandas (pyarrow 26), ~0.4 s of CPU per worker process, taken while the GIL stalls its
    downloads. Text that is not valid Unicode (an undecodable file name in an error) becomes '?'."""
    lines = "".join(json.dumps({k: nan_to_none(v) for k, v in r.items()}, ensure_ascii=False) + "\n" for r in rows)
    opts = pa_json.ParseOptions(explicit_schema=MANIFEST_SCHEMA, unexpected_field_behavior="error")
    return pa_json.read_json(io.BytesIO(lines.encode("utf-8", "replace")), parse_options=opts)


async def run_shard(fetcher: Fetcher, job: ShardJob, report: Any) -> Counter:
    """Fetch one shard job and write its tar, then its manifest part (both atomically, in that order).

    With job.retry, successes already in the tar are kept, gone items (404/410) keep their old row
    unless job.retry_gone, and every other failure is fetched again.
    """
    tar_path, part_path = job.tar, job.part
    shard = tar_path.name
    rows = [_row(job, i, shard) for i in range(len(job.keys))]
    kept: dict[str, dict[str, bytes]] = {}
    old: dict[str, dict[str, Any]] = {}
    if job.retry:
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
        if prev is not None and prev["status"] in GONE and not job.retry_gone:
            row.update(status=prev["status"], error=prev["error"], bytes=prev["bytes"])
            report(row["status"])
            return
        row.update(_fetch_row(await attempt(fetcher, row, job.require_gps), images, row))
        report(row["status"])

    await asyncio.gather(*(one(r) for r in rows))
    await asyncio.get_running_loop().run_in_executor(None, _write_shard, tar_path, part_path, rows, images)
    return Counter(r["status"] for r in rows)


def _fetch_row(result: Any, images: dict[str, tuple[bytes, bytes]], row: dict[str, Any]) -> dict[str, Any]:
    if isinstance(result, ItemFailure):
        return {"status": result.status, "error": result.error[:500]}
    image, nbytes = result
    sizes = {"width": image.width, "height": image.height, "orig_width": image.orig_width,
             "orig_height": image.orig_height}
    info = {"key": row["key"], "id": row["id"], "lat": nan_to_none(row["lat"]),
            "lon": nan_to_none(row["lon"]), **sizes, "url": row["url"]}
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


def archive_shard(job: ShardJob, cfg: FetchConfig) -> Counter:
    """One shard of an archive import: job.data[i] is the member's bytes (None: no image for that row;
    an int: the size of a member too large to read). Same checks, resizing, statuses and writing as a
    downloaded shard."""
    tar_path, part_path = job.tar, job.part
    rows = [_row(job, i, tar_path.name) for i in range(len(job.keys))]
    images: dict[str, tuple[bytes, bytes]] = {}
    for row, data in zip(rows, job.data, strict=True):
        row.update(_fetch_row(from_bytes(data, cfg), images, row))
    _write_shard(tar_path, part_path, rows, images)
    return Counter(r["status"] for r in rows)

