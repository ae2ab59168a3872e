"""The geolocation network: timm branches (RGB, optional segmentation map; any timm image model), fusion,
one head per partitioning plus a scene head (linear or a small MLP); freezing and layer-wise learning-rate
decay by timm's block grouping; and the self-contained inference checkpoint.

The model is single-device code; distribution (DDP) is applied from outside by the training stage.

Inference checkpoint = one safetensors file: the network's weights under `model.`, optionally an
embedded segmenter's weights under `segmenter.`, and a JSON document in the safetensors metadata
(key "geoloc") with the model spec, preprocessing, cell tables (class centres), hierarchy, segmenter
metadata and the resolved config. Loading it runs no pickle and needs no other file.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoloc_cli.data.store import CHECKPOINT_FORMAT, read_checkpoint_meta
from geoloc_cli.errors import ConfigError, InputError


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network's architecture (stored in every checkpoint)."""

    backbone: str
    img_size: int
    seg_channels: int  # 0 = RGB only
    fusion: str  # late | gated | exchange
    heads: dict[str, int]  # head name -> classes, partitionings first, then "scene"
    overrides: dict[str, Any] = field(default_factory=dict)
    head_hidden: int = 0  # 0 = linear heads, else one hidden layer of this width (GELU)
    head_trunk: int = 0  # 0 = none, else a hidden layer of this width (GELU) shared by all heads
    # LayerNorm epsilon of both branches when it differs from the timm architecture's own (0 = keep it):
    # Hugging Face ViTs use 1e-12 where timm uses 1e-6, so converted checkpoints give the same numbers.
    layer_norm_eps: float = 0.0


def _create_vit(spec: ModelSpec, in_chans: int, pretrained: str, branch: str = "rgb") -> nn.Module:
    made = _create_branch(spec, in_chans, pretrained, branch)
    if spec.layer_norm_eps:
        for m in made.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = spec.layer_norm_eps
    return made


def _create_branch(spec: ModelSpec, in_chans: int, pretrained: str, branch: str) -> nn.Module:
    import timm

    if not spec.backbone.startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(spec.backbone):
        import difflib

        close = difflib.get_close_matches(spec.backbone.split(".")[0], timm.list_models(), n=3)
        raise ConfigError(f"model.backbone: timm has no model {spec.backbone!r}"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""))
    try:
        return _create_weighted(spec, in_chans, pretrained, branch)
    except TypeError as e:  # an override the architecture does not take
        raise ConfigError(f"model.overrides {spec.overrides}: {spec.backbone} does not accept them ({e})") from None


def create_backbone(name: str, in_chans: int, img_size: int, overrides: dict[str, Any], **weights: Any) -> nn.Module:
    """timm.create_model without a classifier; `img_size` only where the architecture takes it (ViT, EVA,
    ...: CNNs such as ResNet and ConvNeXt take any size and refuse the keyword)."""
    import timm

    kwargs: dict[str, Any] = dict(num_classes=0, in_chans=in_chans, **overrides, **weights)
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as e:  # timm's entry points take **kwargs: only the constructor knows its keywords
        if "'img_size'" not in str(e):
            raise
        return timm.create_model(name, **kwargs)


def _create_weighted(spec: ModelSpec, in_chans: int, pretrained: str, branch: str) -> nn.Module:
    def create(**weights: Any) -> nn.Module:
        return create_backbone(spec.backbone, in_chans, spec.img_size, spec.overrides, **weights)

    if pretrained in ("none", ""):
        return create(pretrained=False)
    if pretrained != "auto":
        path = check_weights_file(pretrained)
        state = _checkpoint_branch(path, branch)
        if state is None:  # a timm weights file
            return create(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        net = create(pretrained=False)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"model.pretrained: the {branch} branch of {path} is not a {spec.backbone} with "
                              f"model.overrides {spec.overrides}: {' '.join(str(e).split())[:200]}") from None
        return net
    try:  # timm's weights (Hugging Face hub); offline machines fall back to random init with a warning
        return create(pretrained=True)
    except TypeError:  # a bad override, not unreachable weights
        raise
    except Exception as e:  # noqa: BLE001 - any download/IO failure means "not reachable"
        warnings.warn(f"pretrained weights for {spec.backbone} not reachable ({type(e).__name__}); random init",
                      stacklevel=2)
        net = create(pretrained=False)
        net.random_fallback = True  # (where the backbone stays frozen, require_pretrained refuses it)
        return net


def check_weights_file(pretrained: str) -> Path:
    """model.pretrained naming a file: that file, or a one-line error."""
    path = Path(pretrained)
    if not path.is_file():
        raise InputError(f"model.pretrained: weights file {path} does not exist")
    return path


