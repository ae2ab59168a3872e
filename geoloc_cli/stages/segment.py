"""`geoloc segment`: ADE20K class maps for every image, in seg shards that mirror the image shards.

For each image shard `datasets/<name>/shards/images-NNNNNN.tar` the stage writes
`datasets/<name>/seg/seg-NNNNNN.tar` holding `<key>.png` (mode L PNG of the uint8 class map at the
model's output resolution) for the same keys in the same order. Each seg shard appears atomically, so
a finished shard is skipped on the next run and a killed run continues where it stopped; a shard that
fails store.check_shard (cut short, size not as recorded) is made again, with a warning.

An image that does not decode (status `corrupt_image`) or, on import, has no map (`missing_map`) is
left out of its seg shard and recorded in `seg/status.parquet` (key, shard, status, error; `shard` is
the image shard's file name, as in the manifest); readers skip keys without a map. Per-shard status
parts live in `seg/.parts/` and are written after their shard: a shard with its part is done
(store.shard_done, the rule fetch uses too).

Modes: segment with the model (default; `runtime.gpus` splits shards across GPUs, one process per GPU,
shard i -> GPU i % n), `--preview N` (side-by-side PNGs in `seg/preview/`, from the stored maps where a
seg shard exists, else from the model) and `--import DIR_OR_ARCHIVE` (TransLocator colour PNGs named by
image id or key, decoded through the ADE20K palette). Do not run two segment processes on one dataset
at once: a run removes stale temporary files left in `seg/` by a killed run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import tarfile
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from geoloc_cli import console
from geoloc_cli.config import Config
from geoloc_cli.data import DECODE_ERRORS
from geoloc_cli.dist import check_devices, loader_workers, resolve_device, run_on_devices
from geoloc_cli.errors import ConfigError, InputError
from geoloc_cli.segmentation import (
    Segmenter,
    colors_to_classes,
    decode_png,
    encode_png,
    preview_image,
)
from geoloc_cli.store import (
    OK,
    DataRoot,
    ShardWriter,
    drop_damaged,
    iter_shard,
    locked,
    member_key,
    migrate_shard_folder,
    read_shard,
    remove_shard_temps,
    require_intact,
    seg_shard_for,
    shard_done,
    shard_part,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)

CORRUPT_IMAGE = "corrupt_image"
MISSING_MAP = "missing_map"
STATUS_COLUMNS = ["key", "shard", "status", "error"]


def run(cfg: Config, datasets: list[str] | None = None, preview: int = 0, import_from: Path | None = None) -> None:
    root = DataRoot(cfg.root)
    names = datasets or [n for n in (cfg.train.dataset, cfg.train.val_dataset) if n]
    if not names:
        raise ConfigError("train.dataset: no dataset to segment (name one: geoloc segment <dataset>)")
    if preview > 0:  # previews go to their own folder and change no seg shard
        for name in names:
            write_previews(cfg, root, name, preview)
        return
    with contextlib.ExitStack() as locks:  # one writer per dataset's seg folder
        for name in dict.fromkeys(names):
            locks.enter_context(locked(root.seg(name), "segment"))
        if import_from is not None:
            import_maps(root, names, Path(import_from))
        else:
            segment_datasets(cfg, root, names)


# ------------------------------------------------------------------------------------------ shard plan


@dataclass(frozen=True)
class Job:
    """One image shard to turn into one seg shard."""

    dataset: str
    image_shard: Path
    seg_shard: Path

    @property
    def status_part(self) -> Path:
        return shard_part(self.seg_shard)


def plan(root: DataRoot, name: str) -> list[Job]:
    """All jobs of a dataset (finished or not); removes temporary files a killed run left behind."""
    seg_dir = root.seg(name)
    migrate_shard_folder(seg_dir)
    jobs = [Job(name, s, seg_dir / seg_shard_for(s.name)) for s in root.image_shards(name)]
    remove_shard_temps([j.seg_shard for j in jobs])
    for job in jobs:
        require_intact(job.image_shard)
        damage = drop_damaged(job.seg_shard)
        if damage:
            console.warn(f"{job.seg_shard} is damaged ({damage}): making it again")
    return jobs


def shard_keys(path: Path) -> list[str]:
    """Keys of the images in a shard, in order, from the tar headers only (no image data is read)."""
    try:
        with tarfile.open(path, "r") as tar:
            return [key for key, ext in (member_key(m.name) for m in tar) if ext == "jpg"]
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"cannot read shard {path}: {e}") from None


def write_status(root: DataRoot, name: str) -> pd.DataFrame:
    """Merge the status parts of finished seg shards into seg/status.parquet; return the table."""
    seg_dir = root.seg(name)
    parts = [shard_part(s) for s in sorted(seg_dir.glob("seg-*.tar")) if shard_done(s)]
    frames = [pd.read_parquet(p) for p in parts]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STATUS_COLUMNS)
    write_parquet_atomic(table, seg_dir / "status.parquet")
    return table


def _finish_shard(writer: ShardWriter, job: Job, rows: list[dict[str, str]]) -> None:
    """The shard, then its status part: the part marks it done (store.shard_done)."""
    writer.close()
    write_parquet_atomic(pd.DataFrame(rows, columns=STATUS_COLUMNS), job.status_part)


# -------------------------------------------------------------------------------------------- segment


@dataclass(frozen=True)
class Settings:
    """What a worker process needs to build its segmenter (picklable for spawn)."""

    model: str
    precision: str
    input_size: int
    batch_size: int
    threads: int


def record_maker(root: DataRoot, name: str, maker: dict[str, Any]) -> None:
    """Note in seg/segmenter.json what makes this dataset's maps: one maker per dataset, so training can
    embed the same segmenter for predict."""
    path = root.seg_maker(name)
    done = any(root.seg(name).glob("seg-*.tar"))
    if done and not path.is_file():  # maps from before geoloc recorded their maker
        console.warn(f"{name}: some maps were made before geoloc recorded their segmenter; they are kept, "
                     "and training will warn that they may come from another model")
        write_json_atomic(path, {"model": "unknown"})
        return
    if done:
        made = json.loads(path.read_text())
        if made.get("model") == "unknown":
            return
        if made != maker:
            hint = (f"set segment.model={made['model']} segment.input_size={made.get('input_size')}"
                    if made.get("model") != "imported" else "import the rest the same way")
            raise ConfigError(f"{name}: its maps so far were made by {made}, not {maker}: {hint} to finish "
                              f"them, or delete {root.seg(name)} to start over")
    write_json_atomic(path, maker)


def segment_datasets(cfg: Config, root: DataRoot, names: list[str]) -> None:
    check_devices(cfg.runtime.gpus, cfg.runtime.device, "segment")
    jobs = [job for name in names for job in plan(root, name)]
    pending = [j for j in jobs if not shard_done(j.seg_shard)]
    maker = {"model": cfg.segment.model, "input_size": cfg.segment.input_size}
    for name in {j.dataset for j in pending}:
        record_maker(root, name, maker)
    for name in set(names) - {j.dataset for j in pending}:
        made = root.seg_maker(name)
        if made.is_file() and json.loads(made.read_text()) != maker:
            console.warn(f"{name}: every map was made already, by {made.read_text().strip()}; delete "
                         f"{root.seg(name)} to make them again with {cfg.segment.model}")
    devices = [f"cuda:{g}" for g in cfg.runtime.gpus] or [str(resolve_device(cfg.runtime.device))]
    threads = loader_workers(cfg.runtime.num_workers, devices[0], len(devices))
    settings = Settings(cfg.segment.model, cfg.segment.precision, cfg.segment.input_size,
                        cfg.segment.batch_size, max(1, threads))
    total = sum(len(shard_keys(j.image_shard)) for j in pending)
    console.info(f"segment: {len(pending)} of {len(jobs)} shards to do ({total:,} images) with "
                 f"{settings.model} on {', '.join(devices)}")
    start = time.monotonic()
    if pending:
        with console.progress("segment", total, unit="img") as task:
            run_jobs(pending, settings, devices, task.advance)
    seconds = time.monotonic() - start
    _summary(root, names, jobs, pending, seconds)


def run_jobs(jobs: list[Job], settings: Settings, devices: list[str], report: Callable[[int], Any]) -> None:
    """Segment the jobs on the devices: in this process for one device, else one process per device."""
    run_on_devices(functools.partial(segment_shards, settings=settings), jobs, devices, report)


def segment_shards(jobs: list[Job], device: str, report: Callable[[int], Any], settings: Settings) -> None:
    """Segment each job's image shard into its seg shard; report(n) after every batch of n images."""
    if device.startswith("cuda"):  # this worker's GPU hosts its CUDA context, not GPU 0
        import torch

        torch.cuda.set_device(device)
    segmenter = Segmenter.from_name(settings.model, device, settings.precision, settings.input_size)
    segment_with(segmenter, jobs, settings.batch_size, settings.threads, report)


