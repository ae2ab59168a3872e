"""evaluate: the published metric definition, scene breakdown, test-time crops, plots, models side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from test_predict import tiny_checkpoint
from typer.testing import CliRunner

from geoloc_cli.cli import app

runner = CliRunner()
R = 6371.0


def geoloc(*args: str):
    return runner.invoke(app, list(args))


def gc_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The published haversine, written out independently of geoloc_cli.geo."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * R * math.asin(math.sqrt(a))


def write_predictions(path: Path, rows: list[tuple[float, float, float, float]], wrong_distance: bool = False) -> Path:
    df = pd.DataFrame(rows, columns=["gt_lat", "gt_long", "predicted_lat", "predicted_long"])
    df.insert(0, "img_id", [f"{i}.jpg" for i in range(len(df))])
    df["great_circle_distance"] = -1.0 if wrong_distance else [gc_km(*r) for r in rows]
    df[["img_id", "gt_lat", "predicted_lat", "gt_long", "predicted_long", "great_circle_distance"]].to_csv(
        path, index=False)
    return path


ROWS = [(10.0, 20.0, 10.0, 20.0),  # 0 km
        (0.0, 0.0, 0.0, 1.0),  # pi R / 180 = 111.19 km
        (48.8566, 2.3522, 51.5074, -0.1278),  # Paris - London, 343.6 km
        (0.0, 0.0, 90.0, 0.0),  # a quarter circle: 10,007.5 km
        (0.0, 0.0, 0.0, 180.0)]  # half the circumference: 20,015.1 km


def test_from_predictions_is_the_published_definition(tmp_path):
    path = write_predictions(tmp_path / "p.csv", ROWS, wrong_distance=True)  # the distance column is recomputed
    r = geoloc("evaluate", "--from-predictions", str(path), "--json")
    assert r.exit_code == 0, r.output
    (m,) = json.loads(r.stdout).values()
    d = sorted(gc_km(*row) for row in ROWS)
    assert d[1] == pytest.approx(math.pi * R / 180) and d[-1] == pytest.approx(math.pi * R)
    assert (m["acc_1km"], m["acc_25km"], m["acc_200km"], m["acc_750km"], m["acc_2500km"]) == (0.2, 0.2, 0.4, 0.6, 0.6)
    assert m["median_km"] == pytest.approx(d[2], abs=1e-9) and m["median_km"] == pytest.approx(343.56, abs=0.01)
    assert m["mean_km"] == pytest.approx(sum(d) / 5, abs=1e-9) and m["n"] == 5


def test_an_error_equal_to_the_threshold_counts(tmp_path):
    path = write_predictions(tmp_path / "p.csv", ROWS)
    exact = gc_km(*ROWS[1])
    r = geoloc("evaluate", "--from-predictions", str(path), "--json", "--set", f"evaluate.thresholds_km=[{exact!r}]")
    (m,) = json.loads(r.stdout).values()
    assert m[f"acc_{exact}km"] == 0.4, "0 km and exactly pi R / 180 km both count as <= the threshold"


def test_several_predictions_files_side_by_side(tmp_path):
    a = write_predictions(tmp_path / "published.csv", ROWS)
    b = write_predictions(tmp_path / "ours.csv", ROWS[:2])
    r = geoloc("evaluate", "--from-predictions", str(a), "--from-predictions", str(b))
    assert r.exit_code == 0 and "published" in r.stdout and "ours" in r.stdout
    res = json.loads(geoloc("evaluate", "--from-predictions", str(a), "--from-predictions", str(b), "--json").stdout)
    assert [v["n"] for v in res.values()] == [5, 2]


BLOCK = ("street acc (1km),city acc (25km),region acc (200km),country acc (750km),continent acc (2500km),"
         "mean deviation (km)\n")


def test_a_results_file_with_its_summary_block_is_read_as_published(tmp_path):
    path = write_predictions(tmp_path / "results.csv", ROWS)
    mean = sum(gc_km(*r) for r in ROWS) / 5
    base = path.read_text()
    path.write_text(base + BLOCK + f"0.2,0.2,0.4,0.6,0.6,{mean:.1f}\n")  # as GeoEstimation wrote it
    r = geoloc("evaluate", "--from-predictions", str(path), "--json")
    assert r.exit_code == 0, r.output
    (m,) = json.loads(r.stdout).values()
    assert m["n"] == 5, "the block's two lines are not images"
    assert m["stated"] == {"acc_1km": 0.2, "acc_25km": 0.2, "acc_200km": 0.4, "acc_750km": 0.6, "acc_2500km": 0.6,
                           "mean_km": round(mean, 1)}
    assert m["stated_differs"] == [] and "differ" not in r.stderr
    table = geoloc("evaluate", "--from-predictions", str(path))
    assert "summary block" in table.stdout and "stated in the file" in table.stdout
    # 0.4 where 0.6 is true; a mean rounded to one decimal is fine, one off by 0.2 km is not
    path.write_text(base + BLOCK + f"0.2,0.2,0.4,0.4,0.6,{mean:.1f}\n")
    r = geoloc("evaluate", "--from-predictions", str(path), "--json")
    (m,) = json.loads(r.stdout).values()
    assert m["stated_differs"] == ["acc_750km"] and "acc_750km differ" in r.stderr
    path.write_text(base + BLOCK + f"0.2,0.2,0.4,0.6,0.6,{mean + 0.2:.1f}\n")
    (m,) = json.loads(geoloc("evaluate", "--from-predictions", str(path), "--json").stdout).values()
    assert m["stated_differs"] == ["mean_km"]
    path.write_text(base + BLOCK + "0.2,0.2\n")
    r = geoloc("evaluate", "--from-predictions", str(path))
    assert r.exit_code == 1 and "summary row" in r.output


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A small held-out demo dataset with segmentation maps, and two random tiny checkpoints."""
    tmp = tmp_path_factory.mktemp("evalworld")
    cfg = {"paths": {"root": str(tmp / "data")}, "runtime": {"device": "cpu", "num_workers": 0},
           "fetch": {"demo_size": 64, "shard_size": 10, "processes": 1},
           "segment": {"model": "tiny-random", "input_size": 64}, "evaluate": {"datasets": ["demo_val"],
                                                                               "batch_size": 8}}
    path = tmp / "geoloc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for cmd in (["fetch", "demo"], ["segment", "demo_val"]):
        r = geoloc(*cmd, "-c", str(path), "-q")
        assert r.exit_code == 0, r.output
    a = tiny_checkpoint(tmp / "a" / "model.safetensors", seed=0)
    b = tiny_checkpoint(tmp / "b" / "model.safetensors", seed=1)
    return path, a, b


