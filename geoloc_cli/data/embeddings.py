"""Cached embeddings: the frozen RGB branch's pooled feature of every photo, computed once by `geoloc embed`
and read by `train.source: embeddings` (heads trained in minutes instead of the backbone for days).

Layout under datasets/<name>/emb/ (one embedding shard per image shard, aligned by key):
  emb-NNNNNN.safetensors  tensor "embedding" (n, dim) float16 (with a segmentation branch, model.seg_channels
                          > 0: (n, 2 dim), the RGB feature then the class map's), rows in the image shard's key
                          order; metadata
                          "keys" (JSON list, one per row) and "failed" (JSON {key: error}: photos that did not
                          decode have no row). Each file appears atomically, so a finished shard is skipped on
                          the next run and a killed run continues where it stopped.
  embedder.json           what made them: backbone, img_size, overrides, weights (model.pretrained),
                          preprocessing (the backbone's data config), dim. Training refuses another model.
  embedder.safetensors    the backbone's weights (a segmentation branch's under "seg."): training embeds exactly
                          this backbone in its inference
                          checkpoint, so evaluate, predict and export see a photo as the embeddings did.

Shards are read and written with numpy + safetensors (torch only where the backbone's weights are handled);
the training stage's data.EmbeddingDataset is built on `gather`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from geoloc_cli.data.store import atomic_path, write_json_atomic
from geoloc_cli.errors import ConfigError, InputError

RECORD = "embedder.json"
WEIGHTS = "embedder.safetensors"
TENSOR = "embedding"


def emb_shard_for(image_shard: str) -> str:
    """images-000012.tar -> emb-000012.safetensors: embedding shards mirror image shards one to one."""
    return image_shard.replace("images-", "emb-", 1).replace(".tar", ".safetensors")


def embedder_record(cfg: Any) -> dict[str, Any]:
    """The part of the record the config decides (the model adds preprocess and dim)."""
    m = cfg.model
    record = {"backbone": m.backbone, "img_size": m.img_size, "overrides": dict(m.overrides),
              "pretrained": m.pretrained}
    if m.seg_channels:  # (records of RGB-only embeddings stay as they were)
        record["seg_channels"] = m.seg_channels
    return record


def read_record(emb_dir: Path) -> dict[str, Any] | None:
    path = Path(emb_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(emb_dir: Path, record: dict[str, Any], weights: dict[str, Any]) -> None:
    """Weights first, record last: a record on disk always has its weights."""
    from safetensors.torch import save_file

    with atomic_path(Path(emb_dir) / WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
    write_json_atomic(Path(emb_dir) / RECORD, record)


def mismatch(made: dict[str, Any], want: dict[str, Any]) -> str:
    """'' when `want` is what made the embeddings, else the differing keys as one line."""
    diff = [f"{k}: {made.get(k)!r} there, {want[k]!r} here" for k in want if not _same(k, made.get(k), want[k])]
    return "; ".join(diff)


def _same(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if key == "pretrained" and isinstance(a, str) and isinstance(b, str):
        with contextlib.suppress(OSError):  # one weights file spelled two ways (./x, an absolute path)
            return os.path.samefile(a, b)
    return False


def check_record(cfg: Any, emb_dir: Path, name: str) -> dict[str, Any]:
    """The record of a dataset's embeddings, refused when the config describes another backbone."""
    made = read_record(emb_dir)
    if made is None:
        raise InputError(f"train.source=embeddings: dataset {name!r} has no embeddings (run `geoloc embed {name}`)")
    diff = mismatch(made, embedder_record(cfg))
    if diff:
        raise ConfigError(f"{name}: its embeddings were made by another model ({diff}): set model.* as they were "
                          f"made, or delete {emb_dir} and run `geoloc embed {name}` again")
    return made


def branch_weights(model: Any) -> dict[str, Any]:
    """What embedder.safetensors holds: the RGB branch's state dict, and the segmentation branch's under "seg."."""
    weights = dict(model.rgb.state_dict())
    if model.seg is not None:
        weights |= {f"seg.{k}": v for k, v in model.seg.state_dict().items()}
    return weights


