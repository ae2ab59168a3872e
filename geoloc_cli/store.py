"""The data root on disk: where each stage's files live, atomic writes, tar shards and manifests.

Layout (see DESIGN.md):
  <root>/meta/                                  metadata CSVs as published
  <root>/datasets/<name>/shards/images-NNNNNN.tar   <key>.jpg + <key>.json (WebDataset-compatible)
  <root>/datasets/<name>/shards/images-NNNNNN.parquet  per-shard manifest part (written after the tar)
  <root>/datasets/<name>/manifest.parquet       one row per requested item, with a status
  <root>/datasets/<name>/seg/seg-NNNNNN.tar     <key>.png class-index maps, same keys as the images
  <root>/datasets/<name>/emb/emb-NNNNNN.safetensors  fp16 backbone embeddings, same keys (see embeddings.py)
  <root>/datasets/<name>/index.parquet          training index written by `geoloc filter`
  <root>/partitions/<name>/cells_<tmin>_<tmax>.csv, labels.parquet
  <root>/runs/<run>/                            config.yaml, checkpoints, metrics.jsonl, eval/

Every file is written to a temporary name in the same directory and renamed into place, so a killed
process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas costs ~0.4 s to import; the torch-free predict path needs none of it
    import pandas as pd

from geoloc_cli.errors import InputError

OK = "ok"  # manifest status of a successfully stored item
CHECKPOINT_FORMAT = 1  # version of the inference checkpoint's metadata (model.save_inference_checkpoint)
_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass(frozen=True)
class DataRoot:
    path: Path

    @property
    def meta(self) -> Path:
        return self.path / "meta"

    def dataset(self, name: str) -> Path:
        return self.path / "datasets" / name

    def shards(self, name: str) -> Path:
        return self.dataset(name) / "shards"

    def seg(self, name: str) -> Path:
        return self.dataset(name) / "seg"

    def seg_maker(self, name: str) -> Path:
        """JSON naming what made the dataset's maps ({"model", "input_size"}, or {"model": "imported"})."""
        return self.seg(name) / "segmenter.json"

    def emb(self, name: str) -> Path:
        """Cached backbone embeddings (`geoloc embed`), with embedder.json naming what made them."""
        return self.dataset(name) / "emb"

    def manifest(self, name: str) -> Path:
        return self.dataset(name) / "manifest.parquet"

    def index(self, name: str) -> Path:
        return self.dataset(name) / "index.parquet"

    def partitions(self, name: str) -> Path:
        return self.path / "partitions" / name

    def run(self, name: str) -> Path:
        return self.path / "runs" / name

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; final files get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


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


class ShardWriter:
    """Write one tar shard: members are added in memory order and the tar appears atomically on close."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._tar = tarfile.open(self._tmp, "w")  # noqa: SIM115 - closed in close()/abort()
        self.count = 0

    def add(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: files maps extension ('jpg', 'json', 'png') to bytes."""
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # deterministic shards
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
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


def iter_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for each sample of a tar shard, grouping consecutive members by key."""
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, _, ext = member.name.rpartition("/")[2].partition(".")
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
        raise InputError(f"model checkpoint {path} does not exist")
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
