"""Running a trained model and turning class probabilities into places (shared by train's validation,
evaluate and predict).

Cells are carried as a `CellSet` built from the checkpoint metadata: per partitioning the S2 token,
the class centre (mean location of its training images) and, for the finest partitioning, the index
of its containing cell in every coarser one (the hierarchy).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from geoloc_cli.geo import haversine_km
from geoloc_cli.metrics import THRESHOLDS_KM, accuracy, hierarchical_probs
from geoloc_cli.segmentation import encode_seg_torch

HIER = "hierarchical"


@dataclass
class CellSet:
    names: list[str]  # partitionings, coarse to fine
    hex_id: dict[str, list[str]]
    lat: dict[str, np.ndarray]
    lon: dict[str, np.ndarray]
    count: dict[str, np.ndarray]  # training images per cell
    parents: dict[str, np.ndarray]  # coarser name -> parent class of every finest class (-1: none)

    @property
    def finest(self) -> str:
        return self.names[-1]

    def to_meta(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "cells": {n: {"hex_id": self.hex_id[n], "lat": self.lat[n].tolist(), "lon": self.lon[n].tolist(),
                          "count": self.count[n].tolist()}
                      for n in self.names},
            "parents": {n: p.tolist() for n, p in self.parents.items()},
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> CellSet:
        cells = meta["cells"]
        return cls(
            names=list(meta["names"]),
            hex_id={n: list(c["hex_id"]) for n, c in cells.items()},
            lat={n: np.asarray(c["lat"], dtype=np.float64) for n, c in cells.items()},
            lon={n: np.asarray(c["lon"], dtype=np.float64) for n, c in cells.items()},
            count={n: np.asarray(c["count"], dtype=np.int64) for n, c in cells.items()},
            parents={n: np.asarray(p, dtype=np.int64) for n, p in meta["parents"].items()},
        )

    @classmethod
    def from_tables(cls, tables: dict[str, pd.DataFrame], parents: dict[str, np.ndarray]) -> CellSet:
        """From cell tables (class_label order) and the hierarchy of the last (finest) table."""
        t = {n: df.sort_values("class_label") for n, df in tables.items()}
        return cls(
            names=list(t),
            hex_id={n: df["hex_id"].astype(str).tolist() for n, df in t.items()},
            lat={n: df["latitude_mean"].to_numpy(np.float64) for n, df in t.items()},
            lon={n: df["longitude_mean"].to_numpy(np.float64) for n, df in t.items()},
            count={n: df["imgs_per_cell"].to_numpy(np.int64) for n, df in t.items()},
            parents={n: np.asarray(p, dtype=np.int64) for n, p in parents.items()},
        )


@torch.inference_mode()
def probabilities(model: torch.nn.Module, image: torch.Tensor, seg: torch.Tensor, seg_channels: int,
                  device: torch.device, amp: torch.dtype | None) -> dict[str, np.ndarray]:
    """Softmax probabilities of every head for one batch, as float32 numpy arrays."""
    image = image.to(device, non_blocking=True)
    seg_in = encode_seg_torch(seg.to(device, non_blocking=True), seg_channels) if seg_channels else None
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(image, seg_in)
    return {h: torch.softmax(v.float(), -1).cpu().numpy() for h, v in logits.items()}


def decode(probs: dict[str, np.ndarray], cells: CellSet) -> dict[str, np.ndarray]:
    """Predicted class per partitioning and for the hierarchical prediction (a class of the finest)."""
    pred = {n: probs[n].argmax(-1) for n in cells.names}
    pred[HIER] = hierarchical_probs({n: probs[n] for n in cells.names}, cells.parents, cells.finest).argmax(-1)
    return pred


def predicted_location(name: str, cls_idx: np.ndarray, cells: CellSet) -> tuple[np.ndarray, np.ndarray]:
    cell = cells.finest if name == HIER else name
    return cells.lat[cell][cls_idx], cells.lon[cell][cls_idx]


def run_geolocation(model: torch.nn.Module, batches: Iterable[dict[str, Any]], cells: CellSet,
                    seg_channels: int, device: torch.device, amp: torch.dtype | None) -> pd.DataFrame:
    """One row per image: index, gt lat/lon, scene prediction, and per prediction kind its class,
    location and great-circle error."""
    frames = []
    for batch in batches:
        probs = probabilities(model, batch["image"], batch["seg"], seg_channels, device, amp)
        lat, lon = batch["lat"].numpy(), batch["lon"].numpy()
        cols: dict[str, Any] = {"index": batch["index"].numpy(), "lat": lat, "lon": lon}
        if "scene" in probs:
            cols["scene_pred"] = probs["scene"].argmax(-1)
            cols["scene_true"] = batch["targets"]["scene"].numpy()
        for name, c in decode(probs, cells).items():
            plat, plon = predicted_location(name, c, cells)
            cols[f"{name}_class"], cols[f"{name}_lat"], cols[f"{name}_lon"] = c, plat, plon
            cols[f"{name}_km"] = haversine_km(plat, plon, lat, lon)
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summarize(pred: pd.DataFrame, cells: CellSet, thresholds=THRESHOLDS_KM) -> dict[str, dict[str, float]]:
    """Accuracy at each threshold, median and mean error for every prediction kind."""
    return {name: accuracy(pred[f"{name}_km"].to_numpy(), thresholds) for name in [*cells.names, HIER]}
