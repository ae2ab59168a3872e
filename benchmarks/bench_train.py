"""CPU training throughput of the tiny demo config, and whether data loading keeps up.

    python benchmarks/bench_train.py                      # demo config, 1500 demo photos, 3 epochs
    python benchmarks/bench_train.py --num-workers 0 --demo-size 800 --epochs 2

Builds a demo world in a temporary directory through the CLI (`geoloc fetch demo`, `partition`,
`filter`, `segment`, with configs/demo.yaml: ViT-tiny-sized branches at 64 px, RGB + 3-channel seg map),
then reports images/s of
- `stage`: `geoloc train` itself (the `train` stage in this process, validation off), per epoch from
  metrics.jsonl; the first epoch carries the start-up (loader workers, first steps), so the figure is
  the median of the later epochs;
- `data`: the same DataLoader (dataset, shard-local sampler, workers, batch size, collate) iterated
  without a model: what decoding, augmentation and collation deliver at most;
- `step`: optimizer steps on ready tensors (the model alone, no data loading).
If `data` is well above `step`, loading keeps up and the stage runs at the model's speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from geoloc_cli.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


def build_world(tmp: Path, args: argparse.Namespace) -> Path:
    """A demo world under tmp through the CLI; returns the config file."""
    cfg = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    cfg["paths"]["root"] = str(tmp / "data")
    cfg["fetch"]["demo_size"] = args.demo_size
    cfg["runtime"]["num_workers"] = args.num_workers
    cfg["train"].update(epochs=args.epochs, batch_size=args.batch_size, val_dataset="",
                        checkpoint_every=10**9, run="bench")
    path = tmp / "geoloc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for cmd in (["fetch", "demo"], ["partition", "--cells", "all"], ["filter"], ["segment", "demo"]):
        subprocess.run([sys.executable, "-m", "geoloc_cli", *cmd, "-c", str(path), "-q"], check=True)
    return path


def train_loader(cfg: Config, epoch: int = 0, device: str = "cpu"):
    """The DataLoader the train stage builds for one process (rank 0 of 1) on `device`."""
    from geoloc_cli import dist
    from geoloc_cli.data.dataset import EpochSampler, GeoDataset, locate
    from geoloc_cli.data.store import DataRoot, read_parquet
    from geoloc_cli.model.network import build_model, model_spec
    from geoloc_cli.stages import train

    root = DataRoot(cfg.root)
    name = cfg.train.dataset
    rows = read_parquet(root.index(name), "training index", "run `geoloc filter`")
    seg_dir = root.seg(name) if cfg.model.seg_channels else None
    rows = locate(rows, root.shards(name), seg_dir)
    spec = model_spec(cfg, {"scene": 3})
    pre = build_model(spec).data_config()
    ds = GeoDataset(rows, root.shards(name), seg_dir, cfg.model.img_size, pre, train._targets(cfg),
                    train=cfg.train.augment, seed=cfg.runtime.seed)
    sampler = EpochSampler(len(ds), shuffle=True, seed=cfg.runtime.seed, groups=rows["shard"].to_numpy(),
                           window=cfg.train.shuffle_window_shards)  # as the stage's
    sampler.set_epoch(epoch)
    ds.set_epoch(epoch)
    info = SimpleNamespace(device=torch.device(device))  # the loader's settings for a process on `device`
    workers = dist.loader_workers(cfg.runtime.num_workers, info.device)
    return train._epoch_loader(ds, sampler, cfg.train.batch_size, workers, cfg.runtime.seed, info, epoch)


def data_rate(cfg: Config, epochs: int = 2) -> float:
    """Images/s out of the training DataLoader alone (epochs after the first, which starts workers)."""
    from geoloc_cli import dist

    dist.limit_cpu_threads(dist.loader_workers(cfg.runtime.num_workers, "cpu"))  # as the train stage does
    rates = []
    for epoch in range(epochs + 1):
        loader = train_loader(cfg, epoch)
        it = iter(loader)
        next(it)  # start-up: worker processes, first batch
        t0, n = time.perf_counter(), 0
        for batch in it:
            n += batch["image"].shape[0]
        if epoch:
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def step_rate(cfg: Config, steps: int = 20, warmup: int = 3) -> float:
    """Images/s of optimizer steps on ready tensors (model, loss, backward, AdamW, scheduler)."""
    from geoloc_cli.dist import DistInfo
    from geoloc_cli.model.network import build_model, model_spec
    from geoloc_cli.train.trainer import Trainer, TrainState, build_loss

    loader = train_loader(cfg)
    batch = next(iter(loader))
    heads = {"coarse": 40, "middle": 70, "fine": 150, "scene": 3}  # the demo world's order of size
    batch["targets"] = {h: torch.randint(0, n, (cfg.train.batch_size,)) for h, n in heads.items()}
    dev = torch.device("cpu")
    model = build_model(model_spec(cfg, heads))
    state = TrainState.create(cfg, model, dev, total_steps=10**6, warmup_steps=0)
    trainer = Trainer(cfg, DistInfo(0, 1, 0, dev), state, build_loss(cfg, heads, None, dev))
    for _ in range(warmup):
        trainer.step(batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch)
    return steps * cfg.train.batch_size / (time.perf_counter() - t0)


def stage_rate(cfg: Config) -> tuple[float, list[float]]:
    """Images/s of the train stage, per epoch; median of the epochs after the first."""
    from geoloc_cli import console
    from geoloc_cli.stages import train

    console.set_quiet(True)
    (result,) = train.launch(cfg)
    rates = [r["images_per_s"] for r in result["history"]]
    return statistics.median(rates[1:] or rates), rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-size", type=int, default=1500, help="demo photos to generate (train + val)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=1, help="data-loading workers (demo config: 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build_world(Path(tmp), args)
        cfg = load_config(path, ["runtime.device=cpu"])
        print(f"world built in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} cores, "
              f"{args.num_workers} loader worker(s), batch {args.batch_size}, "
              f"{cfg.model.backbone} {cfg.model.overrides} at {cfg.model.img_size} px, "
              f"seg_channels={cfg.model.seg_channels}", flush=True)
        stage, per_epoch = stage_rate(cfg)
        data = data_rate(cfg)
        step = step_rate(cfg)
    print(f"stage  {stage:8.1f} images/s   (train stage, per epoch: {', '.join(f'{r:.0f}' for r in per_epoch)})")
    print(f"data   {data:8.1f} images/s   (DataLoader alone: decode + augment + collate)")
    print(f"step   {step:8.1f} images/s   (model steps on ready tensors)")
    print(f"data / step = {data / step:.2f}: loading {'keeps up' if data > step else 'is the bottleneck'}")


if __name__ == "__main__":
    main()
