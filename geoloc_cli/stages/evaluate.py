"""evaluate: great-circle accuracy of trained models on held-out datasets, or of predictions files.

For each model and dataset (a dataset name under <root>/datasets/; the standard test sets are presets of
geoloc_cli.data.sources, fetched by `geoloc fetch <name>`): accuracy at the configured thresholds,
median and mean error, for every partitioning, the hierarchical prediction and the trivial baseline
(always the largest cell), overall and per scene (S3_Label: indoor / natural / urban). Test-time crops
(evaluate.crops: center, five, ten; photo and segmentation map cropped alike) are combined by
evaluate.crop_reduce (mean or max of the probabilities).

--from-predictions scores published per-image results files as they are; GeoEstimation's end with a
summary block (SUMMARY_HEADER and one row), which is shown beside the recomputed summary.

Writes to <checkpoint dir>/eval/<dataset>[-<crops>-<reduce>]/ (eval-<stem>/ for a checkpoint not named
model.safetensors): metrics.json, predictions.csv in the published results format
(img_id,gt_lat,predicted_lat,gt_long,predicted_long,great_circle_distance; hierarchical prediction)
and accuracy.png (accuracy versus distance). Several models give one table per dataset, a row per model.

The published definition, used everywhere here: haversine distance with R = 6371 km, and an image
counts as correct at t km when its error is <= t.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc_cli import console
from geoloc_cli.config import Config
from geoloc_cli.data.places365 import SCENE_COLUMNS, SCENES3
from geoloc_cli.data.sources import PRESETS
from geoloc_cli.data.store import (
    ID,
    OK,
    DataRoot,
    atomic_path,
    read_parquet,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from geoloc_cli.errors import InputError
from geoloc_cli.geo.sphere import haversine_km
from geoloc_cli.inference.metrics import ADMIN_LEVELS, THRESHOLDS_KM, accuracy, trivial_baseline
from geoloc_cli.inference.retrieval import REFINED, Refiner, embed_pixels

PUBLISHED_COLUMNS = ["img_id", "gt_lat", "predicted_lat", "gt_long", "predicted_long", "great_circle_distance"]
BASELINE = "largest cell (baseline)"


# --------------------------------------------------------------------------- predictions files


# GeoEstimation's results CSVs end with this header and one row of fractions (and the mean in km).
SUMMARY_HEADER = ["street acc (1km)", "city acc (25km)", "region acc (200km)", "country acc (750km)",
                  "continent acc (2500km)", "mean deviation (km)"]
SUMMARY_KEYS = ["acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "mean_km"]


def metrics_from_predictions(path: Path, thresholds: list[float]) -> dict[str, Any]:
    """Recompute the summary of a published-format predictions CSV from its coordinates (the file's
    great_circle_distance column is ignored: distances are recomputed with the one ruler). A summary
    block the file states at its end is returned too ("stated"), with the keys that disagree beyond the
    rounding of the stated numbers ("stated_differs")."""
    import io

    try:
        lines = Path(path).read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read predictions file {path}: {e}") from None
    at = next((i for i, line in enumerate(lines) if line.strip().startswith(SUMMARY_HEADER[0])), None)
    stated = _stated_summary(path, lines[at:]) if at is not None else None
    try:
        df = pd.read_csv(io.StringIO("".join(lines[:at])))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"cannot read predictions file {path}: {e}") from None
    missing = [c for c in PUBLISHED_COLUMNS[:5] if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing} (expected {','.join(PUBLISHED_COLUMNS)})")
    coords = df[PUBLISHED_COLUMNS[1:5]].apply(pd.to_numeric, errors="coerce")
    bad = coords.isna().any(axis=1)
    if bad.any():
        row = int(np.argmax(bad.to_numpy())) + 2  # 1-based, after the header
        raise InputError(f"{path}: row {row}: non-numeric coordinate")
    d = haversine_km(coords["gt_lat"].to_numpy(), coords["gt_long"].to_numpy(),
                     coords["predicted_lat"].to_numpy(), coords["predicted_long"].to_numpy())
    out: dict[str, Any] = accuracy(d, thresholds)
    if stated is not None:
        values, digits = stated
        recomputed = accuracy(d, THRESHOLDS_KM)  # the block's (the published) thresholds, whatever the config's
        out["stated"] = values
        out["recomputed"] = {k: recomputed[k] for k in SUMMARY_KEYS}
        out["stated_differs"] = [k for k, v in values.items()
                                 if abs(recomputed[k] - v) > 0.5 * 10.0 ** -digits[k] + 1e-9]
    return out


def _stated_summary(path: Path, block: list[str]) -> tuple[dict[str, float], dict[str, int]]:
    """({key: value}, {key: decimals written}) of the summary block at a results file's end."""
    rows = [line.strip() for line in block if line.strip()]
    if len(rows) != 2 or [c.strip() for c in rows[0].split(",")] != SUMMARY_HEADER:
        raise InputError(f"{path}: the summary block at the end must be the header "
                         f"{','.join(SUMMARY_HEADER)} and one row of numbers")
    cells = [c.strip() for c in rows[1].split(",")]
    try:
        values = dict(zip(SUMMARY_KEYS, map(float, cells), strict=True))
    except ValueError:
        raise InputError(f"{path}: summary row {rows[1]!r}: expected {len(SUMMARY_KEYS)} numbers") from None
    digits = {k: len(c.partition(".")[2]) if "e" not in c.lower() else 15 for k, c in zip(SUMMARY_KEYS, cells,
                                                                                          strict=True)}
    return values, digits


