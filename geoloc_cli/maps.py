"""World maps: the one home of map drawing for partition, predict and evaluate.

Everything is drawn in plate carree (x = longitude, y = latitude, both in degrees) over an offline
basemap: Natural Earth 1:110m land and country borders (public domain; packed from the npm package
world-atlas by benchmarks/natural_earth.py into resources/natural_earth_110m.json.gz). Pages are
self-contained SVG (nothing fetched, so they work offline and in a sandbox); PNGs use matplotlib.

Longitudes of a view may run past +-180 (a close-up across the antimeridian): the basemap is then drawn
again shifted by 360 degrees, and S2 cells are unwrapped so that none is smeared across the whole map.
"""

from __future__ import annotations

import gzip
import html
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

BASEMAP = "natural_earth_110m.json.gz"
ATTRIBUTION = "Coastlines and borders: Natural Earth 1:110m (public domain)."
OCEAN, LAND, BORDER, COAST = "#cfe0ee", "#f4f1e8", "#b3a99a", "#8c9aa6"
# probability heat ramp (light yellow -> dark red), interpolated in RGB
HEAT = np.array([[255, 237, 160], [254, 178, 76], [240, 59, 32], [189, 0, 38], [103, 0, 13]], dtype=float)
EARTH_KM = 6371.0


@dataclass(frozen=True)
class View:
    """A lon/lat rectangle in degrees (west may be < -180 and east > 180 around the antimeridian)."""

    west: float
    south: float
    east: float
    north: float

    @property
    def width(self) -> float:
        return self.east - self.west

    @property
    def height(self) -> float:
        return self.north - self.south

    def svg_box(self) -> str:
        return f"{self.west:.4f} {-self.north:.4f} {self.width:.4f} {self.height:.4f}"


WORLD = View(-180.0, -90.0, 180.0, 90.0)


# ------------------------------------------------------------------------------------------ data


