"""Foundation backbones (every family timm has, at random init with tiny overrides, offline), fusion limits,
MLP heads and the fine-tuning controls (frozen blocks without autograd in eval mode, layer-wise LR decay)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN

from geoloc_cli.errors import ConfigError
from geoloc_cli.model.network import ModelSpec, block_ids, build_model
from geoloc_cli.model.segmentation import encode_seg_torch

TINY_TOKENS = {"depth": 2, "embed_dim": 32, "num_heads": 2}
HEADS = {"coarse": 5, "scene": 3}
# name, overrides, img_size (patch 14 models take multiples of 14)
FAMILIES = {
    "vit-p8": ("vit_tiny_patch16_224", {**TINY_TOKENS, "patch_size": 8}, 32),
    "openai-clip": ("vit_base_patch16_clip_quickgelu_224.openai", {**TINY_TOKENS, "patch_size": 8}, 32),
    "datacomp-clip": ("vit_large_patch14_clip_224.datacompxl", TINY_TOKENS, 28),
    "dinov2": ("vit_small_patch14_reg4_dinov2.lvd142m", TINY_TOKENS, 28),
    "dinov3": ("vit_small_patch16_dinov3.lvd1689m", TINY_TOKENS, 32),
    "siglip": ("vit_base_patch16_siglip_224.webli", TINY_TOKENS, 32),
    "siglip2": ("vit_base_patch16_siglip_224.v2_webli", TINY_TOKENS, 32),
    "eva02": ("eva02_tiny_patch14_224.mim_in22k", TINY_TOKENS, 28),
    "convnext": ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}, 32),
    "resnet": ("resnet18", {"layers": (1, 1, 1, 1)}, 32),
}


def family(name: str, seg_channels: int = 0, fusion: str = "late", **kw) -> ModelSpec:
    backbone, overrides, size = FAMILIES[name]
    # families (and weights) newer than the oldest timm allowed: DINOv3 came with 1.0.20, SigLIP 2 later than 1.0.3
    if not (timm.list_pretrained(backbone) if "." in backbone else timm.is_model(backbone)):
        pytest.skip(f"timm {timm.__version__} has no {backbone}")
    return ModelSpec(backbone, size, seg_channels, fusion, dict(HEADS), dict(overrides), **kw)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_builds_offline_with_both_branches_and_its_own_preprocessing(name: str):
    torch.manual_seed(0)
    spec = family(name, seg_channels=3)
    model = build_model(spec)
    pixels = torch.randint(0, 256, (2, 3, spec.img_size, spec.img_size), dtype=torch.uint8)
    seg = encode_seg_torch(torch.randint(0, 150, (2, spec.img_size, spec.img_size), dtype=torch.uint8), 3)
    out = model(pixels, seg)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"coarse": (2, 5), "scene": (2, 3)}
    pre = model.data_config()
    assert pre["input_size"] == [3, spec.img_size, spec.img_size]
    want_mean = OPENAI_CLIP_MEAN if "clip" in name else IMAGENET_DEFAULT_MEAN if name in ("convnext", "resnet") \
        else None
    if want_mean is not None:
        assert pre["mean"] == pytest.approx(list(want_mean))
    from geoloc_cli.inference.geolocate import normalize

    raw = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)  # the model normalises with its own mean/std
    assert torch.allclose(model.pixels(raw), torch.from_numpy(normalize(raw.numpy(), pre)))


def test_siglip_pools_by_attention_without_a_cls_token():
    model = build_model(family("siglip"))
    assert model.rgb.cls_token is None and model.rgb.global_pool == "map" and model.rgb.attn_pool is not None
    ids = block_ids(model.rgb)
    last = max(i for n, i in ids.items() if n.startswith("blocks."))
    assert ids["attn_pool.latent"] == ids["norm.weight"] == last == max(ids.values()), \
        "the attention pool and the final norm train with the last block (trainable_blocks=1 trains that block)"


@pytest.mark.parametrize(("name", "why"), [("resnet", "not a ViT-style"), ("convnext", "not a ViT-style"),
                                           ("siglip", "no CLS token"), ("eva02", "not a ViT-style")])
def test_exchange_fusion_is_refused_where_there_is_no_cls_token_to_exchange(name: str, why: str):
    with pytest.raises(ConfigError, match=f"model.fusion=exchange: .*{why}.*use model.fusion=late"):
        build_model(family(name, seg_channels=3, fusion="exchange"))


@pytest.mark.parametrize("name", ["openai-clip", "dinov2"])
def test_exchange_fusion_works_for_cls_token_vits(name: str):
    spec = family(name, seg_channels=3, fusion="exchange")
    out = build_model(spec)(torch.randn(1, 3, spec.img_size, spec.img_size),
                            torch.randn(1, 3, spec.img_size, spec.img_size))
    assert out["coarse"].shape == (1, 5)


def test_a_cnn_gets_no_img_size_and_a_real_bad_override_is_still_named():
    build_model(family("resnet"))  # used to fail with a misleading "overrides" error
    with pytest.raises(ConfigError, match="model.overrides.*dpeth"):
        build_model(replace(family("resnet"), overrides={"dpeth": 1}))


def test_mlp_heads_and_a_shared_trunk():
    model = build_model(family("vit-p8", head_hidden=16))
    assert isinstance(model.heads["coarse"], torch.nn.Sequential) and model.heads["coarse"][0].out_features == 16
    assert model(torch.randn(2, 3, 32, 32))["coarse"].shape == (2, 5) and model.trunk is None
    model = build_model(family("vit-p8", head_trunk=12))
    assert model.heads["coarse"].in_features == 12 and model.trunk[0].in_features == 32
    assert model(torch.randn(2, 3, 32, 32))["scene"].shape == (2, 3)


def test_a_geoloc_checkpoint_is_a_weights_source(tmp_path):
    from geoloc_cli.model.network import save_inference_checkpoint

    torch.manual_seed(0)
    trained = build_model(family("vit-p8", seg_channels=3))
    path = tmp_path / "m.safetensors"
    save_inference_checkpoint(path, trained, {"partitionings": {}})
    torch.manual_seed(1)
    again = build_model(family("vit-p8", seg_channels=3), pretrained=str(path))
    for a, b in ((again.rgb, trained.rgb), (again.seg, trained.seg)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(ConfigError, match="rgb branch of .* is not a resnet18"):
        build_model(family("resnet"), pretrained=str(path))


def test_a_checkpoint_as_weights_brings_its_preprocessing(tmp_path):
    """A converted published model normalises photos its own way; fine-tuning from it must too."""
    from geoloc_cli.model.network import save_inference_checkpoint

    source = build_model(family("vit-p8"))
    source.preprocess = {**source.preprocess, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5],
                         "interpolation": "bilinear", "crop_pct": 0.875}
    path = tmp_path / "converted.safetensors"
    save_inference_checkpoint(path, source, {"partitionings": {}})
    tuned = build_model(family("vit-p8"), pretrained=str(path))
    pre = tuned.data_config()
    assert (pre["mean"], pre["std"], pre["interpolation"], pre["crop_pct"]) == ([0.1, 0.2, 0.3], [0.5] * 3,
                                                                                  "bilinear", 0.875)
    assert pre["input_size"] == source.data_config()["input_size"]
    assert build_model(family("vit-p8")).data_config()["mean"] != [0.1, 0.2, 0.3], "timm's own without a checkpoint"


# ------------------------------------------------------------------------------------- fine-tuning


def test_a_frozen_backbone_runs_without_autograd_in_eval_mode():
    model = build_model(family("vit-p8", seg_channels=3))
    model.freeze(0)
    model.train()
    assert not model.rgb.training and not model.seg.training and model.heads.training
    assert not any(p.requires_grad for b in model.branches() for p in b.parameters())
    assert not model.embed(torch.randn(2, 3, 32, 32)).requires_grad  # nothing recorded for backward
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "fuse_logit", "heads.coarse.weight", "heads.coarse.bias", "heads.scene.weight", "heads.scene.bias"]


def test_the_last_n_blocks_train_and_the_rest_is_frozen():
    model = build_model(family("vit-p8"))
    model.freeze(1)
    model.train()
    trainable = {n for n, p in model.rgb.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "norm.")) for n in trainable)
    assert model.rgb.blocks[1].training and not model.rgb.blocks[0].training and not model.rgb.patch_embed.training
    sum(v.sum() for v in model(torch.randn(2, 3, 32, 32)).values()).backward()
    assert model.rgb.blocks[0].attn.qkv.weight.grad is None and model.rgb.blocks[1].attn.qkv.weight.grad is not None


def test_frozen_batchnorm_keeps_its_statistics():
    model = build_model(family("resnet"))
    model.freeze(0)
    model.train()
    before = model.rgb.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(model.rgb.bn1.running_mean, before)


def test_layer_decay_scales_each_block_and_leaves_the_heads():
    model = build_model(family("vit-p8"))  # stem 0, blocks 1..2 (norm with the last)
    groups = model.param_groups(0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.rgb.patch_embed.proj.weight)] == 0.5 ** 3
    assert scale[id(model.rgb.blocks[0].attn.qkv.weight)] == 0.5 ** 2
    assert scale[id(model.rgb.norm.weight)] == 0.5
    assert scale[id(model.heads["coarse"].weight)] == 1.0
    assert len(model.param_groups(1.0)) == 1
    model.freeze(0)
    assert sum(len(g["params"]) for g in model.param_groups(0.5)) == 4  # the heads only


def test_fine_tuning_keys_are_checked():
    from geoloc_cli.config import load_config

    with pytest.raises(ConfigError, match="train.layer_decay"):
        load_config(None, ["train.layer_decay=0"])
    with pytest.raises(ConfigError, match="train.trainable_blocks"):
        load_config(None, ["train.trainable_blocks=-2"])
    with pytest.raises(ConfigError, match="exchange fusion mixes the branches.*late or gated"):
        load_config(None, ["train.source=embeddings", "model.fusion=exchange"])
    assert load_config(None, ["train.source=embeddings"]).model.seg_channels == 3  # maps are embedded too
    with pytest.raises(ConfigError, match="trainable_blocks=0"):
        load_config(None, ["train.source=embeddings", "model.seg_channels=0", "train.trainable_blocks=2"])


def test_a_frozen_backbone_whose_weights_are_unreachable_is_refused(monkeypatch):
    """model.pretrained=auto offline falls back to random weights with a warning; where the backbone stays
    frozen (embed, trainable_blocks=0) that is refused, while model.pretrained=none asks for random weights."""
    from geoloc_cli.errors import InputError
    from geoloc_cli.model import network

    real = network.create_backbone

    def offline(*args, **weights):
        if weights.get("pretrained"):
            raise OSError("no network")
        return real(*args, **weights)

    monkeypatch.setattr(network, "create_backbone", offline)
    with pytest.warns(UserWarning, match="random init"):
        fallen = build_model(family("vit-p8"), pretrained="auto")
    with pytest.raises(InputError, match="not reachable and the heads would learn nothing; .*model.pretrained=none"):
        network.require_pretrained(fallen, "the heads would learn nothing")
    network.require_pretrained(build_model(family("vit-p8"), pretrained="none"), "random on purpose is fine")
