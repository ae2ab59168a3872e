"""The data root on disk: where each stage's files live, atomic writes, tar shards and manifests.

Layout (README, "Data root"):
  <root>/meta/                                  metadata CSVs as published
  <root>/datasets/<name>/shards/images-NNNNNN.tar   <key>.jpg + <key>.json (WebDataset-compatible)
  <root>/datasets/<name>/shards/.parts/images-NNNNNN.parquet  per-shard manifest part (written after the tar)
  <root>/datasets/<name>/manifest.parquet       one row per requested item, with a status
  <root>/datasets/<name>/seg/seg-NNNNNN.tar     <key>.png class-index maps, same keys as the images
  <root>/datasets/<name>/emb/emb-NNNNNN.safetensors  fp16 backbone embeddings, same keys (see embeddings.py)
  <root>/datasets/<name>/index.parquet          training index written by `geoloc filter`
  <root>/partitions/<name>/cells_<tmin>_<tmax>.csv, labels.parquet
  <root>/runs/<run>/                            config.yaml, checkpoints, metrics.jsonl, eval/
  <shards>/.records/<shard>.tar.json            what a shard held when written (size, members, keys)
  <folder>/.<stage>.lock                        the lock of the process writing that folder

Every file is written to a temporary name in the same directory and renamed into place, so a killed
process never leaves a half-written file under the final name; an operating-system failure on the way
(disk full, read-only, permission) is a StorageError naming the file. Files that belong together
(partition's tables, labels and hierarchy) are committed as one generation (`generation`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import secrets
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas costs ~0.4 s to import; the torch-free predict path needs none of it
    import pandas as pd

from geoloc_cli.errors import InputError, LockedError, StorageError, storage_error

OK = "ok"  # manifest status of a successfully stored item
ID = "id"  # the image id's column in every table geoloc writes (the published formats keep IMG_ID / img_id)
CHECKPOINT_FORMAT = 1  # version of the inference checkpoint's metadata (model.save_inference_checkpoint)
_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass(frozen=True)
class DataRoot:
    path: Path

    @property
    def meta(self) -> Path:
        return self.path / "meta"

    def meta_csv(self, name: str) -> Path:
        """A dataset's metadata in the published format (data.places365)."""
        return self.meta / f"{name}_places365.csv"

    def urls_csv(self, name: str) -> Path:
        """A dataset's image_id,url list, no header (the published format)."""
        return self.meta / f"{name}_urls.csv"

    def dataset(self, name: str) -> Path:
        return self.path / "datasets" / name

    def shards(self, name: str) -> Path:
        return self.dataset(name) / "shards"

    def image_shards(self, name: str) -> list[Path]:
        """The dataset's image shards in order; none is an error naming what to run (segment, embed read them)."""
        shards = sorted(self.shards(name).glob("images-*.tar"))
        if not shards:
            raise InputError(f"no image shards in {self.shards(name)} (run `geoloc fetch {name}` first)")
        return shards

    def seg(self, name: str) -> Path:
        return self.dataset(name) / "seg"

    def seg_maker(self, name: str) -> Path:
        """JSON naming what made the dataset's maps ({"model", "input_size"}, or {"model": "imported"})."""
        return self.seg(name) / "segmenter.json"

    def emb(self, name: str) -> Path:
        """Cached backbone embeddings (`geoloc embed`), with embedder.json naming what made them."""
        return self.dataset(name) / "emb"

    def gallery(self, name: str) -> Path:
        """The retrieval gallery `geoloc index` builds from the dataset's embeddings (inference/retrieval.py)."""
        return self.dataset(name) / "gallery"

    def manifest(self, name: str) -> Path:
        return self.dataset(name) / "manifest.parquet"

    def index(self, name: str) -> Path:
        return self.dataset(name) / "index.parquet"

    def partitions(self, name: str) -> Path:
        return self.path / "partitions" / name

    def run(self, name: str) -> Path:
        return self.path / "runs" / name

    def resume(self, run: str) -> Path:
        """A training run's resume state (train.trainer.Trainer.save)."""
        return self.run(run) / "resume.pt"

    def model(self, run: str) -> Path:
        """The inference checkpoint a training run writes (its best weights)."""
        return self.run(run) / "model.safetensors"


def shard_name(i: int, prefix: str = "images") -> str:
    return f"{prefix}-{i:06d}.tar"


