"""The geolocation network: timm ViT branches (RGB, optional segmentation map), fusion, one head per
partitioning plus a scene head; and the self-contained inference checkpoint.

The model is single-device code; distribution (DDP) is applied from outside by the training stage.

Inference checkpoint = one safetensors file: the network's weights under `model.`, optionally an
embedded segmenter's weights under `segmenter.`, and a JSON document in the safetensors metadata
(key "geoloc") with the model spec, preprocessing, cell tables (class centres), hierarchy, segmenter
metadata and the resolved config. Loading it runs no pickle and needs no other file.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoloc_cli.errors import ConfigError, InputError
from geoloc_cli.store import CHECKPOINT_FORMAT, read_checkpoint_meta


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network's architecture (stored in every checkpoint)."""

    backbone: str
    img_size: int
    seg_channels: int  # 0 = RGB only
    fusion: str  # late | gated | exchange
    heads: dict[str, int]  # head name -> classes, partitionings first, then "scene"
    overrides: dict[str, Any] = field(default_factory=dict)
    # LayerNorm epsilon of both branches when it differs from the timm architecture's own (0 = keep it):
    # Hugging Face ViTs use 1e-12 where timm uses 1e-6, so converted checkpoints give the same numbers.
    layer_norm_eps: float = 0.0


def _create_vit(spec: ModelSpec, in_chans: int, pretrained: str) -> nn.Module:
    branch = _create_branch(spec, in_chans, pretrained)
    if spec.layer_norm_eps:
        for m in branch.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = spec.layer_norm_eps
    return branch


def _create_branch(spec: ModelSpec, in_chans: int, pretrained: str) -> nn.Module:
    import timm

    if not spec.backbone.startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(spec.backbone):
        import difflib

        close = difflib.get_close_matches(spec.backbone.split(".")[0], timm.list_models(), n=3)
        raise ConfigError(f"model.backbone: timm has no model {spec.backbone!r}"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""))
    try:
        return _create_weighted(spec, in_chans, pretrained)
    except TypeError as e:  # an override the architecture does not take
        raise ConfigError(f"model.overrides {spec.overrides}: {spec.backbone} does not accept them ({e})") from None


def _create_weighted(spec: ModelSpec, in_chans: int, pretrained: str) -> nn.Module:
    kwargs: dict[str, Any] = dict(num_classes=0, img_size=spec.img_size, in_chans=in_chans, **spec.overrides)
    try:
        return _create_sized(spec, kwargs, pretrained)
    except TypeError as e:  # CNNs (ResNet, ConvNeXt) take any resolution and no img_size argument
        if "img_size" not in str(e) or "img_size" in spec.overrides:
            raise
        del kwargs["img_size"]
        return _create_sized(spec, kwargs, pretrained)


