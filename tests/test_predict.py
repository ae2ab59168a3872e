"""predict: ONNX export equals torch, torch-free runtime, names, EXIF truth, output formats, bad inputs."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from geoloc_cli.cli import app

runner = CliRunner()
FINE_CENTRES = [(48.86, 2.35), (40.71, -74.0), (-33.87, 151.21), (35.68, 139.69), (-22.91, -43.2),
                (52.52, 13.40), (30.04, 31.24), (19.43, -99.13)]


def tiny_checkpoint(path: Path, seed: int = 0, seg_channels: int = 3, fusion: str = "late") -> Path:
    """A random late-fusion ViT (32 px, 1 block) with coarse/middle/fine heads over real S2 cells around
    eight cities and an embedded tiny random segmenter (64 px), saved as an inference checkpoint."""
    import torch

    from geoloc_cli import config as cfgmod
    from geoloc_cli.geo import sphere
    from geoloc_cli.inference.geolocate import CellSet
    from geoloc_cli.model.network import ModelSpec, build_model, save_inference_checkpoint
    from geoloc_cli.model.segmentation import Segmenter

    lat, lon = np.array(FINE_CENTRES).T
    levels = {"coarse": 2, "middle": 4, "fine": 7}
    tokens = {n: sphere.to_token(sphere.cell_ids(lat, lon, lv)) for n, lv in levels.items()}
    uniq = {n: sorted(set(t)) for n, t in tokens.items()}
    idx = {n: np.array([uniq[n].index(t) for t in tokens[n]]) for n in levels}
    lats = {n: np.array([lat[idx[n] == k].mean() for k in range(len(uniq[n]))]) for n in levels}
    lons = {n: np.array([lon[idx[n] == k].mean() for k in range(len(uniq[n]))]) for n in levels}
    parents = {n: np.empty(len(uniq["fine"]), dtype=np.int64) for n in ("coarse", "middle")}
    for n in parents:
        parents[n][idx["fine"]] = idx[n]
    cells = CellSet(list(levels), uniq, lats, lons, {n: np.arange(len(uniq[n])) + 5 for n in levels}, parents)
    torch.manual_seed(seed)
    heads = {**{n: len(uniq[n]) for n in levels}, "scene": 3}
    spec = ModelSpec("vit_tiny_patch16_224", 32, seg_channels, fusion, heads,
                     {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})
    model = build_model(spec).eval()
    with torch.no_grad():  # spread the logits so rankings are not near-ties
        for head in model.heads.values():
            head.weight.mul_(20)
    meta = {"partitionings": cells.to_meta(), "config": cfgmod.to_dict(cfgmod.Config())}
    seg_tensors = None
    if seg_channels:
        seg_tensors, meta["segmenter"] = Segmenter.from_name("tiny-random", input_size=64).state()
    save_inference_checkpoint(path, model, meta, seg_tensors)
    return path


def photo(path: Path, w: int = 96, h: int = 72, seed: int = 0, mode: str = "RGB", **save) -> Path:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
    Image.fromarray(rgb).convert(mode).save(path, **save)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny checkpoint exported to ONNX (model.onnx + model.seg.onnx beside it)."""
    from geoloc_cli.model.export import export_onnx

    path = tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.safetensors")
    written = export_onnx(path)
    names = [p.name for p in written]
    assert names == ["model.onnx", "model.onnx.data", "model.rgb.onnx", "model.rgb.onnx.data", "model.seg.onnx",
                     "model.seg.onnx.data", "model.onnx.json"]
    assert all(p.is_file() for p in written)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("photos")
    return [photo(d / "a.jpg", 96, 72, 0), photo(d / "b.png", 50, 120, 1), photo(d / "c.jpg", 300, 200, 2)]


def predict(*args: str):
    return runner.invoke(app, ["predict", *args])


