"""`geoloc fetch`: presets, URL lists and photo folders -> tar shards + manifest.parquet + stats.json.

Item i of a list has key `{i:09d}` and goes to shard i // shard_size. A shard is done when its tar is
intact (store.check_shard) and its manifest part (written after the tar) exists, so a re-run skips it:
that is how a killed run resumes; a damaged tar is fetched again. The list is streamed in shard-sized
chunks and the metadata is held as numeric arrays, so memory stays flat in the length of the list.
The download itself lives in geoloc_cli.download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import tarfile
import threading
import time
import urllib.parse
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from geoloc_cli import console, download, http, places365, sources
from geoloc_cli.download import GONE, MANIFEST_SCHEMA, Options, drain, worker_main
from geoloc_cli.errors import USER_ERRORS, ConfigError, GeolocError, InputError, storage_error
from geoloc_cli.photo import exif_gps, photos_in
from geoloc_cli.store import (
    OK,
    DataRoot,
    atomic_path,
    drop_damaged,
    locked,
    migrate_shard_folder,
    read_table,
    remove_shard_temps,
    remove_temps,
    shard_done,
    shard_name,
    shard_part,
    write_json_atomic,
    write_parquet_atomic,
    write_text_atomic,
)

# Every item ends within fetch.deadline once it has a slot, so when none has finished for this many
# deadlines while work is queued, a worker is stuck (a deadlock in a native library, say).
STALL_DEADLINES = 4
STALL_MIN_S = 60.0
MIRROR_TIMEOUT = 30.0
# Flickr file names: <id>_<secret>[_<size>].<ext>; the size part is what --size-suffix sets.
_FLICKR_NAME = re.compile(r"^(?P<stem>\d+_[0-9a-f]+)(?P<size>_[a-z0-9]{1,2})?(?P<ext>\.[A-Za-z]+)$")


# ------------------------------------------------------------------------------------------- entry point


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
        from geoloc_cli import demo

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


# ---------------------------------------------------------------------------------------------- presets


class Unavailable(Exception):
    """A source did not deliver a file (host gone, not found, bad checksum): try the next one."""


class Gated(Unavailable):
    """A gated Hugging Face repository refused us: the user has to accept its terms; never worked around."""


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


def _user_remotes(mirrors: list[str], file_path: str) -> list[sources.Remote]:
    """A user's mirrors of a file: <base>/<its path in its repository> (e.g. images/test/00.zip)."""
    return [sources.Remote(url=f"{base.rstrip('/')}/{file_path}") for base in mirrors]


def ensure_file(root: DataRoot, mf: sources.MetaFile, mirrors: list[str]) -> Path:
    """<root>/meta/<name> as it is when present (a file put there by hand wins), else from the first
    mirror that delivers it (the user's fetch.mirrors first), checksum checked, atomically."""
    dest = root.meta / mf.name
    if dest.is_file():
        return dest
    remotes = [*_user_remotes(mirrors, mf.name), *mf.mirrors]
    if not remotes:
        raise Unavailable(f"{mf.gone or mf.name + ': no mirror known'}: put a copy at {dest} or set fetch.mirrors to "
                          f"a host that has it")
    tried: list[Unavailable] = []
    for r in remotes:
        console.info(f"getting {mf.name} from {r.describe()}")
        try:
            src = _get(r, root)
            try:
                with atomic_path(dest) as tmp:
                    _materialize(src, r, tmp, mf.columns)
            finally:
                if not r.hf_repo:  # a URL's download was only the way here (the Hub's cache is the Hub's)
                    src.unlink(missing_ok=True)
            return dest
        except Unavailable as e:
            tried.append(e)
    gated = [e for e in tried if isinstance(e, Gated)]
    # Unavailable, not a final error: for a URL list the caller adds it to the other sources it tried
    raise (Gated if gated else Unavailable)(
        f"metadata file {mf.name} is missing: not in {dest.parent} and no mirror delivered it "
        f"(tried: {'; '.join(map(str, tried))}); put the file at {dest} or set fetch.mirrors to a copy"
        + (f". {gated[0]}" if gated else ""))


