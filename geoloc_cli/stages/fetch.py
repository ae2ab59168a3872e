"""`geoloc fetch`: presets, URL lists and photo folders -> tar shards + manifest.parquet + stats.json.

Item i of a list has key `{i:09d}` and goes to shard i // shard_size. A shard is done when its tar is
intact (store.check_shard) and its manifest part (written after the tar) exists, so a re-run skips it:
that is how a killed run resumes; a damaged tar is fetched again. The list is streamed in shard-sized
chunks and the metadata is held as numeric arrays, so memory stays flat in the length of the list.
The work is done along the seams of the geoloc_cli.fetch package (reader, remote, downloader, writer,
supervisor); this module drives them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from geoloc_cli import console
from geoloc_cli.data import places365, sources
from geoloc_cli.data.photo import exif_gps, photos_in
from geoloc_cli.data.store import (
    OK,
    DataRoot,
    atomic_path,
    lock_held,
    locked,
    migrate_shard_folder,
    remove_temps,
    write_json_atomic,
    write_parquet_atomic,
    write_text_atomic,
)
from geoloc_cli.errors import ConfigError, GeolocError, InputError, LockedError
from geoloc_cli.fetch.reader import MetaIndex, archive_members, count_rows, flickr_sized, read_list_chunks
from geoloc_cli.fetch.remote import Gated, Unavailable, ensure_file, obtain_part
from geoloc_cli.fetch.supervisor import run_archive_jobs, run_jobs
from geoloc_cli.fetch.writer import ShardJob, check_layout, finish, plan_shards, remove_stale_temps, shard_paths


def run(cfg: Any, source: str | None = None, urls: Path | None = None, meta: Path | None = None,
        name: str | None = None, retry_failed: bool = False, retry_gone: bool = False,
        part: str | None = None, archive: Path | None = None, split: str | None = None,
        via: str | None = None) -> dict[str, dict[str, Any]]:
    """Resolve what to fetch (preset, list, archive or folder), fetch each dataset, return {name: stats}."""
    root = DataRoot(Path(cfg.paths.root))
    kw = {"retry_failed": retry_failed, "retry_gone": retry_gone, "part": parse_part(part)}
    presets = ", ".join(["demo", *sources.PRESETS])
    if via not in (None, "archive", "urls"):
        raise ConfigError(f"--via: expected archive or urls, got {via!r}")
    if source in sources.PRESETS:
        if urls is not None or meta is not None:
            raise ConfigError(f"{source} is a preset: its list and metadata come from the registry; for your own "
                              "give --urls/--meta with --name and no preset")
        return fetch_preset(cfg, root, source, name, split, archive, via, **kw)
    if via is not None:
        raise ConfigError("--via chooses between a preset's archive and its URL list: give a preset")
    if split is not None:
        raise ConfigError(f"--split is for presets with splits ({source or 'no preset'} given)")
    if urls is not None or archive is not None:
        if source is not None:
            raise ConfigError(f"give either a source ({source!r}) or --urls/--archive, not both")
        if archive is not None:
            if meta is None:
                raise ConfigError("--archive without a preset needs --meta *_places365.csv (positions and ids)")
            n = name or Path(archive).name.split(".", 1)[0]
            return {n: import_archive(cfg, root, n, *local_archive(None, Path(archive)), Path(meta), **kw)}
        return {n: fetch_list(cfg, root, n, Path(urls), meta, **kw)
                for n in [name or Path(urls).stem.removesuffix("_urls")]}
    if source is None:
        raise ConfigError(f"nothing to fetch: give a preset ({presets}), a folder of photos, "
                          "--urls LIST.csv --name NAME, or --archive FILE --meta META.csv")
    if source == "demo":
        from geoloc_cli.data import demo

        return {n: fetch_list(cfg, root, n, u, m, **kw) for n, (u, m) in demo.generate(root, cfg).items()}
    folder = Path(source)
    if folder.is_dir():
        n = name or folder.resolve().name
        return {n: import_folder(cfg, root, n, folder, meta, **kw)}
    raise ConfigError(f"{source}: not a preset ({presets}) and not a folder")


def parse_part(text: str | None) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N; None -> (0, 1)."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ConfigError(f"--part: expected i/N with 0 <= i < N (e.g. 0/4), got {text!r}")
    return int(m[1]), int(m[2])


def fetch_preset(cfg: Any, root: DataRoot, preset: str, name: str | None, split: str | None,
                 archive: Path | None, via: str | None, **kw: Any) -> dict[str, dict[str, Any]]:
    """A registry preset: its metadata, then its images from the first source that delivers (archives
    first, then a URL list), or from a local --archive."""
    try:
        p = sources.with_split(sources.PRESETS[preset], split)
    except ValueError as e:
        raise ConfigError(f"--split: {e}") from None
    name = name or sources.dataset_name(p, split)
    mirrors = list(cfg.fetch.mirrors)
    try:
        meta_csv = ensure_file(root, p.meta, mirrors)
    except Unavailable as e:
        raise InputError(str(e)) from None
    if archive is not None:
        return {name: import_archive(cfg, root, name, *local_archive(p, Path(archive)), meta_csv, **kw)}
    tried: list[Unavailable] = []
    for a in p.archives if via != "urls" else ():
        try:
            paths = [obtain_part(root, part, mirrors) for part in a.parts]
        except Unavailable as e:
            tried.append(e)
            continue
        return {name: import_archive(cfg, root, name, a.kind, a.rule, paths, a.label, meta_csv, **kw)}
    if p.urls is not None and via != "archive":
        try:
            return {name: fetch_list(cfg, root, name, ensure_file(root, p.urls, mirrors), meta_csv, **kw)}
        except Unavailable as e:
            tried.append(e)
    gated = [e for e in tried if isinstance(e, Gated)]
    raise InputError(str(gated[0]) if gated else
                     f"{preset}: no image source delivered ({'; '.join(map(str, tried)) or f'none for --via {via}'}); "
                     f"import images you have with `geoloc fetch {preset} --archive FILE`")


ARCHIVE_SUFFIXES = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar.gz", ".tgz": "tar.gz"}


def local_archive(p: sources.Preset | None, path: Path) -> tuple[str, str, list[Path], str]:
    """(kind, id rule, files, label) of a user's --archive: one file, one part of a multi-part archive
    (its siblings are read too), or a folder holding every part of one of the preset's archives."""
    if not path.exists():
        raise InputError(f"--archive {path}: no such file or folder")
    known = p.archives if p is not None else ()
    for a in known:
        paths = [(path if path.is_dir() else path.parent) / n for n in a.file_names]
        if path.is_dir() or (len(paths) > 1 and path.name in a.file_names):
            missing = [q.name for q in paths if not q.is_file()]
            if not missing:
                return a.kind, a.rule, paths, a.label
            if not path.is_dir():
                raise InputError(f"--archive {path}: {a.label} is read as one; missing beside it: {', '.join(missing)}")
    if path.is_dir():
        raise InputError(f"--archive {path}: a folder must hold every file of one archive of the preset"
                         + "".join(f"; {a.label}" for a in known))
    kind = next((k for suffix, k in ARCHIVE_SUFFIXES.items() if path.name.lower().endswith(suffix)), None)
    if kind is None:
        raise InputError(f"--archive {path}: not a {', '.join(ARCHIVE_SUFFIXES)} file")
    same = [a for a in known if path.name in a.file_names] or [a for a in known if a.kind == kind]
    return kind, same[0].rule if same else "name", [path], path.name


