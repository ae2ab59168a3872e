"""Reading samples for training and inference: tar shards by key, joint photo/seg-map transforms.

Samples are read by random access into the tar shards (each member's byte offset is indexed once per
shard), so a map-style dataset with a deterministic sampler gives an exact split across ranks and
workers and an exact mid-epoch resume. Augmentation randomness is derived from (seed, epoch, index),
so it does not depend on which worker loads a sample. The per-epoch order is shard-local (shards
permuted, samples shuffled within windows of a few shards, see EpochSampler): each reader streams
through a few files at a time, as a shuffle buffer over a stream would, with exact splits kept.

Segmentation maps travel as uint8 class indices and are colour-coded (3 channels) or one-hot encoded
(150 channels) on the device, batched, by `segmentation.encode_seg_torch` - 150 float channels per
pixel are far too large to move through the data loader.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from geoloc_cli.data.store import check_members, member_key, require_intact, seg_shard_for
from geoloc_cli.errors import InputError
from geoloc_cli.inference.geolocate import crop_boxes, view, views

DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # a photo that does not decode


def tar_offsets(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """{key: {ext: (data offset, size)}} for one tar shard (reads headers only)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    require_intact(path)  # a shard cut short would silently lose samples or change the numbers
    members = 0
    try:
        with tarfile.open(path, "r") as tar:
            for m in tar:
                if m.isfile():
                    key, ext = member_key(m.name)
                    out.setdefault(key, {})[ext] = (m.offset_data, m.size)
                    members += 1
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"cannot read shard {path}: {e}") from None
    check_members(path, members)
    return out


class ShardReader:
    """Random access to members of many tar shards; file handles are opened lazily per process and
    the least recently used are closed beyond `max_open` (MP-16 has thousands of image + map shards,
    more than the usual limit of 1024 open files; the shard-local order needs only a few at a time)."""

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self._fds: OrderedDict[str, int] = OrderedDict()

    def read(self, path: str, offset: int, size: int) -> bytes:
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        else:
            self._fds.move_to_end(path)
        return os.pread(fd, size, offset)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open, "_fds": OrderedDict()}  # descriptors stay in their process


def locate(rows: pd.DataFrame, shards_dir: Path, seg_dir: Path | None) -> pd.DataFrame:
    """Add byte locations (img_off, img_len, seg_off, seg_len) to rows with columns key, shard.

    A row whose image is missing from its shard is an error (the manifest and shards disagree); a
    missing segmentation map is allowed (seg_len = 0: the segmenter could not read that image).
    """
    rows = rows.reset_index(drop=True).copy()
    cols = {c: np.zeros(len(rows), dtype=np.int64) for c in ("img_off", "img_len", "seg_off", "seg_len")}
    for shard, idx in rows.groupby("shard").indices.items():
        img = tar_offsets(shards_dir / shard)
        seg = tar_offsets(seg_dir / seg_shard_for(shard)) if seg_dir is not None else {}
        for i in idx:
            key = rows.at[i, "key"]
            if key not in img or "jpg" not in img[key]:
                raise InputError(f"{shards_dir / shard}: item {key} listed in the manifest is missing")
            cols["img_off"][i], cols["img_len"][i] = img[key]["jpg"]
            if key in seg and "png" in seg[key]:
                cols["seg_off"][i], cols["seg_len"][i] = seg[key]["png"]
    return rows.assign(**cols)


def crop_box(w: int, h: int, size: int, train: bool, rng: np.random.Generator | None,
             crop_pct: float = 1.0) -> tuple[tuple[float, float, float, float], bool]:
    """(crop box in pixel coordinates, horizontal flip) - shared by the photo and its segmentation map."""
    if not train:
        return crop_boxes(w, h, "center", crop_pct)[0]
    assert rng is not None
    for _ in range(10):  # RandomResizedCrop(scale=(0.35, 1), ratio=(3/4, 4/3))
        area = w * h * rng.uniform(0.35, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if cw <= w and ch <= h:
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return (x0, y0, x0 + cw, y0 + ch), bool(rng.random() < 0.5)
    side = min(w, h)
    return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2), bool(rng.random() < 0.5)