def _get(r: sources.Remote, root: DataRoot) -> Path:
    """The file a remote names, on disk: the Hub's cache, or <root>/downloads/ for a URL."""
    if r.hf_repo:
        return hf_file(r)
    parts = urllib.parse.urlsplit(r.url)
    # the whole host and path: files of one name from two places (OSV-5M's images/test/00.zip and
    # images/train/00.zip, or a mirror's copy) never share a download or a partial one
    return download_resumable(r.url, root.path / "downloads" / parts.netloc / parts.path.lstrip("/"))


def _materialize(src: Path, r: sources.Remote, dest: Path, columns: dict[str, str]) -> None:
    """Write the file (or its zip member) to dest, checking the checksum; rename columns when asked."""
    import shutil

    if r.member:
        try:
            with zipfile.ZipFile(src) as z, z.open(r.member) as f, open(dest, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise Unavailable(f"{r.describe()}: {e}") from None
    else:
        shutil.copyfile(src, dest)
    check_sha256(r, dest)
    if columns:
        _rename_columns(dest, columns)


def _rename_columns(path: Path, columns: dict[str, str]) -> None:
    """A published metadata file (OSV-5M's id, latitude, longitude) as *_places365.csv columns."""
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.rename(columns=columns).to_csv(path, index=False)


def check_sha256(r: sources.Remote, path: Path) -> None:
    """A file whose checksum is not the registry's is not the file: the next mirror is tried."""
    if not r.sha256:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != r.sha256:
        raise Unavailable(f"{r.describe()}: sha256 {h.hexdigest()} != expected {r.sha256}")


def obtain_part(root: DataRoot, part: tuple[sources.Remote, ...], mirrors: list[str]) -> Path:
    """One archive file from the first of its mirrors that delivers it (a complete earlier download is
    reused: the Hub's cache, or <root>/downloads/)."""
    file_name = part[0].file_name
    tried: list[Unavailable] = []
    for r in [*_user_remotes(mirrors, part[0].mirror_path), *part]:
        console.info(f"getting {file_name} from {r.describe()}")
        try:
            path = _get(r, root)
            try:
                check_sha256(r, path)
            except Unavailable:
                if not r.hf_repo:  # not kept for the next run to reuse
                    path.unlink()
                raise
            return path
        except Unavailable as e:
            tried.append(e)
    gated = [e for e in tried if isinstance(e, Gated)]
    raise gated[0] if gated else Unavailable(f"{file_name}: {'; '.join(map(str, tried))}")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hf_file(r: sources.Remote) -> Path:
    """A file of a Hub repository through huggingface_hub: cached and resumed by it; HF_ENDPOINT,
    HF_HUB_OFFLINE and HF_TOKEN (or the token of `hf auth login`) are read now, not at its import."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(
            r.hf_repo, r.hf_path, repo_type=r.repo_type, revision=r.revision,
            endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None,
            local_files_only=_env_true("HF_HUB_OFFLINE")))
    except GatedRepoError:
        raise Gated(gate_message(r)) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if r.gated and status in (401, 403):
            raise Gated(gate_message(r)) from None
        raise Unavailable(f"{r.describe()}: HTTP {status}") from None
    except LocalEntryNotFoundError:
        raise Unavailable(f"{r.describe()}: not in the local Hugging Face cache (HF_HUB_OFFLINE is set, or the "
                          "Hub did not answer)") from None
    except (OSError, ValueError, EntryNotFoundError) as e:
        raise Unavailable(f"{r.describe()}: {type(e).__name__}: {str(e)[:80]}") from None


def gate_message(r: sources.Remote) -> str:
    page = f"https://huggingface.co/{'' if r.repo_type == 'model' else 'datasets/'}{r.hf_repo}"
    return (f"{r.hf_repo} is a gated repository and this account has no access: accept its terms on {page} "
            "(signed in), then give a token via HF_TOKEN or `hf auth login`")


def download_resumable(url: str, dest: Path) -> Path:
    """GET url to dest through dest.part, continuing a part left by an earlier run (HTTP Range)."""
    import httpx

    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "geoloc", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        with httpx.stream("GET", url, headers=headers, timeout=MIRROR_TIMEOUT, follow_redirects=True) as r:
            if r.status_code == 416 and have:  # the part is already complete
                part.replace(dest)
                return dest
            r.raise_for_status()
            with open(part, "ab" if r.status_code == 206 else "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
    except httpx.HTTPError as e:
        raise Unavailable(f"{url} ({type(e).__name__}: {str(e)[:80]})") from None
    except OSError as e:  # our disk, not the mirror: trying the next mirror would not help
        raise storage_error(e, f"writing {part}") from None
    part.replace(dest)
    return dest


# ---------------------------------------------------------------------------------------------- archives

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
    _check_layout(root, name, Path(label), n_items, size, "archive")
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
        counts = run_archive_jobs(Options.from_config(cfg.fetch), jobs, total, cfg.fetch.processes, f"import {name}")
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
        for m in download.archive_members(kind, paths):
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
        for m in download.archive_members(kind, paths):
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
                 data: list[bytes], meta: MetaIndex, label: str) -> dict[str, Any]:
    lo, hi = s * size, min((s + 1) * size, len(ids))
    job = _shard_job(root, name, s, size, ids[lo:hi], [f"{label}:{m}" if m else "" for m in members[lo:hi]], meta)
    job["data"] = data + [None] * (hi - lo - len(data))
    return job


def run_archive_jobs(opts: Options, jobs: Iterator[dict[str, Any]], total: int, processes: int,
                     label: str) -> Counter:
    """Process shard jobs here (one process) or on a pool, at most two jobs per process queued."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    counts: Counter = Counter()
    with console.progress(label, total=total, unit="img", ok=0, failed=0) as bar:
        def done(c: Counter) -> None:
            counts.update(c)
            bar.advance(sum(c.values()), ok=counts[OK], failed=sum(counts.values()) - counts[OK])

        if processes <= 1:
            for job in jobs:
                done(download.archive_shard(job, opts))
            return counts
        with ProcessPoolExecutor(processes, mp_context=worker_context()) as pool:
            pending: set = set()
            for job in jobs:
                pending.add(pool.submit(download.archive_shard, job, opts))
                if len(pending) >= 2 * processes:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        done(f.result())
            for f in pending:
                done(f.result())
    return counts


# ------------------------------------------------------------------------------------------ list reading


def read_list_chunks(path: Path, chunk_rows: int) -> Iterator[pa.Table]:
    """Stream an `image_id,url` list (no header) as tables of exactly `chunk_rows` rows (the last may be
    shorter), ids and urls as strings. Arrow's reader, not pandas: importing pandas alone costs ~0.5 s."""
    pending: list[pa.RecordBatch] = []
    n = 0
    for batch in _list_batches(path):
        pending.append(batch)
        n += batch.num_rows
        while n >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, chunk_rows)
            pending, n = table.slice(chunk_rows).to_batches(), n - chunk_rows
    if n:
        yield pa.Table.from_batches(pending)