def test_onnx_export_gives_the_torch_top_k(ckpt, photos):
    from geoloc_cli.data.store import read_checkpoint_meta as read_meta
    from geoloc_cli.inference.geolocate import CellSet, rank_places
    from geoloc_cli.inference.onnx_runtime import OnnxModel
    from geoloc_cli.stages.predict import TorchModel

    meta = read_meta(ckpt)
    images = [Image.open(p).convert("RGB") for p in photos]
    onnx_model, torch_model = OnnxModel.of_checkpoint(ckpt, meta), TorchModel(ckpt, meta, "cpu")
    maps_onnx = onnx_model.class_maps(images)
    maps_torch = torch_model.segmenter(images)
    assert all((a == b).mean() > 0.99 for a, b in zip(maps_onnx, maps_torch, strict=True))
    p_onnx, p_torch = onnx_model.probabilities(images), torch_model.probabilities(images)
    assert set(p_onnx) == {"coarse", "middle", "fine", "scene"}
    for head in p_onnx:
        np.testing.assert_allclose(p_onnx[head], p_torch[head], atol=1e-4)
    cells = CellSet.from_meta(meta["partitionings"])
    top_onnx, top_torch = rank_places(p_onnx, cells, 5), rank_places(p_torch, cells, 5)
    for a, b in zip(top_onnx, top_torch, strict=True):
        assert [t["cell"] for t in a["top"]] == [t["cell"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-4)


@pytest.mark.parametrize("seg_channels, fusion", [(0, "late"), (150, "exchange")])
def test_single_graph_exports_match_torch(tmp_path, photos, seg_channels, fusion):
    from geoloc_cli.data.store import read_checkpoint_meta as read_meta
    from geoloc_cli.inference.onnx_runtime import OnnxModel
    from geoloc_cli.model.export import export_onnx
    from geoloc_cli.stages.predict import TorchModel

    path = tiny_checkpoint(tmp_path / "model.safetensors", seg_channels=seg_channels, fusion=fusion)
    assert "model.rgb.onnx" not in [p.name for p in export_onnx(path)]
    meta = read_meta(path)
    images = [Image.open(p).convert("RGB") for p in photos]
    p_onnx = OnnxModel.of_checkpoint(path, meta).probabilities(images)
    p_torch = TorchModel(path, meta, "cpu").probabilities(images)
    for head in p_torch:
        np.testing.assert_allclose(p_onnx[head], p_torch[head], atol=1e-4)
        assert (p_onnx[head].argmax(-1) == p_torch[head].argmax(-1)).all()


def test_numpy_center_view_mirrors_data_transform():
    from geoloc_cli.data.dataset import transform
    from geoloc_cli.inference.geolocate import normalize, view, views

    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (70, 110, 3), dtype=np.uint8))
    seg = Image.fromarray(rng.integers(0, 150, (35, 55), dtype=np.uint8))
    for pre in ({"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.9},
                {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}):
        x_ref, s_ref = transform(img, seg, 32, pre, False, None)
        assert x_ref.dtype == torch.uint8, "the training loader ships pixels, not floats"
        x, s = views(img, seg, 32, pre, "center")
        np.testing.assert_array_equal(x[0], normalize(x_ref.numpy(), pre))
        assert (s[0] == s_ref.numpy()).all()
    x, s = view(img, None, 16, pre, (0, 0, 50, 50), True)
    assert x.shape == (3, 16, 16) and (s == 255).all(), "no map: all pixels are 'ignore'"


def test_predict_with_onnx_imports_no_torch(ckpt, photos, tmp_path):
    code = (
        "import json, sys\nfrom geoloc_cli.cli import app\n"
        f"try:\n    app(['predict', {str(photos[0])!r}, '--model', {str(ckpt)!r}, '--json', '-q'])\n"
        "except SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules)\n"
        "print('HEAVY=' + json.dumps(heavy), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY=[]" in r.stderr, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert len(result[0]["top"]) == 5


def test_help_imports_no_heavy_library():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "geoloc_cli", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "export" in r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "timm", "transformers", "onnxruntime", "pandas"}, imported


def test_backends_agree_through_the_cli(ckpt, photos):
    outs = {}
    for backend in ("onnx", "torch"):
        r = predict(*map(str, photos), "--model", str(ckpt), "--json", "--backend", backend, "--top-k", "3")
        assert r.exit_code == 0, r.output
        outs[backend] = json.loads(r.stdout)
    for a, b in zip(outs["onnx"], outs["torch"], strict=True):
        assert [t["cell"] for t in a["top"]] == [t["cell"] for t in b["top"]]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-4)
        assert a["top"][0]["place"] == b["top"][0]["place"]
        for key in ("radius_50_km", "radius_90_km"):  # the credible radii: same post-processing on both paths
            assert a[key] == pytest.approx(b[key], abs=0.5)
        assert 0 < a["radius_50_km"] <= a["radius_90_km"] < 20_038
    first = outs["onnx"][0]
    assert len(first["top"]) == 3 and sum(first["scene"].values()) == pytest.approx(1, abs=1e-5)
    assert set(first["scene"]) == {"indoor", "natural", "urban"}


