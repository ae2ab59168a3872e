"""Devices, precision, CPU threads and loader workers, process groups (single-process paths; the
2-process gloo runs are in test_pipeline.py)."""

import pytest
import torch

from geoloc_cli import dist
from geoloc_cli.errors import ConfigError


def test_devices_are_checked_before_any_worker_starts(monkeypatch):
    assert dist.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        dist.resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="conflicts with runtime.device=cuda:1"):
        dist.check_devices([0, 1], "cuda:1", "train")
    with pytest.raises(ConfigError, match="listed twice"):
        dist.check_devices([0, 0], "auto", "train")
    with pytest.raises(ConfigError, match="CUDA is not available on this machine"):
        dist.check_devices([0], "auto", "train")


def test_precision_and_workers_follow_the_device(monkeypatch):
    assert dist.amp_dtype("auto", "cpu") is None and dist.amp_dtype("bf16", "cpu") == torch.bfloat16
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert dist.loader_workers("auto", "cuda:0") == 14  # the cores a GPU rank leaves free
    assert dist.loader_workers("auto", "cuda:0", world=8) == 1
    assert dist.loader_workers("auto", "cpu") == 2 and dist.loader_workers(5, "cpu") == 5
    before = torch.get_num_threads()
    try:
        dist.limit_cpu_threads(4, world=2)
        assert torch.get_num_threads() == 4  # 16 cores / 2 ranks - 4 loader workers
    finally:
        torch.set_num_threads(before)


def test_without_a_process_group_gather_and_barrier_are_local(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = dist.setup("cpu")
    assert (info.rank, info.world, info.main) == (0, 1, True)
    dist.barrier()
    assert dist.gather({"a": 1}) == [{"a": 1}]
    dist.teardown()
