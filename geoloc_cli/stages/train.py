"""train: the multi-task ViT on geo-cell and scene labels, on one device or many (DDP).

`launch` checks everything that can be checked before heavy work, then either trains in this process
or starts one process per GPU (or per `runtime.nproc` CPU process, gloo) with torch.distributed's
elastic launcher, the engine behind torchrun; under torchrun it just trains. Only rank 0 prints and
writes. Outputs in runs/<run>/: config.yaml, metrics.jsonl, resume.pt (weights, optimizer, scheduler,
scaler, EMA, step, every rank's RNG and running loss sums; written atomically every checkpoint_every
steps and at each epoch end), last.safetensors and model.safetensors (the epoch best by
train.best_metric, by default the hierarchical accuracy at 2500 km) as inference checkpoints - the EMA
weights when train.ema_decay > 0. Each epoch's metrics record, checkpoints and resume state are
committed together (store.generation), and one process at a time writes a run (store.locked).

`--resume` continues exactly: the sample order and augmentation are functions of (seed, epoch,
index), so the same weights come out as from an uninterrupted run (tested with kill -9 on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc_cli import config as cfgmod
from geoloc_cli import console
from geoloc_cli.config import Config
from geoloc_cli.data import store
from geoloc_cli.data.places365 import SCENE_COLUMNS
from geoloc_cli.data.store import OK, DataRoot, locked, parquet_meta, read_parquet, write_text_atomic
from geoloc_cli.errors import USER_ERRORS, ConfigError, GeolocError, InputError, storage_error


@dataclass
class Plan:
    """What a run needs, checked before any process starts."""

    root: DataRoot
    run_dir: Path
    train_rows: pd.DataFrame
    val_rows: pd.DataFrame | None
    nproc: int


def _nproc(cfg: Config) -> int:
    return len(cfg.runtime.gpus) or max(cfg.runtime.nproc, 1)


def _check(cfg: Config, world: int, warn: bool = True) -> Plan:
    """Inputs and settings that cannot work, before any heavy work; `world` = processes in all."""
    from geoloc_cli.geo.partitioning import load_partitions, partitions_generation, read_partitions_json

    root = DataRoot(cfg.root)
    tables = load_partitions(root.partitions(cfg.partition.dataset))
    missing = [p for p in cfg.model.partitionings if p not in tables]
    if missing:
        raise InputError(f"partitionings {missing} not built: run `geoloc partition --cells all`")
    name = cfg.train.dataset
    rows = read_parquet(root.index(name), f"training index of {name!r}", f"run `geoloc filter {name}`")
    made_with = parquet_meta(root.index(name)).get("partitions")
    now = partitions_generation(read_partitions_json(root.partitions(cfg.partition.dataset))[1])
    if made_with is not None and made_with != now:  # its class columns would silently mean other cells
        raise InputError(f"{root.index(name)} was made with other partitions (generation {made_with}, now {now}): "
                         f"run `geoloc filter {name}` again")
    if cfg.model.seg_channels and not _has_seg(root, name, rows):
        raise InputError(f"model.seg_channels={cfg.model.seg_channels} but dataset {name!r} has no "
                         f"segmentation maps: run `geoloc segment {name}` or set model.seg_channels=0")
    scene_col = SCENE_COLUMNS[cfg.model.scene_classes]
    if scene_col not in rows.columns:
        raise InputError(f"the training index has no {scene_col} column for the scene head: "
                         "fetch with --meta *_places365.csv")
    _check_labels(rows, {**{p: len(tables[p]) for p in cfg.model.partitionings}, scene_col: cfg.model.scene_classes})
    if warn and rows[scene_col].isna().all():
        console.warn(f"{name}: no image has a scene label ({scene_col}; fetched without --meta): "
                     "the scene head is not trained")
    _check_best_metric(cfg)
    if cfg.train.batch_size % (world * cfg.train.grad_accum):
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by "
                          f"{world} processes x {cfg.train.grad_accum} accumulation steps")
    if len(rows) - len(rows) % world < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} exceeds the {len(rows)} training images")
    val = None
    if cfg.train.val_dataset:
        v = cfg.train.val_dataset
        m = read_parquet(root.manifest(v), f"manifest of validation dataset {v!r}", f"run `geoloc fetch {v}`")
        val = m[m["status"] == OK].reset_index(drop=True)
        located = val["lat"].notna() & val["lon"].notna()
        if not located.any():
            raise InputError(f"validation dataset {v!r} has no true locations: fetch it with --meta "
                             "*_places365.csv (or photos with EXIF GPS)")
        if warn and not located.all():
            console.warn(f"{v}: {int((~located).sum()):,} validation images have no true location and are "
                         "left out")
        val = val[located].reset_index(drop=True)
        if cfg.model.seg_channels and not _has_seg(root, v, val):
            raise InputError(f"validation dataset {v!r} has no segmentation maps: run `geoloc segment {v}`")
    if cfg.train.source == "embeddings":
        from geoloc_cli.data.embeddings import check_record

        check_record(cfg, root.emb(name), name)
    if cfg.model.seg_channels:
        for dataset in {name, *([cfg.train.val_dataset] if cfg.train.val_dataset else [])}:
            _check_seg_maker(cfg, root, dataset, warn)
    return Plan(root, root.run(cfg.train.run), rows, val, _nproc(cfg))


def _check_best_metric(cfg: Config) -> None:
    from geoloc_cli.inference.metrics import validation_metrics

    names = [*validation_metrics(cfg.model.partitionings, cfg.evaluate.thresholds_km), "train_loss"]
    if cfg.train.best_metric not in names:
        raise ConfigError(f"train.best_metric: {cfg.train.best_metric!r} is not a number training records with "
                          f"evaluate.thresholds_km={cfg.evaluate.thresholds_km} (e.g. {', '.join(names[:3])}, ..., "
                          "train_loss)")


def _check_labels(rows: pd.DataFrame, classes: dict[str, int]) -> None:
    """Every target within its head's range, here: on CUDA an out-of-range label is an asynchronous
    device-side assert that names nothing."""
    for col, n in classes.items():
        if col not in rows.columns:
            continue
        labels = rows[col].dropna()
        bad = labels[(labels < -1) | (labels >= n)]
        if len(bad):
            raise InputError(f"training index: column {col} has label {int(bad.iloc[0])} (row {bad.index[0]}), "
                             f"outside 0..{n - 1} ({n} classes): the index was built against other partitions; "
                             "run `geoloc filter` again")


def _check_seg_maker(cfg: Config, root: DataRoot, name: str, warn: bool) -> None:
    """The checkpoint embeds segment.model for predict: it must be what made the training maps."""
    path = root.seg_maker(name)
    made = json.loads(path.read_text()) if path.is_file() else {}
    want = {"model": cfg.segment.model, "input_size": cfg.segment.input_size}
    if made.get("model") not in (None, "imported", "unknown") and made != want:
        raise ConfigError(f"{name}: its maps were made by {made}, but segment.model={want['model']} "
                          f"(input_size {want['input_size']}) would be embedded for predict: set "
                          f"segment.model={made['model']} segment.input_size={made.get('input_size')}")
    if warn and made.get("model") in (None, "imported", "unknown"):
        console.warn(f"{name}: its maps were imported or made before geoloc recorded their segmenter; "
                     f"predict will segment photos with segment.model={want['model']}")


def _has_seg(root: DataRoot, name: str, rows: pd.DataFrame) -> bool:
    from geoloc_cli.data.store import seg_shard_for, shard_done

    return all(shard_done(root.seg(name) / seg_shard_for(s)) for s in rows["shard"].unique())


def _visible_devices(gpus: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for the listed GPUs; indices count within an already restricted set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [x.strip() for x in visible.split(",")]
        return ",".join(ids[g] for g in gpus)
    return ",".join(map(str, gpus))


def launch(cfg: Config, resume: bool = False, nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int = 29500, weights: bool = False) -> list[dict[str, Any]]:
    """Train in this process or in one process per GPU / `runtime.nproc` (on each of `nnodes` nodes);
    returns each local rank's summary (history; with `weights`, the final weights as numpy arrays, what
    tests compare - a copy of the whole model the CLI never needs), in rank order."""
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} with --nnodes {nnodes}: need 0 <= node rank < nodes")
    # one writer per run, checked first: only the process that writes (global rank 0, or the launcher of
    # its workers) locks
    writes = os.environ.get("RANK", "0") == "0" and node_rank == 0
    run_dir = DataRoot(cfg.root).run(cfg.train.run)
    with locked(run_dir, "train") if writes else contextlib.nullcontext():
        if writes:  # an epoch's commit a kill cut short is completed before anything reads resume.pt
            store.recover(run_dir)
        return _launch(cfg, resume, nnodes, node_rank, master_addr, master_port, weights)


def _launch(cfg: Config, resume: bool, nnodes: int, node_rank: int, master_addr: str,
            master_port: int, weights: bool) -> list[dict[str, Any]]:
    under_torchrun = "LOCAL_RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun else _nproc(cfg) * nnodes
    plan = _check(cfg, world)
    from geoloc_cli.dist import check_devices

    check_devices(cfg.runtime.gpus, cfg.runtime.device, "train")
    if resume and not plan.root.resume(cfg.train.run).is_file():
        raise InputError(f"--resume: no resume state in {plan.run_dir} (resume.pt)")
    if under_torchrun or world == 1:
        return [train(cfg, resume, weights)]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the same settings torchrun derives from --nnodes/--node-rank/--master-addr/--master-port
    lc = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=plan.nproc, run_id=f"geoloc-{cfg.train.run}",
        rdzv_backend="static", rdzv_endpoint=f"{master_addr}:{master_port}",
        rdzv_configs={"rank": node_rank}, max_restarts=0, monitor_interval=0.5, start_method="spawn",
    )
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cfg.runtime.gpus:  # local rank i drives the i-th listed GPU (workers inherit the variable)
        os.environ["CUDA_VISIBLE_DEVICES"] = _visible_devices(cfg.runtime.gpus)
    try:
        results = elastic_launch(lc, _entry)(cfgmod.to_dict(cfg), resume, weights, console.is_quiet(),
                                                 console.verbosity())
    except ChildFailedError as e:  # a worker's own error (and traceback) is in the failure record
        rank, failure = min(e.failures.items())
        msg = failure.message.get("message", failure.message) if isinstance(failure.message, dict) else failure.message
        kind, _, text = str(msg).partition(": ")
        if kind in USER_ERRORS:  # the worker's own one-line message and exit code, as if it ran here
            raise USER_ERRORS[kind](text) from None
        raise GeolocError(f"training process of rank {rank} failed (exit code {failure.exitcode}): {msg}") from None
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return [results[r] for r in sorted(results)]


def _entry(cfg_dict: dict[str, Any], resume: bool, weights: bool, quiet: bool, verbose: int) -> dict[str, Any]:
    console.set_quiet(quiet)  # a spawned worker starts with the console's defaults: the command's -q/-v
    console.set_verbose(verbose)
    try:
        return train(cfgmod.from_dict(cfg_dict), resume, weights)
    except OSError as e:  # disk full, read-only...: one line for the launcher, not a traceback
        raise storage_error(e) from None


# ------------------------------------------------------------------------------------------ training


def _targets(cfg: Config) -> dict[str, str]:
    """Head name -> column of the index."""
    return {**{p: p for p in cfg.model.partitionings}, "scene": SCENE_COLUMNS[cfg.model.scene_classes]}


def _cells(cfg: Config, root: DataRoot):
    from geoloc_cli.geo.partitioning import load_partitions
    from geoloc_cli.inference.geolocate import CellSet

    tables = load_partitions(root.partitions(cfg.partition.dataset))
    return CellSet.from_partitions({p: tables[p] for p in cfg.model.partitionings})


def _device_spec(cfg: Config) -> str:
    """One process on one listed GPU drives that GPU; launched workers see only theirs (local rank)."""
    if cfg.runtime.gpus and "LOCAL_RANK" not in os.environ:
        return f"cuda:{cfg.runtime.gpus[0]}"
    return cfg.runtime.device


def train(cfg: Config, resume: bool = False, weights: bool = False) -> dict[str, Any]:
    """Train on this process's device (one rank of the run); returns the rank's summary (see `launch`)."""
    from geoloc_cli import dist

    info = dist.setup(_device_spec(cfg))
    try:
        return _train(cfg, info, resume, weights)
    finally:
        dist.teardown()


def _train(cfg: Config, info, resume: bool, weights: bool) -> dict[str, Any]:
    import torch

    from geoloc_cli import dist
    from geoloc_cli.data.dataset import EpochSampler
    from geoloc_cli.train.trainer import Trainer, TrainState, build_loss

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = dist.loader_workers(cfg.runtime.num_workers, info.device, local_world)
    dist.limit_cpu_threads(workers, local_world, info.device)
    plan = _check(cfg, info.world, warn=False)  # launch warned already
    torch.manual_seed(cfg.runtime.seed)
    cells = _cells(cfg, plan.root)
    heads = {p: len(cells.hex_id[p]) for p in cfg.model.partitionings} | {"scene": cfg.model.scene_classes}
    model = _build(cfg, plan.root, heads).to(info.device)
    ds, groups = _train_dataset(cfg, plan, model.data_config(), info.main)
    local_batch = cfg.train.batch_size // info.world
    sampler = EpochSampler(len(ds), info.rank, info.world, shuffle=True, seed=cfg.runtime.seed,
                           groups=groups, window=cfg.train.shuffle_window_shards)
    steps = len(sampler.indices()) // local_batch  # per epoch
    state = TrainState.create(cfg, model, info.device, steps * cfg.train.epochs,
                              int(cfg.train.warmup_epochs * steps))
    net, train_workers, seg_channels = model, workers, None
    if cfg.train.source == "embeddings":  # a batch is one index into an array in memory: no workers
        from geoloc_cli.model.network import HeadsOnly

        # the maps' features are cached beside the photos': nothing to encode per step
        net, train_workers, seg_channels = HeadsOnly(model), 0, 0
    trainer = Trainer(cfg, info, state, build_loss(cfg, heads, cells, info.device), net, seg_channels)
    _start(cfg, plan, trainer, resume, steps, len(ds))
    val_loader = _val_loader(cfg, plan, info, model.data_config(), workers) if plan.val_rows is not None else None
    history = []
    for epoch in range(state.epoch, cfg.train.epochs):
        start_batch = state.step - epoch * steps  # > 0 only when resuming mid-epoch
        sampler.set_epoch(epoch, start_batch * local_batch)
        ds.set_epoch(epoch)
        loader = _epoch_loader(ds, sampler, local_batch, train_workers, cfg.runtime.seed, info, epoch)
        record = _epoch(cfg, plan, trainer, loader, epoch, steps, start_batch)
        if val_loader is not None:
            record.update(trainer.validate(val_loader, cells))
        history.append(record)
        _end_epoch(cfg, plan, trainer, record, cells)
    if info.main:
        _export_onnx(plan.root.model(cfg.train.run))
    dist.barrier()
    summary = {"rank": info.rank, "run_dir": str(plan.run_dir), "history": history}
    if weights:
        summary |= {"params": _weights(model), "ema": _weights(state.ema.module) if state.ema else None}
    return summary


def _weights(model) -> dict[str, np.ndarray]:
    """The weights as numpy arrays: what tests compare between runs and ranks (picklable across processes)."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def _start(cfg: Config, plan: Plan, trainer, resume: bool, steps: int, images: int) -> None:
    """Recover and resume the run's files (every rank reads the resume state once its commit is complete),
    write its config; rank 0 says what will be trained."""
    from geoloc_cli import dist

    info, state = trainer.info, trainer.state
    if info.main:  # (again for torchrun, whose launcher is not geoloc's)
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        store.recover(plan.run_dir)
    dist.barrier()
    if resume:
        trainer.load(plan.root.resume(cfg.train.run), steps)
    if info.main:
        write_text_atomic(plan.run_dir / "config.yaml", cfgmod.dump_yaml(cfg))
        _trim_metrics(plan.run_dir / "metrics.jsonl", state.epoch)
        extras = (f", EMA {cfg.train.ema_decay}" if state.ema else "") + (", compiled" if cfg.train.compile else "")
        if state.epoch >= cfg.train.epochs:
            console.info(f"{plan.run_dir.name}: all {cfg.train.epochs} epochs are done already; nothing to "
                         "train (raise train.epochs to continue)")
        else:
            trainable = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
            console.info(f"training {trainable:,} parameters on {info.world} x {info.device.type}, {images:,} "
                         f"images, {steps} steps/epoch" + extras)
    if info.main and cfg.model.seg_channels:  # built now: a segmenter that cannot load fails before epoch 1
        _segmenter_state(cfg.segment.model, cfg.segment.input_size)


