"""configs/recipes/: every recipe loads through the config loader and names real timm weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm

from geoloc_cli.config import load_config

RECIPES = Path(__file__).parents[1] / "configs" / "recipes"
README = (Path(__file__).parents[1] / "README.md").read_text()


@pytest.mark.parametrize("name", ["translocator", "geoestimation", "clip-frozen", "dinov2-finetune"])
def test_recipe_loads_names_timm_weights_and_is_in_the_readme(name: str):
    cfg = load_config(RECIPES / f"{name}.yaml")
    assert cfg.model.backbone in timm.list_pretrained(), "a timm name with a weights tag"
    assert f"configs/recipes/{name}.yaml" in README


def test_the_recipes_differ_where_they_should():
    clip = load_config(RECIPES / "clip-frozen.yaml")
    assert clip.train.source == "embeddings" and clip.model.head_hidden > 0 and clip.model.seg_channels == 0
    assert "quickgelu" in clip.model.backbone  # OpenAI's weights match only the QuickGELU variants
    dino = load_config(RECIPES / "dinov2-finetune.yaml")
    assert dino.train.trainable_blocks > 0 and dino.train.layer_decay < 1
    trans = load_config(RECIPES / "translocator.yaml")
    assert trans.model.fusion == "exchange" and trans.model.seg_channels and trans.train.optimizer == "sgd"
    geo = load_config(RECIPES / "geoestimation.yaml")
    assert geo.model.backbone.startswith("resnet50") and geo.train.loss_weights["scene"] == 0