def require_pretrained(model: GeoModel, why: str) -> None:
    """Refuse a model whose branches fell back to random weights (model.pretrained=auto, offline) where the
    backbone stays frozen: its features would mean nothing."""
    if any(getattr(b, "random_fallback", False) for b in model.branches()):
        raise InputError(f"model.pretrained=auto: the weights of {model.spec.backbone} are not reachable and {why}; "
                         "fetch them where there is a network (the timm / Hugging Face cache, then HF_HUB_OFFLINE=1), "
                         "give a weights file, or set model.pretrained=none to use random weights on purpose")


def _checkpoint_branch(path: Path, branch: str) -> dict[str, torch.Tensor] | None:
    """The `branch` (rgb | seg) weights of a geoloc inference checkpoint; None for any other file."""
    if path.suffix != ".safetensors":
        return None
    try:
        read_checkpoint_meta(path)
    except InputError:
        return None
    from safetensors import safe_open

    prefix = f"model.{branch}."
    with safe_open(str(path), framework="pt") as f:  # only this branch's tensors: the file holds both and more
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118 (no __iter__)
    if not state:
        raise InputError(f"model.pretrained: {path} has no {branch} branch")
    return state


def _recorded_preprocess(pretrained: str) -> dict[str, Any] | None:
    """The preprocessing recorded by a geoloc checkpoint given as model.pretrained (a converted published
    model's own mean/std/crop), None for anything else."""
    path = Path(pretrained)
    if pretrained in ("auto", "none", "") or path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        return read_checkpoint_meta(path).get("preprocess")
    except InputError:  # a timm weights file
        return None


def _check_exchange(spec: ModelSpec, branch: nn.Module) -> None:
    """Exchange fusion swaps CLS tokens after every transformer block: it needs a timm VisionTransformer
    (blocks on a token sequence whose first token is a CLS token)."""
    from timm.models.vision_transformer import VisionTransformer

    why = ("it is not a ViT-style token model" if not isinstance(branch, VisionTransformer)
           else "it has no CLS token" if branch.cls_token is None else "")
    if why:
        raise ConfigError(f"model.fusion=exchange: {spec.backbone} cannot exchange CLS tokens between the branches "
                          f"({why}); use model.fusion=late")


def _head(dim: int, classes: int, hidden: int) -> nn.Module:
    if not hidden:
        return nn.Linear(dim, classes)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, classes))


