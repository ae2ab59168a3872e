"""Running a trained model and turning class probabilities into places (shared by train's validation,
evaluate and predict).

Cells are carried as a `CellSet` built from the checkpoint metadata: per partitioning the S2 token,
the class centre (mean location of its training images) and, for the finest partitioning, the index
of its containing cell in every coarser one (the hierarchy).

This module imports torch and pandas only inside the functions that need them: the torch-free predict
path (ONNX Runtime) uses CellSet, the numpy preprocessing and `rank_places` from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from geoloc_cli.data.places365 import SCENES3
from geoloc_cli.geo.sphere import haversine_km
from geoloc_cli.inference.metrics import THRESHOLDS_KM, accuracy, hierarchical_probs

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from PIL import Image

HIER = "hierarchical"
SEG_IGNORE = 255  # class-map value for "no map": encoded as zeros
MULTICROP_PCT = 0.875  # five/ten-crop side as a fraction of the shorter side (Resize(256) + FiveCrop(224))


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
    def from_partitions(cls, tables: dict[str, pd.DataFrame]) -> CellSet:
        """Cell tables of any number of partitionings, ordered coarse to fine by their number of cells, with
        the hierarchy anchored on the finest."""
        from geoloc_cli.geo.partitioning import build_hierarchy

        order = sorted(tables, key=lambda p: len(tables[p]))
        hierarchy = build_hierarchy(tables, order)
        return cls.from_tables({p: tables[p] for p in order}, {p: hierarchy[p] for p in order[:-1]})

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


def probabilities(model: torch.nn.Module, image: torch.Tensor, seg: torch.Tensor, seg_channels: int,
                  device: torch.device, amp: torch.dtype | None) -> dict[str, np.ndarray]:
    """Softmax probabilities of every head for one batch, as float32 numpy arrays."""
    import torch

    from geoloc_cli.model.segmentation import encode_seg_torch

    with torch.inference_mode():
        image = image.to(device, non_blocking=True)
        seg_in = encode_seg_torch(seg.to(device, non_blocking=True), seg_channels, amp) if seg_channels else None
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(image, seg_in)
        return {h: torch.softmax(v.float(), -1).cpu().numpy() for h, v in logits.items()}


def crop_probabilities(model: torch.nn.Module, image: torch.Tensor, seg: torch.Tensor, seg_channels: int,
                       device: torch.device, amp: torch.dtype | None, reduce: str = "mean") -> dict[str, np.ndarray]:
    """`probabilities` for a batch of crop stacks (B, K, 3, S, S) + (B, K, S, S), reduced over the K crops.

    A plain (B, 3, S, S) batch is passed through unchanged."""
    if image.ndim == 4:
        return probabilities(model, image, seg, seg_channels, device, amp)
    b, k = image.shape[:2]
    probs = probabilities(model, image.flatten(0, 1), seg.flatten(0, 1), seg_channels, device, amp)
    return reduce_crops({h: p.reshape(b, k, -1) for h, p in probs.items()}, reduce)


def reduce_crops(probs: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    """(B, K, C) per head -> (B, C): the mean over crops, or the max renormalised to sum to 1."""
    if how == "mean":
        return {h: p.mean(axis=1) for h, p in probs.items()}
    assert how == "max", how
    out = {}
    for h, p in probs.items():
        m = p.max(axis=1)
        out[h] = m / m.sum(axis=-1, keepdims=True)
    return out


def decode(probs: dict[str, np.ndarray], cells: CellSet) -> dict[str, np.ndarray]:
    """Predicted class per partitioning and for the hierarchical prediction (a class of the finest)."""
    pred = {n: probs[n].argmax(-1) for n in cells.names}
    pred[HIER] = hierarchical_probs({n: probs[n] for n in cells.names}, cells.parents, cells.finest).argmax(-1)
    return pred


def predicted_location(name: str, cls_idx: np.ndarray, cells: CellSet) -> tuple[np.ndarray, np.ndarray]:
    cell = cells.finest if name == HIER else name
    return cells.lat[cell][cls_idx], cells.lon[cell][cls_idx]


def run_geolocation(model: torch.nn.Module, batches: Iterable[dict[str, Any]], cells: CellSet,
                    seg_channels: int, device: torch.device, amp: torch.dtype | None,
                    reduce: str = "mean", on_probs: Callable[[dict[str, np.ndarray]], Any] | None = None,
                    ) -> pd.DataFrame:
    """One row per image: index, gt lat/lon, scene prediction, and per prediction kind its class,
    location and great-circle error. Batches of crop stacks are reduced over crops by `reduce`; `on_probs`
    sees each batch's probabilities (evaluate's --refine keeps the top cells)."""
    import pandas as pd

    frames = []
    for batch in batches:
        probs = crop_probabilities(model, batch["image"], batch["seg"], seg_channels, device, amp, reduce)
        if on_probs is not None:
            on_probs(probs)
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


def scene_accuracy(pred: pd.DataFrame) -> float | None:
    """Share of right scene predictions among images with a known label (-1 = unknown); None if none."""
    known = pred["scene_true"].to_numpy() >= 0
    if not known.any():
        return None
    return float((pred["scene_pred"].to_numpy()[known] == pred["scene_true"].to_numpy()[known]).mean())


# ------------------------------------------------------------------ ranked places (torch-free)


def rank_places(probs: dict[str, np.ndarray], cells: CellSet, top_k: int) -> list[dict[str, Any]]:
    """Per image: the top-k cells of the (renormalised) hierarchical distribution, the scene
    probabilities and the radii (km) around rank 1 that hold 50% and 90% of the probability:
    {"top": [{"rank", "lat", "lon", "cell", "probability"}], "scene": {name: p}, "radius_50_km", "radius_90_km"}."""
    hier = hierarchical_distribution(probs, cells)
    fine = cells.finest
    out = []
    for i in range(hier.shape[0]):
        top = np.argsort(-hier[i], kind="stable")[:top_k]
        scene = probs["scene"][i] if "scene" in probs else np.zeros(0)
        names = SCENES3 if len(scene) == 3 else [str(j) for j in range(len(scene))]
        out.append({
            "top": [{"rank": r + 1, "lat": float(cells.lat[fine][c]), "lon": float(cells.lon[fine][c]),
                     "cell": cells.hex_id[fine][c], "probability": float(hier[i, c])} for r, c in enumerate(top)],
            "scene": {n: float(p) for n, p in zip(names, scene, strict=True)},
            **_radii(hier[i], cells, int(top[0])),
        })
    return out


RADII = ("radius_50_km", "radius_90_km")  # the credible radii around rank 1 that rank_places gives


def _radii(p: np.ndarray, cells: CellSet, best: int) -> dict[str, float]:
    fine = cells.finest
    r50, r90 = credible_radii_km(p, cells.lat[fine], cells.lon[fine], (cells.lat[fine][best], cells.lon[fine][best]),
                                 (0.5, 0.9), cell_radius_km(cells.hex_id[fine][best]))
    return dict(zip(RADII, (round(r50, 1), round(r90, 1)), strict=True))


def hierarchical_distribution(probs: dict[str, np.ndarray], cells: CellSet) -> np.ndarray:
    """(B, finest classes) probabilities of the hierarchical prediction, each row summing to 1."""
    hier = hierarchical_probs({n: probs[n] for n in cells.names}, cells.parents, cells.finest)
    return hier / hier.sum(-1, keepdims=True)


# ------------------------------------------------------------ numpy preprocessing (torch-free)


def crop_boxes(w: int, h: int, crops: str, crop_pct: float = 1.0) -> list[tuple[tuple[float, ...], bool]]:
    """(box, horizontal flip) per test-time crop, in pixel coordinates of a w x h photo.

    center: the eval crop of data.transform (a centred square of side crop_pct * shorter side);
    five: squares of MULTICROP_PCT * shorter side at the four corners and the centre of the whole photo;
    ten: the five crops and their mirror images. Photo and segmentation map share these boxes."""
    if crops == "center":
        side = min(w, h) * crop_pct
        return [(((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2), False)]
    side = min(w, h) * MULTICROP_PCT
    corners = [(0.0, 0.0), (w - side, 0.0), (0.0, h - side), (w - side, h - side), ((w - side) / 2, (h - side) / 2)]
    boxes = [((x, y, x + side, y + side), False) for x, y in corners]
    if crops == "ten":
        boxes += [(b, True) for b, _ in boxes]
    assert crops in ("five", "ten"), crops
    return boxes


def view(img: Image.Image, seg: Image.Image | None, size: int, pre: dict[str, Any],
         box: tuple[float, ...], flip: bool, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One crop of a photo and its class map, as data.transform does for evaluation: (3, S, S) float32
    normalised photo (`raw`: uint8 pixels, which GeoModel normalises on its device), (S, S) uint8 class
    map (all SEG_IGNORE without a map)."""
    from PIL import Image

    w, h = img.size
    interp = Image.BICUBIC if pre.get("interpolation") == "bicubic" else Image.BILINEAR
    x = np.asarray(img.resize((size, size), interp, box=box), dtype=np.uint8).transpose(2, 0, 1)
    if seg is not None:
        sx, sy = seg.size[0] / w, seg.size[1] / h  # maps may be at a lower resolution than the photo
        seg = seg.resize((size, size), Image.NEAREST, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
        s = np.array(seg, dtype=np.uint8)
    else:
        s = np.full((size, size), SEG_IGNORE, dtype=np.uint8)
    if flip:
        x, s = x[:, :, ::-1], s[:, ::-1]
    return np.ascontiguousarray(x if raw else normalize(x, pre)), np.ascontiguousarray(s)


def normalize(pixels: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    """uint8 (..., 3, S, S) pixels -> float32 as the backbone expects (`pre`: its mean and std). GeoModel
    does the same operations on its device, so both give identical numbers."""
    mean = np.asarray(pre["mean"], np.float32)[:, None, None]
    std = np.asarray(pre["std"], np.float32)[:, None, None]
    return (pixels.astype(np.float32) / 255.0 - mean) / std


def views(img: Image.Image, seg: Image.Image | None, size: int, pre: dict[str, Any],
          crops: str = "center", raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All test-time crops of one photo: (K, 3, S, S) float32 (`raw`: uint8) and (K, S, S) uint8."""
    pairs = [view(img, seg, size, pre, box, flip, raw)
             for box, flip in crop_boxes(*img.size, crops, pre.get("crop_pct", 1.0))]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def segmenter_input(images: list[Image.Image], pre: dict[str, Any]) -> np.ndarray:
    """Photos -> (B, 3, S, S) float32 as Segmenter.prepare + predict normalise them (bilinear resize)."""
    from PIL import Image

    size = int(pre["size"])
    batch = np.stack([np.asarray(im.convert("RGB") if im.size == (size, size)
                                 else im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images])
    mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1) * 255.0
    std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1) * 255.0
    return ((batch.transpose(0, 3, 1, 2).astype(np.float32) - mean) / std).astype(np.float32)


def credible_radii_km(p: np.ndarray, lat: np.ndarray, lon: np.ndarray, at: tuple[float, float],
                      levels: Iterable[float] = (0.5, 0.9), floor_km: float = 0.0) -> list[float]:
    """Per level, the smallest radius around `at` (lat, lon) whose disc holds that share of the
    probability mass, each cell's mass counted at its centre (lat, lon); at least `floor_km`.

    The floor is the predicted cell's own size: with the mass placed at cell centres, a top cell holding
    50% alone would otherwise claim a radius of 0 km, a precision the cell cannot give."""
    d = haversine_km(at[0], at[1], np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))
    order = np.argsort(d, kind="stable")
    cum = np.cumsum(np.asarray(p, dtype=np.float64)[order])
    cum /= max(float(cum[-1]), 1e-30)
    out = []
    for level in levels:
        k = min(int(np.searchsorted(cum, level - 1e-9)), len(cum) - 1)  # first k with cum[k] >= level
        out.append(max(float(d[order[k]]), floor_km))
    return out


def cell_radius_km(token: str) -> float:
    """Half the longest diagonal of an S2 cell (km); 0 for a token that is not S2 (a hand-made checkpoint)."""
    from geoloc_cli.geo import sphere

    try:
        lat, lon = sphere.cell_vertices(sphere.from_token([token]))
    except ValueError:
        return 0.0
    return float(max(haversine_km(lat[0, 0], lon[0, 0], lat[0, 2], lon[0, 2]),
                     haversine_km(lat[0, 1], lon[0, 1], lat[0, 3], lon[0, 3]))) / 2
