"""The GPU paths: train, resume, segment, evaluate and predict on CUDA with bf16, and 2-process NCCL DDP.

Run with `pytest -m gpu` on a machine with a CUDA GPU (benchmarks/gpu_check.sh does); every test here is
skipped without one. They use the tiny demo world, so they check that the paths run and agree with
the CPU, not speed (that is benchmarks/bench_train_gpu.py). GEOLOC_GPU_TESTS_DEVICE=cpu runs them on
the CPU (bf16 autocast there) without the CUDA-only checks: the gpu_check smoke run does, so this file
cannot rot on machines without a GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner
from worlds import DATA_STAGES, build_world, free_port, weight_diff

from geoloc_cli.cli import app
from geoloc_cli.config import load_config
from geoloc_cli.stages import train

DEVICE = os.environ.get("GEOLOC_GPU_TESTS_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Resume on a GPU is not bit-exact: cuDNN and SDPA backward kernels accumulate in an order that can
# differ between runs, and bf16 autocast amplifies it. The continued weights must stay this close to an
# uninterrupted run's (the largest element difference, after 3 epochs of the tiny model at lr 1e-3).
RESUME_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny demo world segmented on the GPU (bf16), with a CUDA bf16 training config."""
    stages = (*DATA_STAGES, ["segment"])
    return build_world(tmp_path_factory.mktemp("gpuworld"), stages,
                       runtime={"device": DEVICE, "num_workers": 2},
                       segment={"precision": "bf16"},
                       train={"epochs": 3, "batch_size": 16, "checkpoint_every": 2, "ema_decay": 0.9,
                              "precision": "bf16"})


@pytest.fixture(scope="module")
def reference(world) -> dict:
    (result,) = train.launch(load_config(world[0], ["train.run=ref"]))
    return result


def _resume_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "resume.pt", map_location="cpu", weights_only=True)


def test_training_on_cuda_takes_the_gpu_paths(world, reference, monkeypatch):
    _, root = world
    losses = [v for rec in reference["history"] for k, v in rec.items() if k.startswith("train_loss")]
    assert losses and np.isfinite(losses).all(), reference["history"]
    state = _resume_state(root / "runs/ref")
    assert bool(state["optimizer"]["param_groups"][0]["fused"]) == CUDA, "fused AdamW on the GPU"
    assert (state["ranks"][0]["rng"]["cuda"] is not None) == CUDA, "the CUDA RNG travels in resume.pt"
    assert (root / "runs/ref/model.onnx").is_file() or not _has_onnx()


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_loader_pins_memory_and_ships_uint8(world, monkeypatch):
    seen: list[dict] = []
    real = torch.utils.data.DataLoader

    def spy(*args, **kwargs):
        loader = real(*args, **kwargs)
        seen.append({"pin": loader.pin_memory, "first": next(iter(loader))})
        return loader

    monkeypatch.setattr(torch.utils.data, "DataLoader", spy)
    train.launch(load_config(world[0], ["train.run=spy", "train.epochs=1", "train.val_dataset="]))
    assert seen and all(s["pin"] == CUDA for s in seen)
    first = seen[0]["first"]
    assert first["image"].dtype == torch.uint8
    assert first["image"].is_pinned() == CUDA and all(t.is_pinned() == CUDA for t in first["targets"].values())


def test_resume_on_cuda_continues_the_uninterrupted_run(world, reference, monkeypatch):
    """Stop after the second resume state (mid-epoch), resume, compare with the uninterrupted run."""
    cfg_path, root = world
    saves = []
    from geoloc_cli.train.trainer import Trainer

    real_save = Trainer.save

    class Stop(Exception):
        pass

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise Stop

    monkeypatch.setattr(Trainer, "save", save_then_stop)
    with pytest.raises(Stop):
        train.launch(load_config(cfg_path, ["train.run=cut"]))
    monkeypatch.setattr(Trainer, "save", real_save)
    (resumed,) = train.launch(load_config(cfg_path, ["train.run=cut"]), resume=True)
    a, b = _resume_state(root / "runs/cut"), _resume_state(root / "runs/ref")
    assert a["step"] == b["step"]
    diff = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"])
    print(f"GPU resume: largest weight difference to the uninterrupted run {diff:.2e}")
    assert diff <= RESUME_TOLERANCE
    assert resumed["history"][-1]["train_loss"] == pytest.approx(reference["history"][-1]["train_loss"], rel=2e-2)


def test_segmenting_on_cuda_in_bf16_agrees_with_the_cpu():
    from geoloc_cli.model.segmentation import Segmenter

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    gpu = Segmenter.from_name("segformer-b0-random", DEVICE, "bf16", 128).predict(batch)
    cpu = Segmenter.from_name("segformer-b0-random", "cpu", "fp32", 128).predict(batch)
    agreement = float((gpu == cpu).mean())
    print(f"bf16 GPU vs fp32 CPU segmentation: {agreement:.1%} of pixels agree")
    assert gpu.shape == cpu.shape and agreement >= 0.9  # random weights: many near-ties flip in bf16


def test_evaluate_on_cuda_matches_the_cpu(world, reference):
    from geoloc_cli.stages.evaluate import evaluate_model

    cfg_path, root = world
    ckpt = root / "runs/ref/model.safetensors"
    on = {d: evaluate_model(load_config(cfg_path, [f"runtime.device={d}"]), ckpt, ["demo_val"], quiet_tables=True)
          for d in (DEVICE, "cpu")}
    gpu, cpu = on[DEVICE]["demo_val"]["hierarchical"], on["cpu"]["demo_val"]["hierarchical"]
    for k in ("acc_200km", "acc_2500km"):
        assert abs(gpu[k] - cpu[k]) <= 0.03, (k, gpu[k], cpu[k])


def test_predict_with_torch_on_cuda_agrees_with_onnx_on_the_cpu(world, reference):
    if not _has_onnx():
        pytest.skip("onnx is not installed: no export to compare with")
    cfg_path, root = world
    photos = sorted((root / "sources/demo").glob("*.jpg"))[:4]
    out = {}
    for backend, device in (("torch", DEVICE), ("onnx", "cpu")):
        r = CliRunner().invoke(app, ["predict", *map(str, photos), "-c", str(cfg_path), "--set", "train.run=ref",
                                     "--backend", backend, "--device", device, "--json", "-q"])
        assert r.exit_code == 0, r.output
        out[backend] = [x["top"][0]["cell"] for x in json.loads(r.stdout)]
    assert out["torch"] == out["onnx"]


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_on_two_gpus_with_nccl_keeps_the_ranks_identical(world):
    cfg = load_config(world[0], ["train.run=nccl", "train.epochs=1", "train.val_dataset=", "runtime.gpus=[0,1]",
                                 "runtime.device=auto", "model.fusion=exchange"])
    results = train.launch(cfg, master_port=free_port(), weights=True)
    assert [r["rank"] for r in results] == [0, 1]
    assert weight_diff(results[0]["params"], results[1]["params"]) == 0