def _list_batches(path: Path) -> Iterator[pa.RecordBatch]:
    if not Path(path).is_file():
        raise InputError(f"URL list not found: {path}")
    text = pa.string()
    try:
        reader = pa_csv.open_csv(
            path, read_options=pa_csv.ReadOptions(column_names=["id", "url"], block_size=4 << 20),
            convert_options=pa_csv.ConvertOptions(column_types={"id": text, "url": text},
                                                  strings_can_be_null=False, quoted_strings_can_be_null=False))
        yield from reader
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return
        raise InputError(f"{path}: malformed URL list (expected image_id,url rows): {e}") from None


def count_rows(path: Path) -> int:
    """Rows of a URL list, whose ids must be unique: a second row with an id would silently get the
    first one's position and classes (the metadata is looked up by id)."""
    hashes = [_hash_ids(b.column(0).to_numpy(zero_copy_only=False)) for b in _list_batches(path)]
    h = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    twice = np.unique(h[1:][h[1:] == h[:-1]])
    if twice.size:
        _duplicate_ids(path, twice)
    return len(h)


def _duplicate_ids(path: Path, hashes: np.ndarray, show: int = 3) -> None:
    """Raise the error naming the first few ids listed twice (and their lines); `hashes` are candidates."""
    lines: dict[str, list[int]] = {}
    line = 1
    for batch in _list_batches(path):
        ids = batch.column(0).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(np.isin(_hash_ids(ids), hashes)):
            lines.setdefault(ids[i], []).append(line + int(i))
        line += batch.num_rows
    repeated = sorted((where for where in lines.values() if len(where) > 1), key=lambda w: w[1])
    if not repeated:  # only a 64-bit hash collision
        return
    inv = {w[0]: k for k, w in lines.items()}
    named = "; ".join(f"{inv[w[0]]!r} on lines {', '.join(map(str, w))}" for w in repeated[:show])
    more = f" (and {len(repeated) - show} more)" if len(repeated) > show else ""
    raise InputError(f"{path}: image ids must be unique, {len(repeated)} appear more than once: {named}{more}")


