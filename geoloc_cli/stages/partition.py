"""`geoloc partition`: build adaptive S2 geo-cell partitionings and assign every image its classes.

Reads a metadata CSV (IMG_ID, LAT, LON; default <root>/meta/<dataset>_places365.csv) and writes into
the output directory (default <root>/partitions/<dataset>/):
  cells_<tmin>_<tmax>.csv   one GeoEstimation-compatible cell table per partitioning
  labels.parquet            id (IMG_ID of the metadata) + one int64 column per partitioning (-1 = no class)
  hierarchy.json            {order: [coarse..fine], classes: {name: class per fine cell}} (2+ partitionings)
  partitions.json           {name: {file, tau_min, tau_max, num_cells, ...}}, written last: later stages
                            find everything through it (geoloc_cli.partitioning.load_partitions)
Partitionings an earlier run wrote to the same directory from the same images are kept (so
`--cells fine` after `--cells all` rebuilds fine and keeps coarse and middle); from other images they
are replaced, with a message.
With --use-published DIR the cell tables are read from DIR instead of built. Every input is read and
checked before anything is written; the files are committed as one generation (store.generation), each
stamped with its id, so a kill leaves the old set or the new one and readers refuse a mix. One
`partition` at a time writes an output folder (store.locked).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc_cli import console, geo, maps, store
from geoloc_cli import partitioning as part
from geoloc_cli.errors import ConfigError, InputError


def run(
    cfg: Any,
    cells: str = "all",
    input: Path | None = None,
    tau_max: int | None = None,
    output: Path | None = None,
    use_published: Path | None = None,
    export_mapping: Path | None = None,
    map_path: Path | None = None,
) -> dict:
    specs = _selected(cfg, cells, tau_max)
    if map_path is not None and Path(map_path).suffix.lower() not in (".png", ".html", ".htm"):
        raise ConfigError(f"--map {map_path}: expected a .png or .html file")
    root = store.DataRoot(cfg.root)
    meta_path = Path(input) if input is not None else root.meta / f"{cfg.partition.dataset}_places365.csv"
    out_dir = Path(output) if output is not None else root.partitions(cfg.partition.dataset)
    start = time.perf_counter()
    points = part.read_points(meta_path)  # checked before the output folder is touched
    console.info(f"read {len(points.lat):,} images from {meta_path} ({time.perf_counter() - start:.1f} s)")
    with store.locked(out_dir, "partition"):
        store.recover(out_dir)  # completes a commit a kill cut short, removes temporaries
        return _run(cfg, specs, points, out_dir, use_published, export_mapping, map_path)


def _run(cfg: Any, specs: dict[str, tuple[int, int]], points: part.Points, out_dir: Path,
         use_published: Path | None, export_mapping: Path | None, map_path: Path | None) -> dict:
    start = time.perf_counter()
    if use_published is not None:
        published = Path(use_published)
        tables = {name: part.read_cells(published / part.cells_filename(*spec)) for name, spec in specs.items()}
        sorted_points = part.SortedPoints(points.lat, points.lon)
        labels = {name: part.assign_points(sorted_points, table) for name, table in tables.items()}
        num_images = {name: table.attrs.get("num_images") or len(points.lat) for name, table in tables.items()}
        console.info(f"assigned classes with the tables in {use_published} ({time.perf_counter() - start:.1f} s)")
    else:
        built = part.build_partitionings(points.lat, points.lon, specs, cfg.partition.lvl_min, cfg.partition.lvl_max)
        tables = {name: p.cells for name, p in built.items()}
        labels = {name: p.labels for name, p in built.items()}
        num_images = {name: len(points.lat) for name in built}
        console.info(f"built {len(built)} partitioning(s) ({time.perf_counter() - start:.1f} s)")

    earlier = _earlier(out_dir, specs, points.img_id)
    for name, (spec, table, column, n) in earlier.items():
        specs, tables[name], labels[name], num_images[name] = {**specs, name: spec}, table, column, n
    if earlier:  # coarse to fine, as --cells all writes them with the default config
        specs = dict(sorted(specs.items(), key=lambda kv: -kv[1][1]))
    order = sorted(specs, key=lambda name: -specs[name][1])  # coarse (largest tau_max) to fine
    hierarchy = part.build_hierarchy(tables, order) if len(order) > 1 else None
    result = _write(out_dir, specs, tables, labels, num_images, points.img_id, order, hierarchy)
    if export_mapping is not None:
        n = part.export_mapping(points.img_id, labels, Path(export_mapping), order)
        console.info(f"wrote {n:,} image labels {order} to {export_mapping}")
        result["mapping"] = str(export_mapping)
    if map_path is not None:
        _draw_map(tables, order, Path(map_path))
        console.info(f"drew the cells on {map_path}")
        result["map"] = str(map_path)
    _summary(result)
    return result


def _selected(cfg: Any, cells: str, tau_max: int | None) -> dict[str, tuple[int, int]]:
    """{name: (tau_min, tau_max)} of the partitionings this run builds, in config order."""
    tau_min = cfg.partition.tau_min
    configured = cfg.partition.tau_max
    if tau_max is not None:
        if tau_max <= tau_min:
            raise ConfigError(f"--tau-max {tau_max}: must be greater than tau_min ({tau_min})")
        # One custom partitioning, named after --cells when that names one (so training finds it).
        return {cells if cells != "all" else "custom": (tau_min, tau_max)}
    if cells == "all":
        specs = {name: (tau_min, t) for name, t in configured.items()}
    else:
        if cells not in configured:
            raise ConfigError(f"--cells {cells!r}: expected all or one of {', '.join(configured)} (partition.tau_max)")
        specs = {cells: (tau_min, configured[cells])}
    low = {name: t for name, (_, t) in specs.items() if t <= tau_min}
    if low:
        raise ConfigError(f"partition.tau_max {low}: must be greater than tau_min ({tau_min})")
    return specs


def _earlier(out_dir: Path, specs: dict[str, tuple[int, int]], img_ids: np.ndarray) -> dict[str, tuple]:
    """{name: ((tau_min, tau_max), cells, labels, num_images)} of the partitionings in out_dir that this
    run does not rebuild, when they were built from the same images (same IMG_IDs, same order)."""
    info_path, labels_path = out_dir / part.PARTITIONS_JSON, out_dir / part.LABELS_FILE
    if not (info_path.is_file() and labels_path.is_file()):
        return {}
    info = json.loads(info_path.read_text())
    files = {part.cells_filename(*spec) for spec in specs.values()}
    clash = [name for name in info if name not in specs and info[name]["file"] in files]
    if clash:  # a kept table would be overwritten by a rebuilt one with the same tau range
        console.info(f"{out_dir}: replacing {', '.join(clash)} (same cells file as a partitioning built now)")
    keep = [name for name in info if name not in specs and name not in clash]
    if not keep:
        return {}
    import pyarrow as pa

    old = store.read_table(labels_path)
    old_ids = old.column(store.ID if store.ID in old.column_names else "IMG_ID").combine_chunks()
    if not old_ids.equals(pa.array(img_ids.astype(str), old_ids.type)):
        console.info(f"{out_dir}: replacing partitioning(s) {', '.join(keep)} built from other images")
        return {}
    found = {}
    for name in keep:
        e = info[name]
        table = part.read_cells(out_dir / e["file"])
        found[name] = ((e["tau_min"], e["tau_max"]), table, old.column(name).to_numpy(),
                       table.attrs.get("num_images") or len(img_ids))
    return found


def _write(
    out_dir: Path,
    specs: dict[str, tuple[int, int]],
    tables: dict[str, pd.DataFrame],
    labels: dict[str, np.ndarray],
    num_images: dict[str, int],
    img_ids: np.ndarray,
    order: list[str],
    hierarchy: dict[str, np.ndarray] | None,
) -> dict:
    """Write the files as one generation (all or none: a kill never leaves a mix), each stamped with its
    id so readers can check they belong together."""
    info: dict[str, dict] = {}
    with store.generation(out_dir) as staged:
        for name, (tmin, tmax) in specs.items():
            file = part.cells_filename(tmin, tmax)
            part.write_cells(tables[name], staged.path(file), num_images[name])
            levels = geo.level_of(part.table_cell_ids(tables[name]))
            kept = int((labels[name] >= 0).sum())
            info[name] = {
                "file": file, "tau_min": tmin, "tau_max": tmax, "num_cells": len(tables[name]),
                "images_kept": kept, "images_dropped": len(img_ids) - kept,
                "level_min": int(levels.min()) if levels.size else None,
                "level_max": int(levels.max()) if levels.size else None, part.GENERATION: staged.id,
            }
        frame = pd.DataFrame({store.ID: img_ids.astype(str)} | {name: labels[name] for name in specs})
        store.write_parquet_atomic(frame, staged.path(part.LABELS_FILE), meta={part.GENERATION: staged.id})
        if hierarchy is not None:
            doc = part.hierarchy_to_json(hierarchy, order) | {part.GENERATION: staged.id}
            store.write_json_atomic(staged.path(part.HIERARCHY_JSON), doc)
        else:
            staged.remove(part.HIERARCHY_JSON)  # a previous run's hierarchy would not match these tables
        # Unsorted (store.write_json_atomic sorts keys): its order is the head order.
        store.write_text_atomic(staged.path(part.PARTITIONS_JSON), json.dumps(info, indent=2) + "\n")
    return {
        "output": str(out_dir),
        "partitionings": info,
        "labels": str(out_dir / part.LABELS_FILE),
        "hierarchy": str(out_dir / part.HIERARCHY_JSON) if hierarchy is not None else None,
    }


def _summary(result: dict) -> None:
    rows = [
        (name, f"{e['tau_min']}/{e['tau_max']}", e["num_cells"], e["images_kept"], e["images_dropped"],
         f"{e['level_min']}-{e['level_max']}")
        for name, e in result["partitionings"].items()
    ]
    console.table(
        "partitionings",
        ["name", "tau min/max", "cells", "images kept", "dropped", "S2 levels"],
        rows,
        caption=f"written to {result['output']}",
    )


# --------------------------------------------------------------------------------------------------
# World map of the cells


def _draw_map(tables: dict[str, pd.DataFrame], order: list[str], path: Path) -> None:
    if path.suffix.lower() == ".png":
        _draw_png(tables, order, path)
    else:
        store.write_text_atomic(path, _html_map(tables, order))


def _draw_png(tables: dict[str, pd.DataFrame], order: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.collections import PolyCollection
        from matplotlib.colors import LogNorm
    except ImportError:
        raise InputError("--map .png needs matplotlib (pip install matplotlib), or use --map cells.html") from None
    fig, axes = plt.subplots(len(order), 1, figsize=(12, 6.2 * len(order)), squeeze=False)
    for ax, name in zip(axes[:, 0], order, strict=True):
        polys, owner = maps.cell_polygons(part.table_cell_ids(tables[name]), 6)
        values = tables[name]["imgs_per_cell"].to_numpy()[owner]
        collection = PolyCollection(polys, array=values, cmap="viridis", norm=LogNorm(), edgecolors="face",
                                    linewidths=0.2, alpha=0.8)
        maps.draw_basemap(ax)
        ax.add_collection(collection)
        ax.set_xticks(range(-180, 181, 60))
        ax.set_yticks(range(-90, 91, 30))
        ax.grid(color="white", linewidth=0.5)
        ax.set_title(f"{name}: {len(tables[name]):,} cells")
        fig.colorbar(collection, ax=ax, shrink=0.7, label="images per cell")
    fig.tight_layout()
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)


def _colour(values: np.ndarray) -> list[str]:
    """Viridis-like colours on a log scale."""
    v = np.log10(np.maximum(values, 1).astype(float))
    t = (v - v.min()) / max(v.max() - v.min(), 1e-9) * (len(_RAMP) - 1)
    k = np.minimum(t.astype(int), len(_RAMP) - 2)
    rgb = _RAMP[k] + (_RAMP[k + 1] - _RAMP[k]) * (t - k)[:, None]
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb.round().astype(int)]


def _html_map(tables: dict[str, pd.DataFrame], order: list[str]) -> str:
    """A self-contained page: one world map per partitioning (maps.svg_map), a tooltip per cell."""
    sections = []
    for name in order:
        table = tables[name]
        polys, owner = maps.cell_polygons(part.table_cell_ids(table), 3)
        counts = table["imgs_per_cell"].to_numpy()
        ids = table["hex_id"].tolist()
        tips = [f"{ids[cell]}: {int(counts[cell]):,} images" for cell in owner.tolist()]
        layer = maps.svg_cells(polys, _colour(counts[owner]), tips, "cells", 0.75, "#fff")
        sections.append(f"<h2>{html.escape(name)}: {len(table):,} cells</h2>"
                        + maps.svg_map(maps.WORLD, layer, "100%", name))
    legend = "".join(f'<span style="background:{c};padding:0 1em"></span>' for c in _colour(np.logspace(0, 4, 20)))
    return maps.page("S2 geo-cells", f"colour: images per cell, log scale (few {legend} many); hover a cell for its "
                     "token and count.", "".join(sections))
