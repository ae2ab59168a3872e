"""train: the multi-task ViT on geo-cell and scene labels, on one device or many (DDP).

`launch` checks everything that can be checked before heavy work, then either trains in this process
or starts one process per GPU (or per `runtime.nproc` CPU process, gloo) with torch.distributed's
elastic launcher, the engine behind torchrun; under torchrun it just trains. Only rank 0 prints and
writes. Outputs in runs/<run>/: config.yaml, metrics.jsonl, resume.pt (optimizer, scheduler, step,
RNG; written atomically every checkpoint_every steps and at each epoch end), last.safetensors and
model.safetensors (best validation accuracy at 2500 km, hierarchical) as inference checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc_cli import config as cfgmod
from geoloc_cli import console
from geoloc_cli.config import Config
from geoloc_cli.errors import ConfigError, InputError
from geoloc_cli.store import OK, DataRoot, atomic_path, read_parquet, write_text_atomic

SCENE_COLUMNS = {3: "S3_Label", 16: "S16_Label", 365: "S365_Label"}


@dataclass
class Plan:
    """What a run needs, checked before any process starts."""

    root: DataRoot
    run_dir: Path
    train_rows: pd.DataFrame
    val_rows: pd.DataFrame | None
    nproc: int


def _check(cfg: Config, nnodes: int) -> Plan:
    from geoloc_cli.partitioning import load_partitions

    root = DataRoot(cfg.root)
    tables = load_partitions(root.partitions(cfg.partition.dataset))
    missing = [p for p in cfg.model.partitionings if p not in tables]
    if missing:
        raise InputError(f"partitionings {missing} not built: run `geoloc partition --cells all`")
    name = cfg.train.dataset
    rows = read_parquet(root.index(name), f"training index of {name!r}", f"run `geoloc filter {name}`")
    if cfg.model.seg_channels and not _has_seg(root, name, rows):
        raise InputError(f"model.seg_channels={cfg.model.seg_channels} but dataset {name!r} has no "
                         f"segmentation maps: run `geoloc segment {name}` or set model.seg_channels=0")
    scene_col = SCENE_COLUMNS[cfg.model.scene_classes]
    if scene_col not in rows.columns:
        raise InputError(f"the training index has no {scene_col} column for the scene head: "
                         "fetch with --meta *_places365.csv")
    nproc = len(cfg.runtime.gpus) or max(cfg.runtime.nproc, 1)
    world = nproc * nnodes
    if cfg.train.batch_size % (world * cfg.train.grad_accum):
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by "
                          f"{world} processes x {cfg.train.grad_accum} accumulation steps")
    if len(rows) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} exceeds the {len(rows)} training images")
    val = None
    if cfg.train.val_dataset:
        v = cfg.train.val_dataset
        m = read_parquet(root.manifest(v), f"manifest of validation dataset {v!r}", f"run `geoloc fetch {v}`")
        val = m[m["status"] == OK].reset_index(drop=True)
        if cfg.model.seg_channels and not _has_seg(root, v, val):
            raise InputError(f"validation dataset {v!r} has no segmentation maps: run `geoloc segment {v}`")
    return Plan(root, root.run(cfg.train.run), rows, val, nproc)


def _has_seg(root: DataRoot, name: str, rows: pd.DataFrame) -> bool:
    from geoloc_cli.store import seg_shard_for

    return all((root.seg(name) / seg_shard_for(s)).is_file() for s in rows["shard"].unique())


def launch(cfg: Config, resume: bool = False, nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int = 29500) -> list[dict[str, Any]]:
    """Train in this process or in one process per GPU / `runtime.nproc`; returns each local rank's
    summary (history, parameter checksum), in rank order."""
    plan = _check(cfg, nnodes)
    if resume and not (plan.run_dir / "resume.pt").is_file():
        raise InputError(f"--resume: no resume state in {plan.run_dir} (resume.pt)")
    if "LOCAL_RANK" in os.environ or (plan.nproc == 1 and nnodes == 1):
        return [train(cfg, resume)]  # single process, or already started by torchrun
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if cfg.runtime.gpus:  # local rank i drives the i-th listed GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, cfg.runtime.gpus))
    lc = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=plan.nproc, run_id=f"geoloc-{cfg.train.run}",
        rdzv_backend="static", rdzv_endpoint=f"{master_addr}:{master_port}",
        rdzv_configs={"rank": node_rank}, max_restarts=0, monitor_interval=0.5, start_method="spawn",
    )
    results = elastic_launch(lc, _entry)(cfgmod.to_dict(cfg), resume)
    return [results[r] for r in sorted(results)]


def _entry(cfg_dict: dict[str, Any], resume: bool) -> dict[str, Any]:
    return train(cfgmod.from_dict(cfg_dict), resume)


# ------------------------------------------------------------------------------------------ training


def _targets(cfg: Config) -> dict[str, str]:
    """Head name -> column of the index."""
    return {**{p: p for p in cfg.model.partitionings}, "scene": SCENE_COLUMNS[cfg.model.scene_classes]}


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def _cells(cfg: Config, root: DataRoot):
    from geoloc_cli.inference import CellSet
    from geoloc_cli.partitioning import build_hierarchy, load_partitions

    tables = load_partitions(root.partitions(cfg.partition.dataset))
    # coarse to fine by number of cells: the hierarchy is anchored on the finest partitioning
    order = sorted(cfg.model.partitionings, key=lambda p: len(tables[p]))
    hierarchy = build_hierarchy(tables, order)
    return CellSet.from_tables({p: tables[p] for p in order}, {p: hierarchy[p] for p in order[:-1]})


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from geoloc_cli import dist
    from geoloc_cli.data import EpochSampler, GeoDataset, collate, locate
    from geoloc_cli.dist import amp_dtype
    from geoloc_cli.model import ModelSpec, build_model

    info = dist.setup(cfg.runtime.device)
    if info.device.type == "cpu":
        dist.limit_cpu_threads(cfg.runtime.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        plan = _check(cfg, 1)
        torch.manual_seed(cfg.runtime.seed)
        cells = _cells(cfg, plan.root)
        heads = {p: len(cells.hex_id[p]) for p in cfg.model.partitionings} | {"scene": cfg.model.scene_classes}
        spec = ModelSpec(cfg.model.backbone, cfg.model.img_size, cfg.model.seg_channels, cfg.model.fusion,
                         heads, dict(cfg.model.overrides))
        model = build_model(spec, cfg.model.pretrained).to(info.device)
        pre = model.data_config()
        seg_dir = plan.root.seg(cfg.train.dataset) if cfg.model.seg_channels else None
        rows = locate(plan.train_rows, plan.root.shards(cfg.train.dataset), seg_dir)
        ds = GeoDataset(rows, plan.root.shards(cfg.train.dataset), seg_dir, spec.img_size, pre,
                        _targets(cfg), train=cfg.train.augment, seed=cfg.runtime.seed)
        local_batch = cfg.train.batch_size // info.world
        micro = local_batch // cfg.train.grad_accum
        sampler = EpochSampler(len(ds), info.rank, info.world, shuffle=True, seed=cfg.runtime.seed)
        steps_per_epoch = len(sampler.indices()) // local_batch
        total = steps_per_epoch * cfg.train.epochs
        ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
            if info.world > 1 else model
        fused = info.device.type == "cuda"
        if cfg.train.optimizer == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                    fused=fused)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9,
                                  weight_decay=cfg.train.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _lr_lambda(total, int(cfg.train.warmup_epochs * steps_per_epoch)))
        amp = amp_dtype(cfg.train.precision, info.device)
        scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
        weights = {h: cfg.train.loss_weights.get(h, 0.0) for h in heads}
        state = {"step": 0, "epoch": 0, "best": float("-inf")}
        if resume:
            state = _load_resume(plan.run_dir / "resume.pt", model, opt, sched, scaler)
        if info.main:
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(plan.run_dir / "config.yaml", cfgmod.dump_yaml(cfg))
            console.info(f"training {sum(p.numel() for p in model.parameters()):,} parameters on "
                         f"{info.world} x {info.device.type}, {len(ds):,} images, {steps_per_epoch} steps/epoch")
        val_loader = _val_loader(cfg, plan, info, pre) if plan.val_rows is not None else None
        history = []
        for epoch in range(state["epoch"], cfg.train.epochs):
            start_batch = state["step"] - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            sampler.set_epoch(epoch, start_batch * local_batch)
            ds.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                ds, batch_size=local_batch, sampler=sampler, num_workers=cfg.runtime.num_workers,
                collate_fn=collate, drop_last=True, pin_memory=info.device.type == "cuda",
                persistent_workers=False, prefetch_factor=4 if cfg.runtime.num_workers else None)
            ddp.train()
            sums: dict[str, float] = {}
            t0, seen = time.perf_counter(), 0
            with console.progress(f"epoch {epoch + 1}/{cfg.train.epochs}", steps_per_epoch - start_batch,
                                  unit="step", loss="-", lr="-", img_s="-") as bar:
                for batch in loader:
                    losses = _step(ddp, opt, sched, scaler, batch, micro, weights, amp, info.device,
                                   cfg.model.seg_channels, cfg.train.grad_clip)
                    state["step"] += 1
                    seen += local_batch * info.world
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v
                    bar.advance(1, loss=f"{losses['loss']:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
                    if state["step"] % cfg.train.checkpoint_every == 0:
                        _save_resume(info, plan.run_dir, model, opt, sched, scaler, state, epoch)
            n_steps = max(steps_per_epoch - start_batch, 1)
            sums = {k: float(np.mean([s[k] for s in dist.gather(sums)])) for k in sums}  # mean over ranks
            record = {"epoch": epoch + 1, "step": state["step"],
                      **{f"train_{k}": v / n_steps for k, v in sums.items()},
                      "images_per_s": seen / (time.perf_counter() - t0)}
            if val_loader is not None:
                record.update(_validate(model, val_loader, cells, cfg, info, amp))
            history.append(record)
            score = record.get("val_hierarchical_acc_2500km", -record.get("train_loss", 0.0))
            is_best = score > state["best"]
            state["best"] = max(score, state["best"])
            _save_resume(info, plan.run_dir, model, opt, sched, scaler, state, epoch + 1)
            if info.main:
                _write_epoch(plan.run_dir, record, model, cells, cfg, is_best)
        dist.barrier()
        param_sum = float(sum(p.detach().double().sum() for p in model.parameters()))
        return {"rank": info.rank, "run_dir": str(plan.run_dir), "history": history, "param_sum": param_sum}
    finally:
        dist.teardown()


def _step(ddp, opt, sched, scaler, batch, micro: int, weights: dict[str, float], amp, device, seg_channels: int,
          grad_clip: float) -> dict[str, float]:
    """One optimizer step over a local batch, in `len(batch) / micro` accumulation chunks."""
    import torch
    import torch.nn.functional as F

    from geoloc_cli.segmentation import encode_seg_torch

    n = batch["image"].shape[0]
    chunks = range(0, n, micro)
    totals: dict[str, float] = {}
    opt.zero_grad(set_to_none=True)
    for j, s in enumerate(chunks):
        image = batch["image"][s:s + micro].to(device, non_blocking=True)
        seg = encode_seg_torch(batch["seg"][s:s + micro].to(device, non_blocking=True), seg_channels) \
            if seg_channels else None
        # DDP: sync gradients only on the last micro-batch
        sync = ddp.no_sync() if hasattr(ddp, "no_sync") and j < len(chunks) - 1 else contextlib.nullcontext()
        with sync, torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = ddp(image, seg)
            loss = torch.zeros((), device=device)
            for h, w in weights.items():
                t = batch["targets"][h][s:s + micro].to(device)
                lh = F.cross_entropy(logits[h].float(), t, ignore_index=-1)
                loss = loss + w * lh
                totals[f"loss_{h}"] = totals.get(f"loss_{h}", 0.0) + lh.item() / len(chunks)
            scaler.scale(loss / len(chunks)).backward()
        totals["loss"] = totals.get("loss", 0.0) + loss.item() / len(chunks)
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    return totals


def _val_loader(cfg: Config, plan: Plan, info, pre: dict[str, Any]):
    import torch

    from geoloc_cli.data import EpochSampler, GeoDataset, collate, locate

    v = cfg.train.val_dataset
    seg_dir = plan.root.seg(v) if cfg.model.seg_channels else None
    rows = locate(plan.val_rows, plan.root.shards(v), seg_dir)
    ds = GeoDataset(rows, plan.root.shards(v), seg_dir, cfg.model.img_size, pre,
                    {"scene": SCENE_COLUMNS[cfg.model.scene_classes]}, train=False)
    sampler = EpochSampler(len(ds), info.rank, info.world, shuffle=False)
    return torch.utils.data.DataLoader(ds, batch_size=max(cfg.train.batch_size // info.world, 1),
                                       sampler=sampler, num_workers=cfg.runtime.num_workers, collate_fn=collate)


def _validate(model, loader, cells, cfg: Config, info, amp) -> dict[str, float]:
    """Great-circle accuracy on the validation set (each rank its share, gathered on all ranks)."""
    from geoloc_cli import dist
    from geoloc_cli.inference import run_geolocation, summarize

    model.eval()
    pred = run_geolocation(model, loader, cells, cfg.model.seg_channels, info.device, amp)
    pred = pd.concat(dist.gather(pred), ignore_index=True)
    model.train()
    out: dict[str, float] = {}
    for name, m in summarize(pred, cells).items():
        out.update({f"val_{name}_{k}": v for k, v in m.items() if k.startswith("acc_") or k == "median_km"})
    if "scene_pred" in pred:
        out["val_scene_acc"] = float((pred["scene_pred"] == pred["scene_true"]).mean())
    return out


def _write_epoch(run_dir: Path, record: dict[str, Any], model, cells, cfg: Config, is_best: bool) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    shown = [(k, v) for k, v in record.items()
             if k in ("train_loss", "val_scene_acc", "images_per_s") or k.startswith("val_hierarchical")]
    console.table(f"epoch {record['epoch']}", ["metric", "value"], [(k, round(v, 4)) for k, v in shown])
    export_checkpoint(run_dir / "last.safetensors", model, cells, cfg)
    if is_best:
        export_checkpoint(run_dir / "model.safetensors", model, cells, cfg)


def export_checkpoint(path: Path, model, cells, cfg: Config) -> None:
    """The self-contained inference checkpoint (weights + cells + hierarchy + segmenter + config)."""
    from geoloc_cli.model import save_inference_checkpoint

    meta: dict[str, Any] = {"partitionings": cells.to_meta(), "config": cfgmod.to_dict(cfg)}
    seg_tensors = None
    if cfg.model.seg_channels:
        from geoloc_cli.segmentation import Segmenter

        seg_tensors, meta["segmenter"] = Segmenter.from_name(cfg.segment.model, device="cpu").state()
    save_inference_checkpoint(path, model, meta, seg_tensors)


def _save_resume(info, run_dir: Path, model, opt, sched, scaler, state: dict[str, Any], epoch: int) -> None:
    import torch

    if not info.main:
        return
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "step": state["step"], "epoch": epoch, "best": state["best"],
            "torch_rng": torch.get_rng_state()}
    with atomic_path(run_dir / "resume.pt") as tmp:
        torch.save(blob, tmp)


def _load_resume(path: Path, model, opt, sched, scaler) -> dict[str, Any]:
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(blob["torch_rng"])
    return {"step": int(blob["step"]), "epoch": int(blob["epoch"]), "best": float(blob["best"])}