def flickr_sized(url: str, suffix: str) -> str:
    """Insert Flickr's size suffix (e.g. _z) before the extension unless the name already has one."""
    if not suffix:
        return url
    parts = urllib.parse.urlsplit(url)
    if "flickr" not in (parts.hostname or ""):
        return url
    head, _, name = parts.path.rpartition("/")
    m = _FLICKR_NAME.match(name)
    if not m or m["size"]:
        return url
    return urllib.parse.urlunsplit(parts._replace(path=f"{head}/{m['stem']}{suffix}{m['ext']}"))


# Metadata columns as the manifest stores them.
META_TYPES = {"LAT": pa.float64(), "LON": pa.float64(), **places365.META_TYPES}


class MetaIndex:
    """Metadata rows looked up by IMG_ID without a Python object per row.

    IDs are kept as sorted 64-bit hashes with the row order, columns as numpy / Arrow arrays; a chunk
    of ids is resolved with one vectorised searchsorted. 4.7 M rows take about 250 MB.
    """

    def __init__(self, path: Path) -> None:
        hashes, cols = [], {c: [] for c in META_TYPES}
        try:
            for chunk in places365.read_chunks(path):
                hashes.append(_hash_ids(chunk["IMG_ID"].to_numpy()))
                for c in cols:  # as the manifest stores them: labels with gaps read as floats
                    kind = META_TYPES[c]
                    cols[c].append(pa.array(chunk[c], kind, from_pandas=True) if c in chunk.columns
                                   else pa.nulls(len(chunk), kind))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise InputError(f"{path}: malformed metadata CSV: {e}") from None
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        self.order = np.argsort(h, kind="stable")
        self.sorted = h[self.order]
        twice = self.sorted[1:] == self.sorted[:-1]
        if twice.any():  # the rule: an id's first row is used (searchsorted finds the first of equal hashes)
            first = int(self.order[1:][twice].min()) + 2
            console.warn(f"{path}: {int(twice.sum()):,} IMG_ID rows repeat an earlier id (first on line {first}); "
                         "each id's first row is used")
        self.columns = {c: pa.chunked_array(v, META_TYPES[c]).combine_chunks() for c, v in cols.items()}

    def lookup(self, ids: np.ndarray) -> dict[str, list]:
        """Column values for each id (None where the id is not in the metadata)."""
        h = _hash_ids(ids)
        pos = np.searchsorted(self.sorted, h)
        pos = np.minimum(pos, max(len(self.sorted) - 1, 0))
        found = (self.sorted[pos] == h) if len(self.sorted) else np.zeros(len(h), bool)
        rows = pa.array(np.where(found, self.order[pos] if len(self.sorted) else 0, 0), mask=~found)
        return {c: col.take(rows).to_pylist() for c, col in self.columns.items()}


def _hash_ids(ids: np.ndarray) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False)


# ----------------------------------------------------------------------------------------------- planning


def _shard_paths(root: DataRoot, name: str, s: int) -> tuple[Path, Path]:
    tar = root.shards(name) / shard_name(s)
    return tar, shard_part(tar)


def plan_shards(root: DataRoot, name: str, n_items: int, shard_size: int, part: tuple[int, int],
                retry_failed: bool, retry_gone: bool) -> tuple[list[int], list[int]]:
    """(shards to fetch, shards to retry) of this part: not-done shards, plus done shards with
    retryable failures when retry_failed."""
    i, n = part
    fetch, retry = [], []
    for s in range(i, math.ceil(n_items / shard_size), n):
        tar, pq_part = _shard_paths(root, name, s)
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