def test_evaluate_writes_metrics_predictions_plot_and_scenes(world):
    cfg, a, _ = world
    r = geoloc("evaluate", "-c", str(cfg), "--model", str(a), "--json")
    assert r.exit_code == 0, r.output
    out = a.parent / "eval" / "demo_val"
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(r.stdout)["demo_val"]["hierarchical"] == metrics["hierarchical"]
    n = metrics["hierarchical"]["n"]
    assert n == 16
    for kind in ("coarse", "middle", "fine", "hierarchical", "largest cell (baseline)"):
        m = metrics[kind]
        assert 0 <= m["acc_1km"] <= m["acc_25km"] <= m["acc_200km"] <= m["acc_750km"] <= m["acc_2500km"] <= 1
    scenes = metrics["by_scene"]
    assert set(scenes) <= {"indoor", "natural", "urban"} and sum(s["hierarchical"]["n"] for s in scenes.values()) == n
    manifest = pd.read_parquet(cfg.parent / "data/datasets/demo_val/manifest.parquet")
    urban = int((manifest["S3_Label"] == 2).sum())
    assert scenes.get("urban", {"hierarchical": {"n": 0}})["hierarchical"]["n"] == urban
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(out / "accuracy.png").size[0] > 300
    assert Image.open(out / "errors.png").size[0] > 600, "the per-image error map"
    page = (out / "errors.html").read_text()
    assert "id='ne-land'" in page and page.count("class='dot'") == len(pd.read_csv(out / "predictions.csv"))
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["img_id", "gt_lat", "predicted_lat", "gt_long", "predicted_long",
                                  "great_circle_distance"]
    again = [gc_km(*row) for row in pred[["gt_lat", "gt_long", "predicted_lat", "predicted_long"]].to_numpy()]
    np.testing.assert_allclose(pred["great_circle_distance"], again, atol=1e-9)
    # one ruler: the predictions file gives back exactly the hierarchical numbers
    r2 = geoloc("evaluate", "--from-predictions", str(out / "predictions.csv"), "--json")
    (summary,) = json.loads(r2.stdout).values()
    assert summary == pytest.approx(metrics["hierarchical"], abs=1e-9)
    table = geoloc("evaluate", "-c", str(cfg), "--model", str(a))
    assert "by scene" in table.stdout and "median km" in table.stdout


def test_test_time_crops(world):
    cfg, a, _ = world
    res = {}
    for crops, reduce in (("center", "mean"), ("ten", "max"), ("five", "mean")):
        r = geoloc("evaluate", "-c", str(cfg), "--model", str(a), "--json", "--set", f"evaluate.crops={crops}",
                   "--set", f"evaluate.crop_reduce={reduce}")
        assert r.exit_code == 0, r.output
        res[crops] = json.loads(r.stdout)["demo_val"]
        assert res[crops]["setup"]["crops"] == crops and res[crops]["hierarchical"]["n"] == 16
        assert 0 <= res[crops]["hierarchical"]["geoscore"] <= 5000
        assert set(res[crops]["admin"]) == {"country_acc", "region_acc", "sub-region_acc", "city_acc"}
    assert (a.parent / "eval/demo_val-ten-max/metrics.json").is_file()
    assert (a.parent / "eval/demo_val-five-mean/predictions.csv").is_file()