def import_archive(cfg: Any, root: DataRoot, name: str, kind: str, rule: str, paths: list[Path], label: str,
                   meta_csv: Path, retry_failed: bool = False, retry_gone: bool = False,
                   part: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Stream an image archive into shards, through the same checks and statuses as downloads.

    Keys follow the archive's own order (matched members first, then the metadata rows without an image,
    status `missing`), so each shard's images are consecutive in the archive: a shard is written as soon
    as its last member is read, and memory holds one shard. The plan (the member of each key) is made
    once and kept in archive_plan.parquet, so a resumed run cuts the same shards.
    """
    if part != (0, 1):
        raise ConfigError("--part splits URL lists; an archive is read as one stream")
    with fetch_lock(root, name, part):
        return _import_archive(cfg, root, name, kind, rule, paths, label, meta_csv, retry_failed, retry_gone)


def _import_archive(cfg: Any, root: DataRoot, name: str, kind: str, rule: str, paths: list[Path], label: str,
                    meta_csv: Path, retry_failed: bool, retry_gone: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    size = cfg.fetch.shard_size
    plan, info = archive_plan(root, name, kind, rule, paths, label, meta_csv)
    n_items = len(plan)
    if n_items == 0:
        raise InputError(f"{meta_csv}: no metadata rows to import")
    check_layout(root, name, Path(label), n_items, size, "archive")
    fetch, retry = plan_shards(root, name, n_items, size, (0, 1), retry_failed, retry_gone)
    wanted = set(fetch) | set(retry)  # a retried shard is read again from the archive
    remove_stale_temps(root, name, dict.fromkeys(wanted, False))
    counts: Counter = Counter()
    if wanted:
        total = sum(min(size, n_items - s * size) for s in wanted)
        console.info(f"{name}: {n_items:,} items in {math.ceil(n_items / size):,} shards from {label}; "
                     f"importing {len(wanted)} shard(s) ({total:,} items)")
        jobs = archive_jobs(root, name, kind, paths, plan, MetaIndex(meta_csv), wanted, size, label,
                            cfg.fetch.max_bytes)
        counts = run_archive_jobs(cfg.fetch, jobs, total, f"import {name}")
    else:
        console.info(f"{name}: every shard is done")
    stats = finish(root, name, n_items, size, counts, time.monotonic() - t0, {"archive": info})
    summary_table(name, stats)
    fail_if_nothing_stored(root, name, counts, stats)
    return stats


def archive_plan(root: DataRoot, name: str, kind: str, rule: str, paths: list[Path], label: str,
                 meta_csv: Path) -> tuple[Any, dict[str, Any]]:
    """(plan: id and member per key, counts) of an archive import, made on the first run and kept.

    Members are matched to metadata ids by the preset's id rule (sources.member_keys/meta_key); a row
    without a member and a member without a row are both counted, and the members listed in
    unmatched.txt: neither disappears silently."""
    import pandas as pd

    plan_path, info_path = root.dataset(name) / "archive_plan.parquet", root.dataset(name) / "archive.json"
    if plan_path.is_file() and info_path.is_file():
        return pd.read_parquet(plan_path), json.loads(info_path.read_text())
    console.info(f"{name}: reading the member names of {label}")
    ids = list(dict.fromkeys(i for chunk in places365.read_chunks(meta_csv) for i in chunk["IMG_ID"]))
    by_key: dict[str, str] = {}
    for i in ids:
        by_key.setdefault(sources.meta_key(rule, i), i)
    members, matched, unmatched = [], {}, []
    try:
        for m in archive_members(kind, paths):
            hit = next((by_key[k] for k in sources.member_keys(rule, m.name) if k in by_key), None)
            if hit is None or hit in matched:
                unmatched.append(m.name)
            else:
                matched[hit] = m.name
                members.append(m.name)
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise InputError(f"{label}: cannot read the archive: {e}") from None
    missing = [i for i in ids if i not in matched]
    plan = pd.DataFrame({"id": [*matched, *missing], "member": [*members, *[""] * len(missing)]})
    listing = root.dataset(name) / "unmatched.txt"
    write_text_atomic(listing, "".join(f"{m}\n" for m in unmatched))
    info = {"source": label, "rule": rule, "members": len(members) + len(unmatched), "matched": len(members),
            "missing": len(missing), "unmatched": len(unmatched), "unmatched_list": str(listing)}
    if missing or unmatched:
        console.warn(f"{name}: {len(missing):,} metadata rows have no image in {label} (status missing); "
                     f"{len(unmatched):,} archive files match no row (listed in {listing})")
    write_parquet_atomic(plan, plan_path)
    write_json_atomic(info_path, info)
    return plan, info


def archive_jobs(root: DataRoot, name: str, kind: str, paths: list[Path], plan: Any, meta: MetaIndex,
                 wanted: set[int], size: int, label: str, max_bytes: int) -> Iterator[dict[str, Any]]:
    """Read the archive once, in order, and yield one job per wanted shard with its members' bytes.
    Members of other shards are not read (a plain tar seeks over them), nor are members over max_bytes
    (their size stands in for them: status too_large, as for a download)."""
    ids, members = plan["id"].tolist(), plan["member"].tolist()
    n_matched = sum(1 for m in members if m)
    last = max((s for s in wanted if s * size < n_matched), default=-1)
    buf: list[bytes] = []
    pos = 0  # the next key whose member is due
    if last >= 0:
        for m in archive_members(kind, paths):
            if m.name != members[pos]:
                continue  # unmatched or a duplicate
            s = pos // size
            if s in wanted:
                buf.append(m.size if m.size > max_bytes else m.read())
            pos += 1
            if pos == min((s + 1) * size, n_matched):
                if s in wanted:
                    yield _archive_job(root, name, s, size, ids, members, buf, meta, label)
                buf = []
                if s >= last:
                    break
        if pos // size <= last and pos < n_matched:
            raise InputError(f"{label} ended before {members[pos]}: it is not the archive this dataset was planned "
                             f"from; delete {root.dataset(name)} to start over")
    for s in sorted(w for w in wanted if w > last):  # shards of rows without an image only
        yield _archive_job(root, name, s, size, ids, members, [], meta, label)


def _archive_job(root: DataRoot, name: str, s: int, size: int, ids: list[str], members: list[str],
                 data: list[bytes], meta: MetaIndex, label: str) -> ShardJob:
    lo, hi = s * size, min((s + 1) * size, len(ids))
    job = _shard_job(root, name, s, size, ids[lo:hi], [f"{label}:{m}" if m else "" for m in members[lo:hi]], meta)
    job.data = data + [None] * (hi - lo - len(data))
    return job


def iter_jobs(cfg: Any, root: DataRoot, name: str, urls_csv: Path, meta: MetaIndex | None,
              wanted: dict[int, bool], retry_gone: bool, require_gps: bool) -> Iterator[ShardJob]:
    """Stream the list and yield one job per wanted shard ({shard: is_retry})."""
    size = cfg.fetch.shard_size
    last = max(wanted, default=-1)
    for s, chunk in enumerate(read_list_chunks(urls_csv, size)):
        if s > last:
            return
        if s not in wanted:
            continue
        urls = [flickr_sized(u, cfg.fetch.size_suffix) for u in chunk.column("url").to_pylist()]
        job = _shard_job(root, name, s, size, chunk.column("id").to_pylist(), urls, meta)
        yield dataclasses.replace(job, retry=wanted[s], retry_gone=retry_gone, require_gps=require_gps)


def _shard_job(root: DataRoot, name: str, s: int, size: int, ids: list[str], urls: list[str],
               meta: MetaIndex | None) -> ShardJob:
    """What a worker needs to write shard s: keys, ids, urls, and positions and labels from the metadata."""
    tar, part = shard_paths(root, name, s)
    info = meta.lookup(np.asarray(ids, dtype=object)) if meta is not None else {}
    nan = [math.nan] * len(ids)
    return ShardJob(
        shard=s, tar=tar, part=part, keys=[f"{s * size + j:09d}" for j in range(len(ids))], ids=ids, urls=urls,
        lat=[math.nan if v is None else v for v in info.get("LAT", nan)],
        lon=[math.nan if v is None else v for v in info.get("LON", nan)],
        meta={c: info[c] for c in places365.META_COLUMNS if c in info})


def fetch_list(cfg: Any, root: DataRoot, name: str, urls_csv: Path, meta_csv: Path | None = None,
               retry_failed: bool = False, retry_gone: bool = False, part: tuple[int, int] = (0, 1),
               require_gps: bool = False) -> dict[str, Any]:
    """Fetch an `image_id,url` list into <root>/datasets/<name>/; return the stats (also in stats.json)."""
    with fetch_lock(root, name, part):
        return _fetch_list(cfg, root, name, urls_csv, meta_csv, retry_failed, retry_gone, part, require_gps)


@contextlib.contextmanager
def fetch_lock(root: DataRoot, name: str, part: tuple[int, int]) -> Iterator[None]:
    """One writer per dataset; --part i/N runs are meant to fill one dataset from several machines at
    once, so each takes the dataset's lock shared (a whole-list run is kept out) and its part's lock."""
    folder = root.dataset(name)
    if part != (0, 1):
        i, n = part
        with locked(folder, "fetch", shared=True), locked(folder, f"fetch-parts-of-{n}", shared=True), \
                locked(folder, f"fetch-part-{i}-of-{n}"):
            _one_split(folder, n)
            migrate_shard_folder(root.shards(name))  # (idempotent: parts starting together may both move files)
            yield
        return
    with locked(folder, "fetch"):
        migrate_shard_folder(root.shards(name))
        # the only writer: a killed run's leftovers go (parts running together write these files too)
        remove_temps(folder, "manifest.parquet", "stats.json", "fetch.json")
        yield


def _one_split(folder: Path, n: int) -> None:
    """Refuse to run beside --part runs that split the list into another number of parts: 0/2 and 0/4 would
    both write shard 0 (and 4, 8, ...), and one run's part file could end up describing the other's tar.
    (Checked after taking this split's lock, so two runs starting together with different N both stop.)"""
    for lock in folder.glob(".fetch-parts-of-*.lock"):
        m = lock.name.removeprefix(".fetch-parts-of-").removesuffix(".lock")
        if m.isdigit() and int(m) != n and lock_held(folder, f"fetch-parts-of-{m}"):
            raise LockedError(f"{folder} is being fetched in {m} parts right now (--part i/{m}); run the other "
                              f"slices as i/{m} too, or wait for those runs to end")


def _fetch_list(cfg: Any, root: DataRoot, name: str, urls_csv: Path, meta_csv: Path | None, retry_failed: bool,
                retry_gone: bool, part: tuple[int, int], require_gps: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    size = cfg.fetch.shard_size
    n_items = count_rows(urls_csv)
    if n_items == 0:
        raise InputError(f"{urls_csv}: the URL list is empty (expected image_id,url rows)")
    meta = MetaIndex(meta_csv) if meta_csv is not None else None
    check_layout(root, name, urls_csv, n_items, size)
    fetch, retry = plan_shards(root, name, n_items, size, part, retry_failed, retry_gone)
    wanted = {s: False for s in fetch} | {s: True for s in retry}
    remove_stale_temps(root, name, wanted)
    total = sum(min(size, n_items - s * size) for s in wanted)
    if wanted:
        what = f"{len(fetch)} new" + (f" and {len(retry)} retried" if retry_failed else "")
        console.info(f"{name}: {n_items:,} items in {math.ceil(n_items / size):,} shards; fetching {what} "
                     f"shard(s) ({total:,} items) with {min(cfg.fetch.processes, len(wanted))} process(es)")
        jobs = iter_jobs(cfg, root, name, urls_csv, meta, wanted, retry_gone, require_gps)
        try:
            counts = run_jobs(cfg.fetch, jobs, len(wanted), total,
                              f"fetch {name}")
        except BaseException:  # workers stopped in the middle of a shard leave its temporaries
            remove_stale_temps(root, name, wanted)
            raise
    else:
        counts = Counter()
        console.info(f"{name}: every shard of this part is done (use --retry-failed to retry failures)")
    stats = finish(root, name, n_items, size, counts, time.monotonic() - t0)
    summary_table(name, stats)
    fail_if_nothing_stored(root, name, counts, stats)
    return stats


def fail_if_nothing_stored(root: DataRoot, name: str, counts: Counter, stats: dict[str, Any]) -> None:
    """The exit-code policy for fetch: failed items are rows (exit 0), but a run in which every item
    failed, or a dataset without a single image, is a failure (exit 1)."""
    if (counts and not counts[OK]) or (stats["rows"] and not stats["ok"]):
        worst = ", ".join(f"{st} {n:,}" for st, n in list(stats["status"].items())[:3])
        raise GeolocError(f"{name}: every item failed ({worst}); see {root.manifest(name)}")


def summary_table(name: str, stats: dict[str, Any]) -> None:
    rows_total = max(stats["rows"], 1)
    rows = [(st, n, f"{100 * n / rows_total:.1f}%") for st, n in stats["status"].items()]
    run = stats["this_run"]
    console.table(f"fetch {name}", ["status", "items", "share"], rows,
                  caption=f"{stats['rows']:,} of {stats['items']:,} items in {stats['shards_done']} shards; "
                          f"this run {run['items']:,} items in {run['seconds']:.1f} s "
                          f"({run['images_per_s']:.1f} img/s)")


def exif_latlon(path: Path) -> tuple[float, float] | None:
    """(lat, lon) from a photo's EXIF GPS block, or None when it has none (or cannot be read)."""

    try:
        with Image.open(path) as im:
            return exif_gps(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def import_folder(cfg: Any, root: DataRoot, name: str, folder: Path, meta: Path | None = None,
                  **kw: Any) -> dict[str, Any]:
    """Import local photos. Positions (and scene labels) come from `meta` (a *_places365.csv whose
    IMG_ID is a photo's path below the folder or its file name, as in the published test-set archives),
    else from EXIF GPS; photos with neither are listed with status no_gps."""
    import pandas as pd

    files = photos_in(folder)
    ids = [p.relative_to(folder).as_posix() for p in files]
    record = root.dataset(name) / "folder_meta.json"
    given = meta
    meta = meta if meta is not None else _recorded_meta(record, name)
    known = _folder_meta(meta, ids) if meta is not None else pd.DataFrame({"IMG_ID": []})
    if given is not None:  # remembered only once it has been read without error
        write_json_atomic(record, {"meta": str(Path(given).resolve())})
    from_meta = set(known["IMG_ID"])
    exif = [(i, exif_latlon(p)) for i, p in zip(ids, files, strict=True) if i not in from_meta]
    located = pd.DataFrame([{"IMG_ID": i, "LAT": pos[0], "LON": pos[1]} for i, pos in exif if pos],
                           columns=["IMG_ID", "LAT", "LON"])
    # Only photos with a position go into the metadata file: partition reads it as a list of points.
    rows = pd.concat([known, located], ignore_index=True)
    console.info(f"{name}: {len(files):,} photos; positions "
                 + (f"from {Path(meta).name}: {len(known):,}, " if meta is not None else "")
                 + f"from EXIF GPS: {len(located):,}, none (listed as no_gps): {len(files) - len(rows):,}")
    urls_csv, meta_csv = root.urls_csv(name), root.meta_csv(name)
    uris = [p.resolve().as_uri() for p in files]
    write_text_atomic(urls_csv, pd.DataFrame({"id": ids, "url": uris}).to_csv(index=False, header=False))
    with atomic_path(meta_csv) as tmp:
        rows.to_csv(tmp, index=False)
    return fetch_list(cfg, root, name, urls_csv, meta_csv, require_gps=True, **kw)


def _recorded_meta(record: Path, name: str) -> Path | None:
    """The --meta an earlier import of this folder used: a later run without the option (a resume,
    --retry-failed) uses it too, so positions and labels are never lost on the way."""
    if not record.is_file():
        return None
    meta = Path(json.loads(record.read_text())["meta"])
    if not meta.is_file():
        raise InputError(f"{name} was imported with --meta {meta}, which is gone: give --meta again")
    console.info(f"{name}: positions and labels from {meta} (the --meta of the first run)")
    return meta


def _folder_meta(meta: Path, ids: list[str]) -> Any:
    """The rows of `meta` that belong to photos `ids`, their IMG_ID rewritten to the photo's id: matched
    by the whole relative path, else by file name. Rows without LAT/LON are dropped."""
    import pandas as pd

    df = pd.concat(list(places365.read_chunks(meta)), ignore_index=True)
    paths = set(ids)
    names = Counter(i.rsplit("/", 1)[-1] for i in ids)
    by_name = {i.rsplit("/", 1)[-1]: i for i in ids}
    ambiguous = sorted(m for m in set(df["IMG_ID"]) - paths if names[m] > 1)
    if ambiguous:
        console.warn(f"{meta}: {len(ambiguous):,} ids name several photos in the folder (e.g. {ambiguous[0]}) "
                     "and are not used; use ids with the sub-folder")
    df["IMG_ID"] = [m if m in paths else by_name[m] if names[m] == 1 else None for m in df["IMG_ID"]]
    # a photo matched twice (by path and by name) keeps its first row
    df = df.dropna(subset=["IMG_ID", "LAT", "LON"]).drop_duplicates("IMG_ID").reset_index(drop=True)
    if df.empty:
        console.warn(f"{meta}: no IMG_ID matches a photo's path or file name in the folder")
    return df

