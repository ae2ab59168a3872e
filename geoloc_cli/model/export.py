"""Export an inference checkpoint to ONNX, so `geoloc predict` can run it with ONNX Runtime, no torch.

Writes beside CKPT (e.g. runs/x/model.safetensors):
  model.onnx      the geolocation network: image (B,3,S,S) [+ seg (B,C,S,S) encoded map] -> softmax
                  probabilities, one output per head (partitionings, then scene); for late fusion with a
                  seg branch it takes (rgb_feature, seg) instead, and
  model.rgb.onnx  holds the RGB branch: image -> rgb_feature (so it can run while the segmenter works)
  model.seg.onnx  the embedded segmenter (if the model has a segmentation branch): pixel_values
                  (B,3,s,s) normalised -> ADE20K class map (B,h,w) uint8
  model.onnx.json the checkpoint's fingerprint (also in each model's metadata) and the file list
Each X.onnx keeps its weights in X.onnx.data (written by onnxruntime, page-aligned, so predict maps them
into memory); without onnxruntime at export time the weights stay inside X.onnx.
Each file carries the checkpoint's fingerprint in its metadata, so predict can tell a stale export
from a current one. Everything else predict needs (cells, preprocessing) stays in the checkpoint's
safetensors metadata, which is read without torch.

This module imports torch at the top: only `geoloc export` and training import it.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoloc_cli.data.store import write_json_atomic
from geoloc_cli.errors import InputError
from geoloc_cli.inference.onnx_runtime import (
    FINGERPRINT_KEY,
    META_KEY,
    export_description,
    fingerprint,
    onnx_paths,
    rgb_path,
    split_export,
    stamp_path,
)

OPSET = 17


def export_onnx(ckpt_path: Path, out: Path | None = None) -> list[Path]:
    """Export the network (and its segmenter, if any) of an inference checkpoint; returns the written files.

    `out` names the network's file (default: CKPT with suffix .onnx); the segmenter goes to <out stem>.seg.onnx."""
    from geoloc_cli.model.network import load_inference_checkpoint

    ckpt_path = Path(ckpt_path)
    model, meta, seg_tensors = load_inference_checkpoint(ckpt_path, "cpu")
    net_path, seg_path = onnx_paths(ckpt_path, out)
    net_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = {FINGERPRINT_KEY: fingerprint(ckpt_path)}
    spec = meta["spec"]
    size, channels = spec["img_size"], spec["seg_channels"]
    heads = list(spec["heads"])
    image, seg_in = torch.zeros(1, 3, size, size), torch.zeros(1, channels, size, size)
    written: list[Path] = []
    # the network's file describes itself (preprocessing, cells, hierarchy, palette), as model.onnx.json does
    description = export_description(meta)
    described = {**stamp, META_KEY: json.dumps(description)}
    if split_export(spec):
        # Two graphs: the RGB branch alone, then the seg branch + fusion + heads. predict loads them in
        # parallel and runs the RGB branch while the segmenter is still working on the photo.
        feature = torch.zeros(1, model.rgb.num_features)
        written += _export(_LateFusion(model, heads), (feature, seg_in), ["rgb_feature", "seg"], heads, net_path,
                           described)
        written += _export(_RgbFeature(model), (image,), ["image"], ["rgb_feature"], rgb_path(net_path), stamp)
    else:
        for stale in (rgb_path(net_path), rgb_path(net_path).with_name(rgb_path(net_path).name + ".data")):
            stale.unlink(missing_ok=True)  # from an earlier export of another architecture
        inputs = (image, seg_in) if channels else (image,)
        written += _export(_Probabilities(model, heads), inputs, ["image", "seg"][: len(inputs)], heads, net_path,
                           described)
    if channels:
        from geoloc_cli.model.segmentation import Segmenter

        if "segmenter" not in meta:
            raise InputError(f"{ckpt_path}: the model has a segmentation branch but no embedded segmenter")
        seg = Segmenter.from_state(seg_tensors, meta["segmenter"], device="cpu", precision="fp32")
        s = seg.preprocess.size
        written += _export(_ClassMap(seg.model), (torch.zeros(1, 3, s, s),), ["pixel_values"], ["class_map"],
                           seg_path, stamp)
    write_json_atomic(stamp_path(net_path), {**stamp, "checkpoint": ckpt_path.name,
                                             "files": [p.name for p in written], META_KEY: description})
    return [*written, stamp_path(net_path)]


def _export(module: Any, inputs: tuple, input_names: list[str], output_names: list[str], path: Path,
            stamp: dict[str, str]) -> list[Path]:
    """Export `module` to `path` (+ `path`.data with the weights, when onnxruntime is installed)."""
    import onnx

    dynamic = {n: {0: "batch"} for n in [*input_names, *output_names]}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp_dir:
        tmp = Path(tmp_dir) / "traced.onnx"
        with warnings.catch_warnings():
            # The legacy TorchScript exporter: needs only `onnx`, and handles timm ViTs and SegFormer. Its
            # warnings are about shape checks traced as constants: inputs always have the exported size.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module.eval(), inputs, str(tmp), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        final = Path(tmp_dir) / path.name
        if not _externalize(tmp, final):
            tmp.rename(final)
        proto = onnx.load(str(final), load_external_data=False)  # the weights stay where they are
        for k, v in stamp.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(final))
        data = path.with_name(path.name + ".data")
        external = (Path(tmp_dir) / data.name).is_file()
        if external:
            os.replace(Path(tmp_dir) / data.name, data)  # weights first: the graph names them
        else:
            data.unlink(missing_ok=True)
        os.replace(final, path)
    return [path, data] if external else [path]


def _externalize(src: Path, dst: Path) -> bool:
    """Let onnxruntime write `dst` with its weights in `dst`.data at page-aligned offsets (after the basic,
    exact graph simplifications). predict then maps the weights instead of parsing and copying hundreds
    of MB: a ViT-B session opens in ~0.05 s instead of ~1-2 s. False when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return True


class _Probabilities(nn.Module):
    """GeoModel -> tuple of softmax probabilities in head order (as inference.geolocate.probabilities)."""

    def __init__(self, model: nn.Module, heads: list[str]) -> None:
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, image: torch.Tensor, seg: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        logits = self.model(image, seg)
        return tuple(torch.softmax(logits[h].float(), -1) for h in self.heads)


class _RgbFeature(nn.Module):
    """The RGB branch of a late- or gated-fusion GeoModel: image -> CLS feature."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.rgb = model.rgb

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.rgb(image)


class _LateFusion(nn.Module):
    """The rest of a late- or gated-fusion GeoModel (seg branch, GeoModel.fuse, heads): (RGB feature, seg map)
    -> probabilities."""

    def __init__(self, model: nn.Module, heads: list[str]) -> None:
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, rgb_feature: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.model.fuse(rgb_feature, self.model.seg(seg))
        logits = self.model.classify(f)
        return tuple(torch.softmax(logits[h].float(), -1) for h in self.heads)


class _ClassMap(nn.Module):
    """SegFormer logits -> uint8 ADE20K class map (argmax in the graph: 150x less output)."""

    def __init__(self, seg_model: nn.Module) -> None:
        super().__init__()
        self.seg_model = seg_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.seg_model(pixel_values=pixel_values).logits.argmax(1).to(torch.uint8)