def report_stated(results: dict[str, dict[str, Any]], table: bool) -> None:
    """The summary each file states beside the recomputed one (a table), and a warning where they differ."""
    for file, m in results.items():
        if "stated" not in m:
            continue
        if table:
            rows = [(what, *(f"{100 * src[k]:.2f}" for k in SUMMARY_KEYS[:5]), f"{src['mean_km']:.1f}")
                    for what, src in (("stated in the file", m["stated"]), ("recomputed", m["recomputed"]))]
            console.table(f"{file}: summary block", ["", "1 km %", "25 km %", "200 km %", "750 km %", "2500 km %",
                                                     "mean km"], rows)
        if m["stated_differs"]:
            console.warn(f"{file}: the summary block's {', '.join(m['stated_differs'])} differ from the "
                         "recomputed values by more than rounding")


# --------------------------------------------------------------------------- tables and plots


def _cols(thresholds: list[float]) -> list[str]:
    return [f"acc_{int(t) if float(t).is_integer() else t}km" for t in thresholds]


def _table(title: str, results: dict[str, dict[str, float]], thresholds: list[float], first: str = "prediction",
           caption: str = "") -> None:
    """One row per entry of `results` (a prediction kind, a model, a scene, a file)."""
    cols = _cols(thresholds)
    rows = [(name, *(f"{100 * m[c]:.1f}" for c in cols), _km(m["median_km"]), _km(m["mean_km"]),
             f"{m['geoscore']:,.0f}", m["n"]) for name, m in results.items()]
    console.table(f"{title} - accuracy % within", [first, *[f"{c[4:]}" for c in cols], "median km", "mean km",
                                                   "GeoScore", "n"], rows, caption=caption)