def segment_with(segmenter: Segmenter, jobs: list[Job], batch_size: int, threads: int,
                 report: Callable[[int], Any]) -> None:
    """The shard loop with a ready segmenter: decode threads feed batches, each job's seg shard appears
    atomically when it is complete."""
    with ThreadPoolExecutor(threads) as pool:
        for job in jobs:
            _segment_shard(job, segmenter, pool, batch_size, report)


def _segment_shard(job: Job, segmenter: Segmenter, pool: ThreadPoolExecutor, batch_size: int,
                   report: Callable[[int], Any]) -> None:
    samples = list(iter_shard(job.image_shard))  # one shard in memory: a few tens of MB
    samples = [(k, f) for k, f in samples if "jpg" in f]
    rows: list[dict[str, str]] = []
    writer = ShardWriter(job.seg_shard)
    try:
        for decoded in _decoded_batches(samples, segmenter, pool, batch_size):
            good = [(key, arr) for key, arr, _ in decoded if arr is not None]
            maps = segmenter.predict(np.stack([a for _, a in good])) if good else []
            for (key, _), png in zip(good, pool.map(encode_png, maps), strict=True):
                writer.add(key, {"png": png})
            for key, arr, error in decoded:  # rows in shard order, corrupt ones included
                rows.append({"key": key, "shard": job.image_shard.name,
                             "status": OK if arr is not None else CORRUPT_IMAGE, "error": error})
            report(len(decoded))
        _finish_shard(writer, job, rows)
    except BaseException:
        writer.abort()
        raise