def _epoch(cfg: Config, plan: Plan, trainer, loader, epoch: int, steps: int, start_batch: int) -> dict[str, Any]:
    """One epoch's steps with a progress bar; returns its metrics record (losses averaged over ranks)."""
    from geoloc_cli import dist

    def shown(losses: dict[str, float]) -> None:
        bar.advance(1, loss=f"{losses['loss']:.3f}", lr=f"{losses['lr']:.2e}", img_s=f"{losses['img_s']:.0f}")

    def save() -> None:
        trainer.save(plan.root.resume(cfg.train.run) if trainer.info.main else None)

    with console.progress(f"epoch {epoch + 1}/{cfg.train.epochs}", steps - start_batch,
                          unit="step", loss="-", lr="-", img_s="-") as bar:
        sums, seen, seconds = trainer.train_epoch(loader, steps, start_batch > 0, shown, save)
    sums = {k: float(np.mean([s[k] for s in dist.gather(sums)])) for k in sums}  # mean over ranks
    return {"epoch": epoch + 1, "step": trainer.state.step, **{f"train_{k}": v / steps for k, v in sums.items()},
            "images_per_s": seen / seconds}


def _end_epoch(cfg: Config, plan: Plan, trainer, record: dict[str, Any], cells) -> None:
    """The epoch's outputs and its resume state as one generation: a kill leaves the last epoch's set or
    this one's, never checkpoints of one epoch beside the resume state of another."""
    state, main = trainer.state, trainer.info.main
    score = trainer.score(record)
    is_best = score > state.best
    state.best = max(score, state.best)
    state.epoch = record["epoch"]
    with store.generation(plan.run_dir) if main else contextlib.nullcontext() as staged:
        if main:
            _write_epoch(plan.run_dir, staged, record, state.eval_model, cells, cfg, is_best)
        trainer.save(staged.path(plan.root.resume(cfg.train.run).name) if main else None, epoch_done=True)


