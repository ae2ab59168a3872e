"""maps and credible radii: the packaged basemap, S2 cells across the antimeridian, the close-up of the
most likely region, the pages' structure, and a headless-browser screenshot where Chromium is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geoloc_cli import geo, maps
from geoloc_cli.inference import cell_radius_km, credible_radii_km

KM_PER_DEG = 6371.0 * np.pi / 180  # along the equator


def test_credible_radii_hand_computed():
    # cells on the equator at 0, 1 and 3 degrees east of the predicted point, holding 40%, 30%, 30%
    lat, lon, p = np.zeros(3), np.array([0.0, 1.0, 3.0]), np.array([0.4, 0.3, 0.3])
    r50, r90 = credible_radii_km(p, lat, lon, (0.0, 0.0))
    assert r50 == pytest.approx(KM_PER_DEG, rel=1e-6), "0.4 at 0 km is not half; 0.4 + 0.3 at 111 km is"
    assert r90 == pytest.approx(3 * KM_PER_DEG, rel=1e-6)
    # unnormalised and unordered input; an exact 50% boundary counts as reached
    r50, r90 = credible_radii_km(np.array([3.0, 5.0, 2.0]), lat, np.array([3.0, 0.0, 1.0]), (0.0, 0.0))
    assert r50 == 0.0 and r90 == pytest.approx(3 * KM_PER_DEG, rel=1e-6)
    # the floor: the top cell alone holds 90%, but the answer cannot be finer than that cell
    assert credible_radii_km(np.array([0.95, 0.05]), lat[:2], lon[:2], (0.0, 0.0), (0.9,), floor_km=12.0) == [12.0]
    # across the antimeridian: 179.5 E and 179.5 W are one degree apart
    r = credible_radii_km(np.array([0.5, 0.5]), np.zeros(2), np.array([179.5, -179.5]), (0.0, 179.5), (0.9,))
    assert r[0] == pytest.approx(KM_PER_DEG, rel=1e-6)


def test_cell_radius_follows_the_s2_level():
    token = geo.to_token(geo.cell_ids(np.array([48.86]), np.array([2.35]), 10))[0]
    assert 3 < cell_radius_km(token) < 10  # a level-10 cell is ~8 km across
    assert cell_radius_km("not-a-token") == 0.0


def test_packaged_basemap_is_small_and_whole():
    path = Path(maps.__file__).parent / "resources" / maps.BASEMAP
    assert path.stat().st_size < 150_000
    land, borders = maps.basemap()
    assert len(land) > 100 and len(borders) > 300
    for ring in land:
        jumps = np.abs(np.diff(ring[:, 0])) > 180
        assert (np.abs(ring[1:, 1][jumps]) == 90).all(), "no ring jumps across the map but along a pole's edge"
    # the map's extreme points: Antarctica closed through the south pole, Chukotka past 180 E, and copied
    assert min(r[:, 1].min() for r in land) == -90 and max(r[:, 1].max() for r in land) > 83
    assert max(r[:, 0].max() for r in land) > 180 and min(r[:, 0].min() for r in land) < -180


def test_cells_at_the_antimeridian():
    # S2 face 3 is centred on 180 degrees: its level-0 cell (135 E to 135 W) is drawn on both sides
    face3 = geo.cell_ids(np.array([-17.0]), np.array([180.0]), 0)
    polys, owner = maps.cell_polygons(face3)
    assert owner.tolist() == [0, 0]
    assert all(np.ptp(poly[:, 0]) < 100 for poly in polys), "not smeared across the whole map"
    assert sorted(round(poly[:, 0].mean() / 180) for poly in polys) == [-1, 1]
    assert len(maps.cell_polygons(face3, copies=False)[0]) == 1
    # finer cells only touch 180 degrees (an S2 edge): drawn once, small, on their own side
    ids = geo.cell_ids(np.array([-17.0, -17.0, 66.0]), np.array([179.99, -179.99, -179.99]), 8)
    polys, owner = maps.cell_polygons(ids)
    assert owner.tolist() == [0, 1, 2] and all(np.ptp(poly[:, 0]) < 1 for poly in polys)
    assert polys[0][:, 0].min() > 179 and polys[1][:, 0].max() < -179


def _prediction(lat: list[float], lon: list[float], p: list[float], level: int = 9) -> maps.Prediction:
    tokens = geo.to_token(geo.cell_ids(np.array(lat), np.array(lon), level))
    top = [maps.Point(a, o, f"#{k + 1}", str(k + 1)) for k, (a, o) in enumerate(zip(lat[:3], lon[:3], strict=True))]
    return maps.Prediction("photo.jpg", tokens, np.array(p), top, maps.Point(lat[0] + 0.1, lon[0] + 0.1, "refined"),
                           maps.Point(lat[0] - 0.2, lon[0], "truth"), (20.0, 60.0))


def _views(page: str) -> list[tuple[float, ...]]:
    return [tuple(map(float, v.split(","))) for v in re.findall(r"data-view='([^']+)'", page)]


def test_close_up_zooms_on_the_likely_region():
    # 92% of the probability around Lyon, a far second mode in Sydney: the close-up shows Lyon only
    lat, lon = [45.76, 45.9, 45.6, -33.87], [4.84, 5.1, 4.6, 151.2]
    page = maps.prediction_page([_prediction(lat, lon, [0.6, 0.2, 0.12, 0.08])])
    world, zoom = _views(page)
    assert world == (-180, -90, 180, 90)
    west, south, east, north = zoom
    assert east - west < 20 and north - south < 10, "zoomed in, not the world again"
    assert west < 4.6 and east > 5.1 and south < 45.6 and north > 45.9, "the likely cells are inside"
    assert "showing 92% of the probability" in page
    for cls in ("heat", "pred", "refined", "truth", "radius", "land", "borders", "coast"):
        assert f"class='{cls}'" in page, cls
    assert page.count("<use href='#ne-land'") >= 4, "land under and coastlines over both maps"


def test_close_up_across_the_antimeridian():
    lat, lon = [-17.5, -16.8, -17.2], [179.6, -179.7, 179.9]
    page = maps.prediction_page([_prediction(lat, lon, [0.5, 0.3, 0.2])])
    west, _, east, _ = _views(page)[1]
    assert east - west < 20 and west < 179.6 and east > 180.3, "one small view astride 180, not the whole world"
    assert "translate(360,0)" in page or "translate(-360,0)" in page, "the world drawn again past the edge"


def test_error_page_and_png(tmp_path):
    lat, lon = np.array([48.86, -33.87, 35.68]), np.array([2.35, 151.21, 139.69])
    plat, plon = lat + [0.1, 5.0, 30.0], lon + [0.1, -5.0, 30.0]
    err = geo.haversine_km(lat, lon, plat, plon)
    page = maps.error_page(lat, lon, plat, plon, err, [1, 25, 200, 750, 2500], "test", ["a", "b", "c"])
    assert page.count("class='dot'") == 3 and re.search(r"a: \d+ km", page)
    assert maps.error_bins(np.array([0.5, 1.0, 30, 3000]), [1, 25, 200, 750, 2500]).tolist() == [0, 0, 2, 5]
    maps.error_png(tmp_path / "e.png", lat, lon, plat, plon, err, [1, 25, 200, 750, 2500], "test")
    assert Image.open(tmp_path / "e.png").size[0] > 600


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (apt-get install chromium)")
def test_prediction_page_renders_in_a_browser(tmp_path):
    """A real browser draws the page: land, ocean and the heat layer's colours are on the screenshot."""
    lat, lon = [45.76, 45.9, 45.6, -33.87], [4.84, 5.1, 4.6, 151.2]
    (tmp_path / "p.html").write_text(maps.prediction_page([_prediction(lat, lon, [0.6, 0.2, 0.12, 0.08])]))
    shot = tmp_path / "p.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,800",
                    (tmp_path / "p.html").as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in pixels[:: 7]}

    def share(hex_colour: str) -> float:
        rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        return float((np.abs(pixels.astype(int) - rgb).sum(1) <= 6).mean())

    assert share(maps.LAND) > 0.05 and share(maps.OCEAN) > 0.05, "land and sea are drawn"
    heat = {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in maps.heat_colours(np.array([1.0]))}
    assert len(colours) > 50 and any(np.abs(np.array(sorted(colours)) - np.array(h)).sum(1).min() < 60 for h in heat)


