"""The `geoloc` command: thin typer commands that resolve the config and call one stage's `run`.

Only this module knows typer. Heavy libraries (torch, timm, transformers) are imported inside the
commands that need them, so `geoloc --help` stays fast. Every GeolocError becomes one line on stderr
and its exit code (ConfigError: 2), never a traceback (unless `geoloc -v`); so does an OSError (disk full, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from geoloc_cli.data.sources import PRESETS
from geoloc_cli.errors import ConfigError, GeolocError, require

BEST_HELP = "Inference checkpoint (default: the run's best, by validation accuracy at 2,500 km)"

app = typer.Typer(
    name="geoloc",
    help="Photo geolocation research: fetch MP-16, build S2 geo-cells, segment, train a ViT, evaluate, predict. "
    "Environment: GEOLOC_CONFIG (the config file when -c is not given), GEOLOC_ROOT and GEOLOC_DEVICE (over the "
    "config file, under --set and options).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Shared options (every command takes the config ones; device ones where a stage uses devices).
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c",
                 help="YAML config (default: $GEOLOC_CONFIG, else ./geoloc.yaml if present, else built-in defaults)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set train.lr=3e-4 (repeatable)."),
]
# text, not Path: typer turns --root '' into Path(".") and the mistake would pass unseen
RootOpt = Annotated[str | None, typer.Option("--root", help="Data root directory (config paths.root).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
# Environment variables: a layer between the config file and --set / options (GEOLOC_CONFIG: the file)
ENV_KEYS = {"GEOLOC_ROOT": "paths.root", "GEOLOC_DEVICE": "runtime.device"}
GpusOpt = Annotated[str | None, typer.Option("--gpus", help="Comma-separated GPU indices, e.g. 0,1.")]
# What each extra brings that commands check before starting (pyproject.toml): the pipeline's tables (`data`);
# fetch's own HTTP client and the Hub's (`fetch`; simplejpeg/OpenCV are optional: Pillow stands in); the
# deep-learning stack (`train`, which brings `data` too)
DATA_MODULES = ("pandas", "pyarrow")
FETCH_MODULES = (*DATA_MODULES, "h11", "certifi", "idna", "httpx", "huggingface_hub")
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; plain log lines instead.")]
RefineOpt = Annotated[str | None, typer.Option(
    "--refine", help="knn: refine each position with the nearest gallery photos in its top cells (`geoloc index`; "
    "retrieval.* settings).")]


def _version(show: bool) -> None:
    if show:
        from geoloc_cli import __version__

        typer.echo(f"geoloc {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (as each command's -q).")] = False,
    verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True,
        help="Debug detail: the traceback of every error and libraries' log messages (-vv: their debug ones).")] = 0,
) -> None:
    """The options before the command."""
    from geoloc_cli import console

    # set on every invocation: the state is module-wide and must not leak from one run into the next (tests)
    console.set_quiet(quiet)
    console.set_verbose(verbose)


def _parse_gpus(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--gpus: expected comma-separated integers like 0,1, got {text!r}") from None


def _refine(value: str | None) -> str | None:
    if value not in (None, "none", "knn"):
        raise ConfigError(f"--refine {value}: expected knn (or none)")
    return value if value == "knn" else None


def _config(config: Path | None, sets: list[str] | None, root: str | None, **options: Any):
    """Resolve the config tree; `options` are explicit command options keyed by dotted config key."""
    import os

    from geoloc_cli.config import load_config

    if config is None and os.environ.get("GEOLOC_CONFIG"):
        config = Path(os.environ["GEOLOC_CONFIG"])
    from_env = [f"{key}={os.environ[var]}" for var, key in ENV_KEYS.items() if os.environ.get(var)]
    if root is not None:
        options["paths.root"] = root
    return load_config(config, [*from_env, *(sets or [])], options)


def _handled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn domain errors into a clear message and an exit code (the one place that does so)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from geoloc_cli import console

        if kwargs.get("quiet"):  # the command's -q; `geoloc -q CMD` was set by the app's callback
            console.set_quiet(True)
        try:
            return fn(*args, **kwargs)
        except GeolocError as e:
            console.traceback()
            console.error(str(e))
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # the operating system refused a file operation no stage anticipated
            from geoloc_cli.errors import os_error_message

            console.traceback()
            console.error(os_error_message(e))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.traceback()
            console.error("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@app.command(
    epilog="Examples:  geoloc fetch demo  |  geoloc fetch mp16  |  "
    "geoloc fetch im2gps3k --archive im2gps3ktest.zip  |  geoloc fetch osv5m --split train  |  "
    "geoloc fetch --urls list.csv --meta meta.csv --name mine  |  geoloc fetch ./photos --name holiday"
)
@_handled
def fetch(
    source: Annotated[
        str | None,
        typer.Argument(help=f"Preset (demo, {', '.join(PRESETS)}; sources in the README) or a folder of photos."),
    ] = None,
    urls: Annotated[Path | None, typer.Option(help="URL list: image_id,url rows without a header.")] = None,
    meta: Annotated[Path | None, typer.Option(help="Metadata CSV in *_places365.csv format.")] = None,
    archive: Annotated[Path | None, typer.Option(
        help="Images from a local archive (.zip, .tar, .tar.gz; a folder or one part of a multi-part one), "
             "streamed into shards; with a preset, or with --meta.")] = None,
    split: Annotated[str | None, typer.Option(help="Split of a preset that has splits (osv5m: test, train).")] = None,
    via: Annotated[str | None, typer.Option(help="Preset images only from its archive or its URL list.")] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name (datasets/<name>/).")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Retry failed items (not 404/410).")] = False,
    retry_gone: Annotated[bool, typer.Option(help="With --retry-failed, retry 404/410 too.")] = False,
    part: Annotated[str | None, typer.Option(help="Fetch slice i of N (i/N, 0-based) of the list.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Download images (or import local photos) into tar shards with a manifest of statuses."""
    cfg = _config(config, set_, root)
    require(*FETCH_MODULES, extra="fetch")
    from geoloc_cli.stages import fetch as stage
    stage.run(cfg, source=source, urls=urls, meta=meta, name=name, retry_failed=retry_failed,
              retry_gone=retry_gone, part=part, archive=archive, split=split, via=via)