def _km(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def plot_accuracy(path: Path, curves: dict[str, np.ndarray], thresholds: list[float], title: str) -> None:
    """PNG of the fraction of images within d km, for d from 1 to 20,000 km (log scale), one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.logspace(0, np.log10(20038), 400)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, err in curves.items():
        err = np.sort(np.asarray(err, dtype=np.float64))
        ax.plot(d, np.searchsorted(err, d, side="right") / max(len(err), 1), label=label)  # <= d counts
    for t in thresholds:
        ax.axvline(t, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlim(1, 20038)
    ax.set_ylim(0, 1)
    ax.set_xlabel("great-circle distance d (km)")
    ax.set_ylabel("fraction of images with error <= d")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- model evaluation


def evaluate_dataset(cfg: Config, model, meta: dict[str, Any], dataset: str, device,
                     refiner: Any = None) -> tuple[dict, pd.DataFrame]:
    """(metrics, one row per image) of one model on one dataset (with a `retrieval.Refiner`, the refined
    positions too)."""
    import torch

    from geoloc_cli.data.dataset import GeoDataset, locate
    from geoloc_cli.dist import amp_dtype, loader_workers
    from geoloc_cli.inference.geolocate import CellSet, run_geolocation, scene_accuracy, summarize

    root = DataRoot(cfg.root)
    spec = meta["spec"]
    rows = _located_rows(root, dataset)
    seg_dir = root.seg(dataset) if spec["seg_channels"] else None
    if seg_dir is not None and not seg_dir.is_dir():
        raise InputError(f"the model needs segmentation maps: run `geoloc segment {dataset}`")
    rows = locate(rows, root.shards(dataset), seg_dir)
    # a scene target only for a model with a scene head (a converted GeoEstimation model has none)
    targets = {"scene": SCENE_COLUMNS[spec["heads"]["scene"]]} if "scene" in spec["heads"] else {}
    crops = cfg.evaluate.crops
    ds = GeoDataset(rows, root.shards(dataset), seg_dir, spec["img_size"], meta["preprocess"], targets, train=False,
                    crops=crops)
    workers = loader_workers(cfg.runtime.num_workers, device)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.evaluate.batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    cells = CellSet.from_meta(meta["partitionings"])
    amp = amp_dtype(cfg.train.precision, device)
    queries, tops = [], []  # --refine: each batch's RGB embeddings and top cells
    watch = refiner.watching(model) if refiner is not None else contextlib.nullcontext()
    with watch, console.progress(f"evaluate {dataset}", len(loader), unit="batch") as bar:
        def batches():
            for b in loader:
                yield b  # run_geolocation classifies b before it asks for the next
                if refiner is not None:
                    x = b["image"]
                    q = refiner.kept_queries(x.shape[1] if x.ndim == 5 else 0)
                    queries.append(embed_pixels(model, x, device, amp) if q is None else q)
                bar.advance(1)
        keep_top = (lambda p: tops.append(refiner.top(p, cells))) if refiner is not None else None
        pred = run_geolocation(model, batches(), cells, spec["seg_channels"], device, amp, cfg.evaluate.crop_reduce,
                               keep_top)
    thresholds = cfg.evaluate.thresholds_km
    results: dict[str, Any] = summarize(pred, cells, thresholds)
    if refiner is not None:
        refined = refiner.evaluate(pred, np.concatenate(queries), np.concatenate(tops), cells, rows)
        results[REFINED] = accuracy(pred[f"{REFINED}_km"].to_numpy(), thresholds)
    base = cells.names[0]
    results[BASELINE] = accuracy(trivial_baseline(cells.count[base], cells.lat[base], cells.lon[base],
                                                  pred["lat"].to_numpy(), pred["lon"].to_numpy()), thresholds)
    if "scene_pred" in pred and (acc := scene_accuracy(pred)) is not None:
        results["scene"] = {"accuracy": acc}
    if cfg.evaluate.admin_metrics and (admin := _admin(pred)) is not None:
        results["admin"] = admin
    pred.insert(0, "img_id", rows[ID].to_numpy()[pred["index"].to_numpy()])
    if SCENE_COLUMNS[3] in rows:
        pred["s3"] = pd.to_numeric(rows[SCENE_COLUMNS[3]], errors="coerce").to_numpy()[pred["index"].to_numpy()]
        results["by_scene"] = by_scene(pred, [*cells.names, "hierarchical"], thresholds)
    results["setup"] = {"dataset": dataset, "crops": crops, "crop_reduce": cfg.evaluate.crop_reduce,
                        "thresholds_km": list(thresholds)}
    if refiner is not None:
        results["setup"]["refine"] = refined
    return results, pred


def _located_rows(root: DataRoot, dataset: str) -> pd.DataFrame:
    """The dataset's downloaded images with a true location (scoring the others as misses would
    understate every accuracy)."""
    hint = f"run `geoloc fetch {dataset}`" + (f" ({PRESETS[dataset].what})" if dataset in PRESETS else "")
    manifest = read_parquet(root.manifest(dataset), f"manifest of {dataset!r}", hint)
    rows = manifest[manifest["status"] == OK].reset_index(drop=True)
    if rows.empty:
        raise InputError(f"dataset {dataset!r} has no downloaded images")
    located = rows["lat"].notna() & rows["lon"].notna()
    if not located.any():
        raise InputError(f"dataset {dataset!r} has no true locations to score against: fetch it with "
                         "--meta *_places365.csv (or photos with EXIF GPS)")
    if not located.all():
        console.warn(f"{dataset}: {int((~located).sum()):,} of {len(rows):,} images have no true location "
                     "and are left out of the metrics")
        rows = rows[located].reset_index(drop=True)
    return rows


def _admin(pred: pd.DataFrame) -> dict[str, float] | None:
    """OSV-5M's country / region / sub-region / city accuracy of the hierarchical prediction (None, with a
    warning, without the reverse_geocoder package)."""
    from geoloc_cli.inference.metrics import admin_accuracy, admin_areas

    try:
        truth = admin_areas(pred["lat"].to_numpy(), pred["lon"].to_numpy())
    except ImportError:
        console.warn("country/region/city accuracy needs the reverse_geocoder package: pip install "
                     "'geoloc[metrics]' (or set evaluate.admin_metrics=false)")
        return None
    return admin_accuracy(admin_areas(pred["hierarchical_lat"].to_numpy(), pred["hierarchical_lon"].to_numpy()),
                          truth)


def by_scene(pred: pd.DataFrame, kinds: list[str], thresholds: list[float]) -> dict[str, dict[str, Any]]:
    """{scene: {kind: accuracy}} over the images whose S3_Label (column s3) is that scene."""
    out = {}
    for code, name in enumerate(SCENES3):
        sub = pred[pred["s3"] == code]
        if len(sub):
            out[name] = {k: accuracy(sub[f"{k}_km"].to_numpy(), thresholds) for k in kinds}
    return out


def eval_dir(ckpt: Path, dataset: str, crops: str, reduce: str) -> Path:
    base = ckpt.parent / ("eval" if ckpt.stem == "model" else f"eval-{ckpt.stem}")
    return base / (dataset if crops == "center" else f"{dataset}-{crops}-{reduce}")


def labels(paths: list[Path]) -> list[str]:
    """Shortest distinct trailing parts of the checkpoint paths (runs/a/model.safetensors -> a/model)."""
    resolved = [p.resolve().with_suffix("") for p in paths]
    for k in range(1, max(len(p.parts) for p in resolved) + 1):
        names = ["/".join(p.parts[-k:]) for p in resolved]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _write(out_dir: Path, results: dict[str, Any], pred: pd.DataFrame, kinds: list[str], thresholds: list[float],
           title: str) -> None:
    from geoloc_cli.inference.geolocate import HIER

    write_json_atomic(out_dir / "metrics.json", results)
    published = pd.DataFrame({
        "img_id": pred["img_id"], "gt_lat": pred["lat"], "predicted_lat": pred[f"{HIER}_lat"],
        "gt_long": pred["lon"], "predicted_long": pred[f"{HIER}_lon"],
        "great_circle_distance": pred[f"{HIER}_km"]})
    write_bytes_atomic(out_dir / "predictions.csv", published.to_csv(index=False).encode())
    plot_accuracy(out_dir / "accuracy.png", {k: pred[f"{k}_km"].to_numpy() for k in kinds}, thresholds, title)
    _error_maps(out_dir, pred, thresholds, title)


def _error_maps(out_dir: Path, pred: pd.DataFrame, thresholds: list[float], title: str) -> None:
    """errors.png and errors.html: each image's true place, coloured by its error, and a line to its prediction."""
    from geoloc_cli.geo import maps
    from geoloc_cli.inference.geolocate import HIER

    cols = [pred[c].to_numpy(np.float64) for c in ("lat", "lon", f"{HIER}_lat", f"{HIER}_lon", f"{HIER}_km")]
    maps.error_png(out_dir / "errors.png", *cols, thresholds, title)
    names = pred["img_id"].astype(str).tolist() if "img_id" in pred else None
    write_text_atomic(out_dir / "errors.html", maps.error_page(*cols, thresholds, title, names))