def test_leaflet_page_carries_the_same_layers():
    lat, lon = [45.76, 45.9, 45.6, -33.87], [4.84, 5.1, 4.6, 151.2]
    page = maps.leaflet_page([_prediction(lat, lon, [0.6, 0.2, 0.12, 0.08]), ("bad.jpg", "cannot read </script>")])
    data = json.loads(re.search(r"const DATA = (.*?); const TILES", page).group(1))
    assert len(data) == 1 and len(data[0]["cells"]) == 4 and data[0]["radii"] == [20.0, 60.0]
    (s, w), (n, e) = data[0]["bounds"]
    assert e - w < 20 and n - s < 10, "opens on the close-up"
    assert data[0]["refined"] and data[0]["truth"] and "tile.openstreetmap.org" in page
    assert page.count("</script>") == 2 and "cannot read &lt;/script&gt;" in page


def test_credible_cells():
    p = np.array([0.1, 0.5, 0.25, 0.15])
    assert maps.credible_cells(p, 0.5).tolist() == [1]
    assert maps.credible_cells(p, 0.9).tolist() == [1, 2, 3]
    # the likeliest cells only (0.6 of a whole distribution): 90% of 1 takes all of them
    assert maps.credible_cells(np.array([0.4, 0.2]), 0.9, total=1.0).tolist() == [0, 1]


def test_close_up_names_the_biggest_cities_inside():
    from geoloc_cli import gazetteer

    lat, lon = [45.76, 45.9, 45.6, -33.87], [4.84, 5.1, 4.6, 151.2]
    section = maps.prediction_section(_prediction(lat, lon, [0.6, 0.2, 0.12, 0.08]), gazetteer.load())
    names = re.findall(r"<text x='[^']+' y='[^']+'>([^<]+)</text>", section.split("class='cities'")[1])
    assert "Lyon" in names and "Sydney" not in names and len(names) <= 12