def _train_dataset(cfg: Config, plan: Plan, pre: dict[str, Any], main: bool):
    """(training dataset, each sample's shard for the shard-local order or None): photos from the image
    shards, or their cached embeddings (any order is cheap in memory)."""
    from geoloc_cli.data.dataset import EmbeddingDataset, GeoDataset, locate

    name = cfg.train.dataset
    if cfg.train.source == "embeddings":
        ds = EmbeddingDataset.from_shards(plan.train_rows, plan.root.emb(name), _targets(cfg))
        if ds.dropped and main:
            console.warn(f"{name}: {ds.dropped:,} training images have no embedding (they did not decode)")
        return ds, None
    seg_dir = plan.root.seg(name) if cfg.model.seg_channels else None
    rows = locate(plan.train_rows, plan.root.shards(name), seg_dir)
    ds = GeoDataset(rows, plan.root.shards(name), seg_dir, cfg.model.img_size, pre, _targets(cfg),
                    train=cfg.train.augment, seed=cfg.runtime.seed)
    return ds, rows["shard"].to_numpy()


def _epoch_loader(ds, sampler, local_batch: int, workers: int, seed: int, info, epoch: int):
    import torch

    return torch.utils.data.DataLoader(
        ds, batch_size=local_batch, sampler=sampler, num_workers=workers,
        collate_fn=getattr(ds, "collate_fn", None),  # torch's default_collate; EmbeddingDataset's come whole
        drop_last=True, pin_memory=info.device.type == "cuda",
        # 2 batches ahead per worker: more only fills /dev/shm (14 workers x 2 x ~26 MB uint8 batches of 128 at
        # 224 px ~ 730 MB; a container's 64 MB default is far too small at any setting: give it --shm-size)
        persistent_workers=False, prefetch_factor=2 if workers else None,
        # its own generator: creating the loader must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _build(cfg: Config, root: DataRoot, heads: dict[str, int]):
    """The model to train, frozen as train.trainable_blocks says; with train.source=embeddings its backbone
    is the one that made the embeddings (their record holds its weights)."""
    from geoloc_cli.model.network import build_model, model_spec, require_pretrained

    spec = model_spec(cfg, heads)
    if cfg.train.source == "images":
        model = build_model(spec, cfg.model.pretrained)
        if cfg.train.trainable_blocks == 0:
            require_pretrained(model, "train.trainable_blocks=0 would train heads on a random, frozen backbone")
        model.freeze(cfg.train.trainable_blocks)
        return model
    from geoloc_cli.data.embeddings import check_record, load_branches

    emb_dir = root.emb(cfg.train.dataset)
    model = build_model(spec, "none")
    # the checkpoint records the embeddings' preprocessing: photos at inference are normalised as theirs were
    load_branches(model, emb_dir, check_record(cfg, emb_dir, cfg.train.dataset))
    model.freeze(0)
    return model


def _val_loader(cfg: Config, plan: Plan, info, pre: dict[str, Any], workers: int):
    import torch

    from geoloc_cli.data.dataset import EpochSampler, GeoDataset, locate

    v = cfg.train.val_dataset
    seg_dir = plan.root.seg(v) if cfg.model.seg_channels else None
    rows = locate(plan.val_rows, plan.root.shards(v), seg_dir)
    ds = GeoDataset(rows, plan.root.shards(v), seg_dir, cfg.model.img_size, pre,
                    {"scene": SCENE_COLUMNS[cfg.model.scene_classes]}, train=False)
    sampler = EpochSampler(len(ds), info.rank, info.world, shuffle=False)
    return torch.utils.data.DataLoader(ds, batch_size=max(cfg.train.batch_size // info.world, 1),
                                       sampler=sampler, num_workers=workers,
                                       pin_memory=info.device.type == "cuda")


def _write_epoch(run_dir: Path, staged: store.Staged, record: dict[str, Any], model, cells, cfg: Config,
                 is_best: bool) -> None:
    """The epoch's files into its generation: metrics.jsonl with this record appended, the checkpoints."""
    log = run_dir / "metrics.jsonl"
    write_text_atomic(staged.path(log.name), (log.read_text() if log.is_file() else "") + json.dumps(record) + "\n")
    shown = [(k, v) for k, v in record.items()
             if k in ("train_loss", "val_scene_acc", "images_per_s") or k.startswith("val_hierarchical")]
    console.table(f"epoch {record['epoch']}", ["metric", "value"],  # accuracies in percent, as evaluate shows them
                  [(k, f"{100 * v:.1f}%" if "_acc" in k else round(v, 4)) for k, v in shown])
    export_checkpoint(staged.path("last.safetensors"), model, cells, cfg)
    if is_best:
        export_checkpoint(staged.path("model.safetensors"), model, cells, cfg)


def _export_onnx(ckpt: Path) -> None:
    """ONNX export of the best checkpoint, so `geoloc predict` runs without torch (skipped without onnx)."""
    try:
        import onnx  # noqa: F401 - only checks that the exporter's dependency is there
    except ImportError:
        console.warn("onnx is not installed: no ONNX export (pip install 'geoloc[train]')")
        return
    from geoloc_cli.model.export import export_onnx

    files = export_onnx(ckpt)
    console.info(f"exported {', '.join(f.name for f in files)} for torch-free prediction")


def export_checkpoint(path: Path, model, cells, cfg: Config) -> None:
    """The self-contained inference checkpoint (weights + cells + hierarchy + segmenter + config)."""
    from geoloc_cli.model.network import save_inference_checkpoint

    # the config that made the model, without this machine's paths and devices (the file travels)
    config = {k: v for k, v in cfgmod.to_dict(cfg).items() if k not in ("paths", "runtime")}
    for section, key in (("model", "pretrained"), ("segment", "model")):  # local files: their names only
        if Path(config[section][key]).exists():
            config[section][key] = Path(config[section][key]).name
    meta: dict[str, Any] = {"partitionings": cells.to_meta(), "config": config}
    seg_tensors = None
    if cfg.model.seg_channels:
        seg_tensors, meta["segmenter"] = _segmenter_state(cfg.segment.model, cfg.segment.input_size)
    save_inference_checkpoint(path, model, meta, seg_tensors)


@functools.cache
def _segmenter_state(name: str, input_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The segmenter that made the training maps, same input size, built once per run for embedding."""
    from geoloc_cli.model.segmentation import Segmenter

    return Segmenter.from_name(name, device="cpu", input_size=input_size).state()


def _trim_metrics(path: Path, epochs_done: int) -> None:
    """Drop records of epochs the resume state does not include (written before a kill, redone now),
    and a last line cut short by a kill or a full disk (an append-only log's one possible damage)."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append((line, json.loads(line)["epoch"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            if i < len(lines) - 1:
                raise InputError(f"{path}: line {i + 1} is not a metrics record; fix or delete the line") from None
            console.warn(f"{path}: dropped a cut-off last line (an interrupted write)")
    keep = [line for line, epoch in records if epoch <= epochs_done]
    if len(keep) != len(lines) or not text.endswith("\n"):
        write_text_atomic(path, "".join(x + "\n" for x in keep))
