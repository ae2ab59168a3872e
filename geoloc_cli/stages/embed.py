"""`geoloc embed`: the frozen backbone's fp16 embedding of every photo, once, for `train.source: embeddings`.

The backbone is the one `train` would build from the same config: model.backbone at model.img_size with
model.overrides, weights from model.pretrained (timm's, a local weights file, or a trained geoloc
checkpoint's RGB branch). Photos get the evaluation view (centre crop by the backbone's own data config),
the same uint8 pixels GeoModel normalises on the device; batches run under bf16 autocast on a GPU
(`embed.precision`), and the pooled features are stored as fp16. For the layout (one embedding shard per
image shard, aligned by key; embedder.json + embedder.safetensors recording what made them) see
geoloc_cli/data/embeddings.py.

Resumable and atomic like segment: each shard file appears whole, finished shards are skipped, and a run
on a dataset whose embeddings were begun by another model is refused (delete emb/ to start over); a rerun
continues with the recorded weights, never a fresh random initialisation. `runtime.gpus` splits the
shards across GPUs (shard i -> GPU i % n, one process each).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geoloc_cli import console
from geoloc_cli.config import Config
from geoloc_cli.data.embeddings import (
    branch_weights,
    emb_shard_for,
    embedder_record,
    load_branches,
    mismatch,
    read_record,
    shard_current,
    write_record,
    write_shard,
)
from geoloc_cli.data.store import DataRoot, iter_shard, locked, recover, seg_shard_for
from geoloc_cli.dist import check_devices, loader_workers, resolve_device, run_on_devices
from geoloc_cli.errors import ConfigError, InputError


@dataclass(frozen=True)
class Job:
    """One image shard to turn into one embedding shard."""

    image_shard: Path
    emb_shard: Path
    seg_shard: Path | None = None  # its segmentation maps, when the model has a seg branch


def run(cfg: Config, datasets: list[str] | None = None) -> None:
    root = DataRoot(cfg.root)
    check_devices(cfg.runtime.gpus, cfg.runtime.device, "embed")
    devices = [f"cuda:{g}" for g in cfg.runtime.gpus] or [str(resolve_device(cfg.runtime.device))]
    threads = max(1, loader_workers(cfg.runtime.num_workers, devices[0], len(devices)))
    model = None
    for name in datasets or [cfg.train.dataset]:
        with locked(root.emb(name), "embed"):  # one writer per dataset's embeddings
            model = _embed_dataset(cfg, root, name, model, devices, threads)


def _embed_dataset(cfg: Config, root: DataRoot, name: str, model: Any, devices: list[str], threads: int):
    """One dataset's embeddings (holding its lock); returns the embedder for the next dataset."""
    recover(root.emb(name))  # temporaries a killed run left
    model = _claim(cfg, root.emb(name), name, model)
    jobs = _pending(root, name, model.seg is not None)
    total = sum(1 for j in jobs for _ in _jpegs(j.image_shard, keys_only=True))
    console.info(f"embed {name}: {len(jobs)} shards to do ({total:,} images) with {cfg.model.backbone} "
                 f"({model.rgb.num_features}-d) on {', '.join(devices)}")
    start = time.monotonic()
    if jobs:
        work = functools.partial(embed_shards, model=model.cpu(), batch_size=cfg.embed.batch_size,
                                 precision=cfg.embed.precision, threads=threads)
        with console.progress(f"embed {name}", total, unit="img") as task:
            run_on_devices(work, jobs, devices, task.advance)
    seconds = time.monotonic() - start
    console.info(f"embed {name}: {total:,} images in {seconds:.1f} s ({total / max(seconds, 1e-9):,.1f} img/s) "
                 f"into {root.emb(name)}")
    return model


def _claim(cfg: Config, emb_dir: Path, name: str, model: Any):
    """The embedder for this dataset: the recorded one when its record matches the config (a rerun goes on
    with the very weights it began with, even a random initialisation), else `model` or the configured
    backbone, recorded now. Refused when another model made some of the dataset's embeddings already."""
    from geoloc_cli.model.network import build_model, check_weights_file, model_spec, require_pretrained

    if cfg.model.pretrained not in ("auto", "none", ""):
        check_weights_file(cfg.model.pretrained)  # (before the record's comparison names it "another model")
    want = embedder_record(cfg)
    made = read_record(emb_dir)
    begun = any(emb_dir.glob("emb-*.safetensors"))
    if made is not None and mismatch(made, want):
        if begun:
            raise ConfigError(f"{name}: its embeddings so far were made by another model ({mismatch(made, want)}): "
                              f"set model.* as they were made to finish them, or delete {emb_dir} to start over")
        made = None
    if model is None:
        model = build_model(model_spec(cfg, {}), "none" if made else cfg.model.pretrained)
        require_pretrained(model, "embeddings of a random, frozen backbone would mean nothing")
    if made:
        load_branches(model, emb_dir, made)  # (its preprocessing too: a rerun goes on as it began)
    record = {**want, "preprocess": model.data_config(), "dim": model.rgb.num_features}
    if made != record:
        write_record(emb_dir, record, branch_weights(model))
    return model.eval()


