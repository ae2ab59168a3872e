import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from geoloc_cli.data.dataset import EpochSampler, transform
from geoloc_cli.errors import ConfigError, InputError
from geoloc_cli.model.network import (
    ModelSpec,
    build_model,
    load_inference_checkpoint,
    read_checkpoint_meta,
    save_inference_checkpoint,
)
from geoloc_cli.model.segmentation import encode_seg_torch as seg_to_input

TINY = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def spec(seg_channels: int = 3, fusion: str = "late") -> ModelSpec:
    return ModelSpec("vit_tiny_patch16_224", 32, seg_channels, fusion,
                     {"coarse": 5, "fine": 9, "scene": 3}, dict(TINY))


@pytest.mark.parametrize(("seg_channels", "fusion"),
                         [(0, "late"), (3, "late"), (150, "exchange"), (3, "exchange"), (3, "gated")])
def test_forward_shapes_and_gradients(seg_channels: int, fusion: str):
    torch.manual_seed(0)
    model = build_model(spec(seg_channels, fusion))
    image = torch.randn(2, 3, 32, 32)
    seg = seg_to_input(torch.randint(0, 150, (2, 32, 32), dtype=torch.uint8), seg_channels) if seg_channels else None
    out = model(image, seg)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"coarse": (2, 5), "fine": (2, 9), "scene": (2, 3)}
    sum(v.sum() for v in out.values()).backward()
    assert model.rgb.patch_embed.proj.weight.grad is not None
    if seg_channels:
        assert model.seg.patch_embed.proj.weight.grad.abs().sum() > 0, "the seg branch must influence the output"