def seg_shard_for(image_shard: str) -> str:
    """images-000012.tar -> seg-000012.tar: seg shards mirror image shards one to one."""
    return image_shard.replace("images-", "seg-", 1)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise storage_error(e, f"writing {path}") from None
    try:
        yield Path(tmp)
        # mkstemp creates 0600 (and writers such as safetensors recreate the file 0600 too): final files
        # get the usual permissions
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        raise storage_error(e, f"writing {path}") from None
    except RuntimeError as e:  # torch.save reports a failed write as "basic_ios::clear: iostream error"
        if not _is_stream_write_failure(e):
            raise
        raise StorageError(f"{_write_failure_cause(path.parent)} while writing {path}", errno.EIO) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _is_stream_write_failure(e: RuntimeError) -> bool:
    text = str(e)
    return "basic_ios::clear" in text or "PytorchStreamWriter failed" in text or "file write failed" in text


def _write_failure_cause(folder: Path) -> str:
    """What most likely stopped a write whose error carries no errno (torch's C++ streams say nothing)."""
    with contextlib.suppress(OSError):
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < 1 << 20:
            return "no space left on device"
    return "the write failed (disk full or failing?)"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(df: pd.DataFrame, path: Path, meta: dict[str, Any] | None = None) -> None:
    """`meta` (JSON) goes into the file's schema metadata; `parquet_meta` reads it back. Text columns
    are Arrow `string` in every file (pandas' own writer gives `large_string`, fetch's Arrow writer
    `string`: one type, so tables concatenate and compare across stages)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    schema = pa.schema([f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema],
                       metadata=table.schema.metadata)
    table = table.cast(schema)
    if meta is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"geoloc": json.dumps(meta)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: Path, what: str, hint: str = "") -> pd.DataFrame:
    """Read a parquet file a previous stage wrote; a missing file is a user error that says what to run."""
    if not Path(path).is_file():
        raise InputError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    import pandas as pd

    return pd.read_parquet(path)


def read_table(path: Path, columns: list[str] | None = None) -> Any:
    """One parquet file as an Arrow table. Through ParquetFile, not pq.read_table: the latter imports
    pyarrow.dataset on first use (~0.3 s, a visible share of a short fetch)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read(columns=columns)


def parquet_meta(path: Path) -> dict[str, Any]:
    """The geoloc metadata a parquet file was written with (`write_parquet_atomic(meta=...)`), or {}."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"geoloc")
    return json.loads(raw) if raw else {}


# --------------------------------------------------------------------------------------------------
# One writer per target


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = lock.read_text().strip()
        if text:
            return text
    return "pid unknown"


@contextlib.contextmanager
def locked(folder: Path, stage: str, shared: bool = False) -> Iterator[None]:
    """Hold `<folder>/.<stage>.lock` (flock) while the block runs; a second holder stops at once with a
    LockedError naming the first (pid and command). The kernel drops the lock when its process dies, so
    a killed run never blocks the next one. `shared` lets several holders in (fetch's --part runs) while
    still keeping an exclusive holder out."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f".{stage}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    except OSError as e:
        raise storage_error(e, f"locking {folder}") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{folder} is being written by another geoloc {stage} ({_holder(path)}); wait for it "
                              "to finish or stop it") from None
        me = f"pid {os.getpid()}: {' '.join(sys.argv)}"
        with contextlib.suppress(OSError):  # only informs a second process's message
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_held(folder: Path, stage: str) -> bool:
    """Whether a process holds `<folder>/.<stage>.lock` (shared or exclusive), as `locked` takes it."""
    path = Path(folder) / f".{stage}.lock"
    try:
        fd = os.open(path, os.O_RDWR)  # (NFS grants an exclusive flock only to a descriptor open for writing)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise storage_error(e, f"reading {path}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError as e:
        raise storage_error(e, f"probing {path}") from None
    finally:
        os.close(fd)  # (releases the probe's lock, if it got it)


# --------------------------------------------------------------------------------------------------
# Generations: files that belong together, committed together


GENERATION_JOURNAL = ".commit.json"


class Staged:
    """The files of one generation, written under temporary names until the generation commits."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        self.files: dict[str, Path] = {}
        self.removed: list[str] = []

    def path(self, name: str) -> Path:
        """Where to write file `name` of this generation (renamed to `folder/name` on commit)."""
        self.files[name] = self.folder / f".{name}.{self.id}.tmp"
        return self.files[name]

    def remove(self, name: str) -> None:
        """`folder/name` does not belong to this generation: it goes when the generation commits."""
        self.removed.append(name)


@contextlib.contextmanager
def generation(folder: Path) -> Iterator[Staged]:
    """Write a set of files as one generation: the block writes each to `staged.path(name)`; then a
    journal naming them all is written atomically (the commit point) and the files are renamed into
    place. A kill before the journal leaves the old set (and temporaries `recover` removes); a kill
    after it leaves a journal that `recover` completes. Readers refuse a folder with a journal."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged = Staged(folder)
    committed = False
    try:
        yield staged
        journal = {"generation": staged.id, "remove": staged.removed,
                   "rename": {tmp.name: name for name, tmp in staged.files.items()}}
        write_json_atomic(folder / GENERATION_JOURNAL, journal)
        committed = True
        _complete(folder)
    finally:
        if not committed:
            for tmp in staged.files.values():
                tmp.unlink(missing_ok=True)


