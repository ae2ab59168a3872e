"""Cached embeddings: `geoloc embed` images/s, and head training samples/s on MP-16-sized embeddings.

    python benchmarks/bench_embed.py                                   # CPU: a tiny ViT, 1 M embeddings
    python benchmarks/bench_embed.py --device cuda --backbone vit_large_patch14_clip_quickgelu_224 \\
        --img-size 224 --overrides '{}' --images 4096 --n 4700000 --head-hidden 1024

`embed` times the stage end to end on synthetic 427x320 JPEG shards (what `geoloc fetch` stores): JPEG
decode and the evaluation crop in threads, the backbone (bf16 on a GPU), fp16 shard writes; `model` times
the backbone alone on ready uint8 batches. `heads` builds synthetic embeddings (n x dim fp16, the
published 3,298 / 7,202 / 12,893 cells + 3 scenes as targets) and times the training loader (the
EmbeddingDataset + EpochSampler that `train.source: embeddings` uses) against full training steps (the
heads' forward, backward and AdamW step), so the loader's rate reads against the step's. Random weights
throughout (no network needed): the timing does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_segment import synthetic_jpegs  # noqa: E402 - benchmarks share their synthetic photos

from geoloc_cli.config import load_config  # noqa: E402
from geoloc_cli.data.store import DataRoot, ShardWriter  # noqa: E402

CELLS = {"coarse": 3298, "middle": 7202, "fine": 12893, "scene": 3}  # MP-16's published partitionings


def config(args: argparse.Namespace, root: Path):
    sets = [f"model.backbone={args.backbone}", "model.pretrained=none", f"model.img_size={args.img_size}",
            f"model.overrides={args.overrides}", "model.seg_channels=0", f"runtime.device={args.device}",
            f"embed.batch_size={args.batch_size}", f"runtime.num_workers={args.threads}"]
    return load_config(None, sets, {"paths.root": str(root)})


def bench_embed(args: argparse.Namespace) -> dict[str, float]:
    from geoloc_cli.stages import embed

    with tempfile.TemporaryDirectory() as tmp:
        root = DataRoot(Path(tmp))
        photos = synthetic_jpegs(min(args.images, 256))
        for s in range(0, args.images, 1000):
            with ShardWriter(root.shards("bench") / f"images-{s // 1000:06d}.tar") as w:
                for i in range(s, min(s + 1000, args.images)):
                    w.add(f"{i:09d}", {"jpg": photos[i % len(photos)], "json": b"{}"})
        cfg = config(args, root.path)
        t0 = time.perf_counter()
        embed.run(cfg, ["bench"])
        stage = args.images / (time.perf_counter() - t0)
    return {"embed_stage_images_per_s": stage, "embed_model_images_per_s": bench_model(args, cfg)}


def bench_model(args: argparse.Namespace, cfg) -> float:
    from geoloc_cli.dist import amp_dtype
    from geoloc_cli.model.network import build_model, model_spec

    model = build_model(model_spec(cfg, {})).to(args.device).eval()
    amp = amp_dtype("auto", args.device)
    x = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=args.device)
    with torch.inference_mode(), torch.autocast(torch.device(args.device).type, dtype=amp or torch.float32,
                                                enabled=amp is not None):
        model.embed(x)  # warm-up
        sync(args.device)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < args.seconds:
            model.embed(x).cpu()
            n += len(x)
    return n / (time.perf_counter() - t0)


def bench_heads(args: argparse.Namespace) -> dict[str, float]:
    from geoloc_cli.data.dataset import EmbeddingDataset, EpochSampler
    from geoloc_cli.dist import amp_dtype
    from geoloc_cli.model.network import HeadsOnly, ModelSpec, build_model

    g = torch.Generator().manual_seed(0)
    emb = torch.empty((args.n, args.dim), dtype=torch.float16)
    for s in range(0, args.n, 1 << 18):  # in chunks: a 4.7 M x 1024 float32 temporary would be 19 GB
        emb[s : s + (1 << 18)] = torch.randn((min(1 << 18, args.n - s), args.dim), generator=g).half()
    targets = {h: torch.randint(0, c, (args.n,), generator=g) for h, c in CELLS.items()}
    where = torch.rand(args.n, dtype=torch.float64, generator=g)  # lat, lon (zeros would be untouched pages)
    ds = EmbeddingDataset(emb, targets, where, where)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.train_batch, sampler=EpochSampler(args.n, seed=0),
                                         collate_fn=ds.collate_fn, drop_last=True)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["image"])
        if time.perf_counter() - t0 > args.seconds:
            break
    loader_rate = n / (time.perf_counter() - t0)

    spec = ModelSpec("vit_tiny_patch16_224", 32, 0, "late", dict(CELLS), {"depth": 1, "embed_dim": args.dim,
                     "num_heads": 1, "patch_size": 16}, args.head_hidden)
    model = build_model(spec).to(args.device)
    model.freeze(0)
    net = HeadsOnly(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            fused=args.device.startswith("cuda"))
    amp = amp_dtype("auto", args.device)
    batches = iter(loader)

    def step() -> None:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:  # a fast step runs through every batch of an epoch: start another
            batches = iter(loader)
            batch = next(batches)
        x = batch["image"].to(args.device, non_blocking=True)
        with torch.autocast(torch.device(args.device).type, dtype=amp or torch.float32, enabled=amp is not None):
            out = net(x)
            loss = sum(torch.nn.functional.cross_entropy(out[h].float(), batch["targets"][h].to(args.device))
                       for h in CELLS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    sync(args.device)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        step()
        n += args.train_batch
    sync(args.device)
    step_rate = n / (time.perf_counter() - t0)
    return {"heads_loader_samples_per_s": loader_rate, "heads_train_samples_per_s": step_rate,
            "heads_epoch_minutes_mp16": 4.7e6 / step_rate / 60}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--overrides", default="{patch_size: 8, depth: 4, embed_dim: 96, num_heads: 3}",
                   help="model.overrides as YAML (the demo's tiny ViT by default; '{}' for the real model)")
    p.add_argument("--images", type=int, default=1000, help="photos to embed")
    p.add_argument("--batch-size", type=int, default=64, help="embed.batch_size")
    p.add_argument("--threads", type=int, default=2, help="decode threads")
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic embeddings (MP-16: 4,700,000)")
    p.add_argument("--dim", type=int, default=1024, help="embedding width (CLIP ViT-L/14: 1024)")
    p.add_argument("--head-hidden", type=int, default=0, help="model.head_hidden (0 = linear heads)")
    p.add_argument("--train-batch", type=int, default=4096)
    p.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    out = {**bench_embed(args), **bench_heads(args)}
    for k, v in out.items():
        print(f"{k}: {v:,.1f}")
    print(f"loader / step: {out['heads_loader_samples_per_s'] / out['heads_train_samples_per_s']:.1f}x "
          "(the loader must stay ahead of the step)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **out}, indent=2))


if __name__ == "__main__":
    main()
