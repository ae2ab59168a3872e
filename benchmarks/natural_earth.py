"""Build geoloc_cli/resources/natural_earth_110m.json.gz, the offline basemap of geoloc's maps.

Source: Natural Earth 1:110m (public domain, https://www.naturalearthdata.com/about/terms-of-use/) as
TopoJSON in the npm package world-atlas@2.0.2 (countries-110m.json; package code ISC, Mike Bostock):

    cd /tmp && npm pack world-atlas@2.0.2 && tar xzf world-atlas-2.0.2.tgz
    python benchmarks/natural_earth.py /tmp/package/countries-110m.json

Written: {"source", "licence", "scale", "land": [ring, ...], "borders": [line, ...]}; each ring or line is
a flat list of integers, lon/lat in 1/scale degrees, the first point absolute and the rest deltas (small
numbers compress well). Land rings are the merged land polygons; borders are the arcs two countries share
(coastlines are not repeated as borders).
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from pathlib import Path

SCALE = 100  # 0.01 degree, far finer than the 1:110m source (~0.1 degree)
OUT = Path(__file__).resolve().parents[1] / "geoloc_cli" / "resources" / "natural_earth_110m.json.gz"


def decode_arcs(topo: dict) -> list[list[tuple[float, float]]]:
    """TopoJSON's quantised, delta-encoded arcs -> lon/lat points."""
    (kx, ky), (tx, ty) = topo["transform"]["scale"], topo["transform"]["translate"]
    out = []
    for arc in topo["arcs"]:
        x = y = 0
        pts = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            pts.append((x * kx + tx, y * ky + ty))
        out.append(pts)
    return out


def ring(arcs: list[list[tuple[float, float]]], refs: list[int]) -> list[tuple[float, float]]:
    """Points of a ring made of arcs (~i: arc i reversed); shared end points kept once."""
    pts: list[tuple[float, float]] = []
    for r in refs:
        a = arcs[r] if r >= 0 else arcs[~r][::-1]
        pts += a[1:] if pts else a
    return pts


def rings_of(geometry: dict) -> list[list[int]]:
    if geometry["type"] == "Polygon":
        return geometry["arcs"]
    if geometry["type"] == "MultiPolygon":
        return [r for poly in geometry["arcs"] for r in poly]
    if geometry["type"] == "GeometryCollection":
        return [r for g in geometry["geometries"] for r in rings_of(g)]
    return []


def unwrap(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A ring continuous across the antimeridian (Fiji, Chukotka: longitudes past 180 instead of a jump
    across the map); a ring around the pole (Antarctica) is closed through the pole along the map's edges."""
    out = [points[0]]
    for x, y in points[1:]:
        out.append((x + 360 * round((out[-1][0] - x) / 360), y))
    if abs(out[-1][0] - out[0][0]) <= 180:
        return out
    pole = -90.0 if min(y for _, y in points) < 0 else 90.0
    j = next(k for k in range(len(points) - 1) if abs(points[k + 1][0] - points[k][0]) > 180)
    return points[:j + 1] + [(points[j][0], pole), (points[j + 1][0], pole)] + points[j + 1:]


def pack(points: list[tuple[float, float]]) -> list[int]:
    """Quantised, first point absolute then deltas; repeated points dropped."""
    q = [(round(x * SCALE), round(y * SCALE)) for x, y in points]
    out, last = [], None
    for p in q:
        if p == last:
            continue
        out += [p[0], p[1]] if last is None else [p[0] - last[0], p[1] - last[1]]
        last = p
    return out


def main(src: str) -> None:
    topo = json.loads(Path(src).read_text())
    arcs = decode_arcs(topo)
    land = [pack(unwrap(ring(arcs, r))) for r in rings_of(topo["objects"]["land"])]
    uses = Counter(a if a >= 0 else ~a for r in rings_of(topo["objects"]["countries"]) for a in r)
    borders = [pack(arcs[a]) for a, n in sorted(uses.items()) if n >= 2]
    data = {"source": "Natural Earth 1:110m via world-atlas@2.0.2 countries-110m.json", "licence": "public domain",
            "scale": SCALE, "land": [r for r in land if len(r) >= 6], "borders": borders}
    OUT.write_bytes(gzip.compress(json.dumps(data, separators=(",", ":")).encode(), 9, mtime=0))
    print(f"{OUT}: {len(data['land'])} land rings, {len(borders)} border lines, {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
