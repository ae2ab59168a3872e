"""filter: build the training index from a downloaded dataset and the partition labels.

Rules, in order (each one's drop count is reported): downloaded (status ok); large enough
(min_size); has a class in every configured partitioning; scene_of_interest.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from geoloc_cli import console
from geoloc_cli.config import Config
from geoloc_cli.data.places365 import SCENE_COLUMNS, SCENES3
from geoloc_cli.data.store import (
    ID,
    OK,
    DataRoot,
    locked,
    read_parquet,
    remove_temps,
    write_json_atomic,
    write_parquet_atomic,
)
from geoloc_cli.errors import InputError
from geoloc_cli.geo.partitioning import GENERATION, load_labels

STATS_FILE = "filter.json"


def _shorter_side(df: pd.DataFrame) -> pd.Series:
    """Shorter side as downloaded, before resizing; manifests from before geoloc kept it give the
    stored size."""
    w, h = df["width"], df["height"]
    if "orig_width" in df:
        known = df["orig_width"].fillna(0) > 0
        w, h = df["orig_width"].where(known, w), df["orig_height"].where(known, h)
    return pd.concat([w, h], axis=1).min(axis=1)


def build_index(manifest: pd.DataFrame, labels: pd.DataFrame, partitionings: list[str],
                scene_of_interest: int = 3, min_size: int = 0) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
    """(index rows, [(rule, items dropped)]). Pure: no I/O."""
    missing = [p for p in partitionings if p not in labels.columns]
    if missing:
        raise InputError(f"partition labels have no column for {missing}: run `geoloc partition --cells all`")
    drops: list[tuple[str, int]] = []

    def keep(df: pd.DataFrame, mask: pd.Series, rule: str) -> pd.DataFrame:
        drops.append((rule, int((~mask).sum())))
        return df[mask]

    df = keep(manifest, manifest["status"] == OK, "not downloaded")
    if min_size:
        df = keep(df, _shorter_side(df) >= min_size, f"shorter side < {min_size} px")
    labels = labels.drop_duplicates(ID).set_index(ID)[partitionings]
    df = df.join(labels, on=ID)
    has_all = df[partitionings].notna().all(axis=1) & (df[partitionings].fillna(-1) >= 0).all(axis=1)
    df = keep(df, has_all, "no class in every partitioning")
    df = df.astype({p: "int64" for p in partitionings})
    if scene_of_interest != 3:
        if SCENE_COLUMNS[3] not in df.columns:
            raise InputError("scene_of_interest needs the S3_Label column: fetch with --meta *_places365.csv")
        df = keep(df, df[SCENE_COLUMNS[3]] == scene_of_interest, f"scene is not {SCENES3[scene_of_interest]}")
    return df.reset_index(drop=True), drops


def run(cfg: Config, dataset: str | None = None) -> dict[str, Any]:
    root = DataRoot(cfg.root)
    name = dataset or cfg.train.dataset
    with locked(root.dataset(name), "filter"):
        return _run(cfg, root, name)


def _run(cfg: Config, root: DataRoot, name: str) -> dict[str, Any]:
    remove_temps(root.dataset(name), root.index(name).name, STATS_FILE)  # a killed filter's leftovers
    manifest = read_parquet(root.manifest(name), f"manifest of dataset {name!r}", f"run `geoloc fetch {name}`")
    labels = load_labels(root.partitions(cfg.partition.dataset))
    made_with = labels.attrs.get(GENERATION)
    index, drops = build_index(manifest, labels, cfg.model.partitionings, cfg.filter.scene_of_interest,
                               cfg.filter.min_size)
    if index.empty:
        raise InputError(f"no item of {name!r} passes the filter rules: {drops}")
    # the partitions it was made with: training refuses the index once they are rebuilt
    write_parquet_atomic(index, root.index(name), meta={"partitions": made_with})
    stats = {"requested": len(manifest), "kept": len(index), "dropped": dict(drops)}
    write_json_atomic(root.dataset(name) / STATS_FILE, stats)
    console.table(f"filter {name}", ["rule", "dropped"], [*drops, ("kept", len(index))])
    return stats