@app.command(
    epilog="Examples:  geoloc partition --cells all  |  "
    "geoloc partition --input meta.csv --tau-min 50 --tau-max 1000 --output cells/  |  "
    "geoloc partition --use-published cells/ --export-mapping labels.json"
)
@_handled
def partition(
    cells: Annotated[str, typer.Option(help="coarse, middle, fine or all.")] = "all",
    input: Annotated[Path | None, typer.Option(help="Metadata CSV to partition (default: config's dataset).")] = None,
    tau_min: Annotated[int | None, typer.Option(help="Drop cells with at most this many images.")] = None,
    tau_max: Annotated[int | None, typer.Option(help="Split cells with more images (one custom partitioning).")] = None,
    output: Annotated[Path | None, typer.Option(help="Output directory (default partitions/<dataset>/).")] = None,
    use_published: Annotated[Path | None, typer.Option(help="Assign classes with these cell tables.")] = None,
    export_mapping: Annotated[Path | None, typer.Option(help="Write {IMG_ID: \\[coarse, middle, fine]} JSON.")] = None,
    map: Annotated[Path | None, typer.Option("--map", help="Draw the cells on a world map (.png or .html).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Build adaptive S2 geo-cell partitionings and assign each image its class."""
    cfg = _config(config, set_, root, **{"partition.tau_min": tau_min})
    require(*DATA_MODULES, extra="data")
    from geoloc_cli.stages import partition as stage
    stage.run(cfg, cells=cells, input=input, tau_max=tau_max, output=output, use_published=use_published,
              export_mapping=export_mapping, map_path=map)


@app.command("filter", epilog="Examples:  geoloc filter  |  geoloc filter mp16 --scene 1 --min-size 200")
@_handled
def filter_(
    dataset: Annotated[str | None, typer.Argument(help="Dataset to index (default: train.dataset).")] = None,
    scene: Annotated[int | None, typer.Option(help="scene_of_interest: 0 indoor, 1 natural, 2 urban, 3 all.")] = None,
    min_size: Annotated[int | None, typer.Option(help="Minimum shorter side in pixels.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write the training index: downloaded items with a class in every partitioning."""
    cfg = _config(config, set_, root, **{"filter.scene_of_interest": scene, "filter.min_size": min_size})
    require(*DATA_MODULES, extra="data")
    from geoloc_cli.stages import filter as stage
    stage.run(cfg, dataset=dataset)


@app.command(
    epilog="Examples:  geoloc segment  |  geoloc segment mp16 --gpus 0,1  |  geoloc segment --preview 8  |  "
    "geoloc segment mp16 --import translocator_maps/"
)
@_handled
def segment(
    datasets: Annotated[list[str] | None, typer.Argument(help="Datasets (default: train and val datasets).")] = None,
    preview: Annotated[int, typer.Option(help="Write N side-by-side preview PNGs instead of segmenting.")] = 0,
    import_: Annotated[
        Path | None, typer.Option("--import", help="Import colour-coded maps from a folder or archive.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    device: DeviceOpt = None,
    gpus: GpusOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Compute ADE20K semantic segmentation maps into seg shards aligned with the image shards."""
    cfg = _config(config, set_, root, **{"runtime.device": device, "runtime.gpus": _parse_gpus(gpus)})
    require(*DATA_MODULES, "torch", "transformers")
    from geoloc_cli.stages import segment as stage
    stage.run(cfg, datasets=datasets or None, preview=preview, import_from=import_)


@app.command(
    epilog="Examples:  geoloc embed  |  geoloc embed mp16 --gpus 0,1  |  "
    "geoloc embed mp16 -c configs/recipes/clip-frozen.yaml"
)
@_handled
def embed(
    datasets: Annotated[list[str] | None, typer.Argument(help="Datasets (default: train.dataset).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    device: DeviceOpt = None,
    gpus: GpusOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Store the frozen backbone's fp16 embedding of every photo (for train.source=embeddings)."""
    cfg = _config(config, set_, root, **{"runtime.device": device, "runtime.gpus": _parse_gpus(gpus)})
    require(*DATA_MODULES, "torch", "timm")
    from geoloc_cli.stages import embed as stage
    stage.run(cfg, datasets=datasets or None)


@app.command(
    epilog="Examples:  geoloc index  |  geoloc index mp16 --set retrieval.index=ivf  |  "
    "geoloc evaluate --refine knn --set retrieval.k=20"
)
@_handled
def index(
    dataset: Annotated[str | None, typer.Argument(help="Gallery dataset (default: retrieval.dataset, "
                                                       "else train.dataset).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Build the retrieval gallery (embeddings + positions, FAISS for large ones) for --refine knn."""
    from geoloc_cli.stages import index as stage

    stage.run(_config(config, set_, root), dataset=dataset)


@app.command(
    epilog="Examples:  geoloc train  |  geoloc train --gpus 0,1  |  geoloc train --resume  |  "
    "torchrun --nproc-per-node 8 -m geoloc_cli train"
)
@_handled
def train(
    run: Annotated[str | None, typer.Option(help="Run name (runs/<run>/).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run's last resume state.")] = False,
    nnodes: Annotated[int, typer.Option(help="Number of nodes (multi-node training).")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank.")] = 0,
    master_addr: Annotated[str, typer.Option(help="Address of node 0.")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option(help="Port on node 0.")] = 29500,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    device: DeviceOpt = None,
    gpus: GpusOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train the multi-task network (RGB + segmentation branches) on the geo-cell and scene labels, from photos or
    from cached embeddings (train.source)."""
    cfg = _config(
        config, set_, root, **{"train.run": run, "runtime.device": device, "runtime.gpus": _parse_gpus(gpus)}
    )
    require(*DATA_MODULES, "torch", "timm")
    from geoloc_cli.stages import train as stage
    stage.launch(cfg, resume=resume, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                 master_port=master_port)


@app.command(
    epilog="Examples:  geoloc evaluate  |  geoloc evaluate im2gps3k yfcc4k --model runs/default/model.safetensors"
    "  |  geoloc evaluate yfcc4k --model a.safetensors --model b.safetensors --set evaluate.crops=ten"
    "  |  geoloc evaluate --from-predictions results.csv --json"
)
@_handled
def evaluate(
    datasets: Annotated[
        list[str] | None,
        typer.Argument(help="Datasets, e.g. im2gps im2gps3k yfcc4k yfcc25600 (default: evaluate.datasets)."),
    ] = None,
    model: Annotated[
        list[Path] | None,
        typer.Option(help=f"{BEST_HELP}; repeat to compare models side by side."),
    ] = None,
    from_predictions: Annotated[
        list[Path] | None,
        typer.Option(help="Recompute metrics from a per-image predictions CSV (published format, a trailing "
                          "summary block is compared with the recomputed one); repeatable."),
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
    refine: RefineOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Great-circle accuracy at 1/25/200/750/2500 km per partitioning and hierarchical prediction."""
    cfg = _config(config, set_, root, **{"runtime.device": device})
    if not from_predictions:  # scoring a predictions file runs no model
        require(*DATA_MODULES, "torch", "timm")
    require(*DATA_MODULES, extra="data")
    require("matplotlib", extra="plots")  # accuracy.png
    from geoloc_cli.stages import evaluate as stage
    stage.run(cfg, datasets=datasets or None, model=model or None, from_predictions=from_predictions or None,
              as_json=json_, refine=_refine(refine))


@app.command(
    epilog="Examples:  geoloc predict photo.jpg --model model.safetensors  |  geoloc predict photos/ --json  |  "
    "geoloc predict photos/ --csv > out.csv  |  geoloc predict a.jpg b.jpg --map map.html"
)
@_handled
def predict(
    photos: Annotated[list[Path], typer.Argument(help="Photos or folders of photos.")],
    model: Annotated[Path | None, typer.Option(help=f"{BEST_HELP}.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Candidate places per photo.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    csv_: Annotated[bool, typer.Option("--csv", help="Print one CSV row per photo and rank.")] = False,
    geojson: Annotated[bool, typer.Option("--geojson", help="Print a GeoJSON FeatureCollection.")] = False,
    map_: Annotated[Path | None, typer.Option("--map", help="Write a self-contained HTML map.")] = None,
    backend: Annotated[str | None, typer.Option(help="auto, onnx or torch (predict.backend).")] = None,
    refine: RefineOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Geolocate photos: top-k places with probabilities and names, the scene, the EXIF truth if any."""
    from geoloc_cli.stages import predict as stage

    if json_ + csv_ + geojson > 1:
        raise ConfigError("choose one of --json, --csv, --geojson")
    fmt = "json" if json_ else "csv" if csv_ else "geojson" if geojson else "table"
    cfg = _config(config, set_, root, **{"runtime.device": device, "predict.top_k": top_k,
                                         "predict.backend": backend})
    failed = stage.run(cfg, photos=photos, model=model, fmt=fmt, map_path=map_, refine=_refine(refine))
    if failed:
        raise typer.Exit(1)


@app.command(
    epilog="Examples:  geoloc export  |  geoloc export runs/default/model.safetensors  |  "
    "geoloc export ckpt.safetensors -o m.onnx"
)
@_handled
def export(
    ckpt: Annotated[Path | None, typer.Argument(help=f"{BEST_HELP}.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Network file (default: CKPT with suffix .onnx; "
                                  "predict finds only that one).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Export a checkpoint (network + segmenter) to ONNX, for fast torch-free `geoloc predict`."""
    from geoloc_cli import console
    from geoloc_cli.data.store import DataRoot

    cfg = _config(config, set_, root)
    require(*DATA_MODULES, "torch", "onnx")
    from geoloc_cli.model.export import export_onnx

    for path in export_onnx(ckpt or DataRoot(cfg.root).model(cfg.train.run), output):
        console.info(f"wrote {path}")


@app.command(
    "convert",
    epilog="Examples:  geoloc convert seed-vit Saved_RGB_ViT.tar -o seed.safetensors  |  "
    "geoloc convert geoestimation epoch=014-val_loss=18.4833.ckpt -o base_m.safetensors",
)
@_handled
def convert(
    kind: Annotated[str, typer.Argument(help="seed-vit (the original ViT + segmentation model) or geoestimation "
                                        "(GeoEstimation's ResNet-50 base(M,f*)).")],
    checkpoint: Annotated[Path, typer.Argument(help="The published checkpoint file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The inference checkpoint to write.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Convert a published checkpoint into a geoloc inference checkpoint (predict, evaluate, export)."""
    from geoloc_cli import console

    cfg = _config(config, set_, root)
    require(*DATA_MODULES, "torch", "timm")
    from geoloc_cli.model.convert import convert as run_convert

    done = run_convert(kind, checkpoint, output, cfg.segment.model, cfg.segment.input_size)
    console.info(f"wrote {output}: {done['backbone']}, heads {done['heads']}")
    if kind == "geoestimation":
        console.info("its published numbers use five crops and their maximum: evaluate does the same for it "
                     "(evaluate.crops=auto)")


@app.command("config", epilog="Examples:  geoloc config  |  geoloc config -c demo --docs")
@_handled
def show_config(
    docs: Annotated[bool, typer.Option(help="Show every key with its documentation.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Print the resolved configuration (defaults < YAML < --set < options)."""
    from geoloc_cli import config as cfgmod
    from geoloc_cli import console

    cfg = _config(config, set_, root)
    if docs:
        console.table("configuration", ["key", "value", "doc"], [(k, repr(v), d) for k, v, d in cfgmod.describe(cfg)])
    else:
        console.out.print(cfgmod.dump_yaml(cfg), markup=False, highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
