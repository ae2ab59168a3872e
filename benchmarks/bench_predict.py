"""Cold-start `geoloc predict` wall time with a full-size model on CPU, and `geoloc --help`.

    python benchmarks/bench_predict.py                      # 2 CPU cores (taskset -c 0,1), 3 timed runs each
    python benchmarks/bench_predict.py --cores 0-3 --workdir /tmp/bench-predict --keep

The model is ViT-B/16-sized and dual-branch (RGB + 3-channel segmentation map, 224 px), with heads the
size of the published partitionings (3,298 / 7,202 / 12,893 cells, cell centres from tests/data) plus
a 3-way scene head, and an embedded SegFormer-B0-shaped segmenter (512 px input). Weights are random:
the timing does not depend on them (the cell hierarchy is random too). The checkpoint is exported with
`geoloc export`, then each timed run is a fresh process: `geoloc predict photo.jpg --model CKPT`
(ONNX Runtime, torch never imported; weights mapped from the page-aligned .onnx.data files) and
`--backend torch` for comparison. The first run of each
command is reported separately (it reads the model files into the page cache). The 1-minute load
average after each series is recorded: on a shared machine other processes inflate the wall times;
the CPU time (user + sys over all threads of the process) is much less sensitive to them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
GEOLOC = str(Path(sys.executable).parent / "geoloc")
TABLES = {"coarse": "cells_50_5000.csv", "middle": "cells_50_2000.csv", "fine": "cells_50_1000.csv"}


def build_checkpoint(path: Path) -> None:
    import torch

    from geoloc_cli import config as cfgmod
    from geoloc_cli.inference.geolocate import CellSet
    from geoloc_cli.model.network import ModelSpec, build_model, save_inference_checkpoint
    from geoloc_cli.model.segmentation import Segmenter

    tables = {n: pd.read_csv(REPO / "tests/data" / f, skiprows=2, dtype={"hex_id": str}) for n, f in TABLES.items()}
    rng = np.random.default_rng(0)
    n_fine = len(tables["fine"])
    parents = {n: rng.integers(0, len(tables[n]), n_fine) for n in ("coarse", "middle")}
    cells = CellSet.from_tables(tables, parents)
    torch.manual_seed(0)
    spec = ModelSpec("vit_base_patch16_224", 224, 3, "late", {**{n: len(t) for n, t in tables.items()}, "scene": 3})
    model = build_model(spec, pretrained="none").eval()
    seg_tensors, seg_meta = Segmenter.from_name("segformer-b0-random", device="cpu").state()
    save_inference_checkpoint(path, model, {"partitionings": cells.to_meta(), "segmenter": seg_meta,
                                            "config": cfgmod.to_dict(cfgmod.Config())}, seg_tensors)


def photo(path: Path) -> None:
    """A smooth 640 x 480 photo-like JPEG (the size Flickr's _z photos have)."""
    from PIL import Image

    y, x = np.mgrid[0:480, 0:640]
    rgb = np.stack([x / 640 * 255, y / 480 * 255, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=90)


def timed(cmd: list[str], cores: str, runs: int) -> dict[str, float]:
    """Wall time and CPU time (user + sys of the child, all threads) of fresh processes."""
    full = ["taskset", "-c", cores, *cmd]
    times, cpu = [], []
    for _ in range(runs + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        r = subprocess.run(full, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(full)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return {"first_s": round(times[0], 3), "median_s": round(statistics.median(times[1:]), 3),
            "min_s": round(min(times[1:]), 3), "runs_s": [round(t, 3) for t in times[1:]],
            "cpu_median_s": round(statistics.median(cpu[1:]), 3),
            "loadavg_after": Path("/proc/loadavg").read_text().split()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", default="0,1", help="taskset CPU list (default 0,1: two cores)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-predict"))
    ap.add_argument("--keep", action="store_true", help="keep the model files in --workdir")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, jpg = args.workdir / "model.safetensors", args.workdir / "photo.jpg"
    t = time.perf_counter()
    if not ckpt.is_file():
        build_checkpoint(ckpt)
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([GEOLOC, "export", str(ckpt), "-q"], check=True, capture_output=True)
    t_export = time.perf_counter() - t
    photo(jpg)
    env_note = (f"{len(os.sched_getaffinity(0))} cores visible, timed on taskset -c {args.cores}, "
                f"load average before: {Path('/proc/loadavg').read_text().split()[0]}")
    results = {
        "machine": env_note,
        "files_mb": {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(args.workdir.glob("model*"))},
        "build_s": round(t_build, 1), "export_s": round(t_export, 1),
        "help": timed([GEOLOC, "--help"], args.cores, args.runs),
        "predict_onnx": timed([GEOLOC, "predict", str(jpg), "--model", str(ckpt), "-q"], args.cores, args.runs),
        "predict_torch": timed([GEOLOC, "predict", str(jpg), "--model", str(ckpt), "-q", "--backend", "torch"],
                               args.cores, args.runs),
    }
    print(json.dumps(results, indent=2))
    out = REPO / "benchmarks/out/predict.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
