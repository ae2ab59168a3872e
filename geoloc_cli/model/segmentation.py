"""ADE20K semantic segmentation: the palette, map encodings for the model, and a batched segmenter.

Class maps are uint8 arrays of ADE20K class indices 0..149 (0 = wall, 1 = building, 2 = sky, ...), the
indexing of the published TransLocator maps and of the Hugging Face ADE20K SegFormer checkpoints.

The default model (config `segment.model`) is NVIDIA's SegFormer-B0 fine-tuned on ADE20K. NVIDIA
licenses the SegFormer weights for non-commercial use only; for other uses pick another ADE20K model
that transformers can load with AutoModelForSemanticSegmentation (150 labels, hub id or local directory)
through `--set segment.model=<id or dir>`, or import maps with `geoloc segment --import`.

The palette has one ambiguity inherited from ADE20K's standard colour code: road (6) and skyscraper (48)
share the colour (140, 140, 140). Encoding is unaffected; decoding colours maps it to road (6).
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geoloc_cli.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch
    from PIL import Image

NUM_CLASSES = 150
TINY_RANDOM = "tiny-random"
STATE_FORMAT = "geoloc-segmenter/1"

# Randomly initialised SegFormer shapes that need no download: tests and demos use the tiny one, the
# benchmark uses the B0/B2 ones to time the real architectures on a machine without internet.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    TINY_RANDOM: {
        "hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 4],
        "decoder_hidden_size": 32,
    },
    "segformer-b0-random": {
        "hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "num_attention_heads": [1, 2, 5, 8],
        "decoder_hidden_size": 256,
    },
    "segformer-b2-random": {
        "hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "num_attention_heads": [1, 2, 5, 8],
        "decoder_hidden_size": 768,
    },
}
RANDOM_SEED = 0
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------------------------- palette


@functools.cache
def _palette_rows() -> tuple[tuple[str, int, int, int], ...]:
    text = resources.files("geoloc_cli").joinpath("resources/ade20k_palette.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["class_index"]) for r in rows] == list(range(NUM_CLASSES)), "palette must list 0..149"
    return tuple((r["name"], int(r["r"]), int(r["g"]), int(r["b"])) for r in rows)


def load_palette() -> np.ndarray:
    """The ADE20K colour code: (150, 3) uint8, row i is the RGB colour of class i."""
    return np.array([r[1:] for r in _palette_rows()], dtype=np.uint8)


def class_names() -> list[str]:
    """Short class names ('building', not 'building ; edifice'), index i for class i."""
    return [r[0].split(";")[0].strip() for r in _palette_rows()]


# ------------------------------------------------------------------------------------------- encodings


def encode_seg(class_maps: np.ndarray, channels: int) -> np.ndarray:
    """Class maps (B, H, W) uint8 -> model input (B, C, H, W) float32: 3 = palette colour / 255,
    150 = one-hot; values >= 150 (inference.SEG_IGNORE: the image had no map) become all-zero pixels.
    The numpy twin of encode_seg_torch, for torch-free inference."""
    valid = (class_maps < NUM_CLASSES)[:, None].astype(np.float32)
    index = np.minimum(class_maps, NUM_CLASSES - 1)
    if channels == 3:
        palette = load_palette().astype(np.float32) / 255.0
        return np.ascontiguousarray(palette[index].transpose(0, 3, 1, 2) * valid)
    if channels == NUM_CLASSES:
        return (np.arange(NUM_CLASSES, dtype=np.uint8)[None, :, None, None] == index[:, None]) * valid
    raise ConfigError(f"model.seg_channels: {channels} cannot encode a segmentation map (expected 3 or 150)")


def encode_seg_torch(class_maps: torch.Tensor, channels: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """encode_seg on any device: (B, H, W) integer tensor -> (B, C, H, W) in `dtype` (default float32)."""
    import torch

    dtype = dtype or torch.float32
    valid = (class_maps.long() < NUM_CLASSES).unsqueeze(1)  # e.g. 255 = no map: encoded as zeros
    index = class_maps.long().clamp(max=NUM_CLASSES - 1)
    if channels == 3:
        palette = torch.from_numpy(load_palette()).to(index.device, torch.float32) / 255.0
        return (palette[index].permute(0, 3, 1, 2) * valid).to(dtype).contiguous()
    if channels == NUM_CLASSES:
        # a scatter straight into the output: an int64 one-hot would need 4x the output's memory in
        # temporaries (~22 GiB at batch 256 and 224 px)
        b, h, w = index.shape
        out = torch.zeros((b, NUM_CLASSES, h, w), dtype=dtype, device=index.device)
        return out.scatter_(1, index.unsqueeze(1), valid.to(dtype))
    raise ConfigError(f"model.seg_channels: {channels} cannot encode a segmentation map (expected 3 or 150)")


def _check_classes(class_map: np.ndarray) -> None:
    assert class_map.dtype == np.uint8 and class_map.ndim == 2, f"map {class_map.dtype} {class_map.shape}"
    if class_map.size and int(class_map.max()) >= NUM_CLASSES:
        raise InputError(f"segmentation map has class {int(class_map.max())}; ADE20K classes are 0..149")


@functools.cache
def _color_lookup() -> tuple[np.ndarray, np.ndarray]:
    """Sorted packed colours and their classes; for a shared colour the lower class index wins."""
    packed = _pack(load_palette())
    order = np.lexsort((np.arange(NUM_CLASSES), packed))  # by colour, then by class index
    keys, first = np.unique(packed[order], return_index=True)
    return keys, order[first].astype(np.uint8)


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colors_to_classes(rgb: np.ndarray, source: str = "colour map") -> np.ndarray:
    """Colour-coded map (H, W, 3) uint8 -> class map (H, W) uint8; any colour outside the palette is an
    InputError naming `source` and the number of such pixels (never a nearest-colour guess)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(f"{source}: expected an RGB image (H, W, 3), got shape {rgb.shape}")
    keys, classes = _color_lookup()
    packed = _pack(rgb)
    pos = np.minimum(np.searchsorted(keys, packed), len(keys) - 1)
    unknown = keys[pos] != packed
    if unknown.any():
        n, (y, x) = int(unknown.sum()), np.argwhere(unknown)[0]
        raise InputError(
            f"{source}: {n} of {unknown.size} pixels have colours outside the ADE20K palette "
            f"(first at x={x}, y={y}: {tuple(int(v) for v in rgb[y, x])})"
        )
    return classes[pos]