@lru_cache(maxsize=1)
def basemap() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(land rings, border lines), each an (n, 2) array of lon/lat."""
    raw = resources.files("geoloc_cli").joinpath("resources", BASEMAP).read_bytes()
    data = json.loads(gzip.decompress(raw))

    def unpack(flat: list[int]) -> np.ndarray:
        return np.cumsum(np.asarray(flat, dtype=np.float64).reshape(-1, 2), axis=0) / data["scale"]

    land = [unpack(r) for r in data["land"]]
    # rings continuous across the antimeridian (Chukotka to 190 E) also drawn on the other side of the map
    land += [r + [-360.0 if r[:, 0].max() > 180 else 360.0, 0] for r in land
             if r[:, 0].max() > 180 or r[:, 0].min() < -180]
    return land, [unpack(b) for b in data["borders"]]


def wrap_near(lon: np.ndarray, centre: float) -> np.ndarray:
    """Longitudes moved by multiples of 360 to lie within 180 degrees of `centre`."""
    return centre + (np.asarray(lon, dtype=np.float64) - centre + 180.0) % 360.0 - 180.0


def cell_polygons(ids: np.ndarray, points_per_edge: int = 3,
                  copies: bool = True) -> tuple[list[np.ndarray], np.ndarray]:
    """S2 cell outlines as (k, 2) lon/lat arrays and the index of the cell each one draws.

    An outline is unwrapped (continuous across the antimeridian, its centre within +-180); with `copies`,
    a cell that sticks out past one edge of the world map is drawn again on the other side."""
    from geoloc_cli import geo

    lat, lon = geo.cell_outlines(np.asarray(ids, dtype=np.uint64), points_per_edge)
    lon = np.degrees(np.unwrap(np.radians(lon), axis=1))
    mid = lon.mean(axis=1)
    lon = lon + np.where(mid > 180, -360.0, np.where(mid < -180, 360.0, 0.0))[:, None]
    polys, owner = [], []
    for k in range(lon.shape[0]):
        outline = np.stack([lon[k], lat[k]], axis=1)
        polys.append(outline)
        owner.append(k)
        for offset in (-360.0, 360.0) if copies else ():
            if (lon[k] + offset).min() < 180 and (lon[k] + offset).max() > -180:
                polys.append(outline + [offset, 0.0])
                owner.append(k)
    return polys, np.asarray(owner, dtype=np.int64)


def token_polygons(tokens: list[str], points_per_edge: int = 3,
                   copies: bool = True) -> tuple[list[np.ndarray], np.ndarray]:
    """`cell_polygons` of S2 tokens; none (no outlines) when they are not S2 tokens (a hand-made checkpoint)."""
    from geoloc_cli import geo

    try:
        ids = geo.from_token(tokens)
    except ValueError:
        return [], np.zeros(0, dtype=np.int64)
    return cell_polygons(ids, points_per_edge, copies)


def credible_cells(p: np.ndarray, mass: float, total: float | None = None) -> np.ndarray:
    """Indices of the fewest cells (most likely first) whose probabilities add up to `mass` of `total`
    (default: their sum; all of them when they hold less)."""
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order]) / max(float(p.sum()) if total is None else total, 1e-30)
    return order[:int(np.searchsorted(cum, mass - 1e-9)) + 1]


def focus(lon: np.ndarray, lat: np.ndarray, centre_lon: float, min_span: float = 3.0, pad: float = 0.15,
          aspect: float = 2.0) -> View:
    """A view of width:height = `aspect` around the points (longitudes taken within 180 degrees of
    `centre_lon`), padded by `pad` of its size on each side, at least `min_span` degrees high."""
    x = wrap_near(lon, centre_lon)
    y = np.asarray(lat, dtype=np.float64)
    h = max(np.ptp(y), np.ptp(x) / aspect, min_span) * (1 + 2 * pad)
    h = min(h, 180.0)
    w = min(h * aspect, 360.0)
    cx, cy = (x.min() + x.max()) / 2, (y.min() + y.max()) / 2
    cy = min(max(cy, -90 + h / 2), 90 - h / 2)  # keep the poles at the edge, not inside the box
    return View(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def geodesic_circle(lat: float, lon: float, radius_km: float, n: int = 90) -> np.ndarray:
    """(n + 1, 2) lon/lat of the circle of `radius_km` around a point, longitudes continuous."""
    d = radius_km / EARTH_KM
    a = np.linspace(0, 2 * np.pi, n + 1)
    p1, l1 = np.radians(lat), np.radians(lon)
    p2 = np.arcsin(np.clip(np.sin(p1) * np.cos(d) + np.cos(p1) * np.sin(d) * np.cos(a), -1, 1))
    l2 = l1 + np.arctan2(np.sin(a) * np.sin(d) * np.cos(p1), np.cos(d) - np.sin(p1) * np.sin(p2))
    return np.stack([np.degrees(np.unwrap(l2)), np.degrees(p2)], axis=1)


def heat_colours(p: np.ndarray, floor: float = 1e-3) -> list[str]:
    """Colours of probabilities relative to the largest, on a log scale from `floor` (light) to 1 (dark)."""
    v = np.log10(np.clip(p / max(float(p.max()), 1e-30), floor, 1.0)) / -np.log10(floor)  # -1 .. 0
    t = (1 + v) * (len(HEAT) - 1)
    k = np.minimum(t.astype(int), len(HEAT) - 2)
    rgb = HEAT[k] + (HEAT[k + 1] - HEAT[k]) * (t - k)[:, None]
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb.round().astype(int)]


# ------------------------------------------------------------------------------------------ SVG


def path_d(points: np.ndarray, close: bool = True, digits: int = 3) -> str:
    """SVG path data of lon/lat points (y flipped: north up)."""
    f = f"{{:.{digits}f}},{{:.{digits}f}}"
    return "M" + "L".join(f.format(x, -y) for x, y in points) + ("Z" if close else "")


def svg_defs() -> str:
    """The basemap once per page (an invisible SVG); every map `<use>`s it by id, so a page of many
    maps stays small. Call once, before the maps."""
    land, borders = basemap()
    land_d = "".join(path_d(r, True, 2) for r in land)
    border_d = "".join(path_d(b, False, 2) for b in borders)
    return ("<svg width='0' height='0' style='position:absolute'><defs>"
            f"<path id='ne-land' d='{land_d}' vector-effect='non-scaling-stroke'/>"
            f"<path id='ne-borders' d='{border_d}' vector-effect='non-scaling-stroke'/></defs></svg>")


def _shifts(view: View) -> list[float]:
    """Copies of the world (0, -360, +360) that a view touches."""
    return [s for s in (0.0, -360.0, 360.0) if view.west < 180 + s and view.east > -180 + s]


def svg_map(view: View, layers: str, width: str = "100%", label: str = "") -> str:
    """One map: ocean, land, graticule, `layers` (SVG in lon/-lat units), then borders and coastlines on
    top. Strokes keep their width on screen whatever the zoom (vector-effect)."""
    shifted = "".join(f"<use href='#ne-land' transform='translate({s:g},0)'/>" for s in _shifts(view))
    borders = "".join(f"<use href='#ne-borders' transform='translate({s:g},0)'/>" for s in _shifts(view))
    step = _grid_step(view.height)
    xs = np.arange(np.floor(view.west / step) * step, view.east + step, step)
    ys = np.arange(np.floor(view.south / step) * step, view.north + step, step)
    grid = "".join(f"M{x:g},{-view.north:g}V{-view.south:g}" for x in xs)
    grid += "".join(f"M{view.west:g},{-y:g}H{view.east:g}" for y in ys if -90 <= y <= 90)
    ns = "vector-effect='non-scaling-stroke'"
    return (f"<svg xmlns='http://www.w3.org/2000/svg' class='map' data-view='{view.west:.3f},{view.south:.3f},"
            f"{view.east:.3f},{view.north:.3f}' viewBox='{view.svg_box()}' width='{width}' "
            f"preserveAspectRatio='xMidYMid meet' style='border:1px solid #999'>"
            f"<title>{html.escape(label)}</title>"
            f"<rect x='{view.west:.4f}' y='{-view.north:.4f}' width='{view.width:.4f}' height='{view.height:.4f}' "
            f"fill='{OCEAN}'/><g class='land' fill='{LAND}' stroke='none'>{shifted}</g>"
            f"<path class='graticule' d='{grid}' stroke='#fff' stroke-opacity='0.6' stroke-width='0.5' {ns} "
            f"fill='none'/>{layers}<g class='borders' fill='none' stroke='{BORDER}' stroke-width='0.6'>"
            f"{borders}</g><g class='coast' fill='none' stroke='{COAST}' stroke-width='0.8'>{shifted}</g>"
            "</svg>")


def _grid_step(height: float) -> float:
    return next(s for s in (0.5, 1, 2, 5, 10, 15, 30) if height / s <= 8) if height <= 240 else 30


def svg_cells(polys: list[np.ndarray], colours: list[str], tips: list[str], cls: str = "heat",
              opacity: float = 0.8, stroke: str = "#7f1010") -> str:
    """Filled cell polygons with a tooltip each."""
    out = [f"<path d='{path_d(p)}' fill='{c}'><title>{html.escape(t)}</title></path>"
           for p, c, t in zip(polys, colours, tips, strict=True)]
    return (f"<g class='{cls}' fill-opacity='{opacity}' stroke='{stroke}' stroke-opacity='0.3' stroke-width='0.4' "
            f"vector-effect='non-scaling-stroke'>{''.join(out)}</g>")


def svg_line(points: np.ndarray, colour: str, width: float = 1.2, dash: str = "", tip: str = "",
             cls: str = "line") -> str:
    dashes = f" stroke-dasharray='{dash}'" if dash else ""
    return (f"<path class='{cls}' d='{path_d(points, False)}' fill='none' stroke='{colour}' stroke-width='{width}'"
            f"{dashes} vector-effect='non-scaling-stroke'><title>{html.escape(tip)}</title></path>")


def svg_marker(lon: float, lat: float, kind: str, view: View, text: str = "", tip: str = "") -> str:
    """A marker whose size is a fixed share of the view: 'pred' (numbered circle), 'refined' (blue
    diamond), 'truth' (green cross), 'dot' (small circle; `text` is its colour)."""
    s = view.height / 60  # ~1/60 of the map's height
    x, y = lon, -lat
    tip_el = f"<title>{html.escape(tip)}</title>"
    if kind == "pred":
        return (f"<g class='pred'>{tip_el}<circle cx='{x:.4f}' cy='{y:.4f}' r='{1.5 * s:.4f}' fill='#fff' "
                f"stroke='#000' stroke-width='1' vector-effect='non-scaling-stroke'/><text x='{x:.4f}' "
                f"y='{y + 0.7 * s:.4f}' font-size='{2 * s:.4f}' text-anchor='middle'>{html.escape(text)}</text></g>")
    if kind == "refined":
        a = 1.6 * s
        return (f"<g class='refined'>{tip_el}<path d='M{x:.4f},{y - a:.4f}L{x + a:.4f},{y:.4f}L{x:.4f},{y + a:.4f}"
                f"L{x - a:.4f},{y:.4f}Z' fill='#1f77b4' stroke='#fff' stroke-width='1' "
                f"vector-effect='non-scaling-stroke'/></g>")
    if kind == "truth":
        a = 1.4 * s
        return (f"<g class='truth'>{tip_el}<path d='M{x - a:.4f},{y - a:.4f}L{x + a:.4f},{y + a:.4f}M{x - a:.4f},"
                f"{y + a:.4f}L{x + a:.4f},{y - a:.4f}' stroke='#1a7f1a' stroke-width='3' "
                f"vector-effect='non-scaling-stroke'/></g>")
    assert kind == "dot", kind
    return (f"<circle class='dot' cx='{x:.4f}' cy='{y:.4f}' r='{0.35 * s:.4f}' fill='{text}' stroke='#333' "
            f"stroke-width='0.3' vector-effect='non-scaling-stroke'>{tip_el}</circle>")


def page(title: str, intro: str, body: str, with_basemap: bool = True) -> str:
    """A self-contained HTML page (no scripts, nothing fetched)."""
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:1600px;margin:1em}}"
            "svg.map{background:#fff} svg.map *{vector-effect:non-scaling-stroke} .panels{display:flex;gap:1%} "
            ".legend span{padding:0 .6em}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{intro} {html.escape(ATTRIBUTION)}</p>"
            + (svg_defs() if with_basemap else "") + body + "</body></html>\n")


def heat_legend() -> str:
    stops = heat_colours(np.logspace(-3, 0, 12))
    return ("<span class='legend'>less likely " + "".join(f"<span style='background:{c}'></span>" for c in stops)
            + " more likely</span>")


# ------------------------------------------------------------------------------------------ matplotlib


def draw_basemap(ax: Any, view: View = WORLD) -> None:
    """Ocean and land under the plot's layers (zorder 0.5), coastlines and borders over them (zorder 3)
    so they stay visible through shaded cells; on a matplotlib axis in lon/lat, limited to `view`."""
    from matplotlib.collections import LineCollection, PolyCollection

    land, borders = basemap()
    for s in _shifts(view):
        rings = [r + [s, 0] for r in land]
        ax.add_collection(PolyCollection(rings, facecolors=LAND, edgecolors="none", zorder=0.5))
        ax.add_collection(LineCollection(rings, colors=COAST, linewidths=0.5, zorder=3))
        ax.add_collection(LineCollection([b + [s, 0] for b in borders], colors=BORDER, linewidths=0.4, zorder=3))
    ax.set_facecolor(OCEAN)
    ax.set_xlim(view.west, view.east)
    ax.set_ylim(view.south, view.north)
    ax.set_aspect("equal")


# ------------------------------------------------------------------------------------------ predict


@dataclass
class Point:
    lat: float
    lon: float
    tip: str = ""
    label: str = ""


@dataclass
class Prediction:
    """What one photo's maps show: its finest cells (S2 tokens) with their probabilities (most likely
    first), the top-k candidates, and optionally the refined point, the true place and the credible radii."""

    title: str
    tokens: list[str]
    p: np.ndarray
    top: list[Point]
    refined: Point | None = None
    truth: Point | None = None
    radii_km: tuple[float, float] | None = None  # 50%, 90%


def close_up(outlines: list[np.ndarray], p: np.ndarray, best: Point, extra: list[Point], mass: float = 0.9,
             reach_km: float = 1500.0, min_span: float = 3.0) -> tuple[View, float]:
    """The close-up of the most likely region and the probability it shows: the cells of the `mass`
    credible set within `reach_km` of the best candidate (a far-away second mode belongs to the world
    view, not here), the best candidate and the `extra` points (the refined one), padded. `p` may be the
    likeliest cells only: shares are of a whole distribution (1) unless they add up to more."""
    from geoloc_cli.geo import haversine_km

    total = max(float(p.sum()), 1.0)
    xs, ys, shown = [np.array([best.lon])], [np.array([best.lat])], 0.0
    for k in credible_cells(p, mass, total):
        outline = outlines[k]
        cy, cx = outline[:, 1].mean(), wrap_near(outline[:, 0], best.lon).mean()
        if haversine_km(best.lat, best.lon, cy, cx) <= reach_km:
            xs.append(wrap_near(outline[:, 0], best.lon))
            ys.append(outline[:, 1])
            shown += float(p[k])
    for q in extra:
        xs.append(np.array([q.lon]))
        ys.append(np.array([q.lat]))
    return focus(np.concatenate(xs), np.concatenate(ys), best.lon, min_span), shown / total


def city_labels(view: View, places: Any, n: int = 12) -> str:
    """The `n` most populous places (a gazetteer: name, lat, lon, population arrays) inside the view, none
    closer to a bigger one than 1/10 of the view's height, as dots with names: landmarks for the reader."""
    cx = (view.west + view.east) / 2
    lon = wrap_near(places.lon, cx)
    inside = np.flatnonzero((lon > view.west) & (lon < view.east) & (places.lat > view.south)
                            & (places.lat < view.north))
    chosen: list[int] = []
    gap = view.height / 10
    for i in inside[np.argsort(-places.population[inside], kind="stable")]:
        if all(np.hypot(lon[i] - lon[j], places.lat[i] - places.lat[j]) > gap for j in chosen):
            chosen.append(int(i))
        if len(chosen) == n:
            break
    f = view.height / 32
    out = [f"<circle cx='{lon[i]:.4f}' cy='{-places.lat[i]:.4f}' r='{f / 4:.4f}' fill='#444'/>"
           f"<text x='{lon[i] + f / 2:.4f}' y='{-places.lat[i] + f / 3:.4f}'>{html.escape(str(places.name[i]))}</text>"
           for i in chosen]
    return (f"<g class='cities' font-size='{f:.4f}' fill='#333' stroke='#fff' stroke-width='2.5' "
            f"paint-order='stroke' stroke-opacity='0.8'>{''.join(out)}</g>")