def test_crop_probabilities_reduce_per_crop_probabilities(world):
    import torch

    from geoloc_cli.inference import crop_probabilities, probabilities
    from geoloc_cli.model import load_inference_checkpoint

    _, a, _ = world
    model, meta, _ = load_inference_checkpoint(a)
    rng = torch.Generator().manual_seed(0)
    image = torch.randn(2, 5, 3, 32, 32, generator=rng)
    seg = torch.randint(0, 150, (2, 5, 32, 32), generator=rng, dtype=torch.uint8)
    cpu = torch.device("cpu")
    per_crop = [probabilities(model, image[:, k], seg[:, k], 3, cpu, None) for k in range(5)]
    mean = crop_probabilities(model, image, seg, 3, cpu, None, "mean")
    top = crop_probabilities(model, image, seg, 3, cpu, None, "max")
    for head in mean:
        stack = np.stack([p[head] for p in per_crop], axis=1)
        assert not np.allclose(stack[:, 0], stack[:, 1]), "crops must differ for the test to mean anything"
        np.testing.assert_allclose(mean[head], stack.mean(1), atol=1e-6)
        np.testing.assert_allclose(top[head], stack.max(1) / stack.max(1).sum(-1, keepdims=True), atol=1e-6)


def test_crop_boxes_and_reduction():
    from geoloc_cli.inference import crop_boxes, reduce_crops

    five = crop_boxes(200, 100, "five")
    assert len(five) == 5 and not any(f for _, f in five)
    for (x0, y0, x1, y1), _ in five:
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 100 and x1 - x0 == pytest.approx(87.5) == y1 - y0
    assert five[0][0][:2] == (0.0, 0.0) and five[3][0][2:] == (200.0, 100.0)
    ten = crop_boxes(200, 100, "ten")
    assert [b for b, _ in ten[5:]] == [b for b, _ in five] and all(f for _, f in ten[5:])
    assert crop_boxes(200, 100, "center") == [((50.0, 0.0, 150.0, 100.0), False)]
    p = {"fine": np.array([[[0.6, 0.4], [0.2, 0.8]]])}  # one image, two crops
    np.testing.assert_allclose(reduce_crops(p, "mean")["fine"], [[0.4, 0.6]])
    np.testing.assert_allclose(reduce_crops(p, "max")["fine"], [[0.6 / 1.4, 0.8 / 1.4]])


def test_photo_and_map_are_cropped_alike():
    """Left half red / right half blue photo, and a half-resolution map labelling the halves 1 / 2: in every
    test-time crop (flips included) the map's label follows the photo's colour column by column."""
    from geoloc_cli.inference import views

    w, h = 160, 96
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2, 0] = 255
    rgb[:, w // 2 :, 2] = 255
    seg = np.ones((h // 2, w // 2), np.uint8)
    seg[:, w // 4 :] = 2
    pre = {"mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear"}
    x, s = views(Image.fromarray(rgb), Image.fromarray(seg), 32, pre, "ten")
    assert x.shape == (10, 3, 32, 32) and s.shape == (10, 32, 32)
    for k in range(10):
        red = x[k, 0, 16] > 0.5
        sharp = np.abs(x[k, 0, 16] - 0.5) > 0.4  # skip the blended boundary column
        assert (s[k, 16][sharp] == np.where(red, 1, 2)[sharp]).all(), k
        assert (s[k] == s[k, :1]).all(), "rows are identical"


def test_models_side_by_side(world):
    cfg, a, b = world
    r = geoloc("evaluate", "-c", str(cfg), "--model", str(a), "--model", str(b))
    assert r.exit_code == 0, r.output
    assert "a/model" in r.stdout and "b/model" in r.stdout and "hierarchical" in r.stdout
    res = json.loads(geoloc("evaluate", "-c", str(cfg), "--model", str(a), "--model", str(b), "--json").stdout)
    assert set(res) == {"a/model", "b/model"}
    assert res["a/model"]["demo_val"]["hierarchical"] != res["b/model"]["demo_val"]["hierarchical"]


def test_missing_test_set_names_the_fetch_command(world):
    cfg, a, _ = world
    r = geoloc("evaluate", "im2gps3k", "-c", str(cfg), "--model", str(a))
    assert r.exit_code == 1 and "geoloc fetch im2gps3k" in r.output


def test_images_without_a_true_location_are_left_out_not_scored_as_misses(world):
    import shutil

    cfg, a, _ = world
    datasets = cfg.parent / "data" / "datasets"
    for name, cut in (("partgps", 4), ("nogps", None)):
        shutil.copytree(datasets / "demo_val", datasets / name, dirs_exist_ok=True)
        m = pd.read_parquet(datasets / name / "manifest.parquet")
        ok = m.index[m.status == "ok"][:cut]
        m.loc[ok, ["lat", "lon"]] = np.nan
        m.to_parquet(datasets / name / "manifest.parquet")
    r = geoloc("evaluate", "partgps", "-c", str(cfg), "--model", str(a), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["partgps"]["hierarchical"]["n"] == 12  # 16 located - 4
    assert "4 of 16 images have no true location" in r.stderr.replace("\n", " ")
    r = geoloc("evaluate", "nogps", "-c", str(cfg), "--model", str(a))
    assert r.exit_code == 1 and "no true locations" in r.output