def colorize(class_map: np.ndarray) -> np.ndarray:
    """Class map (H, W) -> palette colours (H, W, 3) uint8."""
    _check_classes(class_map)
    return load_palette()[class_map]


# ---------------------------------------------------------------------------------------------- devices


# -------------------------------------------------------------------------------------------- segmenter


@dataclass(frozen=True)
class Preprocess:
    """Explicit preprocessing: resize to size x size (bilinear, as the SegFormer processor), scale to
    0..1, normalise with mean/std per channel."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Preprocess:
        return Preprocess(int(d["size"]), tuple(d["mean"]), tuple(d["std"]))


class Segmenter:
    """A semantic segmentation network with its preprocessing: PIL images in, ADE20K class maps out."""

    def __init__(self, model: Any, preprocess: Preprocess, device: str = "cpu", precision: str = "auto",
                 name: str = "") -> None:
        from geoloc_cli.dist import amp_dtype, resolve_device

        self.device = str(resolve_device(device))
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.precision = precision
        self.name = name
        self._dtype = amp_dtype(precision, self.device)
        labels = int(model.config.num_labels)
        if labels != NUM_CLASSES:
            raise ConfigError(f"segment.model: {name or 'model'} predicts {labels} classes, ADE20K needs 150")

    # -- construction

    @staticmethod
    def from_name(name: str, device: str = "cpu", precision: str = "auto",
                  input_size: int | None = None) -> Segmenter:
        """'tiny-random' (or another RANDOM_CONFIGS name), a Hugging Face hub id or a local directory.

        `input_size` overrides the processor's square input size (config segment.input_size)."""
        if name in RANDOM_CONFIGS:
            model = _random_segformer(RANDOM_CONFIGS[name])
            pre = Preprocess(input_size or 512, tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
            return Segmenter(model, pre, device, precision, name)
        model, pre = _load_pretrained(name)
        if input_size:
            pre = Preprocess(input_size, pre.mean, pre.std)
        return Segmenter(model, pre, device, precision, name)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights (CPU tensors, safetensors-ready) and JSON-able metadata to rebuild this segmenter.

        The weights carry the names of the model's Hugging Face files, which every transformers release
        reads (5.x renamed SegFormer's modules but still saves and loads those names): a checkpoint made
        under 5.x loads under 4.x and the reverse."""
        import transformers

        meta = {
            "format": STATE_FORMAT,
            "name": self.name,
            "config": self.model.config.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "transformers": transformers.__version__,
        }
        return _hub_named_weights(self.model), meta

    @staticmethod
    def from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: str = "cpu",
                   precision: str = "auto") -> Segmenter:
        """Rebuild from `state()` output without any download or other file."""
        from transformers import AutoConfig, AutoModelForSemanticSegmentation

        if meta.get("format") != STATE_FORMAT:
            raise InputError(f"segmenter metadata format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        config_dict = dict(meta["config"])
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        model = AutoModelForSemanticSegmentation.from_config(config)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError:  # names of the Hugging Face files (or of another transformers): it maps them
            model = _from_hub_named_weights(config, tensors, meta.get("transformers", "an unknown version"))
        pre = Preprocess.from_dict(meta["preprocess"])
        return Segmenter(model, pre, device, precision, meta.get("name", ""))

    # -- inference

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Photo -> (size, size, 3) uint8: the CPU part of preprocessing (PIL releases the GIL)."""
        from PIL import Image

        size = self.preprocess.size
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 prepared images -> (B, h, w) uint8 class maps at the model's output size."""
        import torch

        x = torch.from_numpy(batch).to(self.device, non_blocking=True)  # upload uint8: 4x less traffic
        # (x / 255 - mean) / std in two in-place passes; NHWC -> NCHW view keeps channels-last memory
        mean = torch.tensor(self.preprocess.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.preprocess.std, device=self.device).view(1, 3, 1, 1) * 255.0
        x = x.permute(0, 3, 1, 2).float().sub_(mean).div_(std)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.inference_mode(), torch.autocast(device_type, self._dtype or torch.float32,
                                                    enabled=self._dtype is not None):
            logits = self.model(pixel_values=x).logits
            return logits.argmax(1).to(torch.uint8).cpu().numpy()

    def __call__(self, images: list[Image.Image], batch_size: int = 32) -> list[np.ndarray]:
        """Class maps (uint8, 0..149) for a list of photos, at the model's native output resolution."""
        maps: list[np.ndarray] = []
        for i in range(0, len(images), batch_size):
            batch = np.stack([self.prepare(im) for im in images[i : i + batch_size]])
            maps.extend(self.predict(batch))
        return maps


def _hub_named_weights(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights under the names `save_pretrained` writes (those of its Hugging Face files)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="geoloc-seg-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
    return {k: v.contiguous() for k, v in tensors.items()}


def _from_hub_named_weights(config: Any, tensors: dict[str, torch.Tensor], made_with: str) -> Any:
    """Load weights through transformers' own loader, which maps the names of Hugging Face files (and of
    older releases) onto its modules; any weight left unmapped is an error, never a random init."""
    import tempfile

    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForSemanticSegmentation

    with tempfile.TemporaryDirectory(prefix="geoloc-seg-") as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model, info = AutoModelForSemanticSegmentation.from_pretrained(tmp, output_loading_info=True)
    bad = [*info.get("missing_keys", []), *info.get("unexpected_keys", []), *info.get("mismatched_keys", [])]
    if bad:
        raise InputError(f"the embedded segmenter was saved with transformers {made_with}, whose weight names "
                         f"transformers {transformers.__version__} cannot map ({bad[0]}): use transformers "
                         f"{made_with.split('.')[0]}.x, or export the checkpoint again with this one")
    return model


def _random_segformer(shape: dict[str, Any]) -> Any:
    """A SegFormer with 150 ADE20K labels and weights drawn from a fixed seed (same on every call)."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    names = class_names()
    config = SegformerConfig(
        num_labels=NUM_CLASSES,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        **shape,
    )
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's random stream
        torch.manual_seed(RANDOM_SEED)
        return SegformerForSemanticSegmentation(config)


def _load_pretrained(name: str) -> tuple[Any, Preprocess]:
    """Model and preprocessing of a hub id or local directory (transformers' cache applies)."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    try:
        model = AutoModelForSemanticSegmentation.from_pretrained(name)
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "local directory" if Path(name).exists() else "Hugging Face hub id (needs internet or cache)"
        raise ConfigError(
            f"segment.model: cannot load {name!r} as a {where}: {str(e).splitlines()[0]} "
            f"(use a local model directory, or 'tiny-random' for tests)"
        ) from None
    size = getattr(processor, "size", None) or {}
    side = (size.get("height") or size.get("shortest_edge") or 512) if isinstance(size, dict) else int(size)
    mean = tuple(getattr(processor, "image_mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(processor, "image_std", None) or IMAGENET_STD)
    return model, Preprocess(int(side), mean, std)


# ----------------------------------------------------------------------------------------- PNG helpers


def encode_png(class_map: np.ndarray) -> bytes:
    """Class map -> mode L PNG bytes (lossless, a few KB for a 128 x 128 map)."""
    from PIL import Image

    _check_classes(class_map)
    buf = io.BytesIO()
    Image.fromarray(class_map).save(buf, format="PNG", compress_level=6)  # 2-D uint8 array -> mode L
    return buf.getvalue()


def decode_png(data: bytes, source: str = "png") -> np.ndarray:
    """Mode L PNG bytes (as written by encode_png) -> class map (H, W) uint8."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "L":
                raise InputError(f"{source}: class map PNG has mode {im.mode}, expected L")
            class_map = np.asarray(im).copy()
    except (OSError, SyntaxError) as e:
        raise InputError(f"{source}: cannot decode class map PNG: {e}") from None
    _check_classes(class_map)
    return class_map


# --------------------------------------------------------------------------------------------- preview


def top_classes(class_map: np.ndarray, k: int = 8, min_share: float = 0.005) -> list[tuple[int, float]]:
    """The k most frequent classes of a map as (class index, pixel share), largest first."""
    counts = np.bincount(class_map.ravel(), minlength=NUM_CLASSES)
    order = np.argsort(-counts, kind="stable")[:k]
    total = max(int(counts.sum()), 1)
    return [(int(c), counts[c] / total) for c in order if counts[c] / total >= min_share]


def preview_image(photo: Image.Image, class_map: np.ndarray, height: int = 256, top: int = 8) -> Image.Image:
    """Side by side: the photo | its colour-coded map (same size) | a legend of the top classes."""
    from PIL import Image, ImageDraw

    photo = photo.convert("RGB")
    width = max(1, round(photo.width * height / photo.height))
    photo = photo.resize((width, height), Image.BILINEAR)
    colours = Image.fromarray(colorize(class_map)).resize((width, height), Image.NEAREST)
    legend_w, row_h = 190, 22
    canvas = Image.new("RGB", (2 * width + legend_w, max(height, row_h * top + 8)), "white")
    canvas.paste(photo, (0, 0))
    canvas.paste(colours, (width, 0))
    draw = ImageDraw.Draw(canvas)
    palette, names = load_palette(), class_names()
    for row, (c, share) in enumerate(top_classes(class_map, top)):
        x, y = 2 * width + 8, 6 + row * row_h
        draw.rectangle([x, y, x + 16, y + 16], fill=tuple(int(v) for v in palette[c]), outline="black")
        draw.text((x + 24, y + 2), f"{names[c]} {share:.0%}", fill="black")
    return canvas
