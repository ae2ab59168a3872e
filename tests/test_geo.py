"""geoloc_cli.geo.sphere against s2sphere, the reference S2 implementation the published work used."""

from __future__ import annotations

import math

import numpy as np
import pytest
import s2sphere as s2

from geoloc_cli.geo import sphere


def reference_cells(lat: np.ndarray, lon: np.ndarray) -> list[s2.CellId]:
    pairs = zip(lat.tolist(), lon.tolist(), strict=True)
    return [s2.CellId.from_lat_lng(s2.LatLng.from_degrees(a, b)) for a, b in pairs]


def reference_ids(lat: np.ndarray, lon: np.ndarray, level: int = 30) -> np.ndarray:
    return np.array([c.parent(level).id() for c in reference_cells(lat, lon)], dtype=np.uint64)


def random_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def special_points() -> tuple[np.ndarray, np.ndarray]:
    """Poles, the antimeridian, face edges and corners, and the floats right next to them."""
    corner = math.degrees(math.atan(1 / math.sqrt(2)))  # latitude of the cube corners
    lats = [90.0, -90.0, 0.0, 45.0, -45.0, corner, -corner, 89.999999, -89.999999, 60.0, -30.0]
    lons = [180.0, -180.0, 0.0, 45.0, -45.0, 90.0, -90.0, 135.0, -135.0, 179.999999, -179.999999, 1e-12]
    lat, lon = np.meshgrid(lats, lons)
    lat, lon = lat.ravel(), lon.ravel()
    nudged_lat = np.concatenate([lat, np.nextafter(lat, 0), np.nextafter(lat, 100), lat, lat])
    nudged_lon = np.concatenate([lon, lon, lon, np.nextafter(lon, 0), np.nextafter(lon, 200)])
    ok = np.abs(nudged_lat) <= 90
    return nudged_lat[ok], np.clip(nudged_lon[ok], -180, 180)