def transform(img: Image.Image, seg: Image.Image | None, size: int, pre: dict[str, Any], train: bool,
              rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop/resize/flip the photo and its map with the same geometry.

    Returns (uint8 image (3,S,S), uint8 class map (S,S); all SEG_IGNORE when there is no map). Photos
    travel as uint8 (4x less shared memory and host-to-device traffic than floats) and GeoModel
    normalises them on its device.
    """
    box, flip = crop_box(*img.size, size, train, rng, pre.get("crop_pct", 1.0))
    x, s = view(img, seg, size, pre, box, flip, raw=True)  # the same code evaluation and predict use
    return torch.from_numpy(x), torch.from_numpy(s)


def open_image(data: bytes, size_hint: int | None = None) -> Image.Image:
    """Decode a photo to RGB; JPEGs are decoded at reduced scale when much larger than needed."""
    img = Image.open(io.BytesIO(data))
    if size_hint and img.format == "JPEG":
        img.draft("RGB", (size_hint, size_hint))
    return img.convert("RGB")


class GeoDataset(torch.utils.data.Dataset):
    """Samples from located rows: image, seg map, targets per head (-1 = unknown), lat, lon. `crops`
    other than center (evaluation only): every test-time view, image (K,3,S,S) and seg (K,S,S)."""

    def __init__(self, rows: pd.DataFrame, shards_dir: Path, seg_dir: Path | None, size: int,
                 pre: dict[str, Any], targets: dict[str, str], train: bool, seed: int = 0,
                 crops: str = "center") -> None:
        assert crops == "center" or not train, "test-time crops are for evaluation"
        self.rows, self.crops = rows, crops
        self.shards_dir, self.seg_dir = str(shards_dir), str(seg_dir) if seg_dir else None
        self.size, self.pre, self.train, self.seed = size, pre, train, seed
        # head name -> column of rows; a missing column or value (no --meta at fetch) is -1, unknown
        self.targets = {h: rows[c].fillna(-1).to_numpy(np.int64) if c in rows else np.full(len(rows), -1)
                        for h, c in targets.items()}
        self.epoch = 0
        self.reader = ShardReader()

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows.iloc[i]
        data = self.reader.read(os.path.join(self.shards_dir, r["shard"]), int(r["img_off"]), int(r["img_len"]))
        img = open_image(data, self.size)
        seg = None
        if self.seg_dir is not None and r["seg_len"] > 0:
            seg_path = os.path.join(self.seg_dir, seg_shard_for(r["shard"]))
            seg = Image.open(io.BytesIO(self.reader.read(seg_path, int(r["seg_off"]), int(r["seg_len"]))))
        if self.crops == "center":
            rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
            x, s = transform(img, seg, self.size, self.pre, self.train, rng)
        else:  # uint8 as well: the model normalises
            x, s = (torch.from_numpy(a) for a in views(img, seg, self.size, self.pre, self.crops, raw=True))
        return {
            "image": x, "seg": s, "index": i,
            "targets": {h: int(t[i]) for h, t in self.targets.items()},
            "lat": float(r["lat"]), "lon": float(r["lon"]),
        }


class EmbeddingDataset(torch.utils.data.Dataset):
    """Samples from cached embeddings (`geoloc embed`): one contiguous (n, dim) float16 array in memory,
    so a batch is one fancy index (`__getitems__`, which the DataLoader calls with a whole batch), not n
    JPEG decodes. Batches look like GeoDataset's, with the embedding under "image" (the training step
    feeds it to the heads)."""

    def __init__(self, embedding: torch.Tensor, targets: dict[str, torch.Tensor], lat: torch.Tensor,
                 lon: torch.Tensor) -> None:
        self.embedding, self.targets, self.lat, self.lon = embedding, targets, lat, lon
        self.dropped = 0

    @classmethod
    def from_shards(cls, rows: pd.DataFrame, emb_dir: Path, targets: dict[str, str]) -> EmbeddingDataset:
        """The index rows' embeddings, shard by shard; rows whose photo did not decode at embedding time are
        left out (counted in `dropped`)."""
        from geoloc_cli.data.embeddings import gather

        rows = rows.sort_values("shard", kind="stable").reset_index(drop=True)  # shard by shard, as stored
        groups = rows.groupby("shard", sort=False).indices
        emb, found = gather(emb_dir, {shard: rows["key"].iloc[idx].tolist() for shard, idx in groups.items()})
        rows = rows[found].reset_index(drop=True)
        ds = cls(torch.from_numpy(emb),
                 {h: torch.tensor(rows[c].fillna(-1).to_numpy(np.int64)) if c in rows
                  else torch.full((len(rows),), -1) for h, c in targets.items()},
                 torch.tensor(rows["lat"].to_numpy(np.float64)), torch.tensor(rows["lon"].to_numpy(np.float64)))
        ds.dropped = int((~found).sum())
        return ds

    def __len__(self) -> int:
        return len(self.embedding)

    def set_epoch(self, epoch: int) -> None:  # no augmentation: the embeddings are fixed
        pass

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        i = torch.as_tensor(indices)
        return {"image": self.embedding[i], "seg": torch.zeros(0), "index": i,
                "targets": {h: t[i] for h, t in self.targets.items()}, "lat": self.lat[i], "lon": self.lon[i]}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])

    @staticmethod
    def collate_fn(batch: dict[str, Any]) -> dict[str, Any]:
        return batch  # __getitems__ returns whole batches


class EpochSampler(torch.utils.data.Sampler[int]):
    """Deterministic per-epoch order split across ranks: rank r takes every world-th index.

    With `groups` (each sample's shard), the order is shard-local: the shards are permuted, then the
    samples of each window of `window` consecutive shards are shuffled together, so the readers stream
    through a few files at a time (a shuffle buffer of `window` shards) while the order stays a pure
    function of (seed, epoch). Every rank gets the same number of samples (the tail that does not
    divide evenly is dropped when shuffling, so no sample is seen twice in an epoch); `start` skips
    already-consumed samples for an exact mid-epoch resume.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 groups: np.ndarray | None = None, window: int = 1) -> None:
        """`window`: shards mixed together (train.shuffle_window_shards); only with `groups`."""
        assert 0 <= rank < world and window > 0
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.window = window
        self.epoch, self.start = 0, 0
        self._members: list[np.ndarray] | None = None
        if groups is not None:  # sample indices of each group, in index order
            assert len(groups) == n
            _, inv = np.unique(np.asarray(groups), return_inverse=True)
            by_group = np.argsort(inv, kind="stable")
            bounds = np.searchsorted(inv[by_group], np.arange(inv.max(initial=-1) + 2))
            self._members = [by_group[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self._cache: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> np.ndarray:
        """The whole epoch's order, before the rank split."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self._members is None:
            return rng.permutation(self.n)
        shards = rng.permutation(len(self._members))
        parts = []
        for w in range(0, len(shards), self.window):
            part = np.concatenate([self._members[g] for g in shards[w:w + self.window]])
            rng.shuffle(part)
            parts.append(part)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def indices(self) -> np.ndarray:
        """This rank's indices for the current epoch (from the epoch's start)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        if self.shuffle:
            order = self._order()
            order = order[: self.n - self.n % self.world]
        else:  # evaluation: every sample exactly once; ranks may differ by one
            order = np.arange(self.n)
        mine = order[self.rank :: self.world]
        self._cache = (self.epoch, mine)
        return mine

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :].tolist())

    def __len__(self) -> int:
        return max(len(self.indices()) - self.start, 0)
