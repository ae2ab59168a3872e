"""Training: shard-local sample order, exact resume after kill -9, EMA, torch.compile, early failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner
from worlds import build_world, weight_diff

from geoloc_cli.cli import app
from geoloc_cli.config import load_config
from geoloc_cli.data.dataset import EpochSampler, ShardReader
from geoloc_cli.errors import ConfigError, InputError
from geoloc_cli.stages import train
from geoloc_cli.train import trainer

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny demo world (fetched, partitioned, indexed; no segmentation maps) and an RGB-only config
    with EMA: 3 epochs of 6 steps, resume state every step. Returns (config file, data root)."""
    return build_world(tmp_path_factory.mktemp("trainworld"), model={"seg_channels": 0},
                       train={"epochs": 3, "batch_size": 16, "checkpoint_every": 1, "ema_decay": 0.9,
                              "warmup_epochs": 0.5},
                       runtime={"device": "cpu"})


@pytest.fixture(scope="module")
def reference(world) -> dict:
    """An uninterrupted run of the world's config (run 'ref')."""
    cfg_path, _ = world
    (result,) = train.launch(load_config(cfg_path, ["train.run=ref"]), weights=True)
    return result


def _world_copy(world, tmp_path: Path, *sets: str):
    """(config, data root) of a copy of the world's data (no runs) that a test may change."""
    import shutil

    cfg_path, data = world
    root = tmp_path / "data"
    shutil.copytree(data, root, ignore=shutil.ignore_patterns("runs"))
    return load_config(cfg_path, [*sets, f"paths.root={root}"]), root


# ------------------------------------------------------------------------------------ sampler


def _max_open_shards(order: np.ndarray, groups: np.ndarray) -> int:
    """Most shards whose [first, last] read positions overlap at one point of the order."""
    seq = groups[order]
    first = {g: i for i, g in reversed(list(enumerate(seq)))}
    last = {g: i for i, g in enumerate(seq)}
    return max(sum(first[g] <= i <= last[g] for g in first) for i in range(len(seq)))


def test_sampler_is_shard_local_with_an_exact_rank_split():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(12), rng.integers(5, 15, size=12))  # 12 shards of uneven size
    rng.shuffle(groups)  # sample index order need not follow shards
    n, world, window = len(groups), 3, 2
    ranks = [EpochSampler(n, r, world, seed=7, groups=groups, window=window) for r in range(world)]
    for s in ranks:
        s.set_epoch(4)
    parts = [s.indices() for s in ranks]
    assert len({len(p) for p in parts}) == 1, "every rank gets the same number of samples"
    merged = np.concatenate(parts)
    assert len(merged) == len(set(merged.tolist())) == n - n % world, "no sample twice in an epoch"
    for p in parts:  # each rank streams through at most `window` shards at a time ...
        assert _max_open_shards(p, groups) <= window
    whole = EpochSampler(n, seed=7, groups=groups, window=window)
    whole.set_epoch(4)
    order = whole.indices()
    assert sorted(order.tolist()) == list(range(n))
    assert _max_open_shards(order, groups) == window  # ... and samples of a window are mixed
    seq = groups[order]
    assert (np.diff(seq) != 0).sum() > 12, "samples within a window are shuffled, not shard by shard"
    whole.set_epoch(5)
    assert not np.array_equal(whole.indices(), order), "a new order every epoch"
    whole.set_epoch(4)
    assert np.array_equal(whole.indices(), order), "the order is a function of (seed, epoch)"


def test_sampler_start_skips_exactly_the_consumed_samples():
    groups = np.repeat(np.arange(5), 10)
    s = EpochSampler(50, rank=1, world=2, seed=3, groups=groups, window=2)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=7)
    assert list(s) == full[7:] and len(s) == len(full) - 7
    plain = EpochSampler(50, rank=0, world=2, seed=3)  # without shards: a plain permutation
    assert sorted(plain.indices().tolist() + EpochSampler(50, 1, 2, seed=3).indices().tolist()) == list(range(50))