def _create_sized(spec: ModelSpec, kwargs: dict[str, Any], pretrained: str) -> nn.Module:
    import timm

    if pretrained in ("none", ""):
        return timm.create_model(spec.backbone, pretrained=False, **kwargs)
    if pretrained != "auto":
        path = Path(pretrained)
        if not path.is_file():
            raise InputError(f"model.pretrained: weights file {path} does not exist")
        return timm.create_model(spec.backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    try:  # timm's weights (Hugging Face hub); offline machines fall back to random init with a warning
        return timm.create_model(spec.backbone, pretrained=True, **kwargs)
    except TypeError:  # a bad override, not unreachable weights
        raise
    except Exception as e:  # noqa: BLE001 - any download/IO failure means "not reachable"
        warnings.warn(f"pretrained weights for {spec.backbone} not reachable ({type(e).__name__}); random init",
                      stacklevel=2)
        return timm.create_model(spec.backbone, pretrained=False, **kwargs)


class GeoModel(nn.Module):
    """RGB ViT (+ segmentation-map ViT) -> fused CLS feature -> {partitioning: logits, scene: logits}."""

    def __init__(self, spec: ModelSpec, pretrained: str = "none") -> None:
        super().__init__()
        self.spec = spec
        self.rgb = _create_vit(spec, 3, pretrained)
        self.seg = _create_vit(spec, spec.seg_channels, pretrained) if spec.seg_channels else None
        dim = self.rgb.num_features
        # Fusion parameters exist only for the fusion that uses them: a parameter no forward uses would
        # stall DDP's gradient reduction at the second step.
        with_seg = self.seg is not None
        # late: a learned weighting of the two CLS features (sigmoid keeps it a convex mix)
        self.fuse_logit = nn.Parameter(torch.zeros(())) if with_seg and spec.fusion == "late" else None
        # gated: the seed model's per-sample gate, shared by both branches; it scores each branch's feature
        # and the unnormalised scores weight them (Linear -> LeakyReLU -> Dropout(0.2) -> Linear)
        self.gate = nn.Sequential(nn.Linear(dim, 8), nn.LeakyReLU(), nn.Dropout(0.2), nn.Linear(8, 1)) \
            if with_seg and spec.fusion == "gated" else None
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in spec.heads.items()})
        # the photo's preprocessing (mean/std, size, crop): the backbone's own data config, or what a
        # checkpoint recorded (load_inference_checkpoint sets it)
        self.preprocess = self._timm_data_config()

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 photos (the training loader's) -> normalised floats, on their device, with the same
        operations as inference.normalize; float input is taken as normalised already."""
        if image.dtype != torch.uint8:
            return image
        mean, std = self._normalisation(image.device)
        return (image.float() / 255.0 - mean) / std

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean/std as (1,3,1,1) tensors on `device`, made once: a host-to-device copy per forward would make
        every step wait for the GPU."""
        key = (device, tuple(self.preprocess["mean"]), tuple(self.preprocess["std"]))
        if getattr(self, "_norm_key", None) != key:
            self._norm = tuple(torch.tensor(self.preprocess[k], device=device).view(1, 3, 1, 1)
                               for k in ("mean", "std"))
            self._norm_key = key
        return self._norm

    @staticmethod
    def _embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    @staticmethod
    def _pool(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return vit.forward_head(vit.norm(tokens), pre_logits=True)

    def features(self, image: torch.Tensor, seg: torch.Tensor | None = None) -> torch.Tensor:
        image = self.pixels(image)
        if self.seg is None:
            return self.rgb(image)
        assert seg is not None, "this model has a segmentation branch: pass the segmentation map"
        if self.spec.fusion != "exchange":
            return self.fuse(self.rgb(image), self.seg(seg))
        # exchange: after every block both branches continue with the mean of their CLS tokens
        # (TransLocator-style); the patch tokens stay separate.
        xr, xs = self._embed(self.rgb, image), self._embed(self.seg, seg)
        for br, bs in zip(self.rgb.blocks, self.seg.blocks, strict=True):
            xr, xs = br(xr), bs(xs)
            cls = 0.5 * (xr[:, :1] + xs[:, :1])
            xr, xs = torch.cat([cls, xr[:, 1:]], 1), torch.cat([cls, xs[:, 1:]], 1)
        return 0.5 * (self._pool(self.rgb, xr) + self._pool(self.seg, xs))

    def fuse(self, f_rgb: torch.Tensor, f_seg: torch.Tensor) -> torch.Tensor:
        """Late or gated fusion of the two branches' features (the ONNX export calls this too)."""
        if self.gate is not None:
            return self.gate(f_rgb) * f_rgb + self.gate(f_seg) * f_seg
        w = torch.sigmoid(self.fuse_logit)
        return w * f_rgb + (1 - w) * f_seg

    def forward(self, image: torch.Tensor, seg: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        f = self.features(image, seg)
        return {name: head(f) for name, head in self.heads.items()}

    def upgrade_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict of an older geoloc made loadable: exchange-fusion models used to carry an unused
        `fuse_logit`."""
        if self.fuse_logit is None:
            state = {k: v for k, v in state.items() if k != "fuse_logit"}
        return state

    def data_config(self) -> dict[str, Any]:
        """The photo's preprocessing (mean/std/interpolation/crop): the backbone's own data config unless a
        checkpoint recorded another (a converted published model keeps its original preprocessing)."""
        return dict(self.preprocess)

    def _timm_data_config(self) -> dict[str, Any]:
        import timm

        cfg = timm.data.resolve_data_config({"input_size": (3, self.spec.img_size, self.spec.img_size)},
                                            model=self.rgb)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def build_model(spec: ModelSpec, pretrained: str = "none") -> GeoModel:
    return GeoModel(spec, pretrained)


# ---------------------------------------------------------------- inference checkpoint


def save_inference_checkpoint(path: Path, model: GeoModel, meta: dict[str, Any],
                              segmenter_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights + metadata into one safetensors file, atomically.

    `meta` should hold: partitionings ({name: {"hex_id", "lat", "lon"}}), hierarchy, segmenter (its
    metadata, if the model has a seg branch), config (the resolved config dict).
    """
    from safetensors.torch import save_file

    from geoloc_cli.store import atomic_path

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for k, v in (segmenter_tensors or {}).items():
        tensors[f"segmenter.{k}"] = v.detach().cpu().contiguous()
    doc = {"format": CHECKPOINT_FORMAT, "spec": asdict(model.spec), "preprocess": model.data_config(), **meta}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={"geoloc": json.dumps(doc)})


def _empty_model(spec: ModelSpec) -> GeoModel:
    """The model's structure on the meta device, to take its weights over from a file: randomly
    initialising a ViT-B pair costs ~15 s of CPU that loading overwrites anyway. Architectures that need
    real values while they are built get built normally."""
    try:
        with torch.device("meta"):
            return GeoModel(spec, pretrained="none")
    except (RuntimeError, NotImplementedError):
        return GeoModel(spec, pretrained="none")


def load_inference_checkpoint(path: Path, device: str = "cpu",
                              ) -> tuple[GeoModel, dict[str, Any], dict[str, torch.Tensor]]:
    """(model in eval mode, metadata, segmenter tensors) from an inference checkpoint."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    tensors = load_file(str(path), device="cpu")
    spec = ModelSpec(**meta["spec"])
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model = _empty_model(spec)
        state = model.upgrade_state(state)
        model.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer kept out of state dicts
            model = GeoModel(spec, pretrained="none")
            model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"{path}: weights do not match the model described in its metadata: "
                         f"{' '.join(str(e).split())[:300]}") from None
    model.preprocess = dict(meta["preprocess"])  # normalisation as recorded, e.g. a converted model's own
    seg = {k[len("segmenter."):]: v for k, v in tensors.items() if k.startswith("segmenter.")}
    return model.to(device).eval(), meta, seg