def _decoded_batches(samples: list[tuple[str, dict[str, bytes]]], segmenter: Segmenter,
                     pool: ThreadPoolExecutor, batch_size: int,
                     ) -> Iterator[list[tuple[str, np.ndarray | None, str]]]:
    """Decode and resize in threads, two batches ahead of the model, so the device never waits long."""
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    ahead: deque[list[Future]] = deque()
    for batch in batches:
        ahead.append([pool.submit(_decode, segmenter, key, files["jpg"]) for key, files in batch])
        if len(ahead) > 2:
            yield [f.result() for f in ahead.popleft()]
    while ahead:
        yield [f.result() for f in ahead.popleft()]


def _decode(segmenter: Segmenter, key: str, data: bytes) -> tuple[str, np.ndarray | None, str]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return key, segmenter.prepare(image), ""
    except DECODE_ERRORS as e:
        return key, None, f"{type(e).__name__}: {e}"


def _summary(root: DataRoot, names: list[str], jobs: list[Job], pending: list[Job], seconds: float) -> None:
    rows = []
    for name in names:
        status = write_status(root, name)
        done_now = sum(1 for j in pending if j.dataset == name)
        total = sum(1 for j in jobs if j.dataset == name)
        ok = int((status["status"] == OK).sum())
        rows.append([name, total, done_now, total - done_now, ok, int((status["status"] == CORRUPT_IMAGE).sum())])
        if rows[-1][-1]:
            console.warn(f"{name}: {rows[-1][-1]} corrupt images have no map (see {root.seg(name)}/status.parquet)")
    n_new = sum(len(pd.read_parquet(j.status_part)) for j in pending)
    console.table("segment", ["dataset", "shards", "segmented", "skipped (done)", "maps", "corrupt"], rows,
                  caption=f"{n_new:,} images in {seconds:.1f} s ({n_new / max(seconds, 1e-9):,.1f} img/s)")


# -------------------------------------------------------------------------------------------- preview


def write_previews(cfg: Config, root: DataRoot, name: str, n: int) -> None:
    """photo | colour map | legend for the first n decodable images, into seg/preview/."""
    out_dir = root.seg(name) / "preview"
    segmenter: Segmenter | None = None
    written = 0
    for shard in root.image_shards(name):
        seg_path = root.seg(name) / seg_shard_for(shard.name)
        stored = read_shard(seg_path) if shard_done(seg_path) else {}
        photos = _photos(shard, n - written)
        for key, photo in photos:
            if key in stored:
                class_map = decode_png(stored[key]["png"], f"{seg_path}:{key}.png")
            else:
                if segmenter is None:
                    segmenter = Segmenter.from_name(cfg.segment.model, str(resolve_device(cfg.runtime.device)),
                                                    cfg.segment.precision, cfg.segment.input_size)
                class_map = segmenter([photo])[0]
            buf = io.BytesIO()
            preview_image(photo, class_map).save(buf, format="PNG")
            write_bytes_atomic(out_dir / f"{key}.png", buf.getvalue())
            written += 1
        if written >= n:
            break
    console.info(f"{name}: {written} previews in {out_dir}")


def _photos(shard: Path, n: int) -> list[tuple[str, Image.Image]]:
    photos = []
    for key, files in iter_shard(shard):
        if len(photos) >= n:
            break
        try:
            with Image.open(io.BytesIO(files.get("jpg", b""))) as image:
                photos.append((key, image.convert("RGB")))
        except DECODE_ERRORS:
            continue
    return photos


# --------------------------------------------------------------------------------------------- import