def _prediction_layers(pred: Prediction, polys: list[np.ndarray], owner: np.ndarray, view: View,
                       labels: str = "") -> str:
    """Cells, credible rings, the line to the true place, `labels`, then the markers on top."""
    colours = heat_colours(pred.p)
    tips = [f"{pred.tokens[k]}: {100 * pred.p[k]:.2f}%" for k in owner]
    cells = svg_cells(polys, [colours[k] for k in owner], tips, opacity=0.65)  # land and names show through
    best = pred.top[0]
    rings = ""
    if pred.radii_km is not None:
        for r, dash, name in zip(pred.radii_km, ("", "4 3"), ("50%", "90%"), strict=True):
            if r > 0:
                circle = geodesic_circle(best.lat, best.lon, r)
                circle[:, 0] = wrap_near(circle[:, 0], best.lon)
                rings += svg_line(circle, "#222", 1.3, dash, f"{name} credible radius: {r:,.0f} km", "radius")
    layers = cells + rings + labels
    marks = [svg_marker(q.lon, q.lat, "pred", view, q.label, q.tip) for q in reversed(pred.top)]
    if pred.refined is not None:
        marks.append(svg_marker(pred.refined.lon, pred.refined.lat, "refined", view, tip=pred.refined.tip))
    if pred.truth is not None:  # a dotted line from rank 1 to the true place, the short way round
        tx = float(wrap_near(pred.truth.lon, best.lon))
        layers += svg_line(np.array([[best.lon, best.lat], [tx, pred.truth.lat]]), "#1a7f1a", 1.2, "2 2",
                           pred.truth.tip, "error")
        marks.append(svg_marker(pred.truth.lon, pred.truth.lat, "truth", view, tip=pred.truth.tip))
    # the same drawing once more per copy of the world the view touches (close-ups across the antimeridian)
    return "".join(f"<g transform='translate({s:g},0)'>{layers}{''.join(marks)}</g>" for s in _shifts(view))


