"""Published checkpoints as geoloc inference checkpoints (`geoloc convert KIND CHECKPOINT -o OUT`).

Kinds:
- `seed-vit`: the ViT + segmentation model of the original Geo-Localization code (ewanowara's
  `Test_ViT.py`, class GeoClassification): two Hugging Face ViTModels (photo, ADE20K colour map), a
  gate shared by both branches (`cmaf_1` -> LeakyReLU -> Dropout -> `cmaf_2`) weighting each branch's
  CLS feature per sample, `classifier_1` over the 12,893 fine cells (cells_50_1000) and `classifier_2`
  over 3 scenes. Its file (`Saved_RGB_ViT.tar`) is `torch.save({'Model_state_dict': ...})` of an
  nn.DataParallel model, with transformers 4.x key names (transformers 5 names are read too).
- `geoestimation`: GeoEstimation's PyTorch base(M, f*) (`epoch=014-val_loss=18.4833.ckpt`): a PyTorch
  Lightning checkpoint of a torchvision ResNet-50 trunk as nn.Sequential (`model.0` conv1 ... `model.7`
  layer4) and one Linear(2048 -> cells) per partitioning (`classifier.N`), coarse/middle/fine.

The result is a normal geoloc checkpoint (model.fusion=gated for seed-vit; timm's resnet50 for
geoestimation) with the published cell tables (packaged with geoloc) and the original's preprocessing:
ImageNet mean/std; for seed-vit the photo's 224 px centre crop of its 320 px resize (crop_pct 0.7) and
the colour map's raw 0-255 scale folded into the seg branch's patch embedding (geoloc feeds colours /
255). predict, evaluate, export and ONNX predict then work on it. GeoEstimation's published numbers use
its test protocol (its FiveCropImageDataset: Resize(256) + FiveCrop(224), the max over the crops'
softmax, hierarchical prediction; public copies of its code show it, e.g. keyang1211/GeoEstimation,
classification/dataset.py and train_base.py): the converted checkpoint records it, and evaluate follows
it unless evaluate.crops / crop_reduce say otherwise.

Files are read with torch.load(weights_only=True): no code in them runs. Objects a Lightning file
pickles beside the weights (hyper-parameters, callback states) are read as plain stand-ins.
"""

from __future__ import annotations

import collections
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from geoloc_cli.errors import ConfigError, InputError

KINDS = ("seed-vit", "geoestimation")
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# The published partitionings (tau_min 50; tau_max 5000 / 2000 / 1000) and their files in resources/
PUBLISHED = {"coarse": "cells_50_5000.csv.gz", "middle": "cells_50_2000.csv.gz", "fine": "cells_50_1000.csv.gz"}
# the test protocol each original's published numbers use (evaluate.crops=auto follows it)
PROTOCOLS = {"seed-vit": {"crops": "center", "crop_reduce": "mean"},
             "geoestimation": {"crops": "five", "crop_reduce": "max"}}
SEED_CROP_PCT = 224 / 320  # Resize(320) then CenterCrop(224)
HF_LAYER_NORM_EPS = 1e-12  # transformers' ViT default; timm's ViTs use 1e-6