def _complete(folder: Path) -> None:
    """Rename a committed generation's files into place (again, after a kill: renames are idempotent)."""
    journal = folder / GENERATION_JOURNAL
    try:
        if journal.is_file():
            plan = json.loads(journal.read_text())
            for tmp, name in plan["rename"].items():
                if (folder / tmp).is_file():
                    os.replace(folder / tmp, folder / name)
            for name in plan["remove"]:
                (folder / name).unlink(missing_ok=True)
            journal.unlink()
    except OSError as e:
        raise storage_error(e, f"committing files in {folder}") from None


def recover(folder: Path) -> None:
    """At the start of a writer (holding the folder's lock): complete a generation whose commit was cut
    short, then delete the temporary files killed runs left."""
    folder = Path(folder)
    _complete(folder)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def remove_temps(folder: Path, *names: str) -> None:
    """Delete the temporaries killed writers of `names` left in `folder` (call it holding the lock of
    the only process that writes those files)."""
    for name in names:
        for stale in Path(folder).glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def check_committed(folder: Path) -> None:
    """Refuse to read a folder whose last generation is half renamed into place."""
    if (Path(folder) / GENERATION_JOURNAL).is_file():
        raise InputError(f"{folder}: a write of its files was interrupted; run the command that made them "
                         "again (it completes the interrupted write first)")


# --------------------------------------------------------------------------------------------------
# Tar shards


class ShardWriter:
    """Write one tar shard: members are added in memory order and the tar appears atomically on close."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        try:
            self._tar = tarfile.open(self._tmp, "w")  # noqa: SIM115 - closed in close()/abort()
        except OSError as e:
            self._ctx.__exit__(type(e), e, None)
            raise storage_error(e, f"writing {self.path}") from None
        self.count = 0
        self.keys: list[str] = []

    def add(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: files maps extension ('jpg', 'json', 'png') to bytes."""
        try:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0  # deterministic shards
                self._tar.addfile(info, io.BytesIO(data))
        except OSError as e:
            self.abort()
            raise storage_error(e, f"writing {self.path}") from None
        self.count += 1
        self.keys.append(key)

    def close(self) -> None:
        """Finish the tar, rename it into place, then record what it holds (see `check_shard`)."""
        try:
            self._tar.close()
        except OSError as e:
            self.abort()
            raise storage_error(e, f"writing {self.path}") from None
        self._ctx.__exit__(None, None, None)
        write_json_atomic(shard_record(self.path),
                          {"size": self.path.stat().st_size, "members": len(self._tar.members),
                           "keys": self.keys})

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # a full disk fails the close too; the temporary goes anyway
            self._tar.close()
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def shard_record(path: Path) -> Path:
    """images-000001.tar -> .records/images-000001.tar.json: size, member count and keys as written."""
    path = Path(path)
    return path.parent / ".records" / (path.name + ".json")


def shard_part(path: Path) -> Path:
    """images-000001.tar -> .parts/images-000001.parquet: the rows its stage wrote for it (fetch's manifest
    rows, segment's statuses), merged into the dataset's table when the stage ends. Records and parts
    are hidden so that a shard folder holds only shards (what Hugging Face's webdataset loader reads)."""
    path = Path(path)
    return path.parent / ".parts" / (path.stem + ".parquet")


def migrate_shard_folder(folder: Path) -> None:
    """Move the records and parts an older geoloc kept beside the shards (and segment's parts/) into the
    hidden folders; call it holding the folder's writer lock."""
    folder = Path(folder)
    moves = [(p, shard_record(folder / p.name.removesuffix(".json"))) for p in folder.glob("*.tar.json")]
    moves += [(p, shard_part(folder / f"{p.stem}.tar")) for p in folder.glob("*-[0-9]*.parquet")]
    moves += [(p, shard_part(folder / f"{p.stem}.tar")) for p in folder.glob("parts/*.parquet")]
    try:
        for old, new in moves:
            new.parent.mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # moved by a --part run starting at the same time
                os.replace(old, new)
        if moves and (folder / "parts").is_dir() and not any((folder / "parts").iterdir()):
            (folder / "parts").rmdir()
    except OSError as e:
        raise storage_error(e, f"moving shard records in {folder}") from None


