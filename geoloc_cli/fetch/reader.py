"""The reader side of fetch: URL lists streamed in shard-sized chunks, the metadata indexed by id
(*_places365.csv through places365.read_chunks), and the members of image archives (zip, tar, tar.gz,
byte-split tar parts) streamed without unpacking."""

from __future__ import annotations

import io
import re
import tarfile
import urllib.parse
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from geoloc_cli import console
from geoloc_cli.data import places365
from geoloc_cli.errors import InputError

# Flickr file names: <id>_<secret>[_<size>].<ext>; the size part is what --size-suffix sets.
_FLICKR_NAME = re.compile(r"^(?P<stem>\d+_[0-9a-f]+)(?P<size>_[a-z0-9]{1,2})?(?P<ext>\.[A-Za-z]+)$")


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
INDEXED_TYPES = {"LAT": pa.float64(), "LON": pa.float64(),
                 **{c: pa.type_for_alias(t) for c, t in places365.META_TYPES.items()}}


class MetaIndex:
    """Metadata rows looked up by IMG_ID without a Python object per row.

    IDs are kept as sorted 64-bit hashes with the row order, columns as numpy / Arrow arrays; a chunk
    of ids is resolved with one vectorised searchsorted. 4.7 M rows take about 250 MB.
    """

    def __init__(self, path: Path) -> None:
        hashes, cols = [], {c: [] for c in INDEXED_TYPES}
        try:
            for chunk in places365.read_chunks(path):
                hashes.append(_hash_ids(chunk["IMG_ID"].to_numpy()))
                for c in cols:  # as the manifest stores them: labels with gaps read as floats
                    kind = INDEXED_TYPES[c]
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
        self.columns = {c: pa.chunked_array(v, INDEXED_TYPES[c]).combine_chunks() for c, v in cols.items()}

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