def load_branches(model: Any, emb_dir: Path, record: dict[str, Any]) -> None:
    """The recorded branches' weights and preprocessing into `model` (strict: the record already matched the
    config). Photos are then normalised as the embeddings' photos were, whatever timm's data config for the
    backbone says today or a checkpoint given as model.pretrained recorded."""
    weights = load_embedder(emb_dir)
    model.rgb.load_state_dict({k: v for k, v in weights.items() if not k.startswith("seg.")})
    if model.seg is not None:
        model.seg.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("seg.")})
    model.preprocess = {**model.preprocess, **record["preprocess"]}


def load_embedder(emb_dir: Path) -> dict[str, Any]:
    """The state dict of the backbone that made the embeddings."""
    from safetensors.torch import load_file

    path = Path(emb_dir) / WEIGHTS
    if not path.is_file():
        raise InputError(f"{path} is missing: run `geoloc embed` again")
    return load_file(str(path))


def write_shard(path: Path, keys: list[str], embedding: np.ndarray, failed: dict[str, str],
                image_shard_bytes: int) -> None:
    """`image_shard_bytes`: the size of the image shard embedded, so a shard fetched again later (new photos
    after --retry-failed) is seen to be newer than its embeddings (`shard_current`)."""
    from safetensors.numpy import save_file

    assert len(keys) == len(embedding), (len(keys), embedding.shape)
    meta = {"keys": json.dumps(keys), "failed": json.dumps(failed), "image_shard_bytes": str(image_shard_bytes)}
    with atomic_path(path) as tmp:
        save_file({TENSOR: np.ascontiguousarray(embedding, dtype=np.float16)}, str(tmp), metadata=meta)


def read_shard(path: Path, keys_only: bool = False) -> tuple[list[str], np.ndarray | None, dict[str, str]]:
    """(keys, (n, dim) float16 embeddings, failed keys) of one embedding shard; `keys_only` reads the header
    alone (embeddings None)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            emb = None if keys_only else f.get_tensor(TENSOR)
            return json.loads(meta["keys"]), emb, json.loads(meta.get("failed", "{}"))
    except Exception as e:  # noqa: BLE001 - OSError, KeyError, or safetensors' own type for a damaged header
        raise InputError(f"cannot read embedding shard {path}: {e}") from None


def shard_current(path: Path, image_shard: Path) -> bool:
    """Whether an embedding shard is whole (its header reads, and safetensors checks that it covers the file)
    and was made from the image shard as it is now."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            made_from = (f.metadata() or {}).get("image_shard_bytes")
    except Exception:  # noqa: BLE001 - a cut or garbled file fails in safetensors' own ways
        return False
    return made_from == str(image_shard.stat().st_size)


def gather(emb_dir: Path, keys_by_shard: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings of the given keys of each image shard, in that order, as one contiguous (m, dim) float16
    array, and a mask over the keys of those found (m of them; photos that did not decode have none; a key the
    shard does not know at all is an error). The
    array is allocated once and filled shard by shard: MP-16's is ~10 GB."""
    rows = []
    for shard, keys in keys_by_shard.items():
        path = Path(emb_dir) / emb_shard_for(shard)
        if not path.is_file():
            raise InputError(f"{path} is missing: run `geoloc embed` to finish the dataset's embeddings")
        embedded, _, failed = read_shard(path, keys_only=True)
        at = {k: i for i, k in enumerate(embedded)}
        unknown = [k for k in keys if k not in at and k not in failed]
        if unknown:  # the image shard changed since it was embedded (photos fetched again)
            raise InputError(f"{path} has no embedding of {len(unknown):,} photos of its image shard (e.g. key "
                             f"{unknown[0]}): the shard changed since it was embedded; run `geoloc embed` again")
        rows.append((path, np.array([at.get(k, -1) for k in keys], dtype=np.int64)))
    found = np.concatenate([idx >= 0 for _, idx in rows]) if rows else np.zeros(0, bool)
    out = np.zeros((0, 0), np.float16)
    start = 0
    for path, idx in rows:
        emb = read_shard(path)[1]
        assert emb is not None
        if not out.size:
            out = np.empty((int(found.sum()), emb.shape[1]), np.float16)
        take = emb[idx[idx >= 0]]
        out[start : start + len(take)] = take
        start += len(take)
    return out, found