def run(cfg: Config, datasets: list[str] | None = None, model: Path | list[Path] | None = None,
        from_predictions: Path | list[Path] | None = None, as_json: bool = False,
        refine: str | None = None) -> dict[str, Any]:
    """Evaluate one or more checkpoints (or predictions files); returns the metrics.

    Returned (and printed with --json): {dataset: metrics} for one checkpoint, {label: {dataset: metrics}}
    for several, {file: summary} for predictions files."""
    thresholds = cfg.evaluate.thresholds_km
    if from_predictions is not None:
        files = [from_predictions] if isinstance(from_predictions, str | Path) else list(from_predictions)
        result = {str(f): metrics_from_predictions(Path(f), thresholds) for f in files}
        short = dict(zip(labels([Path(f) for f in files]), result.values(), strict=True))
        if as_json:
            console.print_json(result)
        else:
            _table("predictions files", short, thresholds, first="file")
        report_stated(short, table=not as_json)
        return result
    models = [model] if isinstance(model, str | Path) else list(model or [])
    ckpts = [Path(m) for m in models] or [DataRoot(cfg.root).model(cfg.train.run)]
    names = datasets or cfg.evaluate.datasets
    per_model = {label: evaluate_model(cfg, ckpt, names, quiet_tables=as_json or len(ckpts) > 1, refine=refine)
                 for label, ckpt in zip(labels(ckpts), ckpts, strict=True)}
    if len(ckpts) > 1 and not as_json:
        _side_by_side(per_model, names, thresholds)
    out = per_model[next(iter(per_model))] if len(ckpts) == 1 else per_model
    if as_json:
        console.print_json(out)
    return out