def _check_layout(root: DataRoot, name: str, source: Path, n_items: int, shard_size: int, kind: str = "list") -> None:
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


def iter_jobs(cfg: Any, root: DataRoot, name: str, urls_csv: Path, meta: MetaIndex | None,
              wanted: dict[int, bool], retry_gone: bool, require_gps: bool) -> Iterator[dict[str, Any]]:
    """Stream the list and yield one job per wanted shard ({shard: is_retry})."""
    size = cfg.fetch.shard_size
    last = max(wanted, default=-1)
    for s, chunk in enumerate(read_list_chunks(urls_csv, size)):
        if s > last:
            return
        if s not in wanted:
            continue
        urls = [flickr_sized(u, cfg.fetch.size_suffix) for u in chunk.column("url").to_pylist()]
        yield _shard_job(root, name, s, size, chunk.column("id").to_pylist(), urls, meta) | {
            "retry": wanted[s], "retry_gone": retry_gone, "require_gps": require_gps}


def _shard_job(root: DataRoot, name: str, s: int, size: int, ids: list[str], urls: list[str],
               meta: MetaIndex | None) -> dict[str, Any]:
    """What a worker needs to write shard s: keys, ids, urls, and positions and labels from the metadata."""
    tar, part = _shard_paths(root, name, s)
    info = meta.lookup(np.asarray(ids, dtype=object)) if meta is not None else {}
    nan = [math.nan] * len(ids)
    return {
        "shard": s, "tar": str(tar), "part": str(part),
        "keys": [f"{s * size + j:09d}" for j in range(len(ids))], "ids": ids, "urls": urls,
        "lat": [math.nan if v is None else v for v in info.get("LAT", nan)],
        "lon": [math.nan if v is None else v for v in info.get("LON", nan)],
        "meta": {c: info[c] for c in places365.META_COLUMNS if c in info},
    }


# ---------------------------------------------------------------------------------------------- fetching


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
    migrate_shard_folder(root.shards(name))  # (idempotent: parts starting together may both move files)
    if part != (0, 1):
        with locked(folder, "fetch", shared=True), locked(folder, f"fetch-part-{part[0]}-of-{part[1]}"):
            yield
        return
    with locked(folder, "fetch"):
        # the only writer: a killed run's leftovers go (parts running together write these files too)
        remove_temps(folder, "manifest.parquet", "stats.json", "fetch.json")
        yield