@dataclass
class MapSource:
    """Colour PNGs in a folder, a .zip or a tar archive, found by path stem or by file-name stem.

    A file `a/b/123.png` answers to `a/b/123` and to `123` (unless two files share that stem). Large
    compressed tars are read slowly by random access: extract them first."""

    path: Path
    index: dict[str, str | None] = field(default_factory=dict)
    _zip: zipfile.ZipFile | None = None
    _tar: tarfile.TarFile | None = None
    _members: dict[str, tarfile.TarInfo] = field(default_factory=dict)

    @staticmethod
    def open(path: Path) -> MapSource:
        src = MapSource(path)
        if path.is_dir():
            names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.suffix.lower() == ".png"]
        elif zipfile.is_zipfile(path):
            src._zip = zipfile.ZipFile(path)
            names = [n for n in src._zip.namelist() if n.lower().endswith(".png")]
        elif path.is_file() and tarfile.is_tarfile(path):
            src._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - kept open for reads, closed with the process
            src._members = {m.name: m for m in src._tar if m.isfile() and m.name.lower().endswith(".png")}
            names = list(src._members)
        else:
            raise InputError(f"--import {path}: not a folder, .zip or tar archive")
        for name in names:
            stem = name.rsplit(".", 1)[0]
            src.index[stem] = name
            base = PurePosixPath(stem).name
            if base != stem:  # a shared file-name stem is ambiguous: only full paths match it then
                src.index[base] = name if base not in src.index else None
        return src

    def find(self, key: str, image_id: str | None) -> str | None:
        for candidate in _id_stems(image_id) + [key]:
            name = self.index.get(candidate)
            if name:
                return name
        return None

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        if self._tar is not None:
            f = self._tar.extractfile(self._members[name])
            assert f is not None
            return f.read()
        return (self.path / name).read_bytes()


def _id_stems(image_id: str | None) -> list[str]:
    """'17/c4/639.jpg' -> ['17/c4/639', '639']: an image id without its extension, then its file name."""
    if not image_id:
        return []
    stem = image_id.rsplit(".", 1)[0] if "." in PurePosixPath(image_id).name else image_id
    return [stem, PurePosixPath(stem).name]


def _ids_by_key(root: DataRoot, name: str) -> dict[str, str]:
    path = root.manifest(name)
    if not path.is_file():
        console.warn(f"{name}: no manifest at {path}; matching map files by key only")
        return {}
    manifest = pd.read_parquet(path, columns=None)
    if "id" not in manifest.columns:
        return {}
    return dict(zip(manifest["key"].astype(str), manifest["id"].astype(str), strict=True))


def import_maps(root: DataRoot, names: list[str], source_path: Path) -> None:
    """Map colour PNGs back to class indices into seg shards, shard by shard (resumable like segmenting)."""
    source = MapSource.open(source_path)
    rows = []
    for name in names:
        ids = _ids_by_key(root, name)
        jobs = plan(root, name)
        keys = {j.image_shard: shard_keys(j.image_shard) for j in jobs}
        matches = {k: source.find(k, ids.get(k)) for ks in keys.values() for k in ks}
        if keys and not any(matches.values()):
            raise InputError(f"--import {source_path}: no map file matches a key or image id of dataset {name}")
        pending = [j for j in jobs if not shard_done(j.seg_shard)]
        if pending:
            record_maker(root, name, {"model": "imported"})
        with console.progress(f"import {name}", sum(len(keys[j.image_shard]) for j in pending), unit="map") as task:
            for job in pending:
                _import_shard(job, keys[job.image_shard], matches, source)
                task.advance(len(keys[job.image_shard]))
        status = write_status(root, name)
        missing = int((status["status"] == MISSING_MAP).sum())
        rows.append([name, len(jobs), len(pending), int((status["status"] == OK).sum()), missing])
        if missing:
            console.warn(f"{name}: {missing} images have no map in {source_path} (see seg/status.parquet)")
    console.table("segment --import", ["dataset", "shards", "imported now", "maps", "missing"], rows)


def _import_shard(job: Job, keys: list[str], matches: dict[str, str | None], source: MapSource) -> None:
    rows: list[dict[str, str]] = []
    writer = ShardWriter(job.seg_shard)
    try:
        for key in keys:
            name = matches[key]
            if name is None:
                rows.append({"key": key, "shard": job.image_shard.name, "status": MISSING_MAP, "error": ""})
                continue
            writer.add(key, {"png": encode_png(_read_colour_map(source, name))})
            rows.append({"key": key, "shard": job.image_shard.name, "status": OK, "error": ""})
        _finish_shard(writer, job, rows)
    except BaseException:
        writer.abort()
        raise


def _read_colour_map(source: MapSource, name: str) -> np.ndarray:
    where = f"{source.path}:{name}" if not source.path.is_dir() else str(source.path / name)
    try:
        with Image.open(io.BytesIO(source.read(name))) as image:
            rgb = np.asarray(image.convert("RGB"))
    except DECODE_ERRORS as e:
        raise InputError(f"{where}: cannot decode colour map: {e}") from None
    return colors_to_classes(rgb, where)
