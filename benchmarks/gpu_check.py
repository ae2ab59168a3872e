"""Every GPU path of geoloc in one prepared run, for the few minutes a GPU machine is lent.

    bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine (installs, then runs this)
    bash benchmarks/gpu_check.sh OUT_DIR --smoke    # the same steps on the CPU with tiny sizes

Steps, most important first, each a subprocess with its own time limit; once the whole budget
(--budget seconds) is spent the remaining steps are recorded as skipped, so the run always ends in
time with a report. OUT_DIR gets gpu_check.json (every step: status, seconds, numbers),
gpu_check.md (the table for benchmarks/README.md) and gpu_check.log (every command's output).

1. environment: GPU, cores, /dev/shm, library versions; stop if CUDA is missing (not with --smoke);
2. (bench) bench_train_gpu.py, ViT-B/16 dual branch bf16 late fusion eager: images/s, MFU, memory;
   (batch) the same at batch 256;
3. (pytest) pytest -m gpu (tests/test_gpu.py): train, resume, segment, evaluate, predict on CUDA;
4. (world) a scaled demo world through fetch, partition, filter, segment (SegFormer-B0-sized random
   model, 512 px, bf16), train (ViT-B/16 dual branch, bf16, 2 epochs), evaluate, and predict with torch
   on CUDA and ONNX Runtime on the CPU (same top-k); offline: random weights, HF_HUB_OFFLINE=1; then
   bench_train_gpu.py for exchange fusion and the training DataLoader alone with 16 workers;
5. (segment) bench_segment.py: the model alone and the stage with 2 and 14 decode threads;
6. (embed) bench_embed.py: `geoloc embed` with CLIP ViT-L/14 (random weights, bf16) and head training on
   MP-16-sized embeddings (4.7 M x 1024 fp16, the published cells): images/s, samples/s, loader vs step;
7. (compiled) compiled late fusion, and train compiled on the demo world (1 epoch): last, since on an
   H200 compiling gave no speed-up and costs ~100 s per graph.
`--steps` picks groups (the names in brackets), e.g. to finish what an earlier run's budget skipped.
Targets (from the GPU readiness issue): dual-branch bf16 training >= 40% MFU; the loader >= 1.5x the
model's images/s; no GPU path raising. A missed speed target is reported in the step's note; a command
that fails, or torch and ONNX disagreeing on a photo's top cell, fails the step (and exit code 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
MFU_TARGET = 0.40
LOADER_TARGET = 1.5  # loader images/s over the model's
# step groups, in the order they run (--steps picks some, e.g. to finish what an earlier run's budget skipped)
STEPS = ("bench", "batch", "pytest", "world", "segment", "embed", "compiled")


@dataclass
class Step:
    name: str
    status: str = "skipped"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)
    note: str = ""


class Check:
    """Runs commands under one time budget and keeps the report up to date on disk."""

    def __init__(self, out: Path, budget: float, smoke: bool) -> None:
        self.out, self.smoke, self.deadline = out, smoke, time.monotonic() + budget
        self.steps: list[Step] = []
        self.env: dict[str, Any] = {}
        self.log = open(out / "gpu_check.log", "w")  # noqa: SIM115 - open for the whole run

    def run(self, name: str, cmd: list[str], limit: float, stdout: Path | None = None, **env: str) -> Step:
        step = Step(name)
        self.steps.append(step)
        left = self.deadline - time.monotonic()
        if left < 10:
            step.note = "the check's time budget was spent"
            return self.save(step)
        limit = min(limit, left)
        self.log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        self.log.flush()
        t0 = time.monotonic()
        try:
            with open(stdout, "w") if stdout else contextlib.nullcontext(self.log) as sink:
                r = subprocess.run(cmd, cwd=REPO, stdout=sink, stderr=self.log, timeout=limit,
                                   env={**os.environ, **env})
            step.status = "ok" if r.returncode == 0 else "failed"
            if r.returncode:
                step.note = f"exit code {r.returncode}: {self.last_line()}"
        except subprocess.TimeoutExpired:
            step.status, step.note = "timeout", f"stopped after {limit:.0f} s"
        step.seconds = round(time.monotonic() - t0, 1)
        print(f"{name:<28} {step.status:<8} {step.seconds:7.1f} s  {step.note}", flush=True)
        return self.save(step)

    def last_line(self) -> str:
        self.log.flush()
        lines = [x for x in (self.out / "gpu_check.log").read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1][:300] if lines else ""

    def save(self, step: Step) -> Step:
        report = {"env": self.env, "smoke": self.smoke, "steps": [asdict(s) for s in self.steps]}
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (self.out / "gpu_check.md").write_text(markdown(report))
        return step


def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [f"device: {env.get('device', '?')}; {env.get('cores', '?')} cores; torch {env.get('torch', '?')}; "
             f"date {env.get('date', '?')}" + (" (smoke run on the CPU)" if report["smoke"] else ""), "",
             "| step | status | s | numbers | note |", "|---|---|---|---|---|"]
    for s in report["steps"]:
        nums = ", ".join(f"{k} {_fmt(v)}" for k, v in s["numbers"].items())
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {nums} | {s['note']} |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return (f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}") if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------- steps


def environment(check: Check) -> bool:
    """Versions and the machine; False when there is no CUDA and this is not a smoke run."""
    import torch

    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.version.cuda, "cores": os.cpu_count(),
                            "cuda_available": torch.cuda.is_available()}
    for lib in ("timm", "transformers", "onnxruntime", "onnx", "numpy", "PIL", "simplejpeg", "s2sphere"):
        try:
            info[lib] = getattr(__import__(lib), "__version__", "?")
        except ImportError:
            info[lib] = "missing"
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    bf16=torch.cuda.is_bf16_supported(),
                    gpu_mem_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").is_dir() else None
    info["shm_gib"] = round(shm.total / 2**30, 1) if shm else None
    check.env = info
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    step = Step("environment", "ok", numbers={k: info[k] for k in ("gpus", "shm_gib") if info.get(k) is not None})
    if not info["cuda_available"] and not check.smoke:
        step.status, step.note = "failed", "CUDA is not available: nothing to check (add --smoke for the CPU)"
    check.steps.append(step)
    check.save(step)
    return step.status == "ok"


def bench_train(check: Check, name: str, limit: float, *extra: str) -> dict[str, Any]:
    out = check.out / f".{name}.json"
    args = ["--smoke"] if check.smoke else []
    step = check.run(name, [sys.executable, "benchmarks/bench_train_gpu.py", *args, "--json", str(out), *extra], limit)
    if step.status == "ok":
        r = json.loads(out.read_text())
        step.numbers = {k: round(r[k], 3) for k in ("images_s", "step_ms", "peak_gib", "loader_images_s")
                        if r.get(k) is not None}
        if r.get("mfu") is not None:
            step.numbers["mfu_pct"] = round(100 * r["mfu"], 1)
            step.note = f"MFU {'meets' if r['mfu'] >= MFU_TARGET else 'is under'} the {MFU_TARGET:.0%} target"
        check.save(step)
        return r
    return {}


def world_config(root: Path, smoke: bool, demo_size: int) -> dict[str, Any]:
    """configs/demo.yaml scaled to a GPU (or, with smoke, to the tests' tiny sizes)."""
    cfg = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    cfg["paths"]["root"] = str(Path(root).resolve())  # (a relative root would resolve against the config file)
    scale = demo_size / cfg["fetch"].get("demo_size", 1200)
    cfg["partition"]["tau_min"] = max(2, round(cfg["partition"]["tau_min"] * scale))
    cfg["partition"]["tau_max"] = {k: max(4, round(v * scale)) for k, v in cfg["partition"]["tau_max"].items()}
    cfg["fetch"].update(demo_size=demo_size, shard_size=max(40, demo_size // 16), processes=min(8, os.cpu_count()))
    cfg["train"].update(run="gpu-eager", epochs=2, ema_decay=0.999)
    if smoke:
        cfg["runtime"].update(device="cpu", num_workers=1)
        cfg["segment"].update(input_size=64)
        cfg["model"].update(img_size=32, overrides={"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})
        cfg["train"].update(epochs=1, batch_size=16)
        return cfg
    cfg["runtime"].update(device="cuda", num_workers="auto")
    cfg["segment"].update(model="segformer-b0-random", input_size=512, batch_size=64, precision="bf16")
    cfg["model"].update(backbone="vit_base_patch16_224", pretrained="none", img_size=224, overrides={})
    cfg["train"].update(batch_size=128, lr=3e-4, precision="bf16", checkpoint_every=10**6)
    cfg["evaluate"]["batch_size"] = 128
    return cfg


def demo_world(check: Check, demo_size: int) -> tuple[Path, Path] | None:
    """The pipeline on a scaled demo world; returns (config file, data root) when its data stages worked."""
    root = check.out / ".world"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg_path = root / "geoloc.yaml"
    cfg = world_config(root / "data", check.smoke, demo_size)
    cfg_path.write_text(yaml.safe_dump(cfg))
    geoloc = [sys.executable, "-m", "geoloc_cli"]
    c = ["-c", str(cfg_path), "-q"]
    for name, cmd, limit in (("fetch demo", ["fetch", "demo"], 120), ("partition", ["partition", "--cells", "all"], 60),
                             ("filter", ["filter"], 60)):
        if check.run(name, [*geoloc, *cmd, *c], limit).status != "ok":
            return None
    images = sum(json.loads((root / f"data/datasets/{d}/stats.json").read_text())["ok"] for d in ("demo", "demo_val"))
    step = check.run("segment", [*geoloc, "segment", *c], 120)
    if step.status != "ok":
        return None
    step.numbers = {"images_s": round(images / step.seconds, 1)}
    check.save(step)
    train_step(check, "train", [*geoloc, "train", *c], root / "data/runs/gpu-eager", 240)
    check.run("evaluate", [*geoloc, "evaluate", *c, "--set", "train.run=gpu-eager"], 120)
    predict(check, geoloc, c, root / "data")
    return cfg_path, root / "data"


def train_step(check: Check, name: str, cmd: list[str], run_dir: Path, limit: float) -> None:
    step = check.run(name, cmd, limit)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        step.numbers = {f"epoch{r['epoch']}_images_s": round(r["images_per_s"], 1) for r in records}
        if records and "val_hierarchical_acc_2500km" in records[-1]:
            step.numbers["val_acc_2500km"] = round(records[-1]["val_hierarchical_acc_2500km"], 3)
        step.numbers["onnx"] = (run_dir / "model.onnx").is_file()
        check.save(step)


def predict(check: Check, geoloc: list[str], c: list[str], root: Path) -> None:
    """torch on the GPU (CPU in a smoke run) and ONNX Runtime on the CPU give the same top-k cells."""
    photos = [str(p) for p in sorted((root / "sources/demo").glob("*.jpg"))[:16]]
    tops = {}
    device = "cpu" if check.smoke else "cuda"
    for backend, dev in (("torch", device), ("onnx", "cpu")):
        out = check.out / f".predict-{backend}.json"
        step = check.run(f"predict {backend} {dev}", [*geoloc, "predict", *photos, *c, "--set", "train.run=gpu-eager",
                                                      "--backend", backend, "--device", dev, "--json"], 120, out)
        if step.status == "ok":
            tops[backend] = [[t["cell"] for t in r["top"]] for r in json.loads(out.read_text())]
    if len(tops) == 2:
        same = sum(a == b for a, b in zip(tops["torch"], tops["onnx"], strict=True))
        top1 = sum(a[0] == b[0] for a, b in zip(tops["torch"], tops["onnx"], strict=True))
        step = Step("predict torch = onnx", "ok" if top1 == len(tops["torch"]) else "failed",
                    numbers={"photos": len(tops["torch"]), "same_topk": same, "same_top1": top1})
        check.steps.append(step)
        check.save(step)


def bench_segment(check: Check) -> None:
    base = [sys.executable, "benchmarks/bench_segment.py"]
    if check.smoke:
        runs = {"segment bench": [*base, "--n", "32", "--batch-size", "8", "--input-size", "64"]}
    else:
        gpu = [*base, "--model", "segformer-b0-random", "--device", "cuda", "--precision", "bf16",
               "--batch-size", "64", "--n", "1024"]
        runs = {"segment bench 2 threads": [*gpu, "--threads", "2"],
                "segment bench 14 threads": [*gpu, "--threads", "14"]}
    for name, cmd in runs.items():
        out = check.out / ".segment.json"
        step = check.run(name, [*cmd, "--json", str(out)], 120)
        if step.status == "ok":
            r = json.loads(out.read_text())
            step.numbers = {k: round(r[k], 1) for k in ("model_images_s", "stage_images_s")}
            # the stage decodes, resizes and PNG-encodes on the CPU around the model's work
            step.note = "bound by decode/encode (data)" if r["stage_images_s"] < 0.7 * r["model_images_s"] \
                else "bound by the model"
            check.save(step)


def bench_embed(check: Check) -> None:
    cmd = [sys.executable, "benchmarks/bench_embed.py"]
    if check.smoke:
        cmd += ["--images", "64", "--n", "20000", "--train-batch", "512", "--seconds", "1"]
    else:
        cmd += ["--device", "cuda", "--backbone", "vit_large_patch14_clip_quickgelu_224", "--img-size", "224",
                "--overrides", "{}", "--images", "4096", "--batch-size", "256", "--threads", "14",
                "--n", "4700000", "--seconds", "10"]
    out = check.out / ".embed.json"
    step = check.run("embed bench", [*cmd, "--json", str(out)], 240)
    if step.status == "ok":
        r = json.loads(out.read_text())
        step.numbers = {k: round(v, 1) for k, v in r.items() if k != "args"}
        step.note = "heads bound by the loader" if r["heads_loader_samples_per_s"] < r["heads_train_samples_per_s"] \
            else "heads bound by the step (loader keeps up)"
        check.save(step)


def verdicts(check: Check, late: dict[str, Any], loader: dict[str, Any]) -> None:
    """Which side bounds training: the loader against the model's images/s."""
    if not late or not loader.get("loader_images_s"):
        return
    ratio = loader["loader_images_s"] / late["images_s"]
    step = Step("training bound by", "ok",
                numbers={"loader_over_model": round(ratio, 2)},
                note=("model (loader keeps up)" if ratio >= 1 else "data (the loader is slower than the model)")
                + f"; {'meets' if ratio >= LOADER_TARGET else 'misses'} the >= {LOADER_TARGET}x target")
    check.steps.append(step)
    check.save(step)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks this script end to end")
    ap.add_argument("--budget", type=float, help="seconds for the whole check (default 470; smoke 170)")
    ap.add_argument("--steps", help=f"comma-separated groups to run (default all): {', '.join(STEPS)}")
    ap.add_argument("--demo-size", type=int, help="photos in the demo world (default 2400; smoke 200)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.budget or (170 if args.smoke else 470), args.smoke)
    if not environment(check):
        return 1
    want = set(args.steps.split(",")) if args.steps else set(STEPS)
    if unknown := want - set(STEPS):
        ap.error(f"unknown steps {sorted(unknown)}: choose from {', '.join(STEPS)}")
    late = bench_train(check, "bench late eager", 90) if "bench" in want else {}
    if "batch" in want:  # does a larger batch fill the GPU better (MFU against batch size)?
        bench_train(check, "bench late eager b256", 90, "--batch-size", "256")
    if "pytest" in want:
        gpu_env = {"GEOLOC_GPU_TESTS_DEVICE": "cpu"} if args.smoke else {}
        step = check.run("pytest -m gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider",
                                           "tests/test_gpu.py"], 180, **gpu_env)
        step.numbers = {"summary": check.last_line()}
        check.save(step)
    world = demo_world(check, args.demo_size or (200 if args.smoke else 2400)) if "world" in want else None
    if "bench" in want:
        bench_train(check, "bench exchange eager", 90, "--fusion", "exchange")
    loader: dict[str, Any] = {}
    if world is not None:
        sizes = ["--img-size", "32"] if args.smoke else []
        loader = bench_train(check, "bench late + loader", 120, "--data-root", str(world[1]), "--dataset", "demo",
                             "--num-workers", "1" if args.smoke else "16", *sizes)
    verdicts(check, late, loader)
    if "segment" in want:
        bench_segment(check)
    if "embed" in want:
        bench_embed(check)
    # last: on an H200 (2026-11-27) compiling gave no speed-up and costs ~100 s per graph
    if "compiled" in want and not args.smoke:  # inductor needs ~40 s of C++ builds per graph on a CPU
        bench_train(check, "bench late compiled", 180, "--compile")
        if world is not None:
            geoloc = [sys.executable, "-m", "geoloc_cli", "train", "-c", str(world[0]), "-q", "--set",
                      "train.compile=true", "--set", "train.epochs=1", "--set", "train.run=gpu-compiled"]
            train_step(check, "train compiled", geoloc, world[1] / "runs/gpu-compiled", 240)
    failed = [s.name for s in check.steps if s.status in ("failed", "timeout")]
    print(f"\n{len(check.steps)} steps, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
          f"report in {args.out}/gpu_check.md")
    print((args.out / "gpu_check.md").read_text())
    check.log.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
