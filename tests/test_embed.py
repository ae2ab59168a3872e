"""`geoloc embed` and `train.source: embeddings`: aligned fp16 shards, the record training checks, resuming
with the recorded weights, and a checkpoint that still embeds the backbone (evaluate, predict, ONNX)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner
from worlds import build_world

from geoloc_cli.cli import app
from geoloc_cli.config import load_config
from geoloc_cli.data.embeddings import RECORD, emb_shard_for, load_embedder, read_shard
from geoloc_cli.data.store import DataRoot, ShardWriter

runner = CliRunner()
TRAIN = {"epochs": 2, "batch_size": 16, "source": "embeddings", "trainable_blocks": 0, "checkpoint_every": 1000}


def geoloc(cfg: Path, *args: str):
    return runner.invoke(app, [*args, "-c", str(cfg), "-q"])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, DataRoot]:
    tmp = tmp_path_factory.mktemp("embed")
    cfg, root = build_world(tmp, model={"seg_channels": 0, "head_hidden": 16, "head_trunk": 24}, train=TRAIN,
                            embed={"batch_size": 16})
    r = geoloc(cfg, "embed")
    assert r.exit_code == 0, r.output
    return cfg, DataRoot(root)


def image_keys(shard: Path) -> list[str]:
    from geoloc_cli.data.dataset import tar_offsets

    return [k for k, files in tar_offsets(shard).items() if "jpg" in files]


def test_one_fp16_shard_per_image_shard_aligned_by_key_with_a_record(world):
    _, root = world
    shards = sorted(root.shards("demo").glob("images-*.tar"))
    assert len(shards) > 1
    for shard in shards:
        keys, emb, failed = read_shard(root.emb("demo") / emb_shard_for(shard.name))
        assert keys == image_keys(shard) and failed == {}
        assert emb.dtype == np.float16 and emb.shape == (len(keys), 32) and np.isfinite(emb).all()
    record = json.loads((root.emb("demo") / RECORD).read_text())
    assert record["backbone"] == "vit_tiny_patch16_224" and record["dim"] == 32 and record["img_size"] == 32
    assert record["preprocess"]["mean"] and record["pretrained"] == "none"


def test_stored_embeddings_are_what_the_recorded_backbone_computes_on_the_eval_view(world):
    from geoloc_cli.data.dataset import open_image, transform
    from geoloc_cli.data.store import read_shard as read_tar
    from geoloc_cli.model.network import GeoModel, model_spec

    cfg, root = world
    model = GeoModel(model_spec(load_config(cfg), {}))
    model.rgb.load_state_dict(load_embedder(root.emb("demo")))
    model.eval()
    shard = sorted(root.shards("demo").glob("images-*.tar"))[0]
    photos = read_tar(shard)
    keys, emb, _ = read_shard(root.emb("demo") / emb_shard_for(shard.name))
    pixels = torch.stack([transform(open_image(photos[k]["jpg"], 32), None, 32, model.data_config(), False, None)[0]
                          for k in keys[:4]])
    with torch.no_grad():
        np.testing.assert_allclose(model.embed(pixels).numpy(), emb[:4].astype(np.float32), atol=2e-3, rtol=2e-3)


def test_a_rerun_skips_done_shards_and_redoes_the_rest_with_the_recorded_weights(world):
    cfg, root = world
    files = sorted(root.emb("demo").glob("emb-*.safetensors"))
    before = {f: f.stat().st_mtime_ns for f in files}
    keys, emb, _ = read_shard(files[0])
    files[0].unlink()
    (root.emb("demo") / ".emb-000000.safetensors.x.tmp").write_bytes(b"half")  # a killed run's leftover
    r = geoloc(cfg, "embed")
    assert r.exit_code == 0, r.output
    again = read_shard(files[0])
    assert again[0] == keys and np.array_equal(again[1], emb), "a random-init backbone must not be drawn again"
    assert all(f.stat().st_mtime_ns == before[f] for f in files[1:])
    assert not list(root.emb("demo").glob(".emb-*.tmp"))


def test_damaged_or_outdated_embedding_shards_are_made_again_and_never_trusted(world):
    """A cut embedding shard and one older than its image shard (photos fetched again) are redone by embed;
    training refuses photos an embedding shard does not know."""
    from geoloc_cli.data.embeddings import gather
    from geoloc_cli.errors import InputError

    cfg, root = world
    files = sorted(root.emb("demo").glob("emb-*.safetensors"))
    shards = sorted(root.shards("demo").glob("images-*.tar"))
    good = [read_shard(f)[1] for f in files[:2]]
    files[0].write_bytes(files[0].read_bytes()[:-100])  # cut short
    keys, _, failed = read_shard(files[1])
    from geoloc_cli.data.embeddings import write_shard

    write_shard(files[1], keys[:-1], good[1][:-1], failed, shards[1].stat().st_size - 1)  # an older image shard
    with pytest.raises(InputError, match="no embedding of 1 photos.*run `geoloc embed` again"):
        gather(root.emb("demo"), {shards[1].name: keys})
    r = geoloc(cfg, "embed")
    assert r.exit_code == 0, r.output
    assert "made again" in r.output
    for f, emb in zip(files[:2], good, strict=True):
        assert np.array_equal(read_shard(f)[1], emb)


def test_another_backbone_is_refused_by_embed_and_by_train(world):
    cfg, _ = world
    r = geoloc(cfg, "embed", "--set", "model.overrides.depth=2")
    assert r.exit_code == 2 and "made by another model" in r.output and "depth" in r.output
    r = geoloc(cfg, "train", "--set", "model.overrides.depth=2")
    assert r.exit_code == 2 and "made by another model" in r.output


def test_the_embeddings_preprocessing_goes_on_into_embed_and_the_checkpoint(world):
    """Embeddings made with another normalisation than timm's today (a converted checkpoint's own, an older
    timm): a rerun of embed keeps it, and heads trained on them record it, so photos are normalised as the
    embedded ones were."""
    from geoloc_cli.data.store import read_checkpoint_meta

    cfg, root = world
    path = root.emb("demo") / RECORD
    good = path.read_text()
    record = json.loads(good)
    record["preprocess"]["mean"] = [0.1, 0.2, 0.3]
    path.write_text(json.dumps(record))
    try:
        r = geoloc(cfg, "embed")
        assert r.exit_code == 0, r.output
        assert json.loads(path.read_text())["preprocess"]["mean"] == [0.1, 0.2, 0.3]
        r = geoloc(cfg, "train", "--set", "train.run=recorded-preprocessing", "--set", "train.epochs=1")
        assert r.exit_code == 0, r.output
        meta = read_checkpoint_meta(root.run("recorded-preprocessing") / "model.safetensors")
        assert meta["preprocess"]["mean"] == [0.1, 0.2, 0.3]
    finally:
        path.write_text(good)


def test_heads_train_on_embeddings_and_the_checkpoint_works_on_photos(world):
    cfg, root = world
    r = geoloc(cfg, "train")
    assert r.exit_code == 0, r.output
    from geoloc_cli.model.network import load_inference_checkpoint

    ckpt = root.model("demo")
    model, meta, _ = load_inference_checkpoint(ckpt)
    recorded = load_embedder(root.emb("demo"))
    assert all(torch.equal(v, recorded[k]) for k, v in model.rgb.state_dict().items()), "the backbone that embedded"
    assert meta["spec"]["head_hidden"] == 16 and model.trunk[0].out_features == 24
    records = [json.loads(x) for x in (root.run("demo") / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["train_loss"] < records[0]["train_loss"] + 0.5
    assert geoloc(cfg, "evaluate").exit_code == 0
    url = (root.meta / "demo_val_urls.csv").read_text().splitlines()[0].split(",")[1]  # a held-out photo
    photo = Path(url.removeprefix("file://"))
    tops = {}
    for backend in ("torch", "onnx"):
        r = runner.invoke(app, ["predict", str(photo), "--model", str(ckpt), "--json", "--backend", backend])
        assert r.exit_code == 0, r.output
        tops[backend] = [t["cell"] for t in json.loads(r.stdout)[0]["top"]]
    assert tops["torch"] == tops["onnx"]


def test_photos_that_do_not_decode_are_recorded_and_left_out(tmp_path, monkeypatch):
    from geoloc_cli.stages import embed as stage

    monkeypatch.chdir(tmp_path)
    root = DataRoot(tmp_path / "data")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(buf, format="JPEG")
    with ShardWriter(root.shards("x") / "images-000000.tar") as w:
        for key, data in (("a", buf.getvalue()), ("b", b"\xff\xd8 not a jpeg"), ("c", buf.getvalue())):
            w.add(key, {"jpg": data, "json": b"{}"})
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=none", "model.img_size=32",
                             "model.overrides={layers: [1, 1, 1, 1]}", "runtime.device=cpu", "model.seg_channels=0"],
                      {"paths.root": str(root.path)})
    stage.run(cfg, ["x"])
    keys, emb, failed = read_shard(root.emb("x") / "emb-000000.safetensors")
    assert keys == ["a", "c"] and emb.shape == (2, 512) and list(failed) == ["b"]
    assert os.listdir(root.emb("x")) and not list(root.emb("x").glob(".*.tmp"))


@pytest.mark.slow
def test_the_segmentation_branch_is_embedded_and_fused_by_the_heads(tmp_path):
    """With maps (model.seg_channels > 0, late or gated fusion) each row is the RGB feature then the class
    map's, as the branches compute them on the evaluation views; heads and fusion train on them, and the
    checkpoint holds both branches."""
    from worlds import DATA_STAGES

    from geoloc_cli.data.dataset import transform
    from geoloc_cli.model.network import load_inference_checkpoint
    from geoloc_cli.model.segmentation import encode_seg_torch

    cfg, data = build_world(tmp_path, (*DATA_STAGES, ["segment"]), model={"seg_channels": 3, "fusion": "gated"},
                            train={**TRAIN, "epochs": 1}, embed={"batch_size": 16})
    root = DataRoot(data)
    assert geoloc(cfg, "embed").exit_code == 0
    shard = sorted(root.shards("demo").glob("images-*.tar"))[0]
    keys, emb, _ = read_shard(root.emb("demo") / emb_shard_for(shard.name))
    assert emb.shape[1] == 2 * 32
    r = geoloc(cfg, "train")
    assert r.exit_code == 0, r.output
    model, _, _ = load_inference_checkpoint(root.model("demo"))
    from geoloc_cli.data.store import iter_shard, seg_shard_for

    photo = dict(iter_shard(shard))[keys[0]]["jpg"]
    seg_png = dict(iter_shard(root.seg("demo") / seg_shard_for(shard.name)))[keys[0]]["png"]
    x, s = transform(Image.open(io.BytesIO(photo)).convert("RGB"), Image.open(io.BytesIO(seg_png)), 32,
                     model.data_config(), False, None)
    with torch.no_grad():
        want = torch.cat([model.embed(x[None]), model.seg(encode_seg_torch(s[None], 3))], dim=-1)[0]
    assert torch.allclose(torch.from_numpy(emb[0].astype(np.float32)), want, atol=2e-2), "the stored features"
    assert geoloc(cfg, "evaluate").exit_code == 0, "the checkpoint works on photos and their maps"
    assert geoloc(cfg, "train", "--set", "model.fusion=exchange").exit_code == 2


@pytest.mark.slow
def test_fine_tuning_from_photos_trains_the_last_block_and_keeps_the_frozen_ones(world):
    """train.trainable_blocks / train.layer_decay through `geoloc train` on photos (same world)."""
    from geoloc_cli.model.network import build_model, load_inference_checkpoint, model_spec

    cfg, root = world
    r = geoloc(cfg, "train", "--set", "train.source=images", "--set", "train.trainable_blocks=1", "--set",
               "train.layer_decay=0.8", "--set", "train.run=finetune", "--set", "train.epochs=1")
    assert r.exit_code == 0, r.output
    trained, _, _ = load_inference_checkpoint(root.model("finetune"))
    torch.manual_seed(0)  # train seeds with runtime.seed before it builds the model
    initial = build_model(model_spec(load_config(cfg), {"scene": 3}))
    assert torch.equal(trained.rgb.patch_embed.proj.weight, initial.rgb.patch_embed.proj.weight)
    assert torch.equal(trained.rgb.pos_embed, initial.rgb.pos_embed)
    assert not torch.equal(trained.rgb.blocks[0].attn.qkv.weight, initial.rgb.blocks[0].attn.qkv.weight)


@pytest.mark.slow
def test_two_device_processes_write_the_same_shards_as_one(tmp_path):
    """The --gpus path (one spawned process per device, shard i -> device i % n), here with two CPU 'devices'."""
    import functools

    from geoloc_cli.dist import run_on_devices
    from geoloc_cli.model.network import build_model, model_spec
    from geoloc_cli.stages import embed as stage

    root = DataRoot(tmp_path)
    rng = np.random.default_rng(0)
    for s in range(2):
        with ShardWriter(root.shards("x") / f"images-{s:06d}.tar") as w:
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
                w.add(f"{s}{i}", {"jpg": buf.getvalue()})
    cfg = load_config(None, ["model.backbone=resnet18", "model.img_size=32", "model.overrides={layers: [1, 1, 1, 1]}"])
    model = build_model(model_spec(cfg, {})).eval()
    out = {}
    for devices in (["cpu"], ["cpu", "cpu"]):
        jobs = [stage.Job(s, tmp_path / str(len(devices)) / emb_shard_for(s.name))
                for s in sorted(root.shards("x").glob("*.tar"))]
        reported: list[int] = []
        work = functools.partial(stage.embed_shards, model=model, batch_size=2, precision="fp32", threads=1)
        run_on_devices(work, jobs, devices, reported.append)
        assert sum(reported) == 6
        out[len(devices)] = [read_shard(j.emb_shard) for j in jobs]
    for (k1, e1, _), (k2, e2, _) in zip(out[1], out[2], strict=True):
        assert k1 == k2 and np.allclose(e1, e2, atol=1e-3)


def test_one_weights_file_spelled_two_ways_is_the_same_embedder(tmp_path, monkeypatch):
    from geoloc_cli.data.embeddings import mismatch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"x")
    for other in (str(tmp_path / "w.safetensors"), "./w.safetensors"):
        assert mismatch({"pretrained": "w.safetensors"}, {"pretrained": other}) == ""
    assert "pretrained" in mismatch({"pretrained": "w.safetensors"}, {"pretrained": "auto"})
    assert "pretrained" in mismatch({"pretrained": "gone.safetensors"}, {"pretrained": "./gone.safetensors"})
