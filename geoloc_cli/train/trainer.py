"""The training loop's owner: `TrainState` (model, optimizer, scheduler, scaler, EMA and counters: all an
exact continuation needs) and `Trainer` (one optimizer step, one epoch, validation, resume files).

The model stays single-device code: the Trainer wraps it in DDP and torch.compile from outside. The
training stage (`stages/train.py`) checks inputs, builds data and model, and hands them to a Trainer;
benchmarks build a Trainer around a bare model and time `Trainer.step`. Only rank 0 prints and writes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from geoloc_cli import dist
from geoloc_cli.config import Config, TrainConfig, smoothing_km
from geoloc_cli.data.store import atomic_path
from geoloc_cli.errors import ConfigError, InputError

# torch.compile backend; the tests use "aot_eager" (inductor spends ~40 s compiling C++ on 2 CPU cores)
COMPILE_BACKEND = "inductor"


class Ema:
    """Exponential moving average of a model's weights, kept in a twin module that is validated and
    exported instead of the trained weights. The decay warms up as min(decay, (1+n)/(10+n)) after n
    updates, so the random initialisation is forgotten quickly in short runs."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        import copy

        self.decay, self.updates = decay, 0
        self._moving: list[str] | None = None  # floating-point entries that can change (set at the first update)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            mine, theirs = self.module.state_dict(), model.state_dict()
            if self._moving is None:  # frozen weights never move: a frozen ViT-L would cost most of the step
                moving = {n for n, p in model.named_parameters() if p.requires_grad}
                moving |= {n for n, _ in model.named_buffers()}
                self._moving = [k for k, v in mine.items() if v.is_floating_point() and k in moving]
            floats = self._moving
            torch._foreach_lerp_([mine[k] for k in floats], [theirs[k] for k in floats], 1.0 - d)
            for k, v in mine.items():  # integer buffers (counters) are copied
                if not v.is_floating_point():
                    v.copy_(theirs[k])

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 0 at `total_steps`."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    groups = [{"params": g["params"], "lr": cfg.train.lr * g["lr_scale"]}
              for g in model.param_groups(cfg.train.layer_decay)]
    if cfg.train.optimizer == "adamw":  # fused: one kernel for all parameters on the GPU
        return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                 fused=device.type == "cuda")
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=0.9, weight_decay=cfg.train.weight_decay)


def build_loss(cfg: Config, heads: Iterable[str], cells: Any | None, device: torch.device):
    """The weighted multi-task loss, with haversine label smoothing where train.label_smoothing_km asks
    (`cells`: the inference.geolocate.CellSet whose centres it smooths over)."""
    from geoloc_cli.train.losses import MultitaskLoss

    smoothing = {}
    for p in cfg.model.partitionings:
        tau = smoothing_km(cfg, p)
        if tau > 0:
            assert cells is not None, "label smoothing needs the cells' centres"
            lat, lon = (torch.tensor(c[p], dtype=torch.float32, device=device) for c in (cells.lat, cells.lon))
            smoothing[p] = (tau, lat, lon)
    return MultitaskLoss({h: cfg.train.loss_weights.get(h, 0.0) for h in heads}, smoothing)


@dataclass
class TrainState:
    """Everything that changes while training, and its serialisation (`state_dict` / `load_state_dict`)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: Ema | None = None
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    best: float = -math.inf  # best score of train.best_metric so far (higher is better: see Trainer.score)
    best_metric: str = ""  # the metric `best` scores (a resume with another one starts the comparison anew)
    sums: dict[str, float] = field(default_factory=dict)  # this epoch's running loss sums (mid-epoch resume)

    @classmethod
    def create(cls, cfg: Config, model: torch.nn.Module, device: torch.device, total_steps: int,
               warmup_steps: int) -> TrainState:
        opt = build_optimizer(cfg, model, device)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup_steps))
        amp = dist.amp_dtype(cfg.train.precision, device)
        scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
        ema = Ema(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        return cls(model, opt, sched, scaler, ema, best_metric=cfg.train.best_metric)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated and exported: the EMA's where there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step, "epoch": self.epoch, "best": self.best, "best_metric": self.best_metric}

    def load_state_dict(self, blob: dict[str, Any], source: Path | str = "resume state") -> None:
        """Restore from `state_dict()`'s blob; a blob that does not fit the model is a ConfigError."""
        model = self.model
        try:
            model.load_state_dict(model.upgrade_state(blob["model"]))
        except RuntimeError as e:  # shapes or names differ: the model config changed since the run started
            raise ConfigError(f"{source} does not fit the configured model (model.* changed since the run "
                              f"started?): {' '.join(str(e).split())[:300]}") from None
        try:
            self.optimizer.load_state_dict(blob["optimizer"])
        except ValueError as e:  # parameter groups of another size: a run started by an older geoloc, or model.*
            raise ConfigError(f"{source}: its optimizer state does not fit the model ({e}); resume with the geoloc "
                              "and model.* settings the run started with, or start a new run") from None
        self.scheduler.load_state_dict(blob["scheduler"])
        self.scaler.load_state_dict(blob["scaler"])
        if self.ema is not None:
            if blob.get("ema") is not None:
                self.ema.load_state_dict({**blob["ema"], "module": model.upgrade_state(blob["ema"]["module"])})
            else:  # EMA switched on for the rest of a run: start it from the current weights
                self.ema.module.load_state_dict(model.state_dict())
        self.step, self.epoch = int(blob["step"]), int(blob["epoch"])
        # states from before best_metric was recorded scored the default metric
        if blob.get("best_metric", TrainConfig().best_metric) == self.best_metric:
            self.best = float(blob["best"])


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def best_metric_sign(name: str) -> float:
    """+1 where a higher value of the metric is better (accuracies), -1 where lower is (losses, km)."""
    return -1.0 if name.endswith(("_km", "loss")) else 1.0


