"""The multi-task loss and haversine label smoothing, against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from geoloc_cli.train.losses import MultitaskLoss, smoothed_targets


def _km(lat1, lon1, lat2, lon2):
    """The haversine written out independently (R = 6371 km)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371 * math.asin(math.sqrt(a))


def test_smoothed_target_is_the_softmax_of_minus_distance_over_tau():
    paris, cells = (48.8566, 2.3522), [(48.85, 2.35), (51.5074, -0.1278), (40.4168, -3.7038)]  # Paris, London, Madrid
    tau = 65.0
    d = [_km(*paris, *c) for c in cells]
    # PIGEON's form: exp(-(d_c - d_true) / tau), normalised; the true cell is the nearest (Paris)
    raw = [math.exp(-(dc - d[0]) / tau) for dc in d]
    want = [r / sum(raw) for r in raw]
    got = smoothed_targets(torch.tensor([paris[0]]), torch.tensor([paris[1]]), torch.tensor([c[0] for c in cells]),
                           torch.tensor([c[1] for c in cells]), tau)[0]
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-12)
    assert got[1] > got[2] > 0, "London (344 km) keeps more mass than Madrid (1,053 km)"


def test_without_smoothing_it_is_the_weighted_cross_entropy_over_known_targets():
    torch.manual_seed(0)
    logits = {"fine": torch.randn(4, 3), "scene": torch.randn(4, 3)}
    targets = {"fine": torch.tensor([0, 2, 1, 1]), "scene": torch.tensor([2, -1, 0, -1])}
    known = {h: (t >= 0).sum() for h, t in targets.items()}
    loss, parts = MultitaskLoss({"fine": 0.2, "scene": 1.0})(logits, targets, known, torch.zeros(4), torch.zeros(4))
    scene = F.cross_entropy(logits["scene"][[0, 2]], targets["scene"][[0, 2]])  # unknown (-1) left out
    assert parts["scene"] == pytest.approx(float(scene))
    assert loss == pytest.approx(0.2 * float(F.cross_entropy(logits["fine"], targets["fine"])) + float(scene))


def test_smoothing_scores_a_near_miss_above_a_far_one():
    """With smoothing, a model confident in the cell next door loses less than one confident far away."""
    cell_lat, cell_lon = torch.tensor([48.85, 48.0, -33.9]), torch.tensor([2.35, 2.5, 151.2])  # Paris, Orleans, Sydney
    photo = (torch.tensor([48.86]), torch.tensor([2.34]))
    target = {"fine": torch.tensor([0])}
    smooth = MultitaskLoss({"fine": 1.0}, {"fine": (65.0, cell_lat, cell_lon)})
    plain = MultitaskLoss({"fine": 1.0})
    near, far = {"fine": torch.tensor([[0.0, 5.0, 0.0]])}, {"fine": torch.tensor([[0.0, 0.0, 5.0]])}
    one = {"fine": torch.tensor(1)}
    assert smooth(near, target, one, *photo)[0] < smooth(far, target, one, *photo)[0]
    assert plain(near, target, one, *photo)[0] == pytest.approx(float(plain(far, target, one, *photo)[0]))