def evaluate_model(cfg: Config, ckpt: Path, datasets: list[str], quiet_tables: bool = False,
                   refine: str | None = None) -> dict[str, Any]:
    import torch

    from geoloc_cli.dist import limit_cpu_threads, loader_workers, resolve_device
    from geoloc_cli.model.network import load_inference_checkpoint

    device = resolve_device(cfg.runtime.device)
    if device.type == "cuda":  # cuda:N: its caching context, not one on GPU 0 as well
        torch.cuda.set_device(device)
    limit_cpu_threads(loader_workers(cfg.runtime.num_workers, device), device=device)
    net, meta, _ = load_inference_checkpoint(ckpt, str(device))
    cfg = with_protocol(cfg, meta)
    thresholds = cfg.evaluate.thresholds_km
    refiner = Refiner.open(cfg, net) if refine else None
    kinds = [*meta["partitionings"]["names"], "hierarchical", *([REFINED] if refiner else [])]
    out: dict[str, Any] = {}
    for dataset in datasets:
        results, pred = evaluate_dataset(cfg, net, meta, dataset, device, refiner)
        if refiner is not None:
            _report_refine(dataset, results["setup"]["refine"])
        results["setup"]["model"] = str(ckpt)
        out[dataset] = results
        where = eval_dir(ckpt, dataset, cfg.evaluate.crops, cfg.evaluate.crop_reduce)
        _write(where, results, pred, kinds, thresholds, f"{dataset}: {ckpt.parent.name}/{ckpt.name}")
        if quiet_tables:
            continue
        crops = "" if cfg.evaluate.crops == "center" else f" ({cfg.evaluate.crops} crops, {cfg.evaluate.crop_reduce})"
        _table(f"{dataset}: {ckpt}{crops}", {k: results[k] for k in [*kinds, BASELINE]}, thresholds,
               caption=f"written to {where}")
        if "admin" in results:
            console.table(f"{dataset}: hierarchical prediction in the right area (OSV-5M's definition) - %",
                          list(ADMIN_LEVELS),
                          [tuple(f"{100 * results['admin'][f'{lv}_acc']:.1f}" for lv in ADMIN_LEVELS)])
        if "scene" in results:
            console.info(f"scene accuracy: {100 * results['scene']['accuracy']:.1f}%")
        if results.get("by_scene"):
            _table(f"{dataset} by scene (hierarchical)", {s: m["hierarchical"] for s, m in results["by_scene"].items()},
                   thresholds, first="scene")
    return out


def _report_refine(dataset: str, setup: dict[str, Any]) -> None:
    """The leakage check and the refinement's reach, one line each."""
    leaked = setup["leakage_left_out"]
    if leaked["by_id"] or leaked["by_author"]:
        console.warn(f"{dataset}: the gallery holds {leaked['by_id']:,} of its photos (by id) and "
                     f"{leaked['by_author']:,} more by their authors: left out of the search (run `geoloc index` "
                     "with this dataset in evaluate.datasets to drop them for good)")
    else:
        console.info(f"{dataset}: leakage check passed: no gallery photo shares an id or author with it")
    if setup["without_neighbours"]:
        console.info(f"{dataset}: {setup['without_neighbours']:,} photos had no gallery neighbour in their top "
                     "cells and keep the cell centre")


def with_protocol(cfg: Config, meta: dict[str, Any]) -> Config:
    """evaluate.crops / crop_reduce `auto`: the test protocol the checkpoint records (a converted published
    model's own, e.g. GeoEstimation's five crops and their maximum), else a centre crop."""
    import dataclasses

    protocol = meta.get("protocol", {})
    ev = cfg.evaluate
    crops = protocol.get("crops", "center") if ev.crops == "auto" else ev.crops
    reduce = protocol.get("crop_reduce", "mean") if ev.crop_reduce == "auto" else ev.crop_reduce
    return dataclasses.replace(cfg, evaluate=dataclasses.replace(ev, crops=crops, crop_reduce=reduce))


def _side_by_side(per_model: dict[str, dict[str, Any]], datasets: list[str], thresholds: list[float]) -> None:
    setups = {(r[d]["setup"]["crops"], r[d]["setup"]["crop_reduce"]) for r in per_model.values() for d in datasets}
    crops = "" if setups == {("center", "mean")} else ", crops " + "; ".join(f"{c} ({m})" for c, m in sorted(setups))
    for dataset in datasets:
        rows = {}
        for label, runs in per_model.items():
            rows[label] = runs[dataset]["hierarchical"]
            if REFINED in runs[dataset]:  # --refine: the refined position under each model's cell centre
                rows[f"{label} +knn"] = runs[dataset][REFINED]
        _table(f"{dataset}: hierarchical prediction{crops}", rows, thresholds, first="model")