def _pending(root: DataRoot, name: str, with_seg: bool) -> list[Job]:
    shards = root.image_shards(name)
    jobs = [Job(s, root.emb(name) / emb_shard_for(s.name), root.seg(name) / seg_shard_for(s.name) if with_seg
                else None) for s in shards]
    unmapped = [j.seg_shard for j in jobs if j.seg_shard is not None and not j.seg_shard.is_file()]
    if unmapped:
        raise InputError(f"model.seg_channels={with_seg and 'set'}: {unmapped[0]} is missing: run `geoloc segment "
                         f"{name}` first (the seg branch embeds the maps)")
    stale = [j for j in jobs if j.emb_shard.is_file() and not shard_current(j.emb_shard, j.image_shard)]
    if stale:
        console.warn(f"embed {name}: {len(stale)} embedding shard(s) are damaged or older than their image shard "
                     f"(e.g. {stale[0].emb_shard.name}): made again")
    return [j for j in jobs if not j.emb_shard.is_file() or j in stale]


def _jpegs(shard: Path, keys_only: bool = False):
    """(key, JPEG bytes) of a shard's photos, in shard order (bytes None with keys_only: headers only)."""
    if keys_only:
        from geoloc_cli.data.dataset import tar_offsets

        return [(k, None) for k, files in tar_offsets(shard).items() if "jpg" in files]
    return [(k, files["jpg"]) for k, files in iter_shard(shard) if "jpg" in files]


def embed_shards(jobs: list[Job], device: str, report: Callable[[int], Any], model: Any, batch_size: int,
                 precision: str, threads: int) -> None:
    """Embed each job's photos into its embedding shard; report(n) after every batch of n photos."""
    import torch

    from geoloc_cli.dist import amp_dtype

    if device.startswith("cuda"):  # this worker's GPU hosts its CUDA context, not GPU 0
        torch.cuda.set_device(device)
    model = model.to(device).eval()
    embed = functools.partial(_embed, model, device=device, amp=amp_dtype(precision, device))
    decode = functools.partial(_decode, size=model.spec.img_size, pre=model.data_config())
    with ThreadPoolExecutor(threads) as pool:
        for job in jobs:
            samples = _jpegs(job.image_shard)
            maps = {k: f["png"] for k, f in iter_shard(job.seg_shard) if "png" in f} if job.seg_shard else {}
            batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
            keys, parts, failed = [], [], {}

            def submit(batch, maps=maps):
                return [pool.submit(decode, data, maps.get(key)) for key, data in batch]

            ahead = submit(batches[0]) if batches else []
            for i, batch in enumerate(batches):
                decoded = [f.result() for f in ahead]
                if i + 1 < len(batches):  # decode the next batch while the device works on this one
                    ahead = submit(batches[i + 1])
                good = [(key, x) for (key, _), (x, _) in zip(batch, decoded, strict=True) if x is not None]
                failed |= {key: err for (key, _), (x, err) in zip(batch, decoded, strict=True) if x is None}
                if good:
                    keys += [k for k, _ in good]
                    parts.append(embed(np.stack([x[0] for _, x in good]), np.stack([x[1] for _, x in good])))
                report(len(batch))
            empty = np.zeros((0, model.rgb.num_features * (2 if model.seg is not None else 1)), np.float16)
            write_shard(job.emb_shard, keys, np.concatenate(parts) if parts else empty, failed,
                        job.image_shard.stat().st_size)


def _decode(data: bytes, seg_png: bytes | None, size: int, pre: dict[str, Any],
            ) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """((uint8 (3, S, S) evaluation view, uint8 (S, S) class map view: all "no map" without one), '') or
    (None, why it did not decode): the views training's validation and evaluate take."""
    import io

    from PIL import Image

    from geoloc_cli.data.dataset import DECODE_ERRORS, open_image, transform

    try:
        seg = Image.open(io.BytesIO(seg_png)) if seg_png is not None else None
        x, s = transform(open_image(data, size), seg, size, pre, False, None)
        return (x.numpy(), s.numpy()), ""
    except DECODE_ERRORS as e:
        return None, f"{type(e).__name__}: {e}"


def _embed(model: Any, pixels: np.ndarray, maps: np.ndarray, device: str, amp: Any) -> np.ndarray:
    """uint8 photos (and class maps) -> (n, dim) float16 pooled features ((n, 2 dim) with a seg branch:
    the RGB feature, then the map's)."""
    import torch

    from geoloc_cli.model.segmentation import encode_seg_torch

    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=amp or torch.float32,
                                                enabled=amp is not None):
        f = model.embed(torch.from_numpy(pixels).to(device))
        if model.seg is not None:
            seg = encode_seg_torch(torch.from_numpy(maps).to(device), model.spec.seg_channels, amp)
            f = torch.cat([f, model.seg(seg)], dim=-1)
        return f.float().cpu().numpy().astype(np.float16)