def test_shard_reader_keeps_few_files_open(tmp_path):
    import pickle

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"s{i}.tar")
        paths[-1].write_bytes(bytes(range(i, i + 16)))
    reader = ShardReader(max_open=2)
    for _ in range(2):
        for i, p in enumerate(paths):
            assert reader.read(str(p), 4, 3) == bytes([i + 4, i + 5, i + 6])
            assert len(reader._fds) <= 2
    clone = pickle.loads(pickle.dumps(reader))  # as sent to a DataLoader worker: no descriptors
    assert clone.max_open == 2 and not clone._fds
    reader.close()
    assert not reader._fds


# ------------------------------------------------------------------------------------ resume, EMA


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "resume.pt", map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights(world, reference):
    cfg_path, root = world
    run_dir = root / "runs/killed"
    proc = subprocess.Popen([sys.executable, "-m", "geoloc_cli", "train", "-c", str(cfg_path), "-q",
                             "--run", "killed"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run_dir / "resume.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{err.decode()[-2000:]}"
    steps_per_epoch = reference["history"][0]["step"]
    saved = _state(run_dir)
    assert saved["step"] % steps_per_epoch != 0, "killed after a mid-epoch resume state"

    (resumed,) = train.launch(load_config(cfg_path, ["train.run=killed"]), resume=True)
    a, b = _state(run_dir), _state(root / "runs/ref")
    assert a["step"] == b["step"] == 3 * steps_per_epoch
    assert _max_diff(a["model"], b["model"]) <= 1e-6
    assert _max_diff(a["ema"]["module"], b["ema"]["module"]) <= 1e-6
    assert _max_diff(a["optimizer"]["state"][0], b["optimizer"]["state"][0]) <= 1e-6
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # the running loss sums travel in resume.pt: even the interrupted epoch's mean loss is the same
    assert resumed["history"][-1]["train_loss"] == pytest.approx(reference["history"][-1]["train_loss"], abs=1e-6)
    interrupted = records[saved["epoch"]]["train_loss"]
    assert interrupted == pytest.approx(reference["history"][saved["epoch"]]["train_loss"], abs=1e-6)


def test_ema_weights_are_validated_exported_and_resumable(world, reference):
    _, root = world
    run_dir = root / "runs/ref"
    state = _state(run_dir)
    exported = {k.removeprefix("model."): v for k, v in load_file(run_dir / "last.safetensors").items()}
    assert _max_diff(exported, state["ema"]["module"]) == 0, "the inference checkpoint holds the EMA weights"
    assert _max_diff(state["ema"]["module"], state["model"]) > 1e-4, "EMA weights differ from the raw ones"
    assert state["ema"]["updates"] == state["step"]
    assert weight_diff(reference["ema"], reference["params"]) > 1e-4


def test_resume_with_another_batch_size_is_refused(world, reference):
    cfg_path, _ = world
    cfg = load_config(cfg_path, ["train.run=ref", "train.batch_size=8"])
    with pytest.raises(ConfigError, match="steps per epoch"):
        train.launch(cfg, resume=True)


def test_resume_state_with_another_optimizer_layout_is_a_config_error(world, reference, tmp_path):
    """An older geoloc's exchange-fusion runs kept an unused parameter: their optimizer state has one more
    than the model now; resuming them is a one-line error, not a ValueError traceback."""
    import shutil

    cfg_path, root = world
    run = root / "runs/older"
    shutil.copytree(root / "runs/ref", run)
    blob = _state(run)
    group = blob["optimizer"]["param_groups"][0]
    group["params"].append(max(group["params"]) + 1)
    torch.save(blob, run / "resume.pt")
    with pytest.raises(ConfigError, match="optimizer state does not fit the model"):
        train.launch(load_config(cfg_path, ["train.run=older", "train.epochs=4"]), resume=True)


def test_resume_completes_an_epoch_commit_a_kill_cut_short_first(world, reference):
    """A kill after an epoch's commit point but before its renames: --resume finds the state the commit
    holds instead of saying there is none."""
    import shutil

    cfg_path, root = world
    run = root / "runs/cut-commit"
    shutil.copytree(root / "runs/ref", run)
    (run / "resume.pt").rename(run / ".resume.pt.gen1.tmp")
    (run / ".commit.json").write_text(json.dumps({"generation": "gen1", "remove": [],
                                                  "rename": {".resume.pt.gen1.tmp": "resume.pt"}}))
    (result,) = train.launch(load_config(cfg_path, ["train.run=cut-commit", "train.epochs=4"]), resume=True)
    assert [r["epoch"] for r in result["history"]] == [4] and not (run / ".commit.json").exists()


def test_trim_metrics_drops_epochs_not_in_the_resume_state(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0}) + "\n" for e in (1, 2, 3)))
    train._trim_metrics(path, 2)
    assert [json.loads(x)["epoch"] for x in path.read_text().splitlines()] == [1, 2]