def test_place_names_come_from_the_packaged_gazetteer(ckpt, photos):
    from geoloc_cli.geo import gazetteer

    g = gazetteer.load()
    assert len(g) > 30_000
    got = g.nearest([48.857, 52.52, -33.87, 35.68], [2.352, 13.40, 151.21, 139.69])
    assert [(p["name"], p["country"]) for p in got] == [
        ("Paris", "France"), ("Berlin", "Germany"), ("Sydney", "Australia"), ("Tokyo", "Japan")]
    assert all(p["km"] < 5 for p in got)
    r = predict(str(photos[0]), "--model", str(ckpt), "--json", "--top-k", "8")
    top = json.loads(r.stdout)[0]["top"]
    # the cells sit at eight capitals and big cities; each candidate is named after its own city
    names = {t["place"]["name"] for t in top}
    assert {"Paris", "Berlin", "Sydney", "Tokyo", "New York City"} <= names, names


def test_exif_gps_gives_the_true_place_and_the_error(ckpt, tmp_path):
    from geoloc_cli.geo.sphere import haversine_km

    img = Image.fromarray(np.full((60, 80, 3), 120, np.uint8))
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 7.0)}  # Paris
    img.save(tmp_path / "gps.jpg", exif=exif)
    r = predict(str(tmp_path / "gps.jpg"), "--model", str(ckpt), "--json")
    (res,) = json.loads(r.stdout)
    e = res["exif"]
    assert e["lat"] == pytest.approx(48.856667, abs=1e-5) and e["lon"] == pytest.approx(2.351944, abs=1e-5)
    assert e["place"]["name"] == "Paris"
    top1 = res["top"][0]
    assert e["error_km"] == pytest.approx(float(haversine_km(e["lat"], e["lon"], top1["lat"], top1["lon"])), abs=0.1)
    table = predict(str(tmp_path / "gps.jpg"), "--model", str(ckpt))
    assert "exif" in table.stdout and "true position" in table.stdout and "km off" in table.stdout


