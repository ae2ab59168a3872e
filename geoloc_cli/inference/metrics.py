"""Geolocation metrics and the hierarchical prediction, in numpy (no torch needed).

Definitions follow the published work: great-circle distance by haversine with R = 6371 km; accuracy
at t km is the fraction of images whose error is <= t km. OSV-5M's (Astruc et al., CVPR 2024): the
GeoScore, GeoGuessr's points per round, 5000 exp(-d / 1492.7 km) averaged over images; and accuracy of
country / region / sub-region / city, where prediction and truth are reverse-geocoded with the
`reverse_geocoder` package as OSV-5M's evaluation code does (GeoNames places of >= 1,000 people, the
nearest in degrees), each level compared as the whole chain of names above it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geoloc_cli.config import EvaluateConfig
from geoloc_cli.data.places365 import ADMIN_COLUMNS
from geoloc_cli.geo.sphere import haversine_km

# the published protocol's thresholds, as the config's default has them (GeoEstimation's summary block uses them)
THRESHOLDS_KM = tuple(EvaluateConfig().thresholds_km)
GEOSCORE_KM = 1492.7  # OSV-5M's GeoScore scale
ADMIN_LEVELS = tuple(ADMIN_COLUMNS)  # the metadata's administrative areas, coarsest first


def accuracy(dist_km: np.ndarray, thresholds: Sequence[float] = THRESHOLDS_KM) -> dict[str, float]:
    """{"acc_1km": ..., ..., "median_km": ..., "mean_km": ..., "n": ...} for one set of errors."""
    d = np.asarray(dist_km, dtype=np.float64)
    out = {f"acc_{_km(t)}km": float(np.mean(d <= t)) if len(d) else float("nan") for t in thresholds}
    out["median_km"] = float(np.median(d)) if len(d) else float("nan")
    out["mean_km"] = float(np.mean(d)) if len(d) else float("nan")
    out["geoscore"] = float(np.mean(5000.0 * np.exp(-d / GEOSCORE_KM))) if len(d) else float("nan")
    out["n"] = int(len(d))
    return out


def admin_areas(lat: np.ndarray, lon: np.ndarray) -> list[tuple[str | None, ...]]:
    """Per point, its (country, region, sub-region, city) as OSV-5M names them: each level the chain of
    names down to it ("FR", "FR,Ile-de-France", ...), None where reverse_geocoder has no name for it
    (and for the levels below a missing country or region)."""
    import reverse_geocoder  # the `metrics` extra; imported here: it loads its table on first use (~2 s)

    if not len(lat):
        return []
    places = reverse_geocoder.search(list(zip(np.asarray(lat, float), np.asarray(lon, float), strict=True)),
                                     mode=1, verbose=False)
    out = []
    for p in places:
        cc, region, sub, city = (p.get(k, "") for k in ("cc", "admin1", "admin2", "name"))
        a = cc or None
        b = f"{cc},{region}" if a and region else None
        c = f"{cc},{region},{sub}" if b and sub else None
        d = f"{cc},{region},{sub},{city}" if b and city else None
        out.append((a, b, c, d))
    return out


def admin_accuracy(predicted: list[tuple[str | None, ...]], truth: list[tuple[str | None, ...]]) -> dict[str, float]:
    """OSV-5M's country / region / sub-region / city accuracy: per level, over the images whose true
    position has a name at that level, the share whose prediction has the same chain of names."""
    out = {}
    for i, level in enumerate(ADMIN_LEVELS):
        known = [(p[i], t[i]) for p, t in zip(predicted, truth, strict=True) if t[i] is not None]
        out[f"{level}_acc"] = float(np.mean([p == t for p, t in known])) if known else float("nan")
    return out


def _km(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else str(t)


def validation_metrics(partitionings: Sequence[str], thresholds: Sequence[float]) -> list[str]:
    """The names of the numbers training's validation records (train.best_metric picks one of them, or
    train_loss): per partitioning and for the hierarchical prediction, accuracy at each threshold and
    the median error, then the scene accuracy."""
    names = [*partitionings, "hierarchical"]
    return [f"val_{n}_{k}" for n in names for k in [*(f"acc_{_km(t)}km" for t in thresholds), "median_km"]] \
        + ["val_scene_acc"]


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