def cell_edge_points(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Corners of random cells at every level: points on cell (and often face) edges."""
    lat, lon = random_points(124, seed)
    out_lat, out_lon = [], []
    for k, (a, b) in enumerate(zip(lat.tolist(), lon.tolist(), strict=True)):
        cell = s2.Cell(s2.CellId.from_lat_lng(s2.LatLng.from_degrees(a, b)).parent(k % 31))
        for v in range(4):
            ll = s2.LatLng.from_point(cell.get_vertex(v))
            out_lat.append(ll.lat().degrees)
            out_lon.append(ll.lng().degrees)
    return np.array(out_lat), np.array(out_lon)


@pytest.mark.parametrize("points", ["random", "special", "edges"])
def test_cell_ids_match_s2sphere_at_every_level(points: str) -> None:
    lat, lon = {"random": lambda: random_points(1500, 0), "special": special_points,
                "edges": lambda: cell_edge_points(1)}[points]()
    leaf_ref = reference_cells(lat, lon)
    leaf = sphere.cell_ids(lat, lon)
    for level in range(31):
        expected = np.array([c.parent(level).id() for c in leaf_ref], dtype=np.uint64)
        np.testing.assert_array_equal(sphere.cell_ids(lat, lon, level), expected, err_msg=f"level {level}")
        np.testing.assert_array_equal(sphere.parent(leaf, level), expected, err_msg=f"parent {level}")
        assert (sphere.level_of(expected) == level).all()


def test_cell_ids_chunked_threads_and_math_fallback_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    lat, lon = random_points(70_000, 2)  # more than one chunk
    ids = sphere.cell_ids(lat, lon)
    np.testing.assert_array_equal(ids[:500], reference_ids(lat[:500], lon[:500]))
    monkeypatch.setattr(sphere, "_NUMPY_TRIG_OK", False)
    monkeypatch.setattr(sphere, "_THREADS", 1)
    np.testing.assert_array_equal(sphere.cell_ids(lat, lon), ids)


def test_cell_ids_reject_bad_arguments() -> None:
    with pytest.raises(ValueError):
        sphere.cell_ids(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError):
        sphere.cell_ids(np.zeros(2), np.zeros(2), level=31)
    assert sphere.cell_ids(np.zeros(0), np.zeros(0)).dtype == np.uint64


def test_tokens_round_trip_and_match_s2sphere() -> None:
    lat, lon = random_points(300, 3)
    ids = np.concatenate([sphere.cell_ids(lat, lon, level) for level in (0, 1, 2, 7, 15, 29, 30)])
    tokens = sphere.to_token(ids)
    assert tokens == [s2.CellId(int(i)).to_token() for i in ids.tolist()]
    np.testing.assert_array_equal(sphere.from_token(tokens), ids)
    assert sphere.to_token(np.array([0], dtype=np.uint64)) == ["X"]
    assert sphere.from_token(["X", "1", "0fd"]).tolist() == [0, 1 << 60, 0x0FD << 52]
    for bad in ["", "xyz", "12345678901234567", "1 2"]:
        with pytest.raises(ValueError):
            sphere.token_to_id(bad)


def test_is_valid_and_cell_range() -> None:
    lat, lon = random_points(200, 4)
    for level in (0, 5, 30):
        ids = sphere.cell_ids(lat, lon, level)
        assert sphere.is_valid(ids).all()
        lo, hi = sphere.cell_range(ids)
        for i, a, b in zip(ids.tolist()[:50], lo.tolist(), hi.tolist(), strict=False):
            cell = s2.CellId(i)
            assert (a, b) == (cell.range_min().id(), cell.range_max().id())
    assert not sphere.is_valid(np.array([0, 6 << 61, 2], dtype=np.uint64)).any()


def test_cell_vertices_match_s2sphere() -> None:
    lat, lon = random_points(60, 5)
    ids = np.array([sphere.cell_ids(lat[k : k + 1], lon[k : k + 1], k % 31)[0] for k in range(60)], dtype=np.uint64)
    vlat, vlon = sphere.cell_vertices(ids)
    for row, i in enumerate(ids.tolist()):
        cell = s2.Cell(s2.CellId(i))
        for k in range(4):
            ll = s2.LatLng.from_point(cell.get_vertex(k))
            assert vlat[row, k] == pytest.approx(ll.lat().degrees, abs=1e-9)
            if abs(ll.lat().degrees) < 89.9:
                assert (vlon[row, k] - ll.lng().degrees + 180) % 360 - 180 == pytest.approx(0, abs=1e-9)
    olat, olon = sphere.cell_outlines(ids[:10], points_per_edge=5)
    assert olat.shape == (10, 20)
    # Outline samples are on the cell boundary: nudged towards the cell's centre they fall inside it.
    clat, clon = np.repeat(vlat[:10].mean(1, keepdims=True), 20, 1), np.repeat(vlon[:10].mean(1, keepdims=True), 20, 1)
    levels = sphere.level_of(ids[:10])
    for row in range(10):
        if levels[row] < 3 or np.ptp(vlon[row]) > 180 or np.abs(vlat[row]).max() > 80:
            continue
        inner = sphere.cell_ids(olat[row] * 0.999 + clat[row] * 0.001, olon[row] * 0.999 + clon[row] * 0.001,
                                levels[row])
        assert (inner == ids[row]).all()


def test_haversine() -> None:
    assert sphere.haversine_km(48.8566, 2.3522, 51.5074, -0.1278) == pytest.approx(343.5, abs=0.5)
    assert sphere.haversine_km(0, 0, 0, 180) == pytest.approx(math.pi * 6371)
    assert sphere.haversine_km(90, 0, -90, 0) == pytest.approx(math.pi * 6371)
    assert sphere.haversine_km(10, 179.9, 10, -179.9) < 25
    lat, lon = random_points(5, 6)
    grid = sphere.haversine_km(lat[:, None], lon[:, None], lat[None, :3], lon[None, :3])
    assert grid.shape == (5, 3)
    np.testing.assert_allclose(np.diag(grid[:3]), 0, atol=1e-9)
    np.testing.assert_allclose(grid[:3], grid[:3].T, rtol=1e-12)



def test_hilbert_table_matches_s2_from_face_ij() -> None:
    """The 6-bit table path against s2sphere's own CellId.from_face_ij on random and extreme (i, j)."""
    rng = np.random.default_rng(7)
    face = np.concatenate([rng.integers(0, 6, 3000), np.arange(6).repeat(4)])
    edge = np.array([0, sphere.MAX_SIZE - 1])
    i = np.concatenate([rng.integers(0, sphere.MAX_SIZE, 3000), np.tile(edge.repeat(2), 6)])
    j = np.concatenate([rng.integers(0, sphere.MAX_SIZE, 3000), np.tile(np.tile(edge, 2), 6)])
    expected = [s2.CellId.from_face_ij(f, a, b).id() for f, a, b in zip(face.tolist(), i.tolist(), j.tolist(),
                                                                       strict=True)]
    np.testing.assert_array_equal(sphere._face_ij_to_id(face, i, j), np.array(expected, dtype=np.uint64))
    back_face, back_i, back_j = sphere._id_to_face_ij(np.array(expected, dtype=np.uint64))
    np.testing.assert_array_equal(back_face, face)
    np.testing.assert_array_equal(back_i, i)
    np.testing.assert_array_equal(back_j, j)