def prediction_section(pred: Prediction, places: Any = None) -> str:
    """Two maps side by side: the world, and a close-up of the most likely region (with the biggest
    `places` of a gazetteer named on it)."""
    polys, owner = token_polygons(pred.tokens)
    near, _ = token_polygons(pred.tokens, copies=False)
    best = pred.top[0]
    extra = [pred.refined] if pred.refined is not None else []
    view, shown = close_up(near, pred.p, best, extra) if near else \
        (focus(np.array([q.lon for q in pred.top]), np.array([q.lat for q in pred.top]), best.lon), float("nan"))
    frame = np.array([[view.west, view.south], [view.east, view.south], [view.east, view.north],
                      [view.west, view.north], [view.west, view.south]])
    frames = "".join(svg_line(frame + [s, 0], "#0b3d91", 1.2, "", "the close-up", "frame") for s in _shifts(view))
    world = svg_map(WORLD, _prediction_layers(pred, polys, owner, WORLD) + frames, "49%", "world")
    cities = city_labels(view, places) if places is not None else ""
    zoom = svg_map(view, _prediction_layers(pred, polys, owner, view, cities), "49%", "close-up")
    radii = (f"; 50% of the probability within {pred.radii_km[0]:,.0f} km of #1, 90% within "
             f"{pred.radii_km[1]:,.0f} km" if pred.radii_km else "")
    caption = (f"close-up: {view.height:.1f} degrees high, showing {100 * shown:.0f}% of the probability{radii}"
               if shown == shown else f"close-up of the candidates{radii}")
    return (f"<section class='photo'><h2>{html.escape(pred.title)}</h2><div class='panels'>{world}{zoom}</div>"
            f"<p class='caption'>{html.escape(caption)}</p></section>")