class GeoModel(nn.Module):
    """RGB ViT (+ segmentation-map ViT) -> fused CLS feature -> {partitioning: logits, scene: logits}."""

    def __init__(self, spec: ModelSpec, pretrained: str = "none") -> None:
        super().__init__()
        self.spec = spec
        self.rgb = _create_vit(spec, 3, pretrained)
        self.seg = _create_vit(spec, spec.seg_channels, pretrained, "seg") if spec.seg_channels else None
        if self.seg is not None and spec.fusion == "exchange":
            _check_exchange(spec, self.rgb)
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
        # trunk: only when asked, so checkpoints without one keep their parameter names
        self.trunk = nn.Sequential(nn.Linear(dim, spec.head_trunk), nn.GELU()) if spec.head_trunk else None
        width = spec.head_trunk or dim
        self.heads = nn.ModuleDict({name: _head(width, n, spec.head_hidden) for name, n in spec.heads.items()})
        self.frozen: list[nn.Module] = []  # backbone parts that stay in eval mode (see freeze)
        # the photo's preprocessing (mean/std, size, crop): the backbone's own data config, or what a
        # checkpoint recorded (load_inference_checkpoint sets it; a checkpoint as model.pretrained, below)
        self.preprocess = self._timm_data_config()
        recorded = _recorded_preprocess(pretrained)
        if recorded is not None:  # its branches learned on photos normalised its way; this model's size stays
            self.preprocess |= {k: v for k, v in recorded.items() if k != "input_size"}

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 photos (the training loader's) -> normalised floats, on their device, with the same
        operations as inference.geolocate.normalize; float input is taken as normalised already."""
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

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The RGB branch's pooled feature (what `geoloc embed` stores and train.source=embeddings reads)."""
        return self.rgb(self.pixels(image))

    def features(self, image: torch.Tensor, seg: torch.Tensor | None = None) -> torch.Tensor:
        if self.seg is None:
            return self.embed(image)
        image = self.pixels(image)
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
        return self.classify(self.features(image, seg))

    def classify(self, feature: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fused feature -> logits of every head (through the shared trunk, if any)."""
        f = self.trunk(feature) if self.trunk is not None else feature
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

    def branches(self) -> list[nn.Module]:
        return [b for b in (self.rgb, self.seg) if b is not None]

    def freeze(self, trainable_blocks: int) -> None:
        """Freeze the backbone branches but for their last `trainable_blocks` blocks (-1: freeze nothing, 0:
        all). Frozen parameters take no gradient, so autograd records nothing for the frozen front of a
        branch, and frozen modules stay in eval mode (dropout, drop-path, BatchNorm statistics)."""
        if trainable_blocks < 0:
            return
        for branch in self.branches():
            ids = block_ids(branch)
            cut = max(ids.values()) - trainable_blocks
            for name, p in branch.named_parameters():
                p.requires_grad_(ids[name] > cut)
            self.frozen += _frozen_modules(branch)
        self.train(self.training)

    def train(self, mode: bool = True) -> GeoModel:
        super().train(mode)
        for m in getattr(self, "frozen", ()):  # nn.Module.__init__ calls train() before freeze exists
            m.eval()
        return self

    def param_groups(self, layer_decay: float = 1.0) -> list[dict[str, Any]]:
        """The trainable parameters in optimizer groups with an `lr_scale`: layer-wise learning-rate decay
        scales block i of a branch with blocks 0..L by layer_decay ** (L + 1 - i) (BEiT's rule; the heads
        and the fusion weight count as layer L + 1, scale 1)."""
        scales: dict[int, float] = {}
        for branch in self.branches() if layer_decay != 1 else ():  # any backbone works without decay
            ids = block_ids(branch)
            top = max(ids.values()) + 1
            scales |= {id(p): layer_decay ** (top - ids[n]) for n, p in branch.named_parameters()}
        groups: dict[float, list[nn.Parameter]] = {}
        for p in self.parameters():
            if p.requires_grad:
                groups.setdefault(scales.get(id(p), 1.0), []).append(p)
        return [{"params": ps, "lr_scale": s} for s, ps in sorted(groups.items())]


class HeadsOnly(nn.Module):
    """A GeoModel's fusion and heads on cached branch features (train.source=embeddings): called as the model
    is, with the (B, dim) embedding - (B, 2 dim), RGB then segmentation, with a seg branch - in place of the
    photo."""

    def __init__(self, model: GeoModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, embedding: torch.Tensor, seg: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        f = embedding.float()  # stored as fp16; autocast, where on, casts again
        if self.model.seg is not None:
            f = self.model.fuse(*f.chunk(2, dim=-1))
        return self.model.classify(f)


def block_ids(branch: nn.Module) -> dict[str, int]:
    """Parameter name -> block number, from timm's fine-grained group matcher: 0 the stem (patch embedding,
    tokens), then one per block (ViT block, ResNet bottleneck, ConvNeXt block), the final norm and any
    pooling (SigLIP's attention pool) with the last - the same for every architecture timm has."""
    from timm.models import group_parameters

    if not hasattr(branch, "group_matcher"):
        raise ConfigError(f"{type(branch).__name__} has no timm group matcher: cannot tell its blocks apart "
                          "for train.trainable_blocks / train.layer_decay")
    ids = group_parameters(branch, branch.group_matcher(coarse=False), reverse=True)
    # timm gives the final norm, SigLIP's attention pool or ConvNeXt's head norm a group of their own above
    # the last block: they train (and decay) with that block, or trainable_blocks=1 would train them alone
    for _ in range(2):
        top = max(ids.values())
        if top > 0 and not any(_IN_BLOCK.search(n) for n, i in ids.items() if i == top):
            ids = {n: min(i, top - 1) for n, i in ids.items()}
    return ids


_IN_BLOCK = re.compile(r"(^|\.)(blocks|stages|layers?\d*|levels)\.\d+")


def _frozen_modules(module: nn.Module) -> list[nn.Module]:
    """The largest submodules whose parameters are all frozen (modules without parameters, such as a
    dropout inside a trainable block, belong to their parent)."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    return [m for child in module.children() for m in _frozen_modules(child)]


def build_model(spec: ModelSpec, pretrained: str = "none") -> GeoModel:
    return GeoModel(spec, pretrained)


def model_spec(cfg: Any, heads: dict[str, int]) -> ModelSpec:
    """The architecture the config's model section describes, with these heads (name -> classes)."""
    m = cfg.model
    return ModelSpec(m.backbone, m.img_size, m.seg_channels, m.fusion, heads, dict(m.overrides), m.head_hidden,
                     m.head_trunk)


# ---------------------------------------------------------------- inference checkpoint


def save_inference_checkpoint(path: Path, model: GeoModel, meta: dict[str, Any],
                              segmenter_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights + metadata into one safetensors file, atomically.

    `meta` should hold: partitionings ({name: {"hex_id", "lat", "lon"}}), hierarchy, segmenter (its
    metadata, if the model has a seg branch), config (the resolved config dict).
    """
    from safetensors.torch import save_file

    from geoloc_cli.data.store import atomic_path

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