def convert(kind: str, src: Path, out: Path, segmenter: str = "", segmenter_size: int = 0) -> dict[str, Any]:
    """Convert `src` into the inference checkpoint `out`; returns a summary (spec, heads, source)."""
    from geoloc_cli.model.network import save_inference_checkpoint

    if kind not in KINDS:
        raise ConfigError(f"convert: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    state = read_state_dict(Path(src))
    model, cells, preprocess = (_seed_vit if kind == "seed-vit" else _geoestimation)(state, Path(src))
    model.preprocess = {**model.preprocess, **preprocess}
    meta: dict[str, Any] = {"partitionings": cells.to_meta(), "converted_from": {"kind": kind, "file": Path(src).name},
                            "protocol": PROTOCOLS[kind]}
    seg_tensors = None
    if model.spec.seg_channels:
        from geoloc_cli.model.segmentation import Segmenter

        if not segmenter:
            raise ConfigError("convert seed-vit: the model reads segmentation maps: give the segmenter that "
                              "predict should use (segment.model: a hub id, local directory or tiny-random)")
        made = Segmenter.from_name(segmenter, "cpu", input_size=segmenter_size or None)
        seg_tensors, meta["segmenter"] = made.state()
    save_inference_checkpoint(Path(out), model, meta, seg_tensors)
    return {"kind": kind, "heads": model.spec.heads, "backbone": model.spec.backbone, "out": str(out)}


# ------------------------------------------------------------------------------------------ reading


class _Opaque(dict):
    """Stands in for any object a checkpoint pickles beside its tensors (argparse.Namespace, Lightning's
    AttributeDict, callback states): it keeps the data and runs no code of the original class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__({"args": args, **kwargs})

    def __setstate__(self, state: Any) -> None:
        self["state"] = state


_UNSUPPORTED = re.compile(r"(?:Unsupported global: GLOBAL|global) ([\w.]+)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a checkpoint file: unwraps {'Model_state_dict' | 'model_state_dict' |
    'state_dict': ...} and DataParallel's `module.` prefixes."""
    if not path.is_file():
        raise InputError(f"convert: checkpoint {path} does not exist")
    blob = _load(path)
    for key in ("Model_state_dict", "model_state_dict", "state_dict"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    tensors = {k.removeprefix("module."): v for k, v in blob.items() if isinstance(v, torch.Tensor)} \
        if isinstance(blob, dict) else {}
    if not tensors:
        raise InputError(f"{path}: no state dict found (expected tensors, or a dict with Model_state_dict, "
                         "model_state_dict or state_dict)")
    return tensors


def _load(path: Path, tries: int = 20) -> Any:
    """torch.load(weights_only=True), with each non-tensor class the file names mapped to _Opaque."""
    import pickle

    stand_ins: list[tuple[Any, str]] = [(collections.Counter, "collections.Counter")]
    for _ in range(tries):
        try:
            with torch.serialization.safe_globals(stand_ins):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            m = _UNSUPPORTED.search(str(e))
            if m is None or any(name == m[1] for _, name in stand_ins):
                why = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
                raise InputError(f"{path}: not a PyTorch checkpoint that loads without running code ({why})") \
                    from None
            stand_ins.append((_Opaque, m[1]))
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise InputError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    raise InputError(f"{path}: pickles more than {tries} kinds of objects beside its tensors")


def _published_tables(sizes: dict[str, int]) -> dict[str, Any]:
    """The published cell table for each head, matched by its number of classes."""
    from geoloc_cli.geo.partitioning import read_cells

    folder = resources.files("geoloc_cli") / "resources" / "published_cells"
    tables = {name: read_cells(Path(str(folder / f))) for name, f in PUBLISHED.items()}
    by_size = {len(t): name for name, t in tables.items()}
    out = {}
    for head, n in sizes.items():
        if n not in by_size:
            raise InputError(f"convert: head {head} predicts {n:,} classes, but the published partitionings have "
                             f"{', '.join(f'{len(t):,}' for t in tables.values())}: not a published model")
        out[by_size[n]] = tables[by_size[n]]
    return out


def _take(state: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in state:
        near = [k for k in state if k.split(".")[-1] == key.split(".")[-1]][:3]
        raise InputError(f"{path}: expected tensor {key!r} is missing" + (f" (found e.g. {', '.join(near)})" if near
                                                                          else ""))
    return state.pop(key)


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load; a mismatch names the first key that differs (missing, unexpected or of another shape)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or shapes:
        k = (missing or extra or shapes)[0]
        what = "missing" if missing else "unexpected" if extra else \
            f"shape {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        raise InputError(f"{path}: does not fit the converted architecture: {k} ({what})")
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------ seed-vit

# transformers 4.x ViT names (the 2021 checkpoint) -> transformers 5.x names
_HF4 = [(r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.attention.q_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.attention.k_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.attention.v_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o_proj."),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
        (r"^encoder\.layer\.(\d+)\.", r"layers.\1.")]


def _hf_vit_to_timm(hf: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Hugging Face ViTModel state dict (either naming) -> timm VisionTransformer keys, and the timm
    architecture arguments read from the tensor shapes."""
    names = {}
    for k, v in hf.items():
        for pattern, repl in _HF4:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        names[k] = v
    hf = names
    out = {"cls_token": _take(hf, "embeddings.cls_token", path),
           "pos_embed": _take(hf, "embeddings.position_embeddings", path),
           "patch_embed.proj.weight": _take(hf, "embeddings.patch_embeddings.projection.weight", path),
           "patch_embed.proj.bias": _take(hf, "embeddings.patch_embeddings.projection.bias", path),
           "norm.weight": _take(hf, "layernorm.weight", path), "norm.bias": _take(hf, "layernorm.bias", path)}
    depth = len({int(k.split(".")[1]) for k in hf if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}."
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [_take(hf, f"{p}attention.{q}_proj.{part}", path) for q in ("q", "k", "v")])
            for theirs, ours in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                                 ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"blocks.{i}.{ours}.{part}"] = _take(hf, f"{p}{theirs}.{part}", path)
    leftover = [k for k in hf if not k.startswith("pooler.")]  # the pooler is unused: its output never is
    if leftover:
        raise InputError(f"{path}: unexpected ViT tensor {leftover[0]}")
    dim, patch = out["pos_embed"].shape[-1], out["patch_embed.proj.weight"].shape[-1]
    grid = round((out["pos_embed"].shape[1] - 1) ** 0.5)
    arch = {"embed_dim": dim, "depth": depth, "num_heads": max(dim // 64, 1), "patch_size": patch,
            "mlp_ratio": out["blocks.0.mlp.fc1.weight"].shape[0] / dim, "img_size": grid * patch,
            "in_chans": out["patch_embed.proj.weight"].shape[1]}
    return out, arch


VIT_B16 = {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16, "mlp_ratio": 4.0}


def _seed_vit(state: dict[str, torch.Tensor], path: Path):
    from geoloc_cli.inference.geolocate import CellSet
    from geoloc_cli.model.network import ModelSpec, build_model

    branches = {}
    for b in ("vit_RGB", "vit_Seg"):
        part = {k[len(b) + 1:]: state.pop(k) for k in list(state) if k.startswith(b + ".")}
        if not part:
            raise InputError(f"{path}: no {b}.* tensors: not the seed ViT model (GeoClassification)")
        branches[b] = _hf_vit_to_timm(part, path)
    (rgb, arch), (seg, seg_arch) = branches["vit_RGB"], branches["vit_Seg"]
    ours = {**{f"rgb.{k}": v for k, v in rgb.items()}, **{f"seg.{k}": v for k, v in seg.items()}}
    # raw 0-255 colours in the original, colours / 255 in geoloc: the same first layer, weights x 255
    ours["seg.patch_embed.proj.weight"] = ours["seg.patch_embed.proj.weight"] * 255.0
    for theirs, mine in (("cmaf_1", "gate.0"), ("cmaf_2", "gate.3"), ("classifier_1", "heads.fine"),
                         ("classifier_2", "heads.scene")):
        for part in ("weight", "bias"):
            ours[f"{mine}.{part}"] = _take(state, f"{theirs}.{part}", path)
    if state:
        raise InputError(f"{path}: unexpected tensor {next(iter(state))} (not the seed ViT model?)")
    heads = {"fine": ours["heads.fine.weight"].shape[0], "scene": ours["heads.scene.weight"].shape[0]}
    tables = _published_tables({"fine": heads["fine"]})
    spec = ModelSpec("vit_base_patch16_224", arch["img_size"], seg_arch["in_chans"], "gated", heads,
                     {k: v for k, v in arch.items() if k in VIT_B16 and VIT_B16[k] != v},
                     layer_norm_eps=HF_LAYER_NORM_EPS)
    model = build_model(spec)
    _load_into(model, ours, path)
    preprocess = {**IMAGENET, "interpolation": "bilinear", "crop_pct": SEED_CROP_PCT}
    return model, CellSet.from_partitions(tables), preprocess


# ------------------------------------------------------------------------------------------ GeoEstimation

# torchvision ResNet children kept by GeoEstimation's nn.Sequential(*children[:-2]) -> timm ResNet names
_RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _geoestimation(state: dict[str, torch.Tensor], path: Path):
    from geoloc_cli.inference.geolocate import MULTICROP_PCT, CellSet
    from geoloc_cli.model.network import ModelSpec, build_model

    ours: dict[str, torch.Tensor] = {}
    sizes: dict[int, int] = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head == "model":
            child, _, tail = rest.partition(".")
            if child not in _RESNET_CHILDREN:
                raise InputError(f"{path}: unexpected tensor {k} (not GeoEstimation's ResNet trunk)")
            ours[f"rgb.{_RESNET_CHILDREN[child]}.{tail}"] = v
        elif head == "classifier":
            index, _, part = rest.partition(".")
            sizes[int(index)] = v.shape[0]
            ours[f"classifier.{index}.{part}"] = v
        else:
            raise InputError(f"{path}: unexpected tensor {k} (expected model.* and classifier.*)")
    if not sizes:
        raise InputError(f"{path}: no classifier.N tensors: not a GeoEstimation checkpoint")
    tables = _published_tables({f"classifier.{i}": n for i, n in sorted(sizes.items())})
    names = {len(t): name for name, t in tables.items()}
    for i, n in sizes.items():
        for part in ("weight", "bias"):
            ours[f"heads.{names[n]}.{part}"] = ours.pop(f"classifier.{i}.{part}")
    width = ours["rgb.layer4.0.conv3.weight"].shape[0] if "rgb.layer4.0.conv3.weight" in ours else 0
    if width != 2048:
        raise InputError(f"{path}: the trunk is not a ResNet-50 (layer4 gives {width} features, expected 2048)")
    heads = {names[n]: n for _, n in sorted(sizes.items())}
    spec = ModelSpec("resnet50", 224, 0, "late", heads)
    model = build_model(spec)
    _load_into(model, ours, path)
    preprocess = {**IMAGENET, "interpolation": "bilinear", "crop_pct": MULTICROP_PCT}  # Resize(256), crop 224
    return model, CellSet.from_partitions(tables), preprocess