def test_trim_metrics_drops_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"epoch": e, "train_loss": 1.0}) + "\n" for e in (1, 2))
    path.write_text(whole + '{"epoch": 3, "train_lo')  # a kill or a full disk in the middle of an append
    train._trim_metrics(path, 3)
    assert path.read_text() == whole
    path.write_text(whole + "garbage\n" + whole)  # damage inside the log is not silently dropped
    with pytest.raises(InputError, match="line 3 is not a metrics record"):
        train._trim_metrics(path, 3)


ONE_EPOCH = ["train.epochs=1", "train.val_dataset=", "train.ema_decay=0"]


@pytest.fixture(scope="module")
def eager(world) -> dict:
    """One epoch without validation or EMA (run 'eager')."""
    (result,) = train.launch(load_config(world[0], [*ONE_EPOCH, "train.run=eager"]), weights=True)
    return result


def test_ema_update_follows_the_warmed_up_decay():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = trainer.Ema(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # first update: decay min(0.999, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, torch.full((1, 2), d * 1.0 + (1 - d) * 3.0))
    assert not ema.module.weight.requires_grad
    copy = trainer.Ema(model, decay=0.999)
    copy.load_state_dict(ema.state_dict())
    assert torch.equal(copy.module.weight, ema.module.weight) and copy.updates == 1


def test_gradient_accumulation_matches_the_full_batch(world, eager):
    cfg_path, _ = world
    (accum,) = train.launch(load_config(cfg_path, [*ONE_EPOCH, "train.run=accum", "train.grad_accum=2"]),
                            weights=True)
    assert weight_diff(accum["params"], eager["params"]) <= 1e-5
    assert accum["history"][0]["train_loss"] == pytest.approx(eager["history"][0]["train_loss"], rel=1e-5)


def test_haversine_label_smoothing_trains(world, eager):
    (smoothed,) = train.launch(load_config(world[0], [*ONE_EPOCH, "train.run=smoothed",
                                                      "train.label_smoothing_km={fine: 65, middle: 200}"]))
    loss = smoothed["history"][0]
    assert np.isfinite(loss["train_loss"]) and loss["train_loss_fine"] != pytest.approx(eager["history"][0]
                                                                                         ["train_loss_fine"])


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(world, eager, monkeypatch):
    import torch._dynamo

    cfg_path, _ = world
    common = ONE_EPOCH
    monkeypatch.setattr(trainer, "COMPILE_BACKEND", "aot_eager")  # inductor needs ~40 s of C++ builds on CPU
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    (compiled,) = train.launch(load_config(cfg_path, [*common, "train.run=compiled", "train.compile=true"]),
                               weights=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "the forward went through dynamo"
    assert weight_diff(compiled["params"], eager["params"]) <= 1e-5
    assert compiled["history"][0]["train_loss"] == pytest.approx(eager["history"][0]["train_loss"], rel=1e-4)


# ------------------------------------------------------------------------------------ early failures


def test_configs_that_cannot_work_fail_before_any_heavy_work(world, tmp_path, monkeypatch):
    import torch.distributed.launcher.api as launcher_api

    def no_spawn(*args, **kwargs):
        raise AssertionError("no worker may start for a config that cannot work")

    monkeypatch.setattr(launcher_api, "elastic_launch", no_spawn)
    monkeypatch.setattr(train, "train", no_spawn)
    cfg_path, _ = world

    def cfg(*sets: str):
        return load_config(cfg_path, list(sets))

    with pytest.raises(InputError, match="geoloc partition"):
        train.launch(cfg(f"paths.root={tmp_path}"))
    with pytest.raises(InputError, match="no segmentation maps.*geoloc segment"):
        train.launch(cfg("model.seg_channels=3"))
    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        train.launch(cfg("runtime.nproc=3"))
    with pytest.raises(ConfigError, match=r"train.best_metric: 'val_hierarchical_acc_2500km' is not a number"):
        train.launch(cfg("evaluate.thresholds_km=[1, 25]"))  # the default best metric needs the 2500 km one
    with pytest.raises(ConfigError, match="not divisible by 2 processes x 3"):
        train.launch(cfg("train.grad_accum=3"), nnodes=2)
    with pytest.raises(InputError, match="--resume: no resume state"):
        train.launch(cfg("train.run=never-trained"), resume=True)
    with pytest.raises(ConfigError, match="node rank"):
        train.launch(cfg(), nnodes=2, node_rank=2)
    with pytest.raises(ConfigError, match="GPU is listed twice"):
        train.launch(cfg("runtime.device=auto", "runtime.gpus=[0,0]"))
    with pytest.raises(ConfigError, match="conflicts with runtime.device=cpu"):
        train.launch(cfg("runtime.gpus=[0,1]"))
    with pytest.raises(ConfigError, match="conflicts with runtime.device=cuda:1"):
        train.launch(cfg("runtime.gpus=[0,1]", "runtime.device=cuda:1"))


def test_labels_outside_a_heads_range_fail_before_any_device_sees_them(world, tmp_path):
    """On CUDA an out-of-range target is an asynchronous device-side assert; here it names the column."""
    import pandas as pd

    from geoloc_cli.data.store import DataRoot

    cfg, root = _world_copy(world, tmp_path)
    index = DataRoot(root).index(cfg.train.dataset)
    rows = pd.read_parquet(index)
    rows.loc[3, "fine"] = 10_000
    rows.to_parquet(index)
    with pytest.raises(InputError, match="column fine has label 10000 .row 3.*run `geoloc filter` again"):
        train._check(cfg, 1)


def test_loader_workers_and_threads_are_sized_to_the_machine(monkeypatch):
    from geoloc_cli import dist

    monkeypatch.setattr(dist.os, "cpu_count", lambda: 16)
    assert dist.loader_workers("auto", torch.device("cuda", 0)) == 14  # a GPU rank: the cores it leaves
    assert dist.loader_workers("auto", "cuda:0", world=2) == 6  # two ranks share the cores
    assert dist.loader_workers("auto", torch.device("cpu")) == 2
    assert dist.loader_workers(3, torch.device("cuda", 0)) == 3  # a number is taken as it is
    monkeypatch.setattr(dist.os, "cpu_count", lambda: 64)
    assert dist.loader_workers("auto", "cuda:0") == dist.MAX_AUTO_WORKERS
    threads = []
    monkeypatch.setattr(dist.torch, "set_num_threads", threads.append)
    dist.limit_cpu_threads(14, 1, torch.device("cuda", 0))
    dist.limit_cpu_threads(2, 1, torch.device("cpu"))
    assert threads == [dist.GPU_RANK_THREADS, 62]


def test_a_single_process_on_gpu_n_makes_it_the_current_device(monkeypatch):
    """Without set_device, kernels and NCCL would put a context on GPU 0 as well."""
    from geoloc_cli import dist

    current = []
    monkeypatch.setattr(dist.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(dist.torch.cuda, "set_device", current.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = dist.setup("cuda:3")
    assert info.device == torch.device("cuda", 3) and current == [torch.device("cuda", 3)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpus_without_cuda_says_so_before_spawning(world, monkeypatch):
    import torch.distributed.launcher.api as launcher_api

    def no_spawn(*args, **kwargs):
        raise AssertionError("no worker may start without CUDA")

    monkeypatch.setattr(launcher_api, "elastic_launch", no_spawn)
    cfg_path, _ = world
    r = runner.invoke(app, ["train", "-c", str(cfg_path), "--gpus", "0,1", "--device", "auto", "-q"])
    assert r.exit_code == 2, r.output
    assert "--gpus 0,1: CUDA is not available" in r.output and "Traceback" not in r.output


def test_visible_devices_count_within_an_already_restricted_set(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert train._visible_devices([1, 3]) == "1,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert train._visible_devices([1, 3]) == "5,7"


def test_images_without_scene_labels_train_with_finite_losses(world, tmp_path, capsys):
    """Photos fetched without --meta have no scene label: those targets are unknown (-1), and a batch
    with none known adds 0 to the loss instead of a NaN that would wreck the weights."""
    import pandas as pd

    from geoloc_cli.data.store import DataRoot

    cfg, root = _world_copy(world, tmp_path, "train.run=noscene", "train.epochs=1")
    index = DataRoot(root).index(cfg.train.dataset)
    rows = pd.read_parquet(index)
    col = train.SCENE_COLUMNS[cfg.model.scene_classes]
    rows[col] = pd.Series([None] * len(rows), dtype="Int32")
    rows.to_parquet(index)
    (result,) = train.launch(cfg)
    losses = [v for rec in result["history"] for k, v in rec.items() if k.startswith("train_loss")]
    assert len(losses) > 2 and all(np.isfinite(losses)), result["history"]
    assert capsys.readouterr().err.count("no image has a scene label") == 1


def test_validation_images_without_a_true_location_are_left_out(world, tmp_path, capsys):
    import pandas as pd

    from geoloc_cli.data.store import DataRoot

    cfg, root = _world_copy(world, tmp_path)
    manifest = DataRoot(root).manifest(cfg.train.val_dataset)
    m = pd.read_parquet(manifest)
    full = int((m.status == "ok").sum())
    m.loc[m.index[m.status == "ok"][:3], "lat"] = np.nan
    m.to_parquet(manifest)
    plan = train._check(cfg, 1)
    assert len(plan.val_rows) == full - 3 and "3 validation images have no true location" in capsys.readouterr().err
    m["lat"] = np.nan
    m.to_parquet(manifest)
    with pytest.raises(InputError, match="no true locations"):
        train._check(cfg, 1)


def test_the_best_model_follows_train_best_metric_and_a_resume_with_another_starts_anew():
    import math
    from types import SimpleNamespace

    t = SimpleNamespace(cfg=load_config(None, ["train.best_metric=val_hierarchical_median_km"]))
    assert trainer.Trainer.score(t, {"val_hierarchical_median_km": 100.0}) > \
        trainer.Trainer.score(t, {"val_hierarchical_median_km": 200.0})  # km: lower is better
    assert trainer.Trainer.score(t, {"val_scene_acc": 0.5}) == -math.inf  # validated without it: never the best
    assert trainer.Trainer.score(t, {"train_loss": 2.0}) == -2.0  # no validation set: the training loss

    class Net(torch.nn.Linear):
        def upgrade_state(self, state):
            return state

    def state(metric: str) -> trainer.TrainState:
        net = Net(2, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        return trainer.TrainState(net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                                  torch.amp.GradScaler(enabled=False), best_metric=metric)

    old = state("val_hierarchical_acc_2500km")
    old.best, old.step = 0.4, 7
    same, other = state("val_hierarchical_acc_2500km"), state("val_hierarchical_median_km")
    same.load_state_dict(old.state_dict())
    other.load_state_dict(old.state_dict())
    assert (same.best, same.step) == (0.4, 7) and (other.best, other.step) == (-math.inf, 7)