def remove_shard_temps(shards: list[Path]) -> None:
    """Delete the temporaries killed writers left for these shards, their parts and records. Other
    shards' are left alone: another `--part` process may be writing them right now."""
    stems: dict[Path, set[str]] = {}
    for shard in shards:
        stems.setdefault(Path(shard).parent, set()).add(Path(shard).stem)
    for folder, mine in stems.items():
        for sub in (folder, folder / ".parts", folder / ".records"):
            if not sub.is_dir():
                continue
            for tmp in sub.glob(".*.tmp"):  # atomic_path's ".<final name>.<random>.tmp"
                if tmp.name[1:].split(".", 1)[0] in mine:
                    tmp.unlink(missing_ok=True)


END_OF_ARCHIVE = 1024  # a tar ends with two zero blocks (Python pads the last record with zeros too)


def check_shard(path: Path) -> str | None:
    """Why the shard at `path` cannot be trusted, or None when it is intact. Cheap (a stat and two small
    reads): the size must be what was recorded when it was written and the archive must end with its
    end-of-archive blocks; a shard from before records were kept gets the second check only. Every
    reader of shards goes through it, and `shard_done` (the writers' rule) builds on it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < END_OF_ARCHIVE or size % 512:
            return f"{size} bytes, not a whole tar archive"
        record = _record_of(path)
        if record.is_file():
            want = json.loads(record.read_text()).get("size")
            if want != size:
                return f"{size} bytes, {want} when it was written"
        with open(path, "rb") as f:
            f.seek(size - END_OF_ARCHIVE)
            if f.read(END_OF_ARCHIVE).strip(b"\0"):
                return "no end-of-archive marker (cut short)"
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"unreadable: {e}"
    return None


def shard_done(path: Path) -> bool:
    """The one "shard done" rule of every stage that writes shards: the tar is intact (`check_shard`)
    and its part, written after it, exists."""
    return check_shard(path) is None and _part_of(Path(path)).is_file()


def _record_of(path: Path) -> Path:
    """The shard's record: in .records/, or beside the shard where an older geoloc kept it (until the next
    write moves it: `migrate_shard_folder`)."""
    return _found(shard_record(path), path.with_name(path.name + ".json"))


def _part_of(path: Path) -> Path:
    """The shard's part: in .parts/, or where an older geoloc kept it (beside the shard; segment: parts/)."""
    return _found(shard_part(path), path.with_suffix(".parquet"), path.parent / "parts" / (path.stem + ".parquet"))


def _found(path: Path, *legacy: Path) -> Path:
    return path if path.exists() else next((p for p in legacy if p.exists()), path)


def check_members(path: Path, members: int) -> None:
    """For a reader that has listed a shard's members anyway: the count must be the one recorded."""
    record = _record_of(Path(path))
    with contextlib.suppress(OSError, ValueError, KeyError):  # no record: a shard from before records
        want = json.loads(record.read_text())["members"]
        if want != members:
            raise InputError(f"shard {path} is damaged ({members} members, {want} when it was written): run the "
                             "stage that made it again")


def drop_damaged(path: Path) -> str | None:
    """When the shard exists but is damaged: delete it, its record and its part (so the stage makes
    them again) and return why; None otherwise."""
    path = Path(path)
    if not path.exists():
        return None
    why = check_shard(path)
    if why is not None:
        for p in (path, shard_record(path), shard_part(path)):
            Path(p).unlink(missing_ok=True)
    return why


def require_intact(path: Path) -> None:
    """For readers of shards (train, evaluate): a damaged shard is an error, never silently used."""
    why = check_shard(path)
    if why is not None and why != "missing":
        stage = "segment" if Path(path).name.startswith("seg-") else "fetch"
        raise InputError(f"shard {path} is damaged ({why}): run `geoloc {stage}` again to redo it")


def member_key(name: str) -> tuple[str, str]:
    """A tar member's (key, extension), as WebDataset splits them: "dir/000000012.jpg" -> ("000000012",
    "jpg"); everything after the base name's first dot is the extension ("x.seg.png" -> "seg.png")."""
    key, _, ext = name.rpartition("/")[2].partition(".")
    return key, ext


def iter_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for each sample of a tar shard, grouping consecutive members by key."""
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, ext = member_key(member.name)
                if key is not None and base != key:
                    yield key, files
                    files = {}
                key = base
                f = tar.extractfile(member)
                assert f is not None
                files[ext] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"cannot read shard {path}: {e}") from None
    if key is not None:
        yield key, files


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    return dict(iter_shard(path))


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of an inference checkpoint, without loading the weights (and without torch)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"model checkpoint {path} does not exist (train one with `geoloc train`, or pass --model)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get("geoloc")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise InputError(f"{path} is not a safetensors checkpoint: {e}") from None
    if raw is None:
        raise InputError(f"{path} has no geoloc metadata: not a geoloc inference checkpoint")
    doc = json.loads(raw)
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: checkpoint format {doc.get('format')} is not supported")
    return doc
