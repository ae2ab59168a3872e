"""Partitioning core and the `geoloc partition` stage, checked against the published files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import s2sphere as s2
from typer.testing import CliRunner

from geoloc_cli import geo
from geoloc_cli import partitioning as part
from geoloc_cli.cli import app
from geoloc_cli.errors import InputError

DATA = Path(__file__).parent / "data"
PUBLISHED = {"coarse": "cells_50_5000.csv", "middle": "cells_50_2000.csv", "fine": "cells_50_1000.csv"}
PUBLISHED_COUNTS = {"coarse": 3298, "middle": 7202, "fine": 12893}


def naive_partitioning(lat, lon, tau_min, tau_max, lvl_min=2, lvl_max=30) -> list[tuple]:
    """Straight from the description (and create_cells.py): s2sphere, dicts, one image at a time."""
    images = []
    for a, b in zip(lat.tolist(), lon.tolist(), strict=True):
        leaf = s2.CellId.from_lat_lng(s2.LatLng.from_degrees(a, b))
        images.append([a, b, leaf.parent(lvl_min).to_token(), leaf])
    counts = dict(Counter(img[2] for img in images))
    images = [img for img in images if counts[img[2]] > tau_min]
    counts = {k: v for k, v in counts.items() if v > tau_min}
    level = lvl_min
    while any(v > tau_max for v in counts.values()) and level < lvl_max:
        level += 1
        new: dict[str, int] = {}
        for img in images:
            if counts[img[2]] > tau_max:
                img[2] = img[3].parent(level).to_token()
            new[img[2]] = new.get(img[2], 0) + 1
        counts = new
    images = [img for img in images if counts[img[2]] > tau_min]
    counts = {k: v for k, v in counts.items() if v > tau_min}
    sums = {k: [0.0, 0.0] for k in counts}
    for a, b, token, _ in images:
        sums[token][0] += a
        sums[token][1] += b
    return [(i, k, v, sums[k][0] / v, sums[k][1] / v) for i, (k, v) in enumerate(counts.items())]


def clustered_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed clusters, a few exact-duplicate hot spots (which split down to level 30)."""
    rng = np.random.default_rng(seed)
    centres = np.column_stack([rng.uniform(-60, 70, 40), rng.uniform(-180, 180, 40)])
    weight = rng.pareto(1.0, 40) + 0.05
    which = rng.choice(40, n, p=weight / weight.sum())
    spread = rng.choice([1e-4, 0.02, 1.0, 8.0], n)
    lat = np.clip(centres[which, 0] + rng.normal(0, 1, n) * spread, -90, 90)
    lon = (centres[which, 1] + rng.normal(0, 1, n) * spread + 180) % 360 - 180
    lat[:300], lon[:300] = 48.8584, 2.2945  # one photo spot, exact duplicates
    lat[300:340], lon[300:340] = 89.9, 179.99
    return lat, lon


@pytest.fixture(scope="module")
def published() -> dict[str, pd.DataFrame]:
    return {name: part.read_cells(DATA / file) for name, file in PUBLISHED.items()}


@pytest.fixture(scope="module")
def yfcc() -> part.Points:
    return part.read_points(DATA / "yfcc25600_places365.csv")


@pytest.mark.parametrize(
    ("tau_min", "tau_max", "lvl_min", "lvl_max"),
    [(5, 100, 2, 30), (10, 40, 2, 30), (0, 1000, 2, 30), (3, 60, 4, 9), (20, 150, 0, 30)],
)
def test_build_matches_naive_reference(tau_min: int, tau_max: int, lvl_min: int, lvl_max: int) -> None:
    lat, lon = clustered_points(8000, seed=tau_max)
    cells = part.build_partitioning(lat, lon, tau_min, tau_max, lvl_min, lvl_max)
    assert list(cells.columns) == part.CELL_COLUMNS
    assert list(cells.itertuples(index=False, name=None)) == naive_partitioning(
        lat, lon, tau_min, tau_max, lvl_min, lvl_max
    )


def test_split_reaches_level_30_and_labels_equal_assignment() -> None:
    lat, lon = clustered_points(6000, seed=7)
    built = part.build_partitionings(lat, lon, {"a": (5, 100), "b": (5, 50)})
    for p in built.values():
        levels = geo.level_of(part.table_cell_ids(p.cells))
        assert levels.max() == 30  # the 300 duplicates cannot be split
        assert (p.cells["imgs_per_cell"] > 5).all()
        assert (p.labels >= 0).sum() == p.cells["imgs_per_cell"].sum()
        np.testing.assert_array_equal(part.assign_classes(lat, lon, p.cells), p.labels)
        assert p.labels[0] == 0  # classes are numbered by first appearance in the input


