"""The training loss: one cross-entropy per head, weighted, over the known targets of a local batch.

Haversine label smoothing (PIGEON, Haas et al., CVPR 2024): instead of all mass on the true cell, the
target of a partitioning is softmax over its cells of -(d(cell centre, true position) - d(true cell's
centre, true position)) / tau, distances in km; the second term is the same for every cell of a photo,
so this is softmax(-d / tau). A guess 10 km off then costs less than one 10,000 km off. tau = 0 keeps
plain cross-entropy (PIGEOTTO used 65 km).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1: torch.Tensor, lon1: torch.Tensor, lat2: torch.Tensor, lon2: torch.Tensor) -> torch.Tensor:
    """Great-circle distance in km (broadcasting), as geo.haversine_km on tensors."""
    p1, p2 = torch.deg2rad(lat1), torch.deg2rad(lat2)
    a = torch.sin((p2 - p1) / 2) ** 2 + torch.cos(p1) * torch.cos(p2) * torch.sin(torch.deg2rad(lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(0.0, 1.0)))


def smoothed_targets(lat: torch.Tensor, lon: torch.Tensor, cell_lat: torch.Tensor, cell_lon: torch.Tensor,
                     tau_km: float) -> torch.Tensor:
    """(B, C) target distributions: softmax over the C cells of -distance(cell centre, photo) / tau_km."""
    d = haversine_km(lat[:, None], lon[:, None], cell_lat[None, :], cell_lon[None, :])
    return torch.softmax(-d / tau_km, dim=-1)


@dataclass
class MultitaskLoss:
    """sum over heads of weight * loss; each head's loss is the sum over the chunk's known targets (-1 =
    unknown) divided by the known targets of the whole local batch, so accumulation chunks add up to the
    batch's mean exactly and a chunk without known targets adds 0, not NaN."""

    weights: dict[str, float]
    # head -> (tau in km, centre latitudes, centre longitudes of its cells, on the training device)
    smoothing: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __call__(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                 known: dict[str, torch.Tensor], lat: torch.Tensor, lon: torch.Tensor,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros((), device=lat.device)
        parts = {}
        for h, w in self.weights.items():
            t = targets[h]
            if h in self.smoothing:
                tau, cell_lat, cell_lon = self.smoothing[h]
                q = smoothed_targets(lat, lon, cell_lat, cell_lon, tau)
                per_sample = -(q * F.log_softmax(logits[h].float(), dim=-1)).sum(-1)
                lh = per_sample[t >= 0].sum() / known[h]
            else:
                lh = F.cross_entropy(logits[h].float(), t, ignore_index=-1, reduction="sum") / known[h]
            parts[h] = lh
            total = total + w * lh
        return total, parts
