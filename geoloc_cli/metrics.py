"""Geolocation metrics and the hierarchical prediction, in numpy (no torch needed).

Definitions follow the published work: great-circle distance by haversine with R = 6371 km; accuracy
at t km is the fraction of images whose error is <= t km.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geoloc_cli.geo import haversine_km

THRESHOLDS_KM = (1, 25, 200, 750, 2500)


def accuracy(dist_km: np.ndarray, thresholds: Sequence[float] = THRESHOLDS_KM) -> dict[str, float]:
    """{"acc_1km": ..., ..., "median_km": ..., "mean_km": ..., "n": ...} for one set of errors."""
    d = np.asarray(dist_km, dtype=np.float64)
    out = {f"acc_{_km(t)}km": float(np.mean(d <= t)) if len(d) else float("nan") for t in thresholds}
    out["median_km"] = float(np.median(d)) if len(d) else float("nan")
    out["mean_km"] = float(np.mean(d)) if len(d) else float("nan")
    out["n"] = int(len(d))
    return out


def _km(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else str(t)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def hierarchical_probs(probs: dict[str, np.ndarray], hierarchy: dict[str, list[int]],
                       finest: str) -> np.ndarray:
    """p_hier(c) = p_finest(c) * prod over coarser partitionings of p_coarser(parent(c)).

    `hierarchy` maps each coarser partitioning name to, for every class of `finest`, the index of its
    containing cell there (-1: no containing cell; that factor is then taken as 1).
    """
    p = probs[finest].astype(np.float64)
    for name, parents in hierarchy.items():
        parents = np.asarray(parents)
        factor = probs[name][:, np.clip(parents, 0, None)]
        p = p * np.where(parents >= 0, factor, 1.0)
    return p


def trivial_baseline(cell_sizes: np.ndarray, centres_lat: np.ndarray, centres_lon: np.ndarray,
                     lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Errors when always predicting the largest cell: the floor any trained model must beat."""
    c = int(np.argmax(cell_sizes))
    return haversine_km(np.full(len(lat), centres_lat[c]), np.full(len(lon), centres_lon[c]), lat, lon)