@pytest.mark.parametrize("fusion", ["late", "exchange", "gated"])
def test_every_parameter_gets_a_gradient(fusion: str):
    """DDP waits for a gradient of every parameter: one that no forward uses stalls the second step."""
    model = build_model(spec(3, fusion))
    seg = seg_to_input(torch.randint(0, 150, (2, 32, 32), dtype=torch.uint8), 3)
    sum(v.sum() for v in model(torch.randn(2, 3, 32, 32), seg).values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_gated_fusion_weights_each_sample_by_its_own_gate():
    """The seed model's fusion: w(f) = gate(f) per branch and sample, fused = w(f_rgb) f_rgb + w(f_seg) f_seg."""
    model = build_model(spec(3, "gated")).eval()
    f_rgb, f_seg = torch.randn(4, 32), torch.randn(4, 32)
    g = model.gate
    w_rgb = g[3](g[1](g[0](f_rgb)))  # Linear -> LeakyReLU -> (Dropout: off in eval) -> Linear
    w_seg = g[3](g[1](g[0](f_seg)))
    assert torch.allclose(model.fuse(f_rgb, f_seg), w_rgb * f_rgb + w_seg * f_seg)
    assert w_rgb.shape == (4, 1) and not torch.allclose(w_rgb, w_rgb[:1].expand(4, 1)), "one weight per sample"


def test_an_exchange_checkpoint_of_an_older_geoloc_still_loads(tmp_path):
    """Exchange-fusion models used to carry an unused `fuse_logit`: their files load without it."""
    model = build_model(spec(3, "exchange"))
    path = tmp_path / "old.safetensors"
    save_inference_checkpoint(path, model, {"partitionings": {}})
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["model.fuse_logit"] = torch.zeros(())
    save_file(tensors, path, metadata={"geoloc": json.dumps(read_checkpoint_meta(path))})
    loaded, _, _ = load_inference_checkpoint(path)
    assert loaded.fuse_logit is None and torch.equal(loaded.heads["fine"].weight, model.heads["fine"].weight)


def test_uint8_pixels_are_normalised_on_the_device_exactly_as_numpy_does():
    from geoloc_cli.inference.geolocate import normalize

    model = build_model(spec(0))
    pre = model.data_config()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    floats = torch.from_numpy(normalize(pixels.numpy(), pre))
    assert torch.equal(model.pixels(pixels), floats)
    model.eval()
    assert torch.equal(model(pixels)["fine"], model(floats)["fine"])


def test_one_hot_encoding_is_a_scatter_in_the_autocast_dtype():
    from geoloc_cli.model.segmentation import encode_seg

    maps = torch.randint(0, 150, (2, 16, 16), dtype=torch.uint8)
    maps[0, 0, 0] = 255  # no map: all zeros
    out = seg_to_input(maps, 150, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out[0, :, 0, 0].sum() == 0
    np.testing.assert_array_equal(out.float().numpy(), encode_seg(maps.numpy(), 150).astype(np.float32))


def test_backbone_and_override_mistakes_are_config_errors():
    from dataclasses import replace

    with pytest.raises(ConfigError, match="no model 'vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        build_model(replace(spec(0), backbone="vit_tiny_patch16_22"))
    with pytest.raises(ConfigError, match="model.overrides"):
        build_model(replace(spec(0), overrides={**TINY, "dpeth": 1}))


def test_exchange_fusion_mixes_branches():
    torch.manual_seed(0)
    model = build_model(spec(3, "exchange")).eval()
    image = torch.randn(1, 3, 32, 32)
    a = model(image, torch.zeros(1, 3, 32, 32))["fine"]
    b = model(image, torch.ones(1, 3, 32, 32))["fine"]
    assert not torch.allclose(a, b)


def test_inference_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(spec(0)).eval()
    path = tmp_path / "m.safetensors"
    save_inference_checkpoint(path, model, {"partitionings": {"names": ["coarse"]}, "config": {"x": 1}})
    meta = read_checkpoint_meta(path)
    assert meta["spec"]["heads"] == {"coarse": 5, "fine": 9, "scene": 3}
    assert meta["preprocess"]["mean"] and meta["preprocess"]["input_size"] == [3, 32, 32]
    loaded, meta2, seg = load_inference_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x)["fine"], loaded(x)["fine"])
    assert seg == {} and meta2["config"] == {"x": 1}


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_checkpoint_meta(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="not a safetensors checkpoint"):
        read_checkpoint_meta(junk)


def test_photo_and_map_share_geometry():
    # left half red / class 7, right half blue / class 3; the map at half resolution, like SegFormer's
    arr = np.zeros((60, 80, 3), np.uint8)
    arr[:, :40, 0] = 255
    arr[:, 40:, 2] = 255
    seg = np.full((30, 40), 3, np.uint8)
    seg[:, :20] = 7
    pre = {"mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear", "crop_pct": 1.0}
    for i in range(20):
        x, s = transform(Image.fromarray(arr), Image.fromarray(seg), 24, pre, True, np.random.default_rng(i))
        red = x[0] > 0.5
        assert torch.equal(red, s == 7) or (red ^ (s == 7)).float().mean() < 0.05, "photo and map must align"


def test_seg_to_input_codings():
    seg = torch.tensor([[[0, 1], [149, 255]]], dtype=torch.uint8)
    onehot = seg_to_input(seg, 150)
    assert onehot.shape == (1, 150, 2, 2) and onehot[0, 149, 1, 0] == 1 and onehot[0, :, 1, 1].sum() == 0
    colour = seg_to_input(seg, 3)
    assert colour.shape == (1, 3, 2, 2)
    assert torch.allclose(colour[0, :, 0, 0], torch.tensor([120, 120, 120]) / 255)  # ADE20K wall
    assert colour[0, :, 1, 1].abs().sum() == 0  # ignored pixel


def test_epoch_sampler_splits_without_duplicates_and_resumes():
    parts = [EpochSampler(103, r, 4, shuffle=True, seed=1) for r in range(4)]
    for p in parts:
        p.set_epoch(2)
    seen = np.concatenate([p.indices() for p in parts])
    assert len(seen) == len(set(seen)) == 100  # equal shares, no sample twice
    full = list(parts[1])
    parts[1].set_epoch(2, start=5)
    assert list(parts[1]) == full[5:]
    ev = [EpochSampler(103, r, 4, shuffle=False) for r in range(4)]
    assert sorted(np.concatenate([e.indices() for e in ev])) == list(range(103))


def test_hub_backbones_pass_the_name_check_and_auto_does_not_hide_a_bad_override(monkeypatch):
    import timm

    from geoloc_cli.model import network as model_mod

    seen = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: seen.append(name) or torch.nn.Identity())
    model_mod._create_vit(ModelSpec("hf-hub:org/vit", 32, 0, "late", {"scene": 3}), 3, "none")
    assert seen == ["hf-hub:org/vit"]

    def bad_override(name, pretrained=False, **kw):
        raise TypeError("__init__() got an unexpected keyword argument 'dpeth'")

    monkeypatch.setattr(timm, "create_model", bad_override)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "weights not reachable" warning on the way
        with pytest.raises(ConfigError, match="model.overrides"):
            model_mod._create_vit(spec(0), 3, "auto")