def test_csv_geojson_table_and_map(ckpt, photos, tmp_path):
    args = [*map(str, photos), str(tmp_path / "missing.jpg"), "--model", str(ckpt), "--top-k", "2"]
    r = predict(*args, "--csv")
    assert r.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 3 * 2 + 1 and rows[-1]["failure"].startswith("no such file")
    assert [x["rank"] for x in rows[:2]] == ["1", "2"] and rows[0]["place"] and rows[0]["country"]
    assert list(rows[0])[:15] == ["file", "rank", "lat", "lon", "probability", "cell", "place", "country", "place_km",
                                  "scene", "scene_probability", "true_lat", "true_lon", "error_km", "failure"]
    assert float(rows[0]["radius_90_km"]) >= float(rows[0]["radius_50_km"]) > 0 and rows[1]["radius_50_km"] == ""
    assert rows[0]["refined_lat"] == "", "no --refine, no refined position"
    gj = json.loads(predict(*args, "--geojson").stdout)
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 3 * 2
    lon, lat = gj["features"][0]["geometry"]["coordinates"]
    assert (lat, lon) in [pytest.approx(c, abs=1e-6) for c in FINE_CENTRES]
    assert gj["features"][0]["properties"]["radius_90_km"] >= gj["features"][0]["properties"]["radius_50_km"] > 0
    table = predict(*args)
    assert "place" in table.stdout and "GeoNames" in table.stdout and "no such file" in table.stderr
    assert predict(*args, "--csv", "--json").exit_code == 2
    page = tmp_path / "map.html"
    r = predict(*args, "--map", str(page))
    html = page.read_text()
    assert html.count("<svg") == 2 * 3 + 1, "a world map and a close-up per photo, and the basemap once"
    assert html.count("class='heat'") == 2 * 3, "cells shaded by probability, in both maps"
    assert html.count("<g class='pred'>") == 3 * 2 * 2, "a marker per candidate, in both maps"
    assert html.count("class='cities'") == 3, "city names on each close-up"
    assert "src=" not in html and "http" not in html.replace("http://www.w3.org/2000/svg", ""), \
        "self-contained: nothing to fetch"
    assert "id='ne-land'" in html and "no such file" in html


def test_bad_inputs_fail_one_by_one(ckpt, tmp_path):
    good = photo(tmp_path / "good.jpg")
    (tmp_path / "text.jpg").write_text("not an image at all")
    (tmp_path / "truncated.jpg").write_bytes(photo(tmp_path / "full.jpg", 300, 200).read_bytes()[:600])
    bomb = bytearray(good.read_bytes())  # a real JPEG whose header declares 60000 x 60000 pixels
    i = bomb.find(b"\xff\xc0")
    bomb[i + 5:i + 9] = (60000).to_bytes(2, "big") * 2
    (tmp_path / "bomb.jpg").write_bytes(bytes(bomb))
    handled = [photo(tmp_path / "cmyk.jpg", mode="CMYK"), photo(tmp_path / "alpha.png", mode="RGBA"),
               photo(tmp_path / "grey.png", mode="L"), photo(tmp_path / "palette.gif", mode="P")]
    deep = np.arange(60 * 80, dtype=np.uint16).reshape(60, 80) * 13
    Image.fromarray(deep).save(tmp_path / "grey16.png")
    handled.append(tmp_path / "grey16.png")
    files = [good, tmp_path / "missing.jpg", tmp_path / "text.jpg", tmp_path / "truncated.jpg",
             tmp_path / "bomb.jpg", *handled]
    r = predict(*map(str, files), "--model", str(ckpt), "--json")
    assert r.exit_code == 1, "any failed photo makes the exit code non-zero"
    res = {Path(x["file"]).name: x for x in json.loads(r.stdout)}
    assert "no such file" in res["missing.jpg"]["error"]
    assert "cannot read" in res["text.jpg"]["error"]
    assert "truncated" in res["truncated.jpg"]["error"].lower()
    assert "over the limit" in res["bomb.jpg"]["error"]
    for f in [good, *handled]:
        assert "error" not in res[f.name] and len(res[f.name]["top"]) == 5, res[f.name]
    # a configurable limit; and a folder of only good photos exits 0
    small = predict(str(good), "--model", str(ckpt), "--json", "--set", "fetch.max_pixels=1000")
    assert small.exit_code == 1 and "over the limit" in json.loads(small.stdout)[0]["error"]
    folder = tmp_path / "ok"
    folder.mkdir()
    for f in handled:
        (folder / f.name).write_bytes(f.read_bytes())
    r = predict(str(folder), "--model", str(ckpt), "--json", "--set", "predict.batch_size=2")
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == len(handled)