def test_empty_and_all_dropped() -> None:
    cells = part.build_partitioning(np.array([10.0, 20.0]), np.array([5.0, 6.0]), 50, 100)
    assert len(cells) == 0 and list(cells.columns) == part.CELL_COLUMNS


def test_published_tables_read_with_and_without_preamble(published, tmp_path: Path) -> None:
    for name, cells in published.items():
        assert len(cells) == PUBLISHED_COUNTS[name]
        assert cells.attrs["num_images"] == 4723695
        assert cells["class_label"].tolist() == list(range(len(cells)))
        assert all(isinstance(h, str) for h in cells["hex_id"])
    raw = (DATA / PUBLISHED["coarse"]).read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n")  # the published files are CRLF
    bare = tmp_path / "bare.csv"  # no preamble, LF line ends
    bare.write_bytes(b"\n".join(raw.split(b"\r\n")[2:]))
    again = part.read_cells(bare)
    pd.testing.assert_frame_equal(again, published["coarse"])
    assert again.attrs["num_images"] is None
    assert "0fd" not in set(again["hex_id"]) or isinstance(again["hex_id"][0], str)


def test_write_cells_reproduces_published_bytes(published, tmp_path: Path) -> None:
    for name, file in PUBLISHED.items():
        out = tmp_path / file
        part.write_cells(published[name], out, 4723695)
        assert out.read_bytes() == (DATA / file).read_bytes()


def test_yfcc25600_gets_classes_and_parents_are_consistent(published, yfcc) -> None:
    labels = {name: part.assign_classes(yfcc.lat, yfcc.lon, cells) for name, cells in published.items()}
    for name, lab in labels.items():
        assert (lab >= 0).all(), name
        assert lab.max() < PUBLISHED_COUNTS[name]
    hierarchy = part.build_hierarchy(published)
    assert all((h >= 0).all() for h in hierarchy.values())
    np.testing.assert_array_equal(hierarchy["fine"], np.arange(PUBLISHED_COUNTS["fine"]))
    for name in ("coarse", "middle"):
        np.testing.assert_array_equal(hierarchy[name][labels["fine"]], labels[name])


def test_assignment_agrees_with_published_code_and_finds_level_30(published, yfcc) -> None:
    fine = published["fine"]
    mapping = dict(zip(fine["hex_id"], fine["class_label"], strict=True))

    def published_assign(lat: float, lon: float) -> int:  # partitioning/assign_classes.py
        cell = s2.CellId.from_lat_lng(s2.LatLng.from_degrees(lat, lon))
        for level in range(2, 30):
            token = cell.parent(level).to_token()
            if token in mapping:
                return int(mapping[token])
        return -1

    expected = [published_assign(a, b) for a, b in zip(yfcc.lat[:1500].tolist(), yfcc.lon[:1500].tolist(), strict=True)]
    np.testing.assert_array_equal(part.assign_classes(yfcc.lat[:1500], yfcc.lon[:1500], fine), expected)

    ids = part.table_cell_ids(fine)
    leaf_rows = np.flatnonzero(geo.level_of(ids) == 30)
    assert len(leaf_rows) == 3
    lat, lon = fine["latitude_mean"].to_numpy()[leaf_rows], fine["longitude_mean"].to_numpy()[leaf_rows]
    inside = geo.cell_ids(lat, lon) == ids[leaf_rows]
    assert inside.all()  # the mean of a leaf cell's images is in the leaf cell
    np.testing.assert_array_equal(part.assign_classes(lat, lon, fine), leaf_rows)
    assert [published_assign(a, b) for a, b in zip(lat.tolist(), lon.tolist(), strict=True)] == [-1, -1, -1]