class Trainer:
    """Steps, epochs, validation and resume files of one run, on one rank (DDP across ranks)."""

    def __init__(self, cfg: Config, info: dist.DistInfo, state: TrainState, loss_fn: Any,
                 net: torch.nn.Module | None = None, seg_channels: int | None = None) -> None:
        """`net` is what the step runs (the model, or model.HeadsOnly on cached embeddings); `seg_channels`
        the maps each batch carries (None: model.seg_channels; 0 when the maps' features are cached)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.cfg, self.info, self.state, self.loss_fn = cfg, info, state, loss_fn
        net = state.model if net is None else net
        self.device = info.device
        # DDP and torch.compile wrap the single-device model from outside; state.model stays the plain one
        self.ddp = DDP(net, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
            if info.world > 1 else net
        self.forward = torch.compile(self.ddp, backend=COMPILE_BACKEND) if cfg.train.compile else self.ddp
        self.local_batch = cfg.train.batch_size // info.world
        self.micro = self.local_batch // cfg.train.grad_accum
        self.amp = dist.amp_dtype(cfg.train.precision, info.device)
        self.seg_channels = cfg.model.seg_channels if seg_channels is None else seg_channels

    # ------------------------------------------------------------------------------------------ a step

    def step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step over a local batch, in `local batch / micro` accumulation chunks; returns
        the step's losses (total and per head)."""
        s = self.state
        n = batch["image"].shape[0]
        chunks = range(0, n, self.micro)
        totals: dict[str, Any] = {}  # detached device tensors: read back once per step (one GPU sync)
        # Each head's loss is the mean over the known targets (-1 = unknown) of the whole local batch, so
        # accumulation chunks add up to it exactly, and a chunk without known targets adds 0, not NaN.
        known = {h: (batch["targets"][h] >= 0).sum().clamp(min=1).to(self.device) for h in self.loss_fn.weights}
        s.optimizer.zero_grad(set_to_none=True)
        for j, start in enumerate(chunks):
            part = slice(start, start + self.micro)
            # DDP: sync gradients only on the last micro-batch
            last = j == len(chunks) - 1
            sync = self.ddp.no_sync() if hasattr(self.ddp, "no_sync") and not last else contextlib.nullcontext()
            with sync, torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                loss, parts = self._chunk_loss(batch, part, known)
                for h, lh in parts.items():
                    totals[f"loss_{h}"] = totals.get(f"loss_{h}", 0.0) + lh.detach()
                s.scaler.scale(loss).backward()
            totals["loss"] = totals.get("loss", 0.0) + loss.detach()
        if self.cfg.train.grad_clip > 0:
            s.scaler.unscale_(s.optimizer)
            torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), self.cfg.train.grad_clip)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        if s.ema is not None:
            s.ema.update(s.model)
        s.step += 1
        return dict(zip(totals, torch.stack(list(totals.values())).tolist(), strict=True))

    def _chunk_loss(self, batch: dict[str, Any], part: slice, known: dict[str, torch.Tensor]):
        from geoloc_cli.model.segmentation import encode_seg_torch

        dev = self.device
        image = batch["image"][part].to(dev, non_blocking=True)
        seg = encode_seg_torch(batch["seg"][part].to(dev, non_blocking=True), self.seg_channels, self.amp) \
            if self.seg_channels else None
        logits = self.forward(image, seg)
        targets = {h: batch["targets"][h][part].to(dev, non_blocking=True) for h in self.loss_fn.weights}
        lat, lon = (batch[k][part].to(dev, torch.float32, non_blocking=True) for k in ("lat", "lon"))
        return self.loss_fn(logits, targets, known, lat, lon)

    # ----------------------------------------------------------------------------------------- an epoch

    def train_epoch(self, loader: Iterable[dict[str, Any]], steps: int, resumed: bool,
                    on_step: Callable[[dict[str, float]], None],
                    save: Callable[[], None]) -> tuple[dict[str, float], int, float]:
        """The loader's batches: returns (loss sums of the whole epoch, images seen by all ranks, seconds).
        `steps`: steps per epoch; `resumed`: the epoch continues mid-way (its loss sums were restored).
        `on_step` gets each step's losses (progress); `save` writes resume state (every
        train.checkpoint_every steps, not at the epoch's end, which saves anyway)."""
        s = self.state
        if not resumed:
            s.sums = {}
        self.ddp.train()
        t0, seen = time.perf_counter(), 0
        for batch in loader:
            losses = self.step(batch)
            seen += self.local_batch * self.info.world
            for k, v in losses.items():
                s.sums[k] = s.sums.get(k, 0.0) + v
            on_step({**losses, "lr": self.state.scheduler.get_last_lr()[0],
                     "img_s": seen / (time.perf_counter() - t0)})
            if s.step % self.cfg.train.checkpoint_every == 0 and s.step % steps != 0:
                save()
        return s.sums, seen, time.perf_counter() - t0

    def score(self, record: dict[str, float]) -> float:
        """The epoch's score for choosing model.safetensors (higher is better): train.best_metric, or the
        training loss where the run has no validation set; -inf (never the best) for an epoch whose
        validation did not give the metric (e.g. no scene labels for val_scene_acc)."""
        name = self.cfg.train.best_metric
        if name in record:
            return best_metric_sign(name) * record[name]
        if any(k.startswith("val_") for k in record) or not name.startswith("val_"):
            return -math.inf
        return -record.get("train_loss", 0.0)

    def validate(self, loader: Any, cells: Any) -> dict[str, float]:
        """Great-circle accuracy of the eval model on the validation set (each rank its share, gathered)."""
        import pandas as pd

        from geoloc_cli.inference.geolocate import run_geolocation, scene_accuracy, summarize

        model = self.state.eval_model
        model.eval()
        pred = run_geolocation(model, loader, cells, self.cfg.model.seg_channels, self.device, self.amp)
        pred = pd.concat(dist.gather(pred), ignore_index=True)
        model.train()
        out: dict[str, float] = {}
        for name, m in summarize(pred, cells, self.cfg.evaluate.thresholds_km).items():
            out.update({f"val_{name}_{k}": v for k, v in m.items() if k.startswith("acc_") or k == "median_km"})
        if "scene_pred" in pred and (acc := scene_accuracy(pred)) is not None:
            out["val_scene_acc"] = acc
        return out

    # -------------------------------------------------------------------------------------- resume files

    def save(self, path: Path | None, epoch_done: bool = False) -> None:
        """Everything an exact continuation needs. Every rank calls this (its RNG and running loss sums
        are gathered); rank 0 writes `path`. `epoch_done`: at an epoch's end (no running sums)."""
        ranks = dist.gather({"rng": _rng_state(self.device), "sums": {} if epoch_done else dict(self.state.sums)})
        if not self.info.main:
            return
        assert path is not None
        with atomic_path(path) as tmp:
            torch.save({**self.state.state_dict(), "ranks": ranks}, tmp)

    def load(self, path: Path, steps_per_epoch: int) -> None:
        """Restore the state, this rank's RNG and running sums from `save`'s file."""
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
            raise InputError(f"cannot read resume state {path}: {type(e).__name__}: {str(e)[:200]}") from None
        step, epoch = int(blob["step"]), int(blob["epoch"])
        if not epoch * steps_per_epoch <= step <= (epoch + 1) * steps_per_epoch:
            raise ConfigError(f"{path}: step {step} of epoch {epoch + 1} does not fit {steps_per_epoch} steps per "
                              "epoch: resume with the train.batch_size and dataset the run started with")
        self.state.load_state_dict(blob, path)
        # resume states written before per-rank RNG and loss sums were kept hold rank 0's CPU RNG only
        ranks = blob.get("ranks") or [{"rng": {"cpu": blob["torch_rng"], "cuda": None}, "sums": {}}]
        mine = ranks[self.info.rank] if len(ranks) == self.info.world else ranks[0]
        torch.set_rng_state(mine["rng"]["cpu"])
        if self.device.type == "cuda" and mine["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(mine["rng"]["cuda"], self.device)
        self.state.sums = dict(mine["sums"])
