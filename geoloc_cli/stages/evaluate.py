"""evaluate: great-circle accuracy of a trained model on held-out datasets, or of a predictions file.

For each dataset: accuracy at the configured thresholds, median and mean error, for every
partitioning, the hierarchical prediction and the trivial baseline (always the largest cell).
Writes <run>/eval/<dataset>/metrics.json and predictions.csv in the published results format
(img_id,gt_lat,predicted_lat,gt_long,predicted_long,great_circle_distance; hierarchical prediction).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc_cli import console
from geoloc_cli.config import Config
from geoloc_cli.errors import InputError
from geoloc_cli.geo import haversine_km
from geoloc_cli.metrics import accuracy, trivial_baseline
from geoloc_cli.store import OK, DataRoot, read_parquet, write_bytes_atomic, write_json_atomic

PUBLISHED_COLUMNS = ["img_id", "gt_lat", "predicted_lat", "gt_long", "predicted_long", "great_circle_distance"]
BASELINE = "largest cell (baseline)"


def metrics_from_predictions(path: Path, thresholds: list[float]) -> dict[str, float]:
    """Recompute the summary of a published-format predictions CSV from its coordinates."""
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
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
    return accuracy(d, thresholds)


def _table(title: str, results: dict[str, dict[str, float]], thresholds: list[float]) -> None:
    cols = [f"acc_{int(t) if float(t).is_integer() else t}km" for t in thresholds]
    rows = [(name, *(f"{100 * m[c]:.1f}%" for c in cols), round(m["median_km"], 1), m["n"])
            for name, m in results.items()]
    console.table(title, ["prediction", *[c[4:] for c in cols], "median km", "n"], rows)


def evaluate_dataset(cfg: Config, model, meta: dict[str, Any], dataset: str, device) -> tuple[dict, pd.DataFrame]:
    import torch

    from geoloc_cli.data import GeoDataset, collate, locate
    from geoloc_cli.dist import amp_dtype
    from geoloc_cli.inference import CellSet, run_geolocation, summarize

    root = DataRoot(cfg.root)
    spec = meta["spec"]
    manifest = read_parquet(root.manifest(dataset), f"manifest of {dataset!r}", f"run `geoloc fetch {dataset}`")
    rows = manifest[manifest["status"] == OK].reset_index(drop=True)
    if rows.empty:
        raise InputError(f"dataset {dataset!r} has no downloaded images")
    seg_dir = root.seg(dataset) if spec["seg_channels"] else None
    if seg_dir is not None and not seg_dir.is_dir():
        raise InputError(f"the model needs segmentation maps: run `geoloc segment {dataset}`")
    rows = locate(rows, root.shards(dataset), seg_dir)
    scene_col = {3: "S3_Label", 16: "S16_Label", 365: "S365_Label"}[spec["heads"]["scene"]]
    ds = GeoDataset(rows, root.shards(dataset), seg_dir, spec["img_size"], meta["preprocess"],
                    {"scene": scene_col}, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.evaluate.batch_size, collate_fn=collate,
                                         num_workers=cfg.runtime.num_workers)
    cells = CellSet.from_meta(meta["partitionings"])
    amp = amp_dtype(cfg.train.precision, device)
    with console.progress(f"evaluate {dataset}", len(loader), unit="batch") as bar:
        def batches():
            for b in loader:
                yield b
                bar.advance(1)
        pred = run_geolocation(model, batches(), cells, spec["seg_channels"], device, amp)
    results = summarize(pred, cells, cfg.evaluate.thresholds_km)
    base = cells.names[0]
    results[BASELINE] = accuracy(trivial_baseline(cells.count[base], cells.lat[base], cells.lon[base],
                                                  pred["lat"].to_numpy(), pred["lon"].to_numpy()),
                                 cfg.evaluate.thresholds_km)
    if "scene_pred" in pred:
        results["scene"] = {"accuracy": float((pred["scene_pred"] == pred["scene_true"]).mean())}
    pred.insert(0, "img_id", rows["id"].to_numpy()[pred["index"].to_numpy()])
    return results, pred


def run(cfg: Config, datasets: list[str] | None = None, model: Path | None = None,
        from_predictions: Path | None = None, as_json: bool = False) -> dict[str, Any]:
    thresholds = cfg.evaluate.thresholds_km
    if from_predictions is not None:
        result = {str(from_predictions): metrics_from_predictions(from_predictions, thresholds)}
        console.print_json(result) if as_json else _table(f"predictions {from_predictions}", result, thresholds)
        return result
    from geoloc_cli.dist import limit_cpu_threads, resolve_device
    from geoloc_cli.inference import HIER
    from geoloc_cli.model import load_inference_checkpoint

    ckpt = Path(model) if model else DataRoot(cfg.root).run(cfg.train.run) / "model.safetensors"
    device = resolve_device(cfg.runtime.device)
    if device.type == "cpu":
        limit_cpu_threads(cfg.runtime.num_workers)
    net, meta, _ = load_inference_checkpoint(ckpt, str(device))
    out: dict[str, Any] = {}
    for dataset in datasets or cfg.evaluate.datasets:
        results, pred = evaluate_dataset(cfg, net, meta, dataset, device)
        out[dataset] = results
        eval_dir = ckpt.parent / "eval" / dataset
        write_json_atomic(eval_dir / "metrics.json", results)
        published = pd.DataFrame({
            "img_id": pred["img_id"], "gt_lat": pred["lat"], "predicted_lat": pred[f"{HIER}_lat"],
            "gt_long": pred["lon"], "predicted_long": pred[f"{HIER}_lon"],
            "great_circle_distance": pred[f"{HIER}_km"]})
        write_bytes_atomic(eval_dir / "predictions.csv", published.to_csv(index=False).encode())
        if not as_json:
            _table(f"{dataset}: {ckpt}", {k: v for k, v in results.items() if k != "scene"}, thresholds)
            if "scene" in results:
                console.info(f"scene accuracy: {100 * results['scene']['accuracy']:.1f}%")
    if as_json:
        console.print_json(out)
    return out