PREDICT_INTRO = ("Left: the world (blue frame: the close-up); right: a close-up of the most likely region (the "
                 "cells holding 90% of the probability near the best candidate). Cells are shaded by the "
                 "probability of the hierarchical prediction ({legend}); numbered circles: the top-k candidates; "
                 "solid and dashed rings: the radii holding 50% and 90% of the probability; blue diamond: the "
                 "refined position; green cross: the true place (EXIF). Hover for details.")


def prediction_page(preds: list[Prediction | tuple[str, str]], notes: str = "", places: Any = None) -> str:
    """A page of photos; a (title, error) pair stands for a photo that could not be predicted; `places`
    (a gazetteer) names cities on the close-ups."""
    body = []
    for pred in preds:
        if isinstance(pred, tuple):
            body.append(f"<section class='photo'><h2>{html.escape(pred[0])}</h2><p>error: "
                        f"{html.escape(pred[1])}</p></section>")
        else:
            body.append(prediction_section(pred, places))
    return page("geoloc predictions", PREDICT_INTRO.format(legend=heat_legend()) + " " + html.escape(notes),
                "".join(body))


# ------------------------------------------------------------------------------------------ evaluate

ERROR_COLOURS = ["#1a9850", "#91cf60", "#d9ef8b", "#fee08b", "#fc8d59", "#d73027"]


