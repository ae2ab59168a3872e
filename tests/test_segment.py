"""Segmentation core (palette, encodings, tiny Segmenter) and the `segment` stage on small shards."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from geoloc_cli.cli import app
from geoloc_cli.config import load_config
from geoloc_cli.data.store import DataRoot, ShardWriter, read_shard, write_parquet_atomic
from geoloc_cli.errors import ConfigError, InputError
from geoloc_cli.model import segmentation as seg
from geoloc_cli.stages import segment as stage

INPUT = 64  # tiny inputs keep the stage tests fast; SegFormer maps are INPUT / 4 on a side
CORRUPT_KEY = "000000002"


# --------------------------------------------------------------------------------------------- helpers


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _make_dataset(root: Path, name: str = "demo", shards: int = 2, per_shard: int = 5) -> DataRoot:
    """Image shards as the fetch stage writes them, with one corrupt JPEG, plus a manifest."""
    data_root = DataRoot(root)
    rng = np.random.default_rng(0)
    rows = []
    for s in range(shards):
        shard = f"images-{s:06d}.tar"
        with ShardWriter(data_root.shards(name) / shard) as writer:
            for i in range(per_shard):
                key = f"{s * per_shard + i:09d}"
                image_id = f"ab/cd/{1000 + s * per_shard + i}.jpg"
                jpg = b"\xff\xd8\xff\xe0 not really a jpeg" if key == CORRUPT_KEY else _jpeg(rng, 40 + i, 56)
                writer.add(key, {"jpg": jpg, "json": json.dumps({"id": image_id, "lat": 1.0, "lon": 2.0}).encode()})
                rows.append({"key": key, "id": image_id, "status": "ok", "shard": shard})
    write_parquet_atomic(pd.DataFrame(rows), data_root.manifest(name))
    return data_root


def _cfg(root: Path, *sets: str):
    base = ["segment.model=tiny-random", f"segment.input_size={INPUT}", "segment.batch_size=3", "runtime.device=cpu"]
    return load_config(None, base + list(sets), {"paths.root": str(root)})


def _seg_maps(root: DataRoot, name: str, shard: int) -> dict[str, np.ndarray]:
    path = root.seg(name) / f"seg-{shard:06d}.tar"
    return {k: seg.decode_png(f["png"]) for k, f in read_shard(path).items()}


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataRoot:
    monkeypatch.chdir(tmp_path)  # no stray ./geoloc.yaml
    return _make_dataset(tmp_path / "data")


# --------------------------------------------------------------------------------------- palette, codes


def test_palette_has_150_known_colours():
    palette = seg.load_palette()
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    assert palette[:3].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230]]  # wall, building, sky
    assert palette[149].tolist() == [92, 0, 255]
    assert seg.class_names()[:3] == ["wall", "building", "sky"]


def test_encode_seg_palette_and_one_hot():
    class_map = np.array([[0, 2], [149, 2]], dtype=np.uint8)
    batch = np.stack([class_map, np.full((2, 2), 255, np.uint8)])  # 255 = no map
    rgb = seg.encode_seg(batch, 3)
    assert rgb.shape == (2, 3, 2, 2) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[0, :, 0, 1], np.array([6, 230, 230]) / 255, rtol=1e-6)
    onehot = seg.encode_seg(batch, 150)
    assert onehot.shape == (2, 150, 2, 2) and onehot.dtype == np.float32
    assert (onehot[0].sum(0) == 1).all() and (onehot[0].argmax(0) == class_map).all()
    assert not rgb[1].any() and not onehot[1].any(), "pixels without a map must be all zero"
    for channels in (3, 150):  # the torch twin gives the same numbers
        got = seg.encode_seg_torch(torch.from_numpy(batch), channels)
        np.testing.assert_array_equal(got.numpy(), seg.encode_seg(batch, channels))
    with pytest.raises(ConfigError):
        seg.encode_seg(batch, 7)


def test_colours_round_trip_to_classes():
    class_map = np.arange(150, dtype=np.uint8).reshape(10, 15)
    back = seg.colors_to_classes(seg.colorize(class_map))
    assert back.dtype == np.uint8
    # road (6) and skyscraper (48) share ADE20K's colour (140, 140, 140): it decodes to road.
    expected = np.where(class_map == 48, 6, class_map)
    np.testing.assert_array_equal(back, expected)


def test_unknown_colours_are_an_error_with_pixel_count():
    rgb = seg.colorize(np.zeros((4, 5), np.uint8))
    rgb[1, 2] = rgb[3, 4] = rgb[0, 0] = (1, 2, 3)
    with pytest.raises(InputError, match=r"maps/x\.png: 3 of 20 pixels"):
        seg.colors_to_classes(rgb, "maps/x.png")


# -------------------------------------------------------------------------------------------- segmenter


def _photos(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (50 + 7 * i, 70, 3), dtype=np.uint8)) for i in range(n)]


def test_tiny_segmenter_shapes_and_determinism():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = seg.Segmenter.from_name("tiny-random", input_size=INPUT)
    assert torch.rand(1) == before, "building the tiny model must not consume the caller's random stream"
    b = seg.Segmenter.from_name("tiny-random", input_size=INPUT)
    maps_a, maps_b = a(_photos(), batch_size=2), b(_photos())
    assert len(maps_a) == 3
    for m in maps_a:
        assert m.shape == (INPUT // 4, INPUT // 4) and m.dtype == np.uint8 and m.max() < 150
    assert len(np.unique(np.concatenate(maps_a))) > 1, "a random model should not be constant"
    for x, y in zip(maps_a, maps_b, strict=True):
        np.testing.assert_array_equal(x, y)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_round_trip_through_safetensors(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    original = seg.Segmenter.from_name("tiny-random", input_size=INPUT)
    tensors, meta = original.state()
    save_file(tensors, tmp_path / "seg.safetensors", metadata={"segmenter": json.dumps(meta)})
    meta_back = json.loads(json.dumps(meta))
    restored = seg.Segmenter.from_state(load_file(tmp_path / "seg.safetensors"), meta_back)
    assert restored.preprocess == original.preprocess
    for x, y in zip(original(_photos()), restored(_photos()), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(InputError, match="format"):
        seg.Segmenter.from_state(tensors, {**meta, "format": "other/9"})


def test_embedded_weights_use_the_names_every_transformers_release_reads(tmp_path: Path):
    """transformers 5 renamed SegFormer's modules (encoder.block -> stages.blocks, ...) but writes and reads
    the names of the Hugging Face files: the embedded weights use those, so a checkpoint made under 5.x loads
    under 4.x and the reverse (checked once by hand with 4.40.2 and 5.24). Files from before this change,
    with this release's own names, still load."""
    original = seg.Segmenter.from_name("tiny-random", input_size=INPUT)
    tensors, meta = original.state()
    original.model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert set(tensors) == set(load_file(tmp_path / "model.safetensors")), "the names save_pretrained writes"
    own = {k: v.clone() for k, v in original.model.state_dict().items()}
    for weights in (tensors, own):
        restored = seg.Segmenter.from_state(weights, meta)
        for x, y in zip(original(_photos()), restored(_photos()), strict=True):
            np.testing.assert_array_equal(x, y)
    broken = {k.replace("decode_head", "decoder"): v for k, v in tensors.items()}
    with pytest.raises(InputError, match="cannot map"):
        seg.Segmenter.from_state(broken, meta)


