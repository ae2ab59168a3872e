"""Process-group set-up for single-process, multi-GPU (NCCL) and CPU (gloo) training.

Model code never imports this: the training stage wraps the model in DDP from outside. Launchers
(`geoloc train --gpus`, torchrun) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from geoloc_cli.errors import USER_ERRORS, ConfigError, GeolocError, worker_error


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_devices(gpus: list[int], device: str, stage: str) -> None:
    """GPUs that are asked for must exist: checked in the launching process before any worker starts."""
    if not gpus:
        resolve_device(device)  # raises for cuda without CUDA
        return
    flag = f"--gpus {','.join(map(str, gpus))}"
    if device == "cpu" or device.startswith("cuda:"):
        # cuda:N with --gpus would put every rank on GPU N ("Duplicate GPU detected" in NCCL)
        raise ConfigError(f"{flag} conflicts with runtime.device={device}: drop one of them")
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"{flag}: a GPU is listed twice")
    if not torch.cuda.is_available():
        raise ConfigError(f"{flag}: CUDA is not available on this machine (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}): leave out --gpus to {stage} on the CPU")
    n = torch.cuda.device_count()
    bad = [g for g in gpus if not 0 <= g < n]
    if bad:
        raise ConfigError(f"{flag}: GPU(s) {bad} do not exist, {n} visible (indices 0..{n - 1})")


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """auto -> this process's GPU if CUDA is available, else cpu; cuda:N must exist."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device: {spec} requested but CUDA is not available")
        index = int(spec.split(":")[1]) if ":" in spec else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"runtime.device: {spec}: only {torch.cuda.device_count()} GPU(s) visible")
        return torch.device("cuda", index)
    return torch.device("cpu")


def amp_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """Autocast dtype for a precision setting; None = plain fp32. auto: bf16 on GPUs that support it
    (else fp16), fp32 on CPU."""
    if precision == "auto":
        if not str(device).startswith("cuda"):
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def limit_cpu_threads(num_workers: int, world: int = 1, device: torch.device | None = None) -> None:
    """Give each process only the cores nobody else uses: OpenMP threads that share a core with data
    workers or other ranks spin and stall each other (10x slower steps measured on 2 cores). A GPU rank
    computes on the GPU: a few threads for its host-side work are enough (torchrun sets 1)."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(world, 1) - num_workers)
    torch.set_num_threads(min(threads, GPU_RANK_THREADS) if device is not None and device.type == "cuda" else threads)


GPU_RANK_THREADS = 4


def loader_workers(setting: int | str, device: torch.device | str, world: int = 1) -> int:
    """DataLoader workers per process: `auto` gives a GPU rank the cores it does not use itself (one
    H100 eats ~1,000-1,400 img/s of ViT-B/16 dual-branch training, ~300 img/s per decoding core), and a
    CPU process 2 (its own threads need the rest)."""
    if setting != "auto":
        return int(setting)
    cores = os.cpu_count() or 1
    if str(device).startswith("cuda"):
        return max(1, min(MAX_AUTO_WORKERS, cores // max(world, 1) - 2))
    return min(2, max(cores // max(world, 1) - 1, 0))


MAX_AUTO_WORKERS = 16


def setup(device_spec: str) -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":  # always: kernels, NCCL and caching contexts then land on this GPU, not GPU 0
        torch.cuda.set_device(device)
    if world > 1 and not tdist.is_initialized():
        if device.type == "cuda":  # device_id: NCCL binds the communicator to this GPU at once
            tdist.init_process_group("nccl", device_id=device)
        else:
            tdist.init_process_group("gloo")
    return DistInfo(rank, world, local_rank, device)


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not tdist.is_initialized():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def run_on_devices(work: Callable[..., Any], jobs: list[Any], devices: list[str], report: Callable[[int], Any]) -> None:
    """work(share, device=..., report=...) with job i on device i % n: in this process for one device, else
    one spawned process per device (a picklable `work`). Workers' report(n) calls come back here through a
    queue; a worker's user or operating-system error (errors.worker_error) is raised here as the same one-line
    error, not a traceback, and stops the other workers."""
    if len(devices) == 1:
        work(jobs, device=devices[0], report=report)
        return
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    shares = [jobs[i :: len(devices)] for i in range(len(devices))]
    procs = mp.start_processes(_device_worker, args=(work, shares, devices, queue), nprocs=len(devices),
                               join=False, start_method="spawn")
    failure: tuple[str, str] | None = None
    while True:
        finished = procs.join(timeout=0.2)  # raises if a worker crashed without a message
        while not queue.empty():
            kind, value = queue.get()
            if kind == "done":
                report(value)
            else:
                failure = failure or value
        if finished or failure:  # one device failed (a full disk, say): the others stop too
            break
    if failure:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
        raise USER_ERRORS[failure[0]](failure[1])


def _device_worker(rank: int, work: Callable[..., Any], shares: list[list[Any]], devices: list[str],
                   queue: Any) -> None:
    try:
        work(shares[rank], device=devices[rank], report=lambda n: queue.put(("done", n)))
    except (GeolocError, OSError) as e:  # user errors travel back as messages, not tracebacks
        queue.put(("error", worker_error(e)))
