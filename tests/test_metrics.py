import numpy as np
import pandas as pd
import pytest

from geoloc_cli.errors import InputError
from geoloc_cli.geo import haversine_km
from geoloc_cli.metrics import accuracy, hierarchical_probs, trivial_baseline, validation_metrics
from geoloc_cli.stages.evaluate import metrics_from_predictions
from geoloc_cli.stages.filter import build_index


def test_haversine_known_distances():
    # Paris -> London ~343.5 km, antipodes = pi * R, same point = 0
    assert haversine_km(np.array([48.8566]), np.array([2.3522]), np.array([51.5074]), np.array([-0.1278]))[0] == \
        pytest.approx(343.5, abs=1.0)
    assert haversine_km(np.array([0.0]), np.array([0.0]), np.array([0.0]), np.array([180.0]))[0] == \
        pytest.approx(np.pi * 6371, rel=1e-9)
    assert haversine_km(np.array([10.0]), np.array([20.0]), np.array([10.0]), np.array([20.0]))[0] == 0


def test_accuracy_counts_errors_at_or_below_threshold():
    m = accuracy(np.array([0.5, 1.0, 25.0, 25.0001, 3000.0]))
    assert m["acc_1km"] == pytest.approx(2 / 5)  # 1.0 km counts at 1 km
    assert m["acc_25km"] == pytest.approx(3 / 5)
    assert m["acc_2500km"] == pytest.approx(4 / 5)
    assert m["median_km"] == pytest.approx(25.0) and m["n"] == 5


def test_hierarchical_probs_multiplies_parent_probabilities():
    fine = np.array([[0.5, 0.3, 0.2]])
    coarse = np.array([[0.1, 0.9]])
    parents = {"coarse": [0, 1, -1]}  # fine 0 in coarse 0, fine 1 in coarse 1, fine 2 has no parent
    p = hierarchical_probs({"fine": fine, "coarse": coarse}, parents, "fine")
    assert np.allclose(p, [[0.05, 0.27, 0.2]])
    assert p.argmax() == 1  # the coarse evidence overturns the fine argmax


def test_trivial_baseline_predicts_the_largest_cell():
    d = trivial_baseline(np.array([3, 10, 5]), np.array([0.0, 48.8566, 10.0]), np.array([0.0, 2.3522, 10.0]),
                         np.array([48.8566]), np.array([2.3522]))
    assert d[0] == pytest.approx(0.0)


def test_from_predictions_recomputes_from_coordinates(tmp_path):
    f = tmp_path / "p.csv"
    pd.DataFrame({"img_id": ["a", "b"], "gt_lat": [0.0, 0.0], "predicted_lat": [0.0, 0.0],
                  "gt_long": [0.0, 0.0], "predicted_long": [0.0, 30.0],
                  "great_circle_distance": [999.0, 999.0]}).to_csv(f, index=False)
    m = metrics_from_predictions(f, [1, 2500, 4000])
    assert m["acc_1km"] == 0.5 and m["acc_2500km"] == 0.5 and m["acc_4000km"] == 1.0
    f.write_text("img_id,gt_lat,predicted_lat,gt_long,predicted_long\na,0,x,0,0\n")
    with pytest.raises(InputError, match="row 2: non-numeric"):
        metrics_from_predictions(f, [1])


def test_filter_rules_and_drop_counts():
    manifest = pd.DataFrame({
        "key": ["0", "1", "2", "3", "4"], "id": ["a", "b", "c", "d", "e"],
        "status": ["ok", "ok", "http_404", "ok", "ok"], "width": [400, 100, 0, 400, 400],
        "height": [320, 80, 0, 320, 320], "S3_Label": [0, 1, 1, 2, 1]})
    labels = pd.DataFrame({"id": ["a", "b", "c", "d", "e"], "coarse": [0, 1, 1, -1, 2], "fine": [0, 3, 1, 4, 5]})
    index, drops = build_index(manifest, labels, ["coarse", "fine"])
    assert index["id"].tolist() == ["a", "b", "e"]
    assert dict(drops) == {"not downloaded": 1, "no class in every partitioning": 1}
    index, drops = build_index(manifest, labels, ["coarse", "fine"], scene_of_interest=1, min_size=200)
    assert index["id"].tolist() == ["e"]
    assert dict(drops)["shorter side < 200 px"] == 1 and dict(drops)["scene is not natural"] == 1
    with pytest.raises(InputError, match="no column"):
        build_index(manifest, labels, ["middle"])
    # fetch stores every image at the same shorter side; min_size judges the size as downloaded
    manifest = manifest.assign(width=400, height=320, orig_width=[1024, 120, 0, 640, None],
                               orig_height=[768, 90, 0, 480, None])
    index, _ = build_index(manifest, labels, ["coarse", "fine"], min_size=200)
    assert index["id"].tolist() == ["a", "e"]  # b was 120x90; e comes from an older manifest: as stored


def test_scene_accuracy_counts_only_known_labels():
    from geoloc_cli.inference import scene_accuracy

    pred = pd.DataFrame({"scene_pred": [0, 1, 2, 2], "scene_true": [0, 2, -1, -1]})
    assert scene_accuracy(pred) == 0.5
    assert scene_accuracy(pred.assign(scene_true=-1)) is None


def test_geoscore_is_osv5m_s_definition():
    from geoloc_cli.metrics import accuracy

    d = np.array([0.0, 1492.7, 20000.0])
    expected = np.mean([5000.0, 5000.0 / np.e, 5000.0 * np.exp(-20000.0 / 1492.7)])
    assert accuracy(d)["geoscore"] == pytest.approx(expected)
    assert accuracy(np.zeros(3))["geoscore"] == 5000.0


def test_admin_accuracy_compares_whole_chains_over_known_truths():
    from geoloc_cli.metrics import admin_accuracy, admin_areas

    paris, versailles, sydney = (48.8566, 2.3522), (48.8049, 2.1204), (-33.8688, 151.2093)
    truth = admin_areas(np.array([paris[0], sydney[0]]), np.array([paris[1], sydney[1]]))
    assert truth[0][0] == "FR" and truth[0][1].startswith("FR,") and truth[1][0] == "AU"
    guess = admin_areas(np.array([versailles[0], paris[0]]), np.array([versailles[1], paris[1]]))
    acc = admin_accuracy(guess, truth)
    assert acc["country_acc"] == 0.5 and acc["region_acc"] == 0.5  # Versailles: France, Ile-de-France
    assert acc["city_acc"] == 0.0  # ... but not Paris; Sydney guessed in Paris: nothing right
    # a level the truth has no name for is left out of that level's share, as OSV-5M counts
    none_below = [("FR", None, None, None)]
    assert np.isnan(admin_accuracy([("FR", "FR,x", None, None)], none_below)["region_acc"])
    assert admin_accuracy([("FR", "FR,x", None, None)], none_below)["country_acc"] == 1.0


def test_validation_metric_names_follow_the_thresholds():
    names = validation_metrics(["coarse"], [1, 2.5])
    assert names == ["val_coarse_acc_1km", "val_coarse_acc_2.5km", "val_coarse_median_km",
                     "val_hierarchical_acc_1km", "val_hierarchical_acc_2.5km", "val_hierarchical_median_km",
                     "val_scene_acc"]
    assert accuracy(np.array([1.0]), [1, 2.5]).keys() >= {"acc_1km", "acc_2.5km", "median_km"}