def error_bins(err_km: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Bin of each error: 0 within the first threshold (street), ..., len(thresholds) beyond the last."""
    return np.searchsorted(np.asarray(sorted(thresholds), dtype=float), np.asarray(err_km, dtype=float), side="left")


def _bin_labels(thresholds: list[float]) -> list[str]:
    t = sorted(thresholds)
    return [f"<= {t[0]:g} km"] + [f"{a:g}-{b:g} km" for a, b in zip(t, t[1:], strict=False)] + [f"> {t[-1]:g} km"]


def _colour_of_bins(n: int) -> list[str]:
    """n colours from green (small error) to red (large), taken evenly from ERROR_COLOURS."""
    return [ERROR_COLOURS[round(k * (len(ERROR_COLOURS) - 1) / max(n - 1, 1))] for k in range(n)]


def _sample(n: int, limit: int) -> np.ndarray:
    """Indices of at most `limit` of n rows, evenly spread (deterministic)."""
    return np.arange(n) if n <= limit else np.linspace(0, n - 1, limit).round().astype(int)


def error_page(lat: np.ndarray, lon: np.ndarray, plat: np.ndarray, plon: np.ndarray, err_km: np.ndarray,
               thresholds: list[float], title: str, names: list[str] | None = None, limit: int = 3000) -> str:
    """A world map of per-image errors: a line from each true place (dot coloured by its error) to its
    prediction; at most `limit` images, evenly sampled."""
    rows = _sample(len(lat), limit)
    bins = error_bins(err_km, thresholds)
    colours = _colour_of_bins(len(thresholds) + 1)
    lines, dots = [], []
    for i in rows[np.argsort(-np.asarray(err_km)[rows], kind="stable")]:  # small errors drawn last, on top
        px = float(wrap_near(plon[i], lon[i]))
        tip = f"{names[i] if names else i}: {err_km[i]:,.0f} km"
        lines.append(f"M{lon[i]:.3f},{-lat[i]:.3f}L{px:.3f},{-plat[i]:.3f}")
        dots.append(svg_marker(float(lon[i]), float(lat[i]), "dot", WORLD, colours[bins[i]], tip))
    # lines take the short way, across the antimeridian too: drawn again one world to each side to show both ends
    layer = "".join(f"<path class='errors' d='{''.join(lines)}' stroke='#555' stroke-opacity='0.35' stroke-width='0.6' "
                    f"fill='none' transform='translate({s:g},0)'/>" for s in (0, -360, 360))
    layer += f"<g class='truths'>{''.join(dots)}</g>"
    legend = " ".join(f"<span style='background:{c}'>&nbsp;</span> {html.escape(t)}"
                      for c, t in zip(colours, _bin_labels(thresholds), strict=True))
    shown = f"{len(rows):,} of {len(lat):,} images" if len(rows) < len(lat) else f"{len(lat):,} images"
    return page(title, f"Per-image errors ({shown}): dots at the true places, coloured by the great-circle error "
                f"of the prediction; grey lines lead to the predictions. <span class='legend'>{legend}</span>",
                svg_map(WORLD, layer, "100%", title))


def error_png(path: Any, lat: np.ndarray, lon: np.ndarray, plat: np.ndarray, plon: np.ndarray, err_km: np.ndarray,
              thresholds: list[float], title: str, limit: int = 20000) -> None:
    """The same map as `error_page`, as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    from geoloc_cli.store import atomic_path

    rows = _sample(len(lat), limit)
    rows = rows[np.argsort(-np.asarray(err_km)[rows], kind="stable")]
    bins = error_bins(err_km, thresholds)[rows]
    colours = np.array(_colour_of_bins(len(thresholds) + 1))
    fig, ax = plt.subplots(figsize=(12, 6.6))
    draw_basemap(ax)
    start = np.stack([lon[rows], lat[rows]], 1)
    segs = np.stack([start, np.stack([wrap_near(plon[rows], lon[rows]), plat[rows]], 1)], 1)
    segs = np.concatenate([segs + [s, 0] for s in (0, -360, 360)])  # both ends of a line across the antimeridian
    ax.add_collection(LineCollection(segs, colors="#555555", alpha=0.3, linewidths=0.5, zorder=4))
    ax.scatter(lon[rows], lat[rows], s=9, c=colours[bins], edgecolors="#333333", linewidths=0.2, zorder=5)
    for c, label in zip(colours, _bin_labels(thresholds), strict=True):
        ax.scatter([], [], s=20, c=c, edgecolors="#333333", linewidths=0.2, label=label)
    ax.legend(loc="lower left", fontsize=7, title="error", title_fontsize=8, framealpha=0.85)
    ax.set_title(f"{title}: per-image error (lines lead to the predictions)")
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ Leaflet

LEAFLET = "https://unpkg.com/leaflet@1.9.4/dist/leaflet"
TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
TILE_ATTRIBUTION = "&copy; <a href='https://www.openstreetmap.org/copyright'>OpenStreetMap</a> contributors"

_LEAFLET_JS = """
for (const [i, d] of DATA.entries()) {
  const map = L.map('m' + i, {worldCopyJump: true});
  L.tileLayer(TILES, {maxZoom: 18, attribution: ATTRIBUTION}).addTo(map);
  for (const c of d.cells) L.polygon(c.ring, {color: '#7f1010', weight: 0.5, fillColor: c.colour,
                                               fillOpacity: 0.55}).bindTooltip(c.tip).addTo(map);
  for (const [k, r] of d.radii.entries()) L.circle(d.top[0].at, {radius: r * 1000, fill: false, color: '#222',
                                                   weight: 1.5, dashArray: k ? '6 4' : null}).addTo(map);
  for (const t of d.top) L.marker(t.at, {title: t.tip}).bindTooltip(t.tip).addTo(map);
  if (d.refined) L.circleMarker(d.refined.at, {color: '#1f77b4', radius: 7}).bindTooltip(d.refined.tip).addTo(map);
  if (d.truth) L.circleMarker(d.truth.at, {color: '#1a7f1a', radius: 7}).bindTooltip(d.truth.tip).addTo(map);
  map.fitBounds(d.bounds);
}
"""


def leaflet_page(preds: list[Prediction | tuple[str, str]]) -> str:
    """An interactive page for users who are online: per photo a Leaflet map on OpenStreetMap tiles
    (fetched from the web), opened on the close-up of `prediction_section`, with the same layers."""
    data, body = [], []
    for pred in preds:
        if isinstance(pred, tuple):
            body.append(f"<h2>{html.escape(pred[0])}</h2><p>error: {html.escape(pred[1])}</p>")
            continue
        polys, owner = token_polygons(pred.tokens, copies=False)
        colours = heat_colours(pred.p)
        view = close_up(polys, pred.p, pred.top[0], [pred.refined] if pred.refined else [])[0] if polys else WORLD
        at = [{"at": [q.lat, q.lon], "tip": q.tip} for q in pred.top]
        data.append({
            "cells": [{"ring": np.round(polys[k][:, ::-1], 4).tolist(), "colour": colours[o],
                       "tip": f"{pred.tokens[o]}: {100 * pred.p[o]:.2f}%"} for k, o in enumerate(owner)],
            "top": at, "radii": list(pred.radii_km or []),
            "refined": {"at": [pred.refined.lat, pred.refined.lon], "tip": pred.refined.tip} if pred.refined else None,
            "truth": {"at": [pred.truth.lat, pred.truth.lon], "tip": pred.truth.tip} if pred.truth else None,
            "bounds": [[view.south, view.west], [view.north, view.east]]})
        body.append(f"<h2>{html.escape(pred.title)}</h2><div id='m{len(data) - 1}' style='height:520px'></div>")
    safe = json.dumps(data).replace("</", "<\\/")  # no "</script>" inside the script, whatever a name says
    script = (f"const DATA = {safe}; const TILES = {json.dumps(TILES)}; "
              f"const ATTRIBUTION = {json.dumps(TILE_ATTRIBUTION)};" + _LEAFLET_JS)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>geoloc predictions (online map)</title>"
            f"<link rel='stylesheet' href='{LEAFLET}.css'><script src='{LEAFLET}.js'></script></head>"
            "<body style='font-family:sans-serif;max-width:1400px;margin:1em'><h1>geoloc predictions</h1>"
            "<p>Needs a network connection (Leaflet and OpenStreetMap tiles); the offline page is geoloc predict "
            "--map out.html. Red: cell probability; rings: 50% / 90% credible radii; markers: top-k; blue: "
            "refined; green: true place.</p>" + "".join(body) + f"<script>{script}</script></body></html>\n")
