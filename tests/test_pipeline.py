"""The whole pipeline through the CLI on a tiny demo world, and bad inputs at the edges."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner
from worlds import DATA_STAGES, build_world, free_port, weight_diff

from geoloc_cli.cli import app

runner = CliRunner()


def geoloc(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny demo world run through every stage once; returns (config file, data root)."""
    stages = (*DATA_STAGES, ["segment"], ["train"])
    return build_world(tmp_path_factory.mktemp("world"), stages,
                       train={"epochs": 2, "batch_size": 16, "checkpoint_every": 5})


@pytest.mark.slow
def test_pipeline_outputs(world):
    _, root = world
    assert (root / "datasets/demo/manifest.parquet").is_file()
    assert sorted(p.name for p in (root / "partitions/demo").glob("cells_*.csv")) == [
        "cells_2_10.csv", "cells_2_20.csv", "cells_2_40.csv"]
    assert (root / "datasets/demo/index.parquet").is_file()
    assert len(list((root / "datasets/demo/seg").glob("seg-*.tar"))) == len(
        list((root / "datasets/demo/shards").glob("images-*.tar")))
    run = root / "runs/demo"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "val_hierarchical_acc_2500km" in json.loads(lines[-1])
    for f in ("model.safetensors", "last.safetensors", "resume.pt", "config.yaml"):
        assert (run / f).is_file(), f


def test_evaluate_writes_metrics_and_published_predictions(world):
    cfg, root = world
    r = geoloc("evaluate", "-c", str(cfg), "--json")
    assert r.exit_code == 0, r.output
    metrics = json.loads((root / "runs/demo/eval/demo_val/metrics.json").read_text())
    for kind in ("coarse", "middle", "fine", "hierarchical", "largest cell (baseline)"):
        m = metrics[kind]
        assert 0 <= m["acc_1km"] <= m["acc_25km"] <= m["acc_200km"] <= m["acc_750km"] <= m["acc_2500km"] <= 1
    header = (root / "runs/demo/eval/demo_val/predictions.csv").read_text().splitlines()[0]
    assert header == "img_id,gt_lat,predicted_lat,gt_long,predicted_long,great_circle_distance"
    # the predictions file gives back the same hierarchical numbers
    r2 = geoloc("evaluate", "--from-predictions", str(root / "runs/demo/eval/demo_val/predictions.csv"), "--json")
    assert r2.exit_code == 0, r2.output
    again = json.loads(r2.stdout)
    (summary,) = again.values()
    assert summary["acc_2500km"] == pytest.approx(metrics["hierarchical"]["acc_2500km"])


def test_predict_top_k_and_per_file_errors(world, tmp_path):
    cfg, root = world
    photo = next((root / "sources/demo").glob("*.jpg"))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(photo.read_bytes()[:200])
    r = geoloc("predict", str(photo), str(tmp_path / "missing.jpg"), str(corrupt), "-c", str(cfg), "--json",
               "--top-k", "3")
    assert r.exit_code == 1, "a failed photo makes the exit code non-zero"
    results = json.loads(r.stdout)
    assert [("error" in x) for x in results] == [False, True, True]
    top = results[0]["top"]
    assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    assert 0.99 < sum(results[0]["scene"].values()) < 1.01
    ok = geoloc("predict", str(photo), "-c", str(cfg))
    assert ok.exit_code == 0 and "predictions" in ok.stdout


@pytest.mark.slow
def test_resume_continues_from_saved_state(world):
    cfg, root = world
    r = geoloc("train", "-c", str(cfg), "-q", "--resume", "--set", "train.epochs=3")
    assert r.exit_code == 0, r.output
    lines = (root / "runs/demo/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_missing_inputs_fail_early_with_clear_messages(tmp_path):
    r = geoloc("train", "--root", str(tmp_path))
    assert r.exit_code == 1 and "geoloc partition" in r.output and "Traceback" not in r.output
    r = geoloc("filter", "--root", str(tmp_path))
    assert r.exit_code == 1 and "geoloc fetch" in r.output
    r = geoloc("predict", "x.jpg", "--model", str(tmp_path / "none.safetensors"))
    assert r.exit_code == 1 and "does not exist" in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text("img_id,gt_lat\n1,2\n")
    r = geoloc("evaluate", "--from-predictions", str(bad))
    assert r.exit_code == 1 and "missing columns" in r.output
    r = geoloc("partition", "--input", str(tmp_path / "nope.csv"), "--root", str(tmp_path))
    assert r.exit_code != 0 and "nope.csv" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["late", "exchange", "gated"])
def test_ddp_two_gloo_processes_match_one_process(world, fusion):
    """Same global batch on 1 and 2 processes: same losses, same weights, identical on both ranks (for
    exchange fusion too: a parameter without a gradient used to stop DDP at its second step). The gated
    fusion's gate has dropout, whose masks depend on the rank split: there only the ranks must agree."""
    from geoloc_cli.config import load_config
    from geoloc_cli.stages import train

    cfg_path, root = world
    common = ["train.epochs=1", "train.val_dataset=", "runtime.device=cpu", "train.grad_clip=0",
              f"model.fusion={fusion}"]
    single = train.launch(load_config(cfg_path, [*common, "train.run=one", "runtime.nproc=1"]), weights=True)
    double = train.launch(load_config(cfg_path, [*common, "train.run=two", "runtime.nproc=2"]), master_port=free_port(),
                          weights=True)
    assert double[0]["history"][0]["step"] >= 2, "DDP must get past its second step"
    assert [r["rank"] for r in double] == [0, 1]
    assert weight_diff(double[0]["params"], double[1]["params"]) == 0, "DDP ranks must hold identical weights"
    if fusion != "gated":
        # summation order differs between one process and two (gradients all-reduced): rounding, which
        # AdamW's normalised steps carry into the weights at up to ~1e-5 after 6 steps of lr 1e-3
        assert weight_diff(double[0]["params"], single[0]["params"]) <= 1e-4
        assert double[0]["history"][0]["train_loss"] == pytest.approx(single[0]["history"][0]["train_loss"],
                                                                      rel=1e-3)
    assert (root / "runs/two/model.safetensors").is_file()
    # only rank 0 writes: one record per epoch, not one per rank
    assert len((root / "runs/two/metrics.jsonl").read_text().splitlines()) == 1


def test_checkpoints_are_portable_files(world):
    """Readable by others (0644 under the usual umask, like every other output) and free of this
    machine's paths: a checkpoint is shared between machines and people."""
    import os
    import stat

    from geoloc_cli.data.store import read_checkpoint_meta

    _, root = world
    ckpt = root / "runs/demo/model.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o666 & ~umask
    meta = read_checkpoint_meta(ckpt)
    assert "paths" not in meta["config"] and str(root) not in json.dumps(meta)


def test_corrupt_resume_state_is_a_clear_error(world):
    cfg, root = world
    broken = root / "runs/broken"
    broken.mkdir(parents=True)
    (broken / "resume.pt").write_bytes(b"not a checkpoint")
    r = geoloc("train", "-c", str(cfg), "-q", "--resume", "--run", "broken")
    assert r.exit_code == 1 and "cannot read resume state" in r.output and "Traceback" not in r.output


def test_resume_with_a_changed_model_is_a_clear_error(world):
    cfg, root = world
    r = geoloc("train", "-c", str(cfg), "-q", "--resume", "--set", "model.overrides.depth=2")
    out = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2 and "does not fit the configured model" in out and "Traceback" not in out