def test_nested_tables_pick_the_coarsest_cell() -> None:
    lat, lon = np.array([48.85, 40.0]), np.array([2.29, -3.0])
    tokens = geo.to_token(np.concatenate([geo.cell_ids(lat[:1], lon[:1], 12), geo.cell_ids(lat[:1], lon[:1], 5)]))
    cells = pd.DataFrame({"class_label": [0, 1], "hex_id": tokens, "imgs_per_cell": [60, 70],
                          "latitude_mean": [48.8, 48.0], "longitude_mean": [2.2, 2.0]})
    assert part.assign_classes(lat, lon, cells).tolist() == [1, -1]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("0,zz,60,1.0,2.0", "line 4, column hex_id"),
        ("0,8744,sixty,1.0,2.0", "line 4, column imgs_per_cell"),
        ("0,8744,60,100.0,2.0", "line 4, column latitude_mean"),
        ("5,8744,60,1.0,2.0", "line 4, column class_label"),
    ],
)
def test_bad_cell_tables_are_clear_errors(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "cells.csv"
    path.write_text("num_images: 10\nmin_concept_probability: ---\n" + ",".join(part.CELL_COLUMNS) + "\n" + row + "\n")
    with pytest.raises(InputError, match=message):
        part.read_cells(path)
    path.write_text(",".join(part.CELL_COLUMNS[:-1]) + "\n0,8744,60,1.0\n")
    with pytest.raises(InputError, match="missing column"):
        part.read_cells(path)
    path.write_text(",".join(part.CELL_COLUMNS) + "\n0,8744,60,1,2\n1,8744,60,1,2\n")
    with pytest.raises(InputError, match="line 3, column hex_id.*twice"):
        part.read_cells(path)
    with pytest.raises(InputError, match="not found"):
        part.read_cells(tmp_path / "nope.csv")


def test_export_mapping_format(tmp_path: Path) -> None:
    labels = {"coarse": np.array([0, 1, -1]), "middle": np.array([2, 3, 4]), "fine": np.array([5, 6, 7])}
    n = part.export_mapping(np.array(["a/1.jpg", "b/2.jpg", "c/3.jpg"], dtype=object), labels, tmp_path / "m.json")
    assert n == 2
    assert json.loads((tmp_path / "m.json").read_text()) == {"a/1.jpg": [0, 2, 5], "b/2.jpg": [1, 3, 6]}


def _invoke(*args: str):
    return CliRunner().invoke(app, ["partition", *args])


def test_cli_custom_partitioning(tmp_path: Path, yfcc) -> None:
    out = tmp_path / "cells"
    result = _invoke("--input", str(DATA / "yfcc25600_places365.csv"), "--tau-min", "5", "--tau-max", "100",
                     "--output", str(out), "--map", str(tmp_path / "map.html"), "--root", str(tmp_path / "root"))
    assert result.exit_code == 0, result.output
    cells = part.read_cells(out / "cells_5_100.csv")
    expected = part.build_partitioning(yfcc.lat, yfcc.lon, 5, 100)
    pd.testing.assert_frame_equal(cells, expected, check_dtype=False)
    assert cells.attrs["num_images"] == 25600
    info = json.loads((out / "partitions.json").read_text())
    assert info["custom"]["file"] == "cells_5_100.csv" and info["custom"]["num_cells"] == len(cells)
    labels = pd.read_parquet(out / "labels.parquet")
    assert labels["id"].tolist() == yfcc.img_id.tolist()
    np.testing.assert_array_equal(labels["custom"], part.assign_classes(yfcc.lat, yfcc.lon, cells))
    assert not (out / "hierarchy.json").exists()
    assert list(part.load_partitions(out)) == ["custom"]
    page = (tmp_path / "map.html").read_text()
    assert page.count("<path") >= len(cells) and "<svg" in page


def test_cli_use_published(tmp_path: Path, published, yfcc) -> None:
    root = tmp_path / "root"
    result = _invoke("--input", str(DATA / "yfcc25600_places365.csv"), "--use-published", str(DATA),
                     "--export-mapping", str(tmp_path / "labels.json"), "--root", str(root),
                     "--map", str(tmp_path / "map.png"))
    assert result.exit_code == 0, result.output
    tables = part.load_partitions(root)  # found through <root>/partitions/mp16/partitions.json
    assert list(tables) == ["coarse", "middle", "fine"]
    for name, cells in tables.items():
        pd.testing.assert_frame_equal(cells, published[name])
    out = root / "partitions" / "mp16"
    assert (out / "cells_50_1000.csv").read_bytes() == (DATA / "cells_50_1000.csv").read_bytes()
    labels = pd.read_parquet(out / "labels.parquet")
    assert (labels[["coarse", "middle", "fine"]] >= 0).all().all()
    mapping = json.loads((tmp_path / "labels.json").read_text())
    assert len(mapping) == 25600
    first = yfcc.img_id[0]
    assert mapping[first] == [int(labels[name][0]) for name in ("coarse", "middle", "fine")]
    hierarchy = part.load_hierarchy(root)
    np.testing.assert_array_equal(hierarchy["middle"][labels["fine"]], labels["middle"])
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_partitioning_rebuilt_keeps_the_others(tmp_path: Path, yfcc) -> None:
    root, meta = tmp_path / "root", str(DATA / "yfcc25600_places365.csv")
    assert _invoke("--input", meta, "--use-published", str(DATA), "--root", str(root)).exit_code == 0
    out = root / "partitions" / "mp16"
    before = pd.read_parquet(out / "labels.parquet")
    result = _invoke("--cells", "fine", "--input", meta, "--root", str(root), "--set", "partition.tau_max.fine=500")
    assert result.exit_code == 0, result.output
    info = json.loads((out / "partitions.json").read_text())
    assert list(info) == ["coarse", "middle", "fine"] and info["fine"]["tau_max"] == 500
    labels = pd.read_parquet(out / "labels.parquet")
    pd.testing.assert_frame_equal(labels[["id", "coarse", "middle"]], before[["id", "coarse", "middle"]])
    fine = part.read_cells(out / info["fine"]["file"])
    assert info["fine"]["file"].endswith("_500.csv") and info["fine"]["num_cells"] == len(fine)
    np.testing.assert_array_equal(labels["fine"], part.assign_classes(yfcc.lat, yfcc.lon, fine))
    assert set(part.load_hierarchy(root)) >= {"coarse", "middle"}  # rebuilt over all three
    # A custom partitioning with middle's tau range writes middle's cells file: middle cannot be kept.
    result = _invoke("--tau-max", "2000", "--input", meta, "--root", str(root))
    assert result.exit_code == 0 and "replacing middle" in result.output
    info = json.loads((out / "partitions.json").read_text())
    assert "middle" not in info and info["custom"]["num_cells"] == len(part.read_cells(out / info["custom"]["file"]))
    other = tmp_path / "other.csv"  # other images: the earlier partitionings cannot be kept
    pd.read_csv(meta).head(500).to_csv(other, index=False)
    result = _invoke("--cells", "fine", "--input", str(other), "--root", str(root))
    assert result.exit_code == 0 and "replacing" in result.output
    assert list(json.loads((out / "partitions.json").read_text())) == ["fine"]


def test_cli_bad_input_writes_nothing(tmp_path: Path) -> None:
    meta = tmp_path / "meta.csv"
    meta.write_text("IMG_ID,LAT,LON\na,1,2\nb,1,x\n")
    out = tmp_path / "out"
    result = _invoke("--input", str(meta), "--tau-max", "100", "--output", str(out))
    assert result.exit_code == 1
    assert "line 3, column LON" in result.output.replace("\n", "")
    assert not out.exists()
    result = _invoke("--input", str(meta), "--cells", "tiny", "--output", str(out))
    assert result.exit_code == 2 and not out.exists()
    result = _invoke("--root", str(tmp_path / "empty"))
    assert result.exit_code == 1 and "mp16_places365.csv" in result.output.replace("\n", "")


def test_tau_min_is_checked_against_what_this_run_builds(tmp_path: Path) -> None:
    meta = tmp_path / "m.csv"
    meta.write_text("IMG_ID,LAT,LON\n" + "".join(f"i{k},{k % 50},{k % 70}\n" for k in range(300)))
    root = ["--root", str(tmp_path / "root")]
    # a custom partitioning: the configured fine tau_max (1000) does not matter
    out = ["--output", str(tmp_path / "c")]
    result = _invoke("--input", str(meta), "--tau-min", "1000", "--tau-max", "5000", *out, *root)
    assert result.exit_code == 0, result.output
    result = _invoke("--input", str(meta), "--cells", "fine", "--tau-min", "2000", *root)
    assert result.exit_code == 2 and "must be greater than tau_min (2000)" in result.output


def test_missing_partitions_name_only_real_places(tmp_path: Path) -> None:
    from geoloc_cli.errors import InputError
    from geoloc_cli.store import DataRoot

    with pytest.raises(InputError) as e:
        part.load_partitions(DataRoot(tmp_path).partitions("mp16"))
    assert str(e.value).count("partitions/mp16") == 1, str(e.value)
    with pytest.raises(InputError, match=f"in {tmp_path} or {tmp_path}/partitions/mp16"):
        part.load_partitions(tmp_path)  # a data root: both places are tried
