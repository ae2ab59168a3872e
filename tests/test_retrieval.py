"""Retrieval refinement: exact search (chunked, masked) and FAISS agree, the gallery `geoloc index` builds
leaves evaluation photos out, refined positions come from gallery neighbours, and predict / evaluate take
--refine knn through the CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner
from worlds import build_world

from geoloc_cli.cli import app
from geoloc_cli.config import load_config
from geoloc_cli.data.store import DataRoot
from geoloc_cli.inference import retrieval

runner = CliRunner()
TRAIN = {"epochs": 1, "batch_size": 16, "source": "embeddings", "trainable_blocks": 0, "checkpoint_every": 1000}


def geoloc(cfg: Path, *args: str):
    return runner.invoke(app, [*args, "-c", str(cfg), "-q"])


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ search


def test_exact_search_merges_chunks_and_respects_the_mask(monkeypatch):
    monkeypatch.setattr(retrieval, "CHUNK", 37)  # many chunks, the last one short
    g, q = unit(500, 16), unit(7, 16, seed=1)
    allowed = np.random.default_rng(2).random(500) < 0.5
    s, i = retrieval.exact_search(q, g.astype(np.float16), 10, allowed)
    sims = q @ g.astype(np.float16).astype(np.float32).T
    sims[:, ~allowed] = -np.inf
    np.testing.assert_array_equal(i, np.argsort(-sims, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(s, np.take_along_axis(sims, i, 1), rtol=1e-6)
    s, i = retrieval.exact_search(q, g.astype(np.float16), 5, np.arange(500) < 3)  # fewer allowed than k
    assert (i[:, 3:] == -1).all() and np.isinf(s[:, 3:]).all() and (i[:, :3] >= 0).all()


def test_faiss_flat_agrees_with_exact_search_and_ivf_recalls_most(monkeypatch, tmp_path):
    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(retrieval, "CHUNK", 700)  # the flat index's rows are written in several chunks
    g, q = retrieval.normalise(unit(3000, 32)), unit(20, 32, seed=3)
    _, exact = retrieval.exact_search(q, g, 10)
    index = retrieval.build_faiss(g, "flat")
    faiss.write_index(index, str(tmp_path / "flat.index"))  # as a gallery stores it
    index = faiss.read_index(str(tmp_path / "flat.index"))
    assert index.ntotal == 3000
    _, flat = retrieval.faiss_search(index, q, 10)
    np.testing.assert_array_equal(flat, exact)
    _, ivf = retrieval.faiss_search(retrieval.build_faiss(g, "ivf", nlist=16), q, 10, nprobe=16)  # all lists
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ivf, exact, strict=True)]) >= 0.95


def test_median_resists_an_outlier_and_top1_takes_the_nearest():
    lat, lon = np.array([48.85, 48.86, 48.87, -33.9]), np.array([2.35, 2.34, 2.36, 151.2])
    scores = np.array([0.9, 0.8, 0.8, 0.7])
    m = retrieval.aggregate(lat, lon, scores, "median", 1.0)
    assert abs(m[0] - 48.86) < 0.02 and abs(m[1] - 2.35) < 0.02
    assert retrieval.aggregate(lat, lon, scores, "top1", 1.0) == (48.85, 2.35)
    assert abs(retrieval.aggregate(lat[:3], lon[:3], scores[:3], "mean", 1.0)[0] - 48.86) < 1e-3


def test_leaks_by_id_and_by_author_only_where_asked():
    items = pd.DataFrame({"id": ["a", "b", "c"], "author": ["x", None, "y"], "lat": 0.0, "lon": 0.0})
    leak = retrieval.leaks(items, {"b"}, {"y"}, by_author=True)
    assert leak["id"].tolist() == [False, True, False] and leak["author"].tolist() == [False, False, True]
    assert not retrieval.leaks(items, {"b"}, {"y"}, by_author=False)["author"].any()


# ------------------------------------------------------------------------------------------ a tiny world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, DataRoot]:
    tmp = tmp_path_factory.mktemp("retrieval")
    cfg, root = build_world(tmp, model={"seg_channels": 0, "head_hidden": 16}, train=TRAIN, embed={"batch_size": 16},
                            retrieval={"exclude_authors": False})
    for cmd in (["embed"], ["train"], ["index"]):
        r = geoloc(cfg, *cmd)
        assert r.exit_code == 0, r.output
    return cfg, DataRoot(root)


def test_index_records_what_made_it_and_holds_no_evaluation_photo(world):
    cfg, root = world
    record = json.loads((root.gallery("demo") / retrieval.RECORD).read_text())
    gallery = retrieval.load(root.gallery("demo"))
    assert record["count"] == len(gallery) > 100 and record["index"] == "exact" and record["dim"] == 32
    assert record["excluded"] == {"demo_val": {"by_id": 0, "by_author": 0}}
    assert np.allclose(np.linalg.norm(gallery.emb.astype(np.float32), axis=1), 1, atol=1e-2)
    val = pd.read_parquet(root.manifest("demo_val"))
    assert not set(gallery.items["id"]) & set(val["id"])
    r = geoloc(cfg, "index", "--set", "retrieval.exclude_authors=true")  # the demo's 37 authors took every photo
    assert r.exit_code == 1 and "shares an id or author" in r.output


def test_refined_positions_come_from_neighbours_in_the_top_cell(world):
    import dataclasses

    from geoloc_cli.data.store import read_checkpoint_meta
    from geoloc_cli.inference.geolocate import CellSet

    cfg, root = world
    conf = load_config(cfg)
    conf = dataclasses.replace(conf, retrieval=dataclasses.replace(conf.retrieval, k=1, aggregation="top1"))
    cells = CellSet.from_meta(read_checkpoint_meta(root.model("demo"))["partitionings"])
    gallery = retrieval.load(root.gallery("demo"))
    cls = gallery.cell_groups(cells)[0]
    rows = np.flatnonzero(cls >= 0)[:6]
    queries, top = gallery.emb[rows].astype(np.float32), cls[rows][:, None]
    lat, lon, used = retrieval.refine(gallery, cells, queries, top, conf)
    assert (used == 1).all()  # each photo's own position: it is its own nearest neighbour
    np.testing.assert_allclose(lat, gallery.items["lat"].to_numpy()[rows])
    allowed = np.ones(len(gallery), bool)
    allowed[rows] = False  # now the nearest other photo of the same cell (or the cell centre: none there)
    lat, lon, used = retrieval.refine(gallery, cells, queries, top, conf, allowed)
    glat, glon = gallery.items["lat"].to_numpy(), gallery.items["lon"].to_numpy()
    for q, row in enumerate(rows):
        others = {(glat[j], glon[j]) for j in np.flatnonzero((cls == cls[row]) & allowed)}
        assert (lat[q], lon[q]) in others if used[q] else not others


def test_evaluate_refine_knn_records_both_rows_and_the_leakage_check(world):
    cfg, root = world
    r = geoloc(cfg, "evaluate", "--refine", "knn", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])["demo_val"]
    assert {"hierarchical", retrieval.REFINED} <= set(out)
    setup = out["setup"]["refine"]
    assert setup["method"] == "knn" and setup["k"] == 20 and setup["aggregation"] == "median"
    assert setup["leakage_left_out"] == {"by_id": 0, "by_author": 0}
    saved = json.loads((root.run("demo") / "eval" / "demo_val" / "metrics.json").read_text())
    assert saved[retrieval.REFINED] == out[retrieval.REFINED]


def test_evaluating_on_the_gallery_itself_leaves_every_photo_out(world):
    """A gallery that holds the evaluated photos: the check finds all, none is searched, cell centres stay."""
    cfg, _ = world
    r = geoloc(cfg, "evaluate", "demo", "--refine", "knn", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])["demo"]
    setup = out["setup"]["refine"]
    assert setup["leakage_left_out"]["by_id"] == setup["gallery_photos"] == setup["without_neighbours"]
    assert out[retrieval.REFINED] == out["hierarchical"]


def test_predict_refine_knn_adds_the_refined_position(world):
    cfg, root = world
    photo = next((root.path / "meta").glob("demo_val_urls.csv")).read_text().splitlines()[0].split(",")[1]
    photo = photo.removeprefix("file://")
    r = geoloc(cfg, "predict", photo, "--refine", "knn", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("["):])[0]
    assert res["refined"]["method"] == "knn" and res["refined"]["neighbours"] >= 1
    assert -90 <= res["refined"]["lat"] <= 90
    rows = list(csv.DictReader(io.StringIO(geoloc(cfg, "predict", photo, "--refine", "knn", "--csv").stdout)))
    assert float(rows[0]["refined_lat"]) == pytest.approx(res["refined"]["lat"], abs=1e-6)
    assert float(rows[0]["refined_lon"]) == pytest.approx(res["refined"]["lon"], abs=1e-6)
    assert rows[1]["refined_lat"] == "", "only the rank-1 row carries it"
    r = geoloc(cfg, "predict", photo, "--refine", "knn", "--backend", "onnx")
    assert r.exit_code == 2 and "torch backend" in r.output


def test_a_gallery_of_another_backbone_is_refused(world, tmp_path):
    cfg, root = world
    record_path = root.gallery("demo") / retrieval.RECORD
    saved = record_path.read_text()
    try:
        record_path.write_text(json.dumps({**json.loads(saved), "embedder_fingerprint": "0" * 16}))
        r = geoloc(cfg, "evaluate", "--refine", "knn")
        assert r.exit_code == 2 and "another backbone" in r.output
    finally:
        record_path.write_text(saved)


def test_without_faiss_small_and_large_galleries_search_exactly(monkeypatch):
    from geoloc_cli.errors import ConfigError

    monkeypatch.setattr(retrieval, "faiss_module", lambda: None)
    assert retrieval.choose_index("auto", 10, 1000) == retrieval.choose_index("auto", 10**7, 1000) == "exact"
    with pytest.raises(ConfigError, match="needs FAISS"):
        retrieval.choose_index("ivf", 10, 1000)


def test_faiss_serves_whole_gallery_search_and_cells_are_searched_exactly(world, monkeypatch, tmp_path):
    """top_cells 0 through FAISS's flat index gives exact search's neighbours; inside the top cells the search
    is exact and leaves a FAISS index alone (a global approximate search filtered to one cell can miss it)."""
    pytest.importorskip("faiss")
    from geoloc_cli.data.store import read_checkpoint_meta
    from geoloc_cli.inference.geolocate import CellSet

    cfg, root = world
    in_cells, whole = load_config(cfg), load_config(cfg, ["retrieval.top_cells=0"])
    cells = CellSet.from_meta(read_checkpoint_meta(root.model("demo"))["partitionings"])
    gallery = retrieval.load(root.gallery("demo"))
    queries = retrieval.normalise(np.random.default_rng(0).standard_normal((8, gallery.emb.shape[1])), np.float32)
    top = np.tile(np.unique(gallery.cell_groups(cells)[0][gallery.cell_groups(cells)[0] >= 0])[:2], (8, 1))
    exact = {n: retrieval.refine(gallery, cells, queries, top, c) for n, c in (("cells", in_cells), ("whole", whole))}
    gallery.index = retrieval.build_faiss(gallery.emb, "flat")
    searches = []
    real = retrieval.faiss_search
    monkeypatch.setattr(retrieval, "faiss_search", lambda *a, **kw: searches.append(1) or real(*a, **kw))
    for a, b in zip(exact["cells"], retrieval.refine(gallery, cells, queries, top, in_cells), strict=True):
        np.testing.assert_array_equal(a, b)  # the same exact search
    assert not searches, "inside cells FAISS is not asked"
    # FAISS's float sums may order near-equal neighbours otherwise: scores alike, positions within ~100 m
    s_exact, _ = retrieval.exact_search(queries, gallery.emb, 20)
    s_faiss, _ = retrieval.neighbours(gallery, cells, queries, top, 20, 0, 1000)
    np.testing.assert_allclose(s_faiss, s_exact, atol=1e-5)
    for a, b in zip(exact["whole"], retrieval.refine(gallery, cells, queries, top, whole), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)
    assert len(searches) == 2, "FAISS served the whole-gallery searches"
    saved = tmp_path / "gallery"  # on disk, the index is read only for whole-gallery search
    retrieval.save(saved, gallery.emb, gallery.items, {**gallery.record, "index": "flat"}, gallery.index)
    assert retrieval.load(saved, with_index=False).index is None
    assert retrieval.load(saved).index.ntotal == len(gallery)
    assert retrieval.choose_index("auto", 10**7, 1000) == "exact", "cells are searched exactly at any size"
    assert retrieval.choose_index("auto", 10**7, 1000, top_cells=0) == "ivf"
    assert retrieval.choose_index("auto", 1000, 1000, top_cells=0) == "exact"


@pytest.mark.parametrize(("seg_channels", "fusion"), [(0, "late"), (3, "late"), (3, "gated"), (3, "exchange")])
def test_refine_queries_come_from_the_forward_that_classified_the_batch(seg_channels, fusion):
    """Watched, a forward keeps its RGB feature and that is the query: the branch runs once per batch, not
    twice. Exchange fusion keeps none (its branch runs block by block) and the batch is embedded anew, as
    evaluate does, without that embedding passing for the next batch's. The queries are the same numbers
    as a fresh embedding, batch after batch, crop stacks included."""
    import torch

    from geoloc_cli.inference.geolocate import crop_probabilities
    from geoloc_cli.model.network import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec("vit_tiny_patch16_224", 32, seg_channels, fusion, {"coarse": 5},
                     {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8})
    model = build_model(spec).eval()
    batches = [(torch.randint(0, 256, (b, 3, 3, 32, 32), dtype=torch.uint8),  # b photos, 3 crops each
                torch.randint(0, 150, (b, 3, 32, 32), dtype=torch.uint8)) for b in (2, 3)]
    fresh = [retrieval.embed_pixels(model, image, "cpu") for image, _ in batches]
    runs = []
    model.rgb.register_forward_hook(lambda *_: runs.append(1))
    refiner = retrieval.Refiner(cfg=None, gallery=None, folder=Path())
    with refiner.watching(model):
        for (image, seg), want in zip(batches, fresh, strict=True):
            runs.clear()
            crop_probabilities(model, image, seg, seg_channels, torch.device("cpu"), None)
            kept = refiner.kept_queries(crops=3)
            assert len(runs) == (0 if fusion == "exchange" else 1) and (kept is None) == (fusion == "exchange")
            got = retrieval.embed_pixels(model, image, "cpu") if kept is None else kept
            assert got.shape == want.shape and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
            np.testing.assert_allclose(got, want, atol=1e-5)