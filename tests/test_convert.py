"""geoloc convert: the published architectures, built here at random init in their original code's form,
saved in their original file formats, converted, and compared logit for logit with the original forward."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from geoloc_cli.cli import app
from geoloc_cli.errors import InputError
from geoloc_cli.model.convert import convert, read_state_dict
from geoloc_cli.model.network import load_inference_checkpoint
from geoloc_cli.model.segmentation import encode_seg_torch, load_palette

DATA = Path(__file__).parent / "data"
N_FINE, N_MIDDLE, N_COARSE = 12_893, 7_202, 3_298  # the published partitionings


class SeedGeoClassification(nn.Module):
    """The seed model as its Test_ViT.py writes it (GeoClassification), at a small ViT size."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                        image_size=32, patch_size=8)
        self.vit_RGB, self.vit_Seg = ViTModel(cfg), ViTModel(cfg)
        self.cmaf_1, self.cmaf_2 = nn.Linear(128, 8), nn.Linear(8, 1)
        self.dropout, self.relu = nn.Dropout(p=0.20), nn.LeakyReLU()
        self.classifier_1, self.classifier_2 = nn.Linear(128, N_FINE), nn.Linear(128, 3)

    def forward(self, rgb_image: torch.Tensor, seg_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg_image = torch.permute(seg_image, (0, 3, 1, 2))
        rgb = self.vit_RGB(rgb_image).last_hidden_state[:, 0, :]
        seg = self.vit_Seg(seg_image).last_hidden_state[:, 0, :]
        w_rgb = self.cmaf_2(self.dropout(self.relu(self.cmaf_1(rgb))))
        w_seg = self.cmaf_2(self.dropout(self.relu(self.cmaf_1(seg))))
        out = rgb * w_rgb + seg * w_seg
        return self.classifier_1(out), self.classifier_2(out)


# transformers 5 -> 4.x names, written out here independently of the converter's table
_TO_HF4 = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
           "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def _as_2021_names(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        k = k.replace(".layers.", ".encoder.layer.")
        for new, old in _TO_HF4.items():
            k = k.replace(f".{new}.", f".{old}.")
        out[k] = v
    return out


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> tuple[SeedGeoClassification, Path, Path]:
    """The seed model at random init, saved as its Saved_RGB_ViT.tar was (DataParallel, optimizer beside),
    in transformers 5 and in 2021 (transformers 4) key names."""
    torch.manual_seed(0)
    model = SeedGeoClassification().eval()
    wrapped = nn.DataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tmp = tmp_path_factory.mktemp("seed")
    new, old = tmp / "Saved_RGB_ViT_tf5.tar", tmp / "Saved_RGB_ViT.tar"
    state = wrapped.state_dict()
    assert all(k.startswith("module.") for k in state)
    torch.save({"Model_state_dict": state, "optimizer_state_dict": opt.state_dict()}, new)
    torch.save({"Model_state_dict": _as_2021_names(state), "optimizer_state_dict": opt.state_dict()}, old)
    return model, new, old


@pytest.mark.parametrize("names", ["tf5", "2021"])
def test_seed_vit_converts_to_the_same_logits(seed, tmp_path, names):
    original, new, old = seed
    out = tmp_path / "seed.safetensors"
    convert("seed-vit", old if names == "2021" else new, out, segmenter="tiny-random", segmenter_size=64)
    model, meta, _ = load_inference_checkpoint(out)
    assert meta["spec"]["fusion"] == "gated" and meta["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    torch.manual_seed(1)
    photo = torch.randn(2, 3, 32, 32)  # ImageNet-normalised, as both take it
    classes = torch.randint(0, 150, (2, 32, 32), dtype=torch.uint8)
    colours = torch.from_numpy(load_palette()).float()[classes.long()]  # the original's raw 0-255 HWC map
    with torch.no_grad():
        fine, scene = original(photo, colours)
        ours = model(photo, encode_seg_torch(classes, 3))  # geoloc's own encoding: colours / 255
    np.testing.assert_allclose(ours["fine"].numpy(), fine.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours["scene"].numpy(), scene.numpy(), atol=1e-5)
    assert len(meta["partitionings"]["cells"]["fine"]["hex_id"]) == N_FINE


def test_a_converted_seed_model_predicts_and_exports(seed, tmp_path):
    """predict through the CLI on torch and on the ONNX export (gated fusion exports as two graphs)."""
    from PIL import Image

    _, new, _ = seed
    out = tmp_path / "seed.safetensors"
    r = CliRunner().invoke(app, ["convert", "seed-vit", str(new), "-o", str(out), "--set",
                                 "segment.model=tiny-random", "--set", "segment.input_size=64", "-q"])
    assert r.exit_code == 0, r.output
    photo = tmp_path / "p.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(photo)
    tops = {}
    for backend in ("torch", "onnx"):
        if backend == "onnx":
            assert CliRunner().invoke(app, ["export", str(out), "-q"]).exit_code == 0
        r = CliRunner().invoke(app, ["predict", str(photo), "--model", str(out), "--backend", backend, "--json",
                                     "--device", "cpu", "-q"])
        assert r.exit_code == 0, r.output
        tops[backend] = [t["cell"] for t in json.loads(r.stdout)[0]["top"]]
    assert tops["torch"] == tops["onnx"] and len(tops["torch"]) == 5


class HParams:
    """Stands for an object a Lightning checkpoint pickles beside its weights (its class is not importable
    where the file is converted)."""

    def __init__(self) -> None:
        self.arch = "resnet50"


@pytest.fixture(scope="module")
def geoestimation(tmp_path_factory) -> tuple[nn.Module, nn.ModuleList, Path]:
    """GeoEstimation's base(M, f*) at random init, built as its utils_global.build_base_model does, saved as
    a PyTorch Lightning checkpoint with hyper-parameters and a callback state beside the weights."""
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    trunk = nn.Sequential(*list(resnet.children())[:-2])
    trunk.avgpool = nn.AdaptiveAvgPool2d(1)
    trunk.flatten = nn.Flatten(start_dim=1)
    classifier = nn.ModuleList([nn.Linear(2048, n) for n in (N_COARSE, N_MIDDLE, N_FINE)])
    state = {**{f"model.{k}": v for k, v in trunk.state_dict().items()},
             **{f"classifier.{k}": v for k, v in classifier.state_dict().items()}}
    path = tmp_path_factory.mktemp("geoestimation") / "epoch=014-val_loss=18.4833.ckpt"
    torch.save({"epoch": 14, "state_dict": state, "pytorch-lightning_version": "1.1.0",
                "hyper_parameters": argparse.Namespace(arch="resnet50", partitionings={"shortnames": ["coarse"]}),
                "callbacks": {"ModelCheckpoint": HParams()}}, path)
    return trunk.eval(), classifier.eval(), path


def _s2_parents(fine: list[str], coarser: list[str]) -> np.ndarray:
    """For each fine cell token, the class of the coarser cell that contains it (s2sphere, not geoloc)."""
    import s2sphere

    index = {t: i for i, t in enumerate(coarser)}
    out = np.full(len(fine), -1)
    for i, token in enumerate(fine):
        cell = s2sphere.CellId.from_token(token)
        for level in range(cell.level(), -1, -1):
            j = index.get(cell.parent(level).to_token())
            if j is not None:
                out[i] = j
                break
    return out


@pytest.mark.slow
def test_geoestimation_converts_to_the_same_logits_and_hierarchy(geoestimation, tmp_path):
    trunk, classifier, path = geoestimation
    out = tmp_path / "base_m.safetensors"
    convert("geoestimation", path, out)
    model, meta, _ = load_inference_checkpoint(out)
    torch.manual_seed(2)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        feats = trunk(x)
        theirs = [c(feats) for c in classifier]
        ours = model(x)
    for name, logits in zip(("coarse", "middle", "fine"), theirs, strict=True):
        np.testing.assert_allclose(ours[name].numpy(), logits.numpy(), atol=1e-5)
    # hierarchical prediction: the product of each partitioning's probability of the fine cell's parents
    cells = meta["partitionings"]["cells"]
    probs = [torch.softmax(t.double(), 1).numpy() for t in theirs]  # float64: float32 products underflow
    parents = [_s2_parents(cells["fine"]["hex_id"], cells[n]["hex_id"]) for n in ("coarse", "middle")]
    expected = (probs[0][:, parents[0]] * probs[1][:, parents[1]] * probs[2]).argmax(1)
    from geoloc_cli.inference.geolocate import CellSet, decode

    ours_probs = {k: torch.softmax(v.double(), 1).numpy() for k, v in ours.items()}
    assert (decode(ours_probs, CellSet.from_meta(meta["partitionings"]))["hierarchical"] == expected).all()
    assert meta["preprocess"]["crop_pct"] == pytest.approx(224 / 256)
    from geoloc_cli.config import load_config
    from geoloc_cli.stages.evaluate import with_protocol

    protocol = with_protocol(load_config(None), meta).evaluate  # evaluate follows the published protocol ...
    assert (protocol.crops, protocol.crop_reduce) == ("five", "max")
    mine = with_protocol(load_config(None, ["evaluate.crops=ten"]), meta).evaluate  # ... unless told otherwise
    assert (mine.crops, mine.crop_reduce) == ("ten", "max")


@pytest.mark.slow
def test_a_converted_geoestimation_model_evaluates_with_its_protocol(geoestimation, tmp_path):
    """evaluate on a model without a scene head, with the recorded protocol (five crops, their maximum)."""
    from worlds import build_world

    _, _, path = geoestimation
    out = tmp_path / "base_m.safetensors"
    convert("geoestimation", path, out)
    cfg, _ = build_world(tmp_path, (["fetch", "demo"],), fetch={"demo_size": 24}, runtime={"device": "cpu"},
                         evaluate={"batch_size": 6})
    r = CliRunner().invoke(app, ["evaluate", "demo_val", "-c", str(cfg), "--model", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)["demo_val"]
    assert (result["setup"]["crops"], result["setup"]["crop_reduce"]) == ("five", "max")
    assert result["hierarchical"]["n"] == 6 and "scene" not in result


def test_files_that_are_not_published_models_are_one_line_errors(tmp_path, geoestimation):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a PyTorch checkpoint that loads without running code"):
        read_state_dict(bad)
    torch.save({"state_dict": {"model.0.weight": torch.zeros(1), "classifier.0.weight": torch.zeros(5, 2),
                               "classifier.0.bias": torch.zeros(5)}}, bad)
    with pytest.raises(InputError, match="predicts 5 classes.*not a published model"):
        convert("geoestimation", bad, tmp_path / "o.safetensors")
    _, _, path = geoestimation
    with pytest.raises(InputError, match="no vit_RGB"):
        convert("seed-vit", path, tmp_path / "o.safetensors", segmenter="tiny-random")
    r = CliRunner().invoke(app, ["convert", "nope", str(path), "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 2 and "unknown kind" in r.output
