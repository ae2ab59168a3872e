"""GPU training throughput and model FLOPs utilisation (MFU) of the full-size model.

    python benchmarks/bench_train_gpu.py                          # ViT-B/16 RGB + seg map, 224 px, bf16, batch 128
    python benchmarks/bench_train_gpu.py --compile --fusion exchange
    python benchmarks/bench_train_gpu.py --data-root geoloc-data --dataset mp16 --num-workers 8
    python benchmarks/bench_train_gpu.py --smoke                  # tiny version on the CPU (checks the script)
    python benchmarks/bench_train_gpu.py --json out.json          # also write the numbers as JSON

Times the training stage's own optimizer step (`trainer.Trainer.step`: autocast forward of both branches,
multi-task loss over the published partitionings - 3,298 / 7,202 / 12,893 cells - and 3 scene classes,
backward, fused AdamW, scheduler) on synthetic batches already on the GPU, so the figure is the model's
speed. FLOPs per step are counted once with torch.utils.flop_counter.FlopCounterMode (matmuls and
convolutions, forward + backward) and MFU = FLOPs/s / the GPU's dense bf16 peak from the table below
(or --peak-tflops). With --data-root, the training DataLoader (decode, augment, collate in
--num-workers processes) is timed alone on the real shards, to show whether it keeps up with the step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets; the first
# substring found in torch.cuda.get_device_name() wins, so more specific names come first.
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A6000", 155e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
]
PUBLISHED_CELLS = {"coarse": 3298, "middle": 7202, "fine": 12893}


def peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key in device_name:
            return peak
    return None


def setup(args: argparse.Namespace, device: torch.device):
    """The training stage's Trainer around a bare model (no data root) and a synthetic batch on the device."""
    from geoloc_cli.config import load_config
    from geoloc_cli.dist import DistInfo
    from geoloc_cli.model import build_model, model_spec
    from geoloc_cli.trainer import Trainer, TrainState, build_loss

    cfg = load_config(None, [
        f"model.backbone={args.backbone}", f"model.img_size={args.img_size}", "model.pretrained=none",
        f"model.seg_channels={args.seg_channels}", f"model.fusion={args.fusion}",
        f"model.overrides={json.dumps(args.overrides)}", f"train.batch_size={args.batch_size}",
        f"train.grad_accum={args.grad_accum}", f"train.precision={args.precision}",
        f"train.compile={str(args.compile).lower()}", "train.grad_clip=1.0", "train.ema_decay=0"])
    heads = {**PUBLISHED_CELLS, "scene": 3}
    model = build_model(model_spec(cfg, heads), "none").to(device)
    state = TrainState.create(cfg, model, device, total_steps=10**6, warmup_steps=0)
    trainer = Trainer(cfg, DistInfo(0, 1, 0, device), state, build_loss(cfg, heads, None, device))
    b, s = args.batch_size, args.img_size
    batch = {
        "image": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device),  # as the loader ships them
        "seg": torch.randint(0, 150, (b, s, s), dtype=torch.uint8, device=device),
        "targets": {h: torch.randint(0, n, (b,), device=device) for h, n in heads.items()},
        "lat": torch.rand(b, dtype=torch.float64, device=device) * 180 - 90,
        "lon": torch.rand(b, dtype=torch.float64, device=device) * 360 - 180,
    }
    return trainer, batch


def step_fn(args: argparse.Namespace, device: torch.device):
    """The public Trainer.step on one synthetic batch, and the model's parameter count."""
    trainer, batch = setup(args, device)

    def step() -> None:
        trainer.step(batch)

    return step, sum(p.numel() for p in trainer.state.model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def loader_rate(args: argparse.Namespace, batches: int) -> float:
    """Images/s of the training DataLoader alone on real shards (after its first batch)."""
    from bench_train import train_loader

    from geoloc_cli.config import load_config

    sets = [f"paths.root={args.data_root}", f"train.dataset={args.dataset}", f"model.backbone={args.backbone}",
            f"model.img_size={args.img_size}", f"model.seg_channels={args.seg_channels}",
            f"train.batch_size={args.batch_size}", f"runtime.num_workers={args.num_workers}"]
    it = iter(train_loader(load_config(None, sets), device="cuda" if torch.cuda.is_available() else "cpu"))
    next(it)
    t0, n = time.perf_counter(), 0
    for _, batch in zip(range(batches), it, strict=False):
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vit_base_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128, help="per GPU")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seg-channels", type=int, default=3, choices=(0, 3, 150))
    ap.add_argument("--fusion", default="late", choices=("late", "exchange"))
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    ap.add_argument("--data-root", help="also time the DataLoader on this data root's shards")
    ap.add_argument("--dataset", default="mp16")
    ap.add_argument("--num-workers", type=int, default=16)
    ap.add_argument("--json", help="write the numbers to this JSON file")
    ap.add_argument("--smoke", action="store_true", help="tiny model and batch, runs on the CPU")
    args = ap.parse_args()
    args.overrides = {}
    if args.smoke:  # the demo world's model size: checks the script end to end in seconds
        args.backbone, args.img_size, args.batch_size, args.steps, args.warmup = "vit_tiny_patch16_224", 64, 8, 3, 1
        args.overrides = {"patch_size": 8, "depth": 2, "embed_dim": 96, "num_heads": 3}
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_train_gpu: no CUDA device here. Run it on a GPU machine, or add --smoke for a tiny "
              "CPU version that checks the script.", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    step, n_params = step_fn(args, device)
    for _ in range(args.warmup):
        step()
    flops = count_flops(step)  # one more (counted) step, outside the timing
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    images_s = args.batch_size / dt
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name)
    print(f"device {name}; {args.backbone} x{2 if args.seg_channels else 1} branches ({args.fusion}), "
          f"{n_params / 1e6:.1f} M parameters, {args.img_size} px, batch {args.batch_size}, {args.precision}"
          f"{', compiled' if args.compile else ''}")
    print(f"step    {dt * 1e3:8.1f} ms   {images_s:8.1f} images/s")
    print(f"flops   {flops / args.batch_size / 1e9:8.1f} GFLOP per image (forward + backward)   "
          f"{flops / dt / 1e12:.1f} TFLOP/s achieved")
    if peak:
        print(f"MFU     {flops / dt / peak:8.1%}   (of {peak / 1e12:.0f} TFLOP/s dense bf16 peak)")
    else:
        print("MFU     n/a (device not in the peak table: pass --peak-tflops)")
    if device.type == "cuda":
        print(f"memory  {torch.cuda.max_memory_allocated(device) / 2**30:8.1f} GiB peak allocated")
    report = {"device": name, "backbone": args.backbone, "fusion": args.fusion, "seg_channels": args.seg_channels,
              "compile": args.compile, "precision": args.precision, "batch_size": args.batch_size,
              "img_size": args.img_size, "params_m": n_params / 1e6, "step_ms": dt * 1e3, "images_s": images_s,
              "gflop_per_image": flops / args.batch_size / 1e9, "tflops": flops / dt / 1e12,
              "mfu": flops / dt / peak if peak else None,
              "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    if args.data_root:
        rate = loader_rate(args, batches=max(args.steps, 20))
        verdict = "keeps up" if rate >= images_s else "is the bottleneck: add --num-workers or cores"
        print(f"data    {rate:8.1f} images/s with {args.num_workers} workers: loading {verdict}")
        report.update(loader_images_s=rate, loader_workers=args.num_workers)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