def _fetch_list(cfg: Any, root: DataRoot, name: str, urls_csv: Path, meta_csv: Path | None, retry_failed: bool,
                retry_gone: bool, part: tuple[int, int], require_gps: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    size = cfg.fetch.shard_size
    n_items = count_rows(urls_csv)
    if n_items == 0:
        raise InputError(f"{urls_csv}: the URL list is empty (expected image_id,url rows)")
    meta = MetaIndex(meta_csv) if meta_csv is not None else None
    _check_layout(root, name, urls_csv, n_items, size)
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
            counts = run_jobs(Options.from_config(cfg.fetch), jobs, len(wanted), total, cfg.fetch.processes,
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


def run_jobs(opts: Options, jobs: Iterator[dict[str, Any]], n_jobs: int, total: int, processes: int,
             label: str) -> Counter:
    """Run shard jobs on `processes` worker processes; show progress; return counts by status."""
    processes = max(1, min(processes, n_jobs))  # a worker per job at most: each start costs CPU
    ctx = worker_context()
    opts = dataclasses.replace(opts, tls=http.env_tls(), proxies=_proxies())
    try:  # once, here: forked workers share it, and a bad certificate setting fails the run, not each item
        http.ssl_context(*opts.tls)
    except OSError as e:
        raise ConfigError(f"cannot load TLS certificates (SSL_CERT_FILE={os.environ.get('SSL_CERT_FILE')!r}, "
                          f"SSL_CERT_DIR={os.environ.get('SSL_CERT_DIR')!r}): {e}") from None
    job_q, events = ctx.Queue(maxsize=max(2, processes * 2)), ctx.Queue()
    workers = [ctx.Process(target=worker_main, args=(opts, job_q, events, os.getpid()), daemon=True)
               for _ in range(processes)]
    for w in workers:
        w.start()
    feed_error: list[BaseException] = []
    progress = [time.monotonic()]  # when an item last finished or a worker last took a job
    feeder = threading.Thread(target=_feed, args=(jobs, job_q, processes, feed_error, progress), daemon=True)
    feeder.start()
    counts: Counter = Counter()
    stall = max(STALL_MIN_S, STALL_DEADLINES * opts.deadline)
    try:
        with console.progress(label, total=total, unit="img", ok=0, failed=0) as bar:
            done = 0
            while done < n_jobs:
                if time.monotonic() - progress[0] > stall:
                    raise InputError(f"no item finished for {stall:.0f} s ({STALL_DEADLINES} x fetch.deadline): a "
                                     "fetch worker is stuck and was stopped; run the same command again to resume")
                for ev in drain(events, 0.5):
                    progress[0] = time.monotonic()
                    if ev[0] == "items":
                        counts.update(ev[1])
                        bar.advance(sum(ev[1].values()), ok=counts[OK], failed=sum(counts.values()) - counts[OK])
                    elif ev[0] == "shard":
                        done += 1
                    elif ev[2][0] in USER_ERRORS:  # a worker's user or OS error, as if it happened here
                        raise USER_ERRORS[ev[2][0]](ev[2][1])
                    else:
                        raise InputError(f"writing shard {ev[1]} failed:\n{ev[2][1]}")
                if feed_error:
                    raise feed_error[0]
                if done < n_jobs and not any(w.is_alive() for w in workers):
                    raise InputError(f"all fetch workers exited with {n_jobs - done} shard(s) left; "
                                     "run the same command again to resume")
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
    return counts


def worker_context() -> Any:
    """The multiprocessing context the workers start in.

    fork when this process runs no other Python thread: a worker then starts in milliseconds with every
    module already imported (a fork server has to import pandas, pyarrow, httpx and Pillow again first:
    ~1.5 s of a 2,000-image run). With other threads around (a progress bar, a server in a test) fork
    could copy a lock another thread holds, so a fork server preloaded with the download module is used.
    """
    if threading.active_count() == 1 and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["geoloc_cli.download"])
    return ctx


def _proxies() -> dict[str, Any]:
    try:
        return http.env_proxies()
    except ValueError as e:
        raise ConfigError(f"{e}; unset the variable or point it to an http:// proxy") from None


def _feed(jobs: Iterator[dict[str, Any]], job_q: Any, processes: int, errors: list[BaseException],
          progress: list[float]) -> None:
    try:
        for job in jobs:
            job_q.put(job)  # blocks until a worker has room for it
            progress[0] = time.monotonic()
    except BaseException as e:  # reported by the main thread
        errors.append(e)
    for _ in range(processes):
        job_q.put(None)


# ------------------------------------------------------------------------------------------ finishing


def finish(root: DataRoot, name: str, n_items: int, shard_size: int, counts: Counter,
           seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Combine all manifest parts present into manifest.parquet (streamed) and write stats.json."""
    by_status: Counter = Counter()
    n_shards = math.ceil(n_items / shard_size)
    present, nbytes, rows = 0, 0, 0
    with atomic_path(root.manifest(name)) as tmp, pq.ParquetWriter(tmp, MANIFEST_SCHEMA) as writer:
        for s in range(n_shards):
            tar, part = _shard_paths(root, name, s)
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


def summary_table(name: str, stats: dict[str, Any]) -> None:
    rows_total = max(stats["rows"], 1)
    rows = [(st, n, f"{100 * n / rows_total:.1f}%") for st, n in stats["status"].items()]
    run = stats["this_run"]
    console.table(f"fetch {name}", ["status", "items", "share"], rows,
                  caption=f"{stats['rows']:,} of {stats['items']:,} items in {stats['shards_done']} shards; "
                          f"this run {run['items']:,} items in {run['seconds']:.1f} s "
                          f"({run['images_per_s']:.1f} img/s)")


# ---------------------------------------------------------------------------------------- photo folders


def exif_latlon(path: Path) -> tuple[float, float] | None:
    """(lat, lon) from a photo's EXIF GPS block, or None when it has none (or cannot be read)."""
    from PIL import Image

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
    urls_csv, meta_csv = root.meta / f"{name}_urls.csv", root.meta / f"{name}_places365.csv"
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