def test_unloadable_model_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="segment.model"):
        seg.Segmenter.from_name(str(tmp_path / "no-such-model"))


def test_preview_image_has_three_panels():
    class_map = np.zeros((16, 16), np.uint8)
    class_map[:4] = 2
    assert seg.top_classes(class_map) == [(0, 0.75), (2, 0.25)]
    image = seg.preview_image(_photos(1)[0], class_map, height=100)
    # 70x50 photo -> 140x100 panels; the legend (8 rows of 22 px + 8) sets the height
    assert image.height == 8 * 22 + 8 and image.width == 2 * 140 + 190


# ------------------------------------------------------------------------------------------------ stage


def test_stage_writes_aligned_seg_shards_and_records_corrupt_image(world: DataRoot):
    stage.run(_cfg(world.path), datasets=["demo"])
    for s in range(2):
        image_keys = list(read_shard(world.shards("demo") / f"images-{s:06d}.tar"))
        maps = _seg_maps(world, "demo", s)
        assert list(maps) == [k for k in image_keys if k != CORRUPT_KEY]
        for m in maps.values():
            assert m.shape == (INPUT // 4, INPUT // 4) and m.max() < 150
    status = pd.read_parquet(world.seg("demo") / "status.parquet")
    assert list(status.columns) == ["key", "shard", "status", "error"] and len(status) == 10
    bad = status[status.status != "ok"]
    assert bad.key.tolist() == [CORRUPT_KEY] and bad.status.tolist() == ["corrupt_image"]
    assert bad.shard.tolist() == ["images-000000.tar"] and bad.error.iloc[0]


def test_stage_matches_direct_segmenter(world: DataRoot):
    stage.run(_cfg(world.path), datasets=["demo"])
    model = seg.Segmenter.from_name("tiny-random", input_size=INPUT)
    shard = read_shard(world.shards("demo") / "images-000001.tar")
    photos = [Image.open(io.BytesIO(f["jpg"])) for f in shard.values()]
    for expected, got in zip(model(photos), _seg_maps(world, "demo", 1).values(), strict=True):
        np.testing.assert_array_equal(expected, got)


def _interrupt_in_second_shard(world: DataRoot, cfg, monkeypatch: pytest.MonkeyPatch):
    """Run the stage until a kill in the middle of shard 1 (batch 3 of 4); returns the real predict."""
    calls = {"n": 0}
    real_predict = seg.Segmenter.predict

    def dies_on_second_shard(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_predict(self, batch)

    monkeypatch.setattr(seg.Segmenter, "predict", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        stage.run(cfg, datasets=["demo"])
    return real_predict


def test_resume_skips_done_shards_and_ignores_half_written_temp(world: DataRoot, monkeypatch: pytest.MonkeyPatch):
    cfg = _cfg(world.path)
    real_predict = _interrupt_in_second_shard(world, cfg, monkeypatch)
    seg_dir = world.seg("demo")
    assert (seg_dir / "seg-000000.tar").is_file() and not (seg_dir / "seg-000001.tar").exists()
    assert not list(seg_dir.glob(".*.tmp")), "an interrupted shard must not leave its temp file"

    # A SIGKILL leaves the temp file behind: it must not count as done, and gets cleaned up.
    (seg_dir / ".seg-000001.tar.x1y2.tmp").write_bytes(b"half a tar")
    done_before = (seg_dir / "seg-000000.tar").stat().st_mtime_ns
    os.utime(seg_dir / "seg-000000.tar", ns=(done_before - 10**9, done_before - 10**9))
    monkeypatch.setattr(seg.Segmenter, "predict", real_predict)
    stage.run(cfg, datasets=["demo"])
    assert (seg_dir / "seg-000000.tar").stat().st_mtime_ns == done_before - 10**9, "done shard was rewritten"
    assert len(_seg_maps(world, "demo", 1)) == 5
    assert not list(seg_dir.glob(".*.tmp"))
    assert len(pd.read_parquet(seg_dir / "status.parquet")) == 10


@pytest.mark.slow  # spawns two processes that each import torch and transformers (~20 s on 2 cores)
def test_two_worker_processes_give_the_same_maps(world: DataRoot, tmp_path: Path):
    other = _make_dataset(tmp_path / "other")
    settings = stage.Settings("tiny-random", "auto", INPUT, 3, 1)
    reported: list[int] = []
    stage.run_jobs(stage.plan(other, "demo"), settings, ["cpu", "cpu"], reported.append)
    assert sum(reported) == 10
    stage.run(_cfg(world.path), datasets=["demo"])
    for s in range(2):
        single, multi = _seg_maps(world, "demo", s), _seg_maps(other, "demo", s)
        assert list(single) == list(multi)
        assert all(np.array_equal(single[k], multi[k]) for k in single)


def test_preview_writes_side_by_side_pngs(world: DataRoot):
    stage.run(_cfg(world.path), datasets=["demo"], preview=3)
    files = sorted((world.seg("demo") / "preview").glob("*.png"))
    assert [f.stem for f in files] == ["000000000", "000000001", "000000003"]  # the corrupt one is skipped
    with Image.open(files[0]) as image:
        assert image.width > 2 * image.height * 56 / 40 - 2
    assert not list(world.seg("demo").glob("seg-*.tar")), "preview must not segment the dataset"


def _colour_png(class_map: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(seg.colorize(class_map)).save(buf, format="PNG")
    return buf.getvalue()


def _expected_maps(keys: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    classes = np.array([c for c in range(150) if c != 48], np.uint8)  # 48 shares road's colour
    return {k: rng.choice(classes, size=(12, 20)).astype(np.uint8) for k in keys}


@pytest.mark.parametrize("as_zip", [False, True])
def test_import_colour_maps_by_id_or_key(world: DataRoot, tmp_path: Path, as_zip: bool):
    manifest = pd.read_parquet(world.manifest("demo"))
    keys = manifest.key.tolist()
    expected = _expected_maps(keys)
    files = {}
    for key, image_id in zip(keys, manifest.id, strict=True):
        if key == "000000007":
            continue  # no map for this one
        name = f"maps/{image_id.replace('.jpg', '.png')}" if int(key) % 2 else f"maps/{key}.png"
        files[name] = _colour_png(expected[key])
    source = tmp_path / ("maps.zip" if as_zip else "src")
    if as_zip:
        with zipfile.ZipFile(source, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        for name, data in files.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(data)

    stage.run(_cfg(world.path), datasets=["demo"], import_from=source)
    got = {**_seg_maps(world, "demo", 0), **_seg_maps(world, "demo", 1)}
    assert list(got) == [k for k in keys if k != "000000007"]  # same order as the image shards
    assert all(np.array_equal(got[k], expected[k]) for k in got)
    status = pd.read_parquet(world.seg("demo") / "status.parquet")
    assert status.set_index("key").loc["000000007", "status"] == "missing_map"


def test_import_unknown_colour_names_file_and_pixels(world: DataRoot, tmp_path: Path):
    source = tmp_path / "src"
    source.mkdir()
    rgb = seg.colorize(np.zeros((6, 6), np.uint8))
    rgb[0, :4] = (3, 3, 3)
    Image.fromarray(rgb).save(source / "000000000.png")
    with pytest.raises(InputError, match=r"000000000\.png: 4 of 36 pixels"):
        stage.run(_cfg(world.path), datasets=["demo"], import_from=source)
    assert not list(world.seg("demo").glob("seg-*.tar"))
    (tmp_path / "other").mkdir()
    Image.fromarray(rgb).save(tmp_path / "other" / "unrelated.png")
    with pytest.raises(InputError, match="no map file matches"):
        stage.run(_cfg(world.path), datasets=["demo"], import_from=tmp_path / "other")


def test_missing_shards_are_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="geoloc fetch nothing"):
        stage.run(_cfg(tmp_path), datasets=["nothing"])


def test_cli_segment_command(world: DataRoot):
    result = CliRunner().invoke(app, [
        "segment", "demo", "--root", str(world.path), "--set", "segment.model=tiny-random",
        "--set", f"segment.input_size={INPUT}", "--device", "cpu", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert len(_seg_maps(world, "demo", 0)) == 4 and len(_seg_maps(world, "demo", 1)) == 5
    assert "segment" in result.output


def test_one_segmenter_per_dataset_is_recorded_and_enforced(world: DataRoot, monkeypatch: pytest.MonkeyPatch):
    from geoloc_cli.stages import train

    cfg = _cfg(world.path)
    _interrupt_in_second_shard(world, cfg, monkeypatch)
    maker = json.loads(world.seg_maker("demo").read_text())
    assert maker == {"model": "tiny-random", "input_size": INPUT}
    other = _cfg(world.path, f"segment.input_size={INPUT * 2}")
    with pytest.raises(ConfigError, match=f"set segment.model=tiny-random segment.input_size={INPUT}"):
        stage.run(other, datasets=["demo"])  # half the maps at one size, half at another: refused
    # training would embed the configured segmenter for predict: it must be the one that made the maps
    with pytest.raises(ConfigError, match="would be embedded for predict"):
        train._check_seg_maker(other, world, "demo", warn=False)
    train._check_seg_maker(cfg, world, "demo", warn=False)


def test_maps_from_before_the_record_are_kept_and_marked_unknown(world: DataRoot, monkeypatch, capsys):
    from geoloc_cli.stages import train

    _interrupt_in_second_shard(world, _cfg(world.path), monkeypatch)
    world.seg_maker("demo").unlink()  # as a geoloc from before the record left it
    monkeypatch.undo()
    other = _cfg(world.path, f"segment.input_size={INPUT * 2}")
    stage.run(other, datasets=["demo"])
    assert json.loads(world.seg_maker("demo").read_text()) == {"model": "unknown"}
    assert "before geoloc recorded their segmenter" in capsys.readouterr().err
    train._check_seg_maker(other, world, "demo", warn=True)  # a warning, not an error
    assert "predict will segment photos with" in capsys.readouterr().err


def test_gpus_that_cannot_be_used_fail_before_any_work(world: DataRoot):
    with pytest.raises(ConfigError, match="conflicts with runtime.device=cpu"):
        stage.run(_cfg(world.path, "runtime.gpus=[0]"), datasets=["demo"])
    assert not list(world.seg("demo").glob("seg-*.tar"))


def test_damaged_seg_shard_is_redone_and_never_used(world: DataRoot, capsys):
    from geoloc_cli.data.dataset import locate

    cfg = _cfg(world.path)
    stage.run(cfg, datasets=["demo"])
    shard = world.seg("demo") / "seg-000001.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # a disk that filled up, a copy cut short
    rows = pd.DataFrame({"key": ["000000005"], "shard": ["images-000001.tar"]})
    with pytest.raises(InputError, match=r"seg-000001.tar is damaged .*geoloc segment"):
        locate(rows, world.shards("demo"), world.seg("demo"))  # train and evaluate read through this
    capsys.readouterr()
    stage.run(cfg, datasets=["demo"])
    out = capsys.readouterr()
    assert "seg-000001.tar is damaged" in out.err and "making it again" in out.err
    assert shard.read_bytes() == whole
    assert locate(rows, world.shards("demo"), world.seg("demo")).seg_len.iloc[0] > 0
