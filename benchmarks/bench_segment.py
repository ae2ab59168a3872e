"""Segmentation throughput in images/s: the model alone, and the `segment` stage end to end.

    python benchmarks/bench_segment.py                                   # CPU, tiny random SegFormer
    python benchmarks/bench_segment.py --model segformer-b0-random --device cuda --batch-size 64 --n 2048

`model` times preprocessing on the device + forward + argmax on ready uint8 batches; `stage` times what
`geoloc segment` does per image shard: JPEG decode and resize in threads, inference, PNG encode, tar
write. Images are synthetic 427x320 JPEGs (the size `geoloc fetch` stores).

Models: `tiny-random`, `segformer-b0-random` and `segformer-b2-random` are the SegFormer architectures
with random weights, built offline (B0 = nvidia/segformer-b0-finetuned-ade-512-512's shapes), so the
timing is real on a machine without internet. Any hub id or local directory works too; `--random-init`
then takes only its config (AutoConfig, from the cache or the hub) and skips the weights.

Licence: NVIDIA's SegFormer weights (the default `segment.model`) are for non-commercial use only. To
use another ADE20K model (150 labels, loadable with AutoModelForSemanticSegmentation), set
`segment.model` in the config or pass `--set segment.model=<hub id or local dir>` to `geoloc segment`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geoloc_cli.data.store import DataRoot, ShardWriter
from geoloc_cli.dist import resolve_device
from geoloc_cli.model.segmentation import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Segmenter
from geoloc_cli.stages import segment as stage


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Smooth photo-like JPEGs (noise compresses and decodes unlike photos)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((427, 320), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_segmenter(args: argparse.Namespace, device: str) -> Segmenter:
    if not args.random_init:
        return Segmenter.from_name(args.model, device, args.precision, args.input_size)
    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_config(AutoConfig.from_pretrained(args.model))
    pre = Preprocess(args.input_size or 512, tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    return Segmenter(model, pre, device, args.precision, args.model)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_model(segmenter: Segmenter, jpegs: list[bytes], batch_size: int) -> float:
    """Images/s of predict() on prepared batches (device preprocessing + forward + argmax + copy back)."""
    prepared = [segmenter.prepare(Image.open(io.BytesIO(j))) for j in jpegs[:batch_size]]
    batch = np.stack(prepared)
    segmenter.predict(batch)  # warm-up: kernels, autotuning, allocator
    sync(segmenter.device)
    batches = max(1, len(jpegs) // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        segmenter.predict(batch)
    sync(segmenter.device)
    return batches * batch_size / (time.perf_counter() - start)


def bench_stage(segmenter: Segmenter, jpegs: list[bytes], batch_size: int, threads: int) -> float:
    """Images/s of the stage's shard loop (decode threads, inference, PNG, tar) on temporary shards."""
    with tempfile.TemporaryDirectory() as tmp:
        root = DataRoot(Path(tmp))
        per_shard = 1000
        for s in range(0, len(jpegs), per_shard):
            with ShardWriter(root.shards("bench") / f"images-{s // per_shard:06d}.tar") as writer:
                for i, data in enumerate(jpegs[s : s + per_shard]):
                    writer.add(f"{s + i:09d}", {"jpg": data})
        jobs = stage.plan(root, "bench")
        start = time.perf_counter()
        stage.segment_with(segmenter, jobs, batch_size, threads, lambda n: None)
        sync(segmenter.device)
        return len(jpegs) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-random", help="tiny-random, segformer-b0-random, hub id or dir")
    p.add_argument("--random-init", action="store_true", help="hub id/dir: its config with random weights")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--input-size", type=int, default=512)
    p.add_argument("--n", type=int, default=256, help="images per measurement")
    p.add_argument("--threads", type=int, default=2, help="decode threads (runtime.num_workers)")
    p.add_argument("--skip-stage", action="store_true", help="only time the model")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.random_init and args.model.endswith("-random"):
        sys.exit("--random-init is for hub ids and directories; *-random models are random already")
    device = str(resolve_device(args.device))
    jpegs = synthetic_jpegs(args.n)
    segmenter = build_segmenter(args, device)
    model_rate = bench_model(segmenter, jpegs, args.batch_size)
    print(f"model={args.model} device={device} precision={args.precision} input={args.input_size} "
          f"batch={args.batch_size} n={args.n} torch_threads={torch.get_num_threads()}")
    print(f"model only : {model_rate:10.1f} img/s")
    report = {"device": device, "model": args.model, "model_images_s": model_rate}
    if not args.skip_stage:
        rate = bench_stage(segmenter, jpegs, args.batch_size, args.threads)
        print(f"stage      : {rate:10.1f} img/s  (decode threads={args.threads})")
        report.update(stage_images_s=rate, threads=args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
