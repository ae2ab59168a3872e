"""One configuration tree for every stage.

Precedence: dataclass defaults < YAML file < `--set a.b=c` overrides < explicit command options.
Unknown keys, wrong types and bad values raise ConfigError naming the key. Every field carries its
documentation in `metadata["doc"]`; `geoloc config` prints the resolved tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from geoloc_cli.errors import ConfigError

DEFAULT_CONFIG_FILE = "geoloc.yaml"
# The configs shipped with geoloc (the repository's configs/, linked into the package and so in the wheel)
PACKAGED_CONFIGS = Path(__file__).parent / "configs"


# Choices are Literal types: the type checker, `_check_type` and the error message all read the one list.
Precision = Literal["auto", "fp32", "fp16", "bf16"]


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and a docstring (mutable defaults are copied per instance)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class PathsConfig:
    root: str = doc("geoloc-data", "Data root: meta/, datasets/, partitions/, runs/ live under it.")


@dataclass
class RuntimeConfig:
    device: str = doc("auto", "Device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
    gpus: list[int] = doc([], "GPU indices for multi-GPU stages (train, segment); empty = use `device`.")
    nproc: int = doc(0, "Processes per node when `gpus` is empty (CPU/gloo multi-process); 0 = one.")
    num_workers: int | str = doc(
        "auto", "Data-loading worker processes per training/inference process (segment: decode threads); auto = "
        "the cores a GPU process leaves free (up to 16), 1-2 on the CPU.")
    seed: int = doc(0, "Random seed for everything that is random.")


@dataclass
class FetchConfig:
    size_suffix: str = doc("_z", "Flickr size suffix added before the extension ('_z' = 640 px; '' = original).")
    resize_shorter: int = doc(320, "Resize so the shorter side is this many pixels (0 = keep size).")
    jpeg_quality: int = doc(90, "JPEG quality of stored images.")
    shard_size: int = doc(1000, "Items per tar shard.")
    processes: int = doc(2, "Download processes (each runs many concurrent requests).")
    concurrency: int = doc(64, "Concurrent requests per process.")
    per_host: int = doc(16, "Maximum concurrent requests to one host per process.")
    connect_timeout: float = doc(5.0, "Seconds to establish a connection.")
    read_timeout: float = doc(10.0, "Seconds to wait for data on an open connection.")
    deadline: float = doc(30.0, "Overall seconds one item may take, retries included.")
    retries: int = doc(3, "Retries for 429, 5xx and connection errors (never for 404/410).")
    max_bytes: int = doc(20_000_000, "Largest response body accepted.")
    demo_size: int = doc(1200, "Photos in the built-in demo world (3/4 training, 1/4 held out).")
    max_pixels: int = doc(100_000_000, "Largest decoded image (width*height) accepted: decompression-bomb guard.")
    mirrors: list[str] = doc([], "Your own mirror base URLs (e.g. an institutional copy), tried first for every "
                             "preset file: <base>/<file name>.")


@dataclass
class PartitionConfig:
    dataset: str = doc("mp16", "Dataset whose metadata (meta/<dataset>_places365.csv) is partitioned.")
    tau_min: int = doc(50, "Cells with at most this many images are dropped.")
    tau_max: dict[str, int] = doc(
        {"coarse": 5000, "middle": 2000, "fine": 1000},
        "Per partitioning: cells with more images are split (published: 5000/2000/1000).",
    )
    lvl_min: int = doc(2, "S2 level partitioning starts from.")
    lvl_max: int = doc(30, "Deepest S2 level a cell may be split to.")


@dataclass
class FilterConfig:
    scene_of_interest: Literal[0, 1, 2, 3] = doc(3, "Keep one scene only: 0 indoor, 1 natural, 2 urban, 3 all.")
    min_size: int = doc(0, "Drop images whose shorter side, as downloaded (before resizing), is below this.")


@dataclass
class SegmentConfig:
    model: str = doc(
        "nvidia/segformer-b0-finetuned-ade-512-512",
        "ADE20K segmentation model: Hugging Face hub id or local directory; 'tiny-random' builds a small "
        "randomly initialised SegFormer (tests, demo).",
    )
    batch_size: int = doc(32, "Images per inference batch.")
    input_size: int = doc(512, "Images are resized to this square size before segmentation.")
    precision: Precision = doc("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")


@dataclass
class EmbedConfig:
    batch_size: int = doc(256, "Photos per batch of `geoloc embed`.")
    precision: Precision = doc(
        "auto", "auto (bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16; stored embeddings are fp16.")


@dataclass
class ModelConfig:
    backbone: str = doc(
        "vit_base_patch16_224.augreg_in21k",
        "timm model of each branch: any timm image model (ViT of any patch size, OpenAI CLIP as "
        "vit_large_patch14_clip_quickgelu_224.openai, DataComp CLIP, DINOv2/v3, SigLIP/SigLIP2, EVA, ConvNeXt, "
        "ResNet) or an hf-hub:org/name id; its own data config sets mean/std/crop/interpolation.")
    pretrained: str = doc(
        "auto", "Backbone weights: auto (timm's if reachable, else random with a warning; refused where the backbone "
        "stays frozen: embed, train.trainable_blocks=0), none (random), a local timm weights file, or a "
        "geoloc inference checkpoint (.safetensors: its branches' weights).")
    img_size: int = doc(224, "Input resolution of both branches (passed to timm only where the architecture takes "
                        "it; CNNs take any size).")
    seg_channels: Literal[0, 3, 150] = doc(
        3, "Segmentation branch input: 0 = RGB only, 3 = palette colours, 150 = one-hot.")
    fusion: Literal["late", "gated", "exchange"] = doc(
        "late", "How branches are fused: late (one learned weighting), gated (the seed model's per-sample gate) or "
        "exchange (CLS tokens averaged after every block).")
    scene_classes: Literal[3, 16, 365] = doc(3, "Scene head size: 3 (indoor/natural/urban), 16 or 365.")
    partitionings: list[str] = doc(["coarse", "middle", "fine"], "Geo-cell heads, one per partitioning.")
    overrides: dict[str, Any] = doc({}, "Extra keyword arguments for timm.create_model (e.g. depth).")
    head_hidden: int = doc(0, "Heads: 0 = one linear layer per head, N = a small MLP per head (one hidden layer of "
                           "N units, GELU).")
    head_trunk: int = doc(0, "0 = none, N = a hidden layer of N units (GELU) shared by all heads, before them.")


@dataclass
class TrainConfig:
    dataset: str = doc("mp16", "Training dataset (datasets/<name>/ with an index from `geoloc filter`).")
    val_dataset: str = doc("yfcc25600", "Held-out dataset for validation ('' = none).")
    run: str = doc("default", "Run name: outputs go to runs/<run>/.")
    epochs: int = doc(15, "Training epochs.")
    batch_size: int = doc(256, "Global batch size (split across GPUs).")
    lr: float = doc(1e-4, "Peak learning rate.")
    weight_decay: float = doc(0.05, "AdamW weight decay.")
    optimizer: Literal["adamw", "sgd"] = doc("adamw", "adamw or sgd.")
    warmup_epochs: float = doc(1.0, "Linear warm-up length, then cosine decay.")
    label_smoothing_km: float | dict[str, float] = doc(
        0.0, "Haversine label smoothing (PIGEON): each partitioning's target is softmax(-distance to each cell "
        "centre / tau), tau in km (PIGEOTTO: 65); one value for every partitioning or {name: tau}; 0 = plain "
        "cross-entropy.")
    loss_weights: dict[str, float] = doc(
        {"coarse": 0.5, "middle": 0.3, "fine": 0.2, "scene": 1.0}, "Weight of each head's loss."
    )
    precision: Precision = doc("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")
    grad_clip: float = doc(1.0, "Clip the gradient norm to this (0 = off).")
    grad_accum: int = doc(1, "Gradient accumulation steps.")
    checkpoint_every: int = doc(1000, "Save resume state every N optimizer steps (and at each epoch end).")
    shuffle_window_shards: int = doc(
        16, "Shuffle buffer: each epoch permutes the shards, then mixes samples within windows of this many "
        "consecutive shards (reads stream through few files at a time).")
    augment: bool = doc(True, "Random resized crop + flip (same geometry for photo and seg map).")
    ema_decay: float = doc(0.0, "Keep an exponential moving average of the weights with this decay (0 = off).")
    compile: bool = doc(False, "torch.compile the model (GPU; helps long runs, costs start-up time).")
    source: Literal["images", "embeddings"] = doc(
        "images", "What training reads: images (photos through the whole network) or embeddings (the heads only, "
        "on the frozen backbone's fp16 features from `geoloc embed`; the checkpoint still holds the backbone).")
    trainable_blocks: int = doc(
        -1, "Fine-tuning depth: -1 = the whole backbone, 0 = backbone frozen (heads only), N = only the last N "
        "blocks (timm's block grouping; the final norm/pool counts with the last). Frozen parts run without "
        "autograd, in eval mode.")
    best_metric: str = doc(
        "val_hierarchical_acc_2500km", "Which validation number picks model.safetensors (the epoch where it is best: "
        "highest for accuracies, lowest for *_median_km): val_<partitioning or hierarchical>_acc_<T>km with T one of "
        "evaluate.thresholds_km, val_<...>_median_km, val_scene_acc, or train_loss; without a validation set, "
        "train_loss.")
    layer_decay: float = doc(1.0, "Layer-wise learning-rate decay: block i of L gets lr * decay^(L+1-i), the heads "
                             "lr (1 = off; 0.65-0.85 is usual for fine-tuning ViTs).")


@dataclass
class EvaluateConfig:
    datasets: list[str] = doc(["yfcc25600"], "Datasets to evaluate on.")
    thresholds_km: list[float] = doc([1, 25, 200, 750, 2500], "Accuracy thresholds in km.")
    batch_size: int = doc(64, "Images per inference batch.")
    crops: Literal["auto", "center", "five", "ten"] = doc(
        "auto", "Test-time crops: center, five (corners + centre) or ten (five + flips); auto = the protocol the "
        "checkpoint records (a converted published model's own), else center.")
    crop_reduce: Literal["auto", "mean", "max"] = doc(
        "auto", "How crop probabilities are combined: mean or max; auto = the checkpoint's protocol, else mean.")
    admin_metrics: bool = doc(True, "Also score the hierarchical prediction's country / region / sub-region / city "
                              "as OSV-5M does (reverse_geocoder package: the `metrics` extra).")


@dataclass
class PredictConfig:
    top_k: int = doc(5, "Number of candidate places per photo.")
    batch_size: int = doc(16, "Photos per inference batch.")
    backend: Literal["auto", "onnx", "torch"] = doc(
        "auto", "auto (ONNX Runtime when an exported .onnx sits beside the checkpoint, else torch), onnx or torch.")


@dataclass
class RetrievalConfig:
    dataset: str = doc("", "Gallery dataset for `geoloc index` and --refine knn ('' = train.dataset); its "
                       "embeddings (`geoloc embed`) must come from the refining model's RGB branch.")
    k: int = doc(20, "Gallery neighbours whose positions are aggregated into the refined position.")
    top_cells: int = doc(1, "Search only among gallery photos in the query's most likely finest cells (of the "
                         "hierarchical prediction); 0 = the whole gallery. On the demo 1 beats more: the classifier "
                         "picks the cell better than the nearest embeddings do.")
    aggregation: Literal["median", "weighted", "mean", "top1"] = doc(
        "median", "How neighbours' positions become one: median (weighted geometric median on the sphere), weighted "
        "(centroid, softmax(similarity / temperature) weights), mean (centroid) or top1 (the nearest "
        "neighbour's position).")
    temperature: float = doc(0.2, "Softmax temperature of the similarity weights (weighted, median).")
    index: Literal["auto", "exact", "flat", "ivf", "hnsw"] = doc(
        "auto", "How `geoloc index` prepares whole-gallery search (top_cells 0; inside cells the search is always "
        "exact, a few hundred photos per cell): exact (numpy), or a FAISS index, flat / ivf / hnsw (exact, "
        "inverted lists or graph over fp16 codes; the `retrieval` extra; GPU where the build has one); auto = "
        "ivf when top_cells is 0 and the gallery has more than exact_max photos, else exact.")
    exact_max: int = doc(1_000_000, "index=auto: larger galleries searched whole (top_cells 0) get an IVF index.")
    candidates: int = doc(1000, "FAISS (top_cells 0): neighbours fetched per query before dropping left-out photos.")
    nprobe: int = doc(32, "FAISS ivf: inverted lists visited per query (recall against speed).")
    exclude: list[str] = doc([], "Datasets whose photos (by id, and by author where both metadata have authors) "
                             "`geoloc index` leaves out of the gallery, besides evaluate.datasets.")
    exclude_authors: bool = doc(True, "Also leave out gallery photos by an author of an evaluation photo.")


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    @property
    def root(self) -> Path:
        return Path(self.paths.root)


# Value checks beyond types: key -> (predicate, what is allowed).
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "paths.root": (lambda v: bool(v.strip()), "a folder; empty is not allowed"),
    "train.run": (lambda v: bool(v.strip()), "a run name; empty is not allowed"),
    "train.dataset": (lambda v: bool(v.strip()), "a dataset name; empty is not allowed"),
    "partition.dataset": (lambda v: bool(v.strip()), "a dataset name; empty is not allowed"),
    "runtime.device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "auto, cpu, cuda or cuda:N"),
    "runtime.num_workers": (lambda v: v == "auto" or isinstance(v, int) and v >= 0, "auto or >= 0"),
    "fetch.shard_size": (lambda v: v > 0, "> 0"),
    "fetch.processes": (lambda v: v > 0, "> 0"),
    "fetch.concurrency": (lambda v: v > 0, "> 0"),
    "fetch.demo_size": (lambda v: v >= 8, ">= 8"),
    "fetch.jpeg_quality": (lambda v: 1 <= v <= 100, "1..100"),
    "partition.tau_min": (lambda v: v >= 0, ">= 0"),
    "partition.lvl_min": (lambda v: 0 <= v <= 30, "0..30"),
    "partition.lvl_max": (lambda v: 0 <= v <= 30, "0..30"),
    "segment.batch_size": (lambda v: v > 0, "> 0"),
    "embed.batch_size": (lambda v: v > 0, "> 0"),
    "model.img_size": (lambda v: v > 0, "> 0"),
    "model.partitionings": (lambda v: len(v) > 0, "at least one partitioning"),
    "train.epochs": (lambda v: v > 0, "> 0"),
    "train.batch_size": (lambda v: v > 0, "> 0"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.grad_accum": (lambda v: v > 0, "> 0"),
    "train.checkpoint_every": (lambda v: v > 0, "> 0"),
    "predict.top_k": (lambda v: v > 0, "> 0"),
    "predict.batch_size": (lambda v: v > 0, "> 0"),
    "train.shuffle_window_shards": (lambda v: v > 0, "> 0"),
    "train.ema_decay": (lambda v: 0 <= v < 1, "0 <= decay < 1"),
    "train.trainable_blocks": (lambda v: v >= -1, ">= -1"),
    "train.layer_decay": (lambda v: 0 < v <= 1, "0 < decay <= 1"),
    "model.head_hidden": (lambda v: v >= 0, ">= 0"),
    "model.head_trunk": (lambda v: v >= 0, ">= 0"),
    "retrieval.k": (lambda v: v > 0, "> 0"),
    "retrieval.top_cells": (lambda v: v >= 0, ">= 0"),
    "retrieval.temperature": (lambda v: v > 0, "> 0"),
    "retrieval.candidates": (lambda v: v > 0, "> 0"),
    "retrieval.nprobe": (lambda v: v > 0, "> 0"),
}


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp` where that is lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        # the type too: True == 1 and 3.0 == 3, but a YAML `yes` or `3.0` is no choice of 0/1/2/3
        if not any(type(value) is type(c) and value == c for c in choices):
            kinds = {type(c) for c in choices}
            if len(kinds) == 1 and type(value) not in kinds:
                raise ConfigError(f"{key}: expected {kinds.pop().__name__} ({_one_of(choices)}), got {value!r}")
            raise ConfigError(f"{key}: {value!r} is not allowed (expected {_one_of(choices)})")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _check_type(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a YAML `run: 1` or `size_suffix: 640` is meant as text
    if isinstance(value, bool) and tp is not bool:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _one_of(choices: tuple[Any, ...]) -> str:
    """'a, b or c'."""
    words = [str(c) for c in choices]
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]


def _is_text(tp: Any) -> bool:
    """A field whose value is text: str, or a Literal of strings."""
    return tp is str or typing.get_origin(tp) is Literal and all(isinstance(c, str) for c in typing.get_args(tp))


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Write a nested mapping onto a dataclass tree, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, 1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(f"{full}: unknown key ({hint}known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{full}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            # mappings merge key by key, so `--set partition.tau_max.fine=500` keeps coarse and middle
            setattr(obj, key, {**current, **_check_type(full, value, hints[key])})
        else:
            setattr(obj, key, _check_type(full, value, hints[key]))


def _validate(cfg: Config) -> None:
    for key, (ok, allowed) in _CHECKS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{key}: {value!r} is not allowed (expected {allowed})")
    unknown = set(cfg.model.partitionings) - set(cfg.partition.tau_max)
    if unknown:
        raise ConfigError(f"model.partitionings: {sorted(unknown)} have no partition.tau_max entry")
    if cfg.partition.lvl_min > cfg.partition.lvl_max:
        raise ConfigError("partition.lvl_min: must not exceed partition.lvl_max")
    heads = {*cfg.model.partitionings, "scene"}
    typos = set(cfg.train.loss_weights) - heads - set(cfg.partition.tau_max)
    if typos:
        raise ConfigError(f"train.loss_weights: {sorted(typos)} name no head (heads: {', '.join(sorted(heads))})")
    if cfg.train.source == "embeddings":
        _validate_embeddings(cfg)
    smoothing = cfg.train.label_smoothing_km
    values = smoothing.values() if isinstance(smoothing, dict) else [smoothing]
    if any(v < 0 for v in values):
        raise ConfigError(f"train.label_smoothing_km: {smoothing!r}: tau must be >= 0 km (0 = off)")
    if isinstance(smoothing, dict) and set(smoothing) - set(cfg.model.partitionings):
        raise ConfigError(f"train.label_smoothing_km: {sorted(set(smoothing) - set(cfg.model.partitionings))} "
                          f"are no partitioning (model.partitionings: {', '.join(cfg.model.partitionings)})")
    unweighted = heads - set(cfg.train.loss_weights)
    if unweighted:
        raise ConfigError(f"train.loss_weights: no weight for {sorted(unweighted)} (0 turns a head off)")


def _validate_embeddings(cfg: Config) -> None:
    """Cached embeddings come from the frozen branches, fused only after them."""
    if cfg.model.seg_channels and cfg.model.fusion == "exchange":
        raise ConfigError("train.source=embeddings: exchange fusion mixes the branches inside every block, so "
                          "there is no branch feature to cache; use model.fusion=late or gated")
    if cfg.train.trainable_blocks > 0:
        raise ConfigError("train.source=embeddings: the backbone is frozen (its features are cached); set "
                          "train.trainable_blocks=0 or train.source=images to fine-tune blocks")


def smoothing_km(cfg: Config, partitioning: str) -> float:
    """train.label_smoothing_km for one partitioning (0: plain cross-entropy)."""
    smoothing = cfg.train.label_smoothing_km
    return float(smoothing.get(partitioning, 0.0) if isinstance(smoothing, dict) else smoothing)


def parse_override(text: str) -> dict[str, Any]:
    """`a.b=c` -> {"a": {"b": c}}: c as given for a text field (a run named 0612 stays "0612", not YAML
    1.1's octal 394), else parsed as YAML (so 3 is an int, [0,1] a list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    path, raw = text.split("=", 1)
    if not all(path.strip().split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    if _is_text(_field_type(path.strip())) and not raw.strip().startswith(("'", '"')):
        return _nest(path.strip(), raw.strip())  # a quoted value ('' for empty) is parsed as YAML below
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot parse value {raw!r}: {e}") from None
    return _nest(path.strip(), value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []  # a list: a key may be unhashable (a YAML sequence), which SafeLoader refuses below
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *anchor; a key given beside it overrides it
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1})")
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def _field_type(path: str) -> Any:
    """The declared type of a dotted key (None for an unknown key or one inside a mapping's values)."""
    tp: Any = Config
    for part in path.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - safe
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def packaged_configs() -> dict[str, Path]:
    """The configs shipped with geoloc by name: `demo` and each recipe (`clip-frozen`, `translocator`, ...)."""
    return {p.stem: p for p in sorted(PACKAGED_CONFIGS.rglob("*.yaml"))}


def find_config(path: Path) -> Path:
    """`path` when it exists, else the shipped config of that name (`-c demo` from any folder)."""
    if path.exists():
        return path
    named = packaged_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml") if len(path.parts) == 1 else None
    if name in named:
        return named[name]
    raise ConfigError(f"config file {path} does not exist (configs shipped with geoloc, by name: {', '.join(named)})")


def _anchor_paths(data: dict[str, Any], path: Path) -> None:
    """A relative paths.root in a config file names a folder beside that file, whatever the working directory;
    in a config shipped with geoloc it stays relative to the working directory (its own folder is inside the
    installation, no place for data)."""
    section = data.get("paths")
    root = section.get("root") if isinstance(section, dict) else None
    if not isinstance(root, str) or not root.strip() or Path(root).expanduser().is_absolute():
        return
    if path.resolve().is_relative_to(PACKAGED_CONFIGS.resolve()):
        return
    section["root"] = str(path.parent / root)


def load_config(
    path: Path | None = None,
    overrides: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> Config:
    """Resolve the configuration: defaults < YAML < --set overrides < explicit options.

    `path` None means ./geoloc.yaml when present, else defaults only; a path that does not exist may name a
    shipped config (`demo`). `options` maps dotted keys to values from explicit command options (None values
    are ignored). A relative paths.root in the file is relative to the file's folder (see `_anchor_paths`).
    """
    cfg = Config()
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = Path(DEFAULT_CONFIG_FILE)
    if path is not None:
        path = find_config(Path(path))
        data = read_yaml(path)
        _anchor_paths(data, path)
        _merge(cfg, data)
    for text in overrides or []:
        _merge(cfg, parse_override(text))
    for key, value in (options or {}).items():
        if value is not None:
            _merge(cfg, _nest(key, value))
    _validate(cfg)
    return cfg


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for k in reversed(key.split(".")):
        out = {k: out}
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. stored in a checkpoint), with full checking."""
    cfg = Config()
    _merge(cfg, data)
    _validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cfg: Any = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, value, doc) for every field: used by `geoloc config` and the docs."""
    cfg = cfg if cfg is not None else Config()
    rows: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("doc", "")))
    return rows