def test_alpha_is_composited_on_white():
    from geoloc_cli.data.photo import to_rgb

    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255


def test_stale_or_missing_export(ckpt, photos, tmp_path):
    other = tiny_checkpoint(tmp_path / "model.safetensors", seed=1)
    for suffix in (".onnx", ".onnx.data", ".rgb.onnx", ".rgb.onnx.data", ".seg.onnx", ".seg.onnx.data",
                   ".onnx.json"):  # the export of a different checkpoint
        (tmp_path / f"model{suffix}").write_bytes(ckpt.with_name(f"model{suffix}").read_bytes())
    r = predict(str(photos[0]), "--model", str(other), "--backend", "onnx")
    assert r.exit_code == 1 and "different checkpoint" in r.output
    r = predict(str(photos[0]), "--model", str(other), "--json")  # auto falls back to torch
    assert r.exit_code == 0 and "torch" in r.stderr
    (tmp_path / "model.onnx").unlink()
    r = predict(str(photos[0]), "--model", str(other), "--backend", "onnx")
    assert r.exit_code == 1 and "geoloc export" in r.output
    r = runner.invoke(app, ["export", str(other)])
    assert r.exit_code == 0 and "model.onnx.json" in r.output
    r = predict(str(photos[0]), "--model", str(other), "--backend", "onnx", "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)[0]["top"]) == 5


def test_export_defaults_to_the_runs_checkpoint(ckpt, tmp_path):
    run = tmp_path / "root" / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "model.safetensors").write_bytes(ckpt.read_bytes())
    r = runner.invoke(app, ["export", "--root", str(tmp_path / "root"), "--set", "train.run=mine"])
    assert r.exit_code == 0, r.output
    assert (run / "model.onnx").is_file() and (run / "model.onnx.json").is_file()


def test_exif_parsing_rejects_garbage():
    from geoloc_cli.data.photo import dms

    assert dms((10, 30, 36)) == pytest.approx(10.51)
    assert math.isclose(dms((0, 0, 0)), 0.0)


def test_an_export_is_self_describing(tmp_path, photos):
    """predict takes the .onnx (or its folder) alone, and the README's plain-onnxruntime example finds the
    same top cell as geoloc."""
    import os
    import re
    import shutil
    import subprocess

    from geoloc_cli.model.export import export_onnx

    ckpt = tiny_checkpoint(tmp_path / "run" / "model.safetensors")
    export_onnx(ckpt)
    alone = tmp_path / "alone"  # the export without its checkpoint
    shutil.copytree(tmp_path / "run", alone, ignore=shutil.ignore_patterns("*.safetensors"))
    tops = []
    for model in (ckpt, alone / "model.onnx", alone):
        r = CliRunner().invoke(app, ["predict", str(photos[0]), "--model", str(model), "--json", "-q"])
        assert r.exit_code == 0, r.output
        tops.append(json.loads(r.stdout)[0]["top"][0]["cell"])
    assert tops[0] == tops[1] == tops[2]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"<!-- onnx-example -->\n```python\n(.*?)```", readme, re.S)[1]
    shutil.copy(photos[0], alone / "photo.jpg")
    r = subprocess.run([sys.executable, "-c", code], cwd=alone, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == tops[0]


def test_predict_of_an_export_imports_no_table_or_training_library():
    """The predict-only install has no pandas, pyarrow, torch, matplotlib, OpenCV or httpx (CI's
    predict-only job installs it); here they are made unimportable instead."""
    code = ("import sys\n"
            "for m in ('pyarrow', 'pandas', 'torch', 'matplotlib', 'cv2', 'httpx'): sys.modules[m] = None\n"
            "import geoloc_cli.cli, geoloc_cli.stages.predict, geoloc_cli.inference.onnx_runtime\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
