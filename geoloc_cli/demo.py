"""The built-in demo world: a small deterministic set of geotagged synthetic photos.

Photos cluster around real places (heavy-tailed, like Flickr), and how a photo looks depends on where
it was taken, so a model can learn geolocation from it:
- climate by latitude sets the ground and sky colours (snow, temperate green, dry olive, tropics);
- coastal places show the sea in outdoor scenes;
- each region has its own building colour and window pattern, each place a slight tint of its own;
- the scene (indoor / natural / urban) sets the layout.
The generator writes the published metadata format (`*_places365.csv`) and a URL list of `file://`
URLs, so `geoloc fetch demo` downloads it through the same code path as a real dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from geoloc_cli.places365 import PUBLISHED_COLUMNS
from geoloc_cli.store import DataRoot, write_bytes_atomic, write_text_atomic

# name, lat, lon, region, coastal, relative popularity
PLACES: list[tuple[str, float, float, str, bool, float]] = [
    ("New York", 40.71, -74.01, "north_america", True, 10.0),
    ("London", 51.51, -0.13, "europe", False, 9.0),
    ("Paris", 48.86, 2.35, "europe", False, 8.0),
    ("Tokyo", 35.68, 139.69, "east_asia", True, 7.0),
    ("San Francisco", 37.77, -122.42, "north_america", True, 6.0),
    ("Rome", 41.90, 12.50, "europe", False, 5.0),
    ("Barcelona", 41.39, 2.17, "europe", True, 4.5),
    ("Sydney", -33.87, 151.21, "oceania", True, 4.0),
    ("Beijing", 39.90, 116.41, "east_asia", False, 3.5),
    ("Rio de Janeiro", -22.91, -43.17, "south_america", True, 3.2),
    ("Chicago", 41.88, -87.63, "north_america", False, 3.0),
    ("Berlin", 52.52, 13.40, "europe", False, 3.0),
    ("Bangkok", 13.76, 100.50, "south_asia", False, 2.6),
    ("Cairo", 30.04, 31.24, "africa", False, 2.4),
    ("Mexico City", 19.43, -99.13, "south_america", False, 2.2),
    ("Mumbai", 19.08, 72.88, "south_asia", True, 2.0),
    ("Cape Town", -33.92, 18.42, "africa", True, 1.8),
    ("Buenos Aires", -34.60, -58.38, "south_america", True, 1.7),
    ("Reykjavik", 64.15, -21.94, "europe", True, 1.5),
    ("Seoul", 37.57, 126.98, "east_asia", False, 1.5),
    ("Nairobi", -1.29, 36.82, "africa", False, 1.3),
    ("Vancouver", 49.28, -123.12, "north_america", True, 1.3),
    ("Singapore", 1.35, 103.82, "south_asia", True, 1.2),
    ("Auckland", -36.85, 174.76, "oceania", True, 1.1),
    ("Anchorage", 61.22, -149.90, "north_america", True, 1.0),
    ("Lima", -12.05, -77.04, "south_america", True, 1.0),
    ("Dubai", 25.20, 55.27, "south_asia", True, 1.0),
    ("Marrakesh", 31.63, -7.99, "africa", False, 0.9),
    ("Oslo", 59.91, 10.75, "europe", True, 0.9),
    ("Honolulu", 21.31, -157.86, "oceania", True, 0.8),
]

# Region style: building colour (RGB) and window grid (columns, rows) per building.
REGIONS: dict[str, tuple[tuple[int, int, int], tuple[int, int]]] = {
    "europe": ((190, 90, 60), (3, 4)),
    "north_america": ((70, 110, 170), (5, 9)),
    "south_america": ((230, 200, 60), (2, 3)),
    "africa": ((200, 150, 80), (2, 2)),
    "east_asia": ((180, 40, 40), (4, 6)),
    "south_asia": ((240, 240, 230), (3, 5)),
    "oceania": ((60, 190, 180), (4, 3)),
}



def climate(lat: float) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(ground, sky) colours by absolute latitude."""
    a = abs(lat)
    if a >= 58:
        return (235, 238, 242), (190, 200, 215)  # snow under a pale sky
    if a >= 40:
        return (80, 140, 60), (120, 170, 225)  # temperate green
    if a >= 23:
        return (170, 160, 100), (110, 170, 235)  # dry olive
    return (30, 110, 40), (60, 140, 230)  # tropical green under a deep sky


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in rgb)


def render(place: int, scene: int, rng: np.random.Generator, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """Draw one synthetic photo of `scene` at PLACES[place]."""
    _, lat, _, region, coastal, _ = PLACES[place]
    ground, sky = climate(lat)
    building, (cols, rows) = REGIONS[region]
    tint = np.random.default_rng(place).normal(0, 12, 3)  # every place has its own slight colour cast
    w, h = size
    img = Image.new("RGB", size, _jitter(sky, rng, 10))
    d = ImageDraw.Draw(img)
    horizon = int(h * rng.uniform(0.4, 0.6))
    if scene == 0:  # indoor: walls in the regional colour, a floor, a window onto the local climate
        wall = tuple(int(0.5 * b + 0.5 * c) for b, c in zip(building, (225, 215, 195), strict=True))
        d.rectangle([0, 0, w, h], fill=_jitter(wall, rng, 10))
        d.rectangle([0, int(h * 0.75), w, h], fill=_jitter((110, 80, 55), rng, 10))
        x0, y0 = int(rng.uniform(0.1, 0.5) * w), int(0.15 * h)
        d.rectangle([x0, y0, x0 + w // 3, y0 + h // 3], fill=_jitter(sky, rng, 8))
        d.rectangle([x0, y0 + h // 5, x0 + w // 3, y0 + h // 3], fill=_jitter(ground, rng, 8))
    else:
        d.rectangle([0, horizon, w, h], fill=_jitter(ground, rng, 10))
        if coastal:
            d.rectangle([0, int(horizon + 0.5 * (h - horizon)), w, h], fill=_jitter((30, 80, 150), rng, 10))
    if scene == 1:  # natural: hills in the ground colour
        for _ in range(3):
            cx, r = rng.uniform(0, w), rng.uniform(0.2, 0.5) * w
            d.ellipse([cx - r, horizon - r / 3, cx + r, horizon + r / 3], fill=_jitter(ground, rng, 18))
    if scene == 2:  # urban: buildings with the regional colour and window grid
        x = int(rng.uniform(-20, 10))
        while x < w:
            bw, bh = int(rng.uniform(50, 110)), int(rng.uniform(0.3, 0.8) * horizon + 40)
            d.rectangle([x, horizon - bh, x + bw, horizon + 10], fill=_jitter(building, rng, 12))
            for i in range(cols):
                for j in range(rows):
                    wx = x + (i + 0.5) * bw / cols
                    wy = horizon - bh + (j + 0.5) * bh / (rows + 1)
                    d.rectangle([wx - 4, wy - 3, wx + 4, wy + 3], fill=(40, 40, 50))
            x += bw + int(rng.uniform(5, 25))
    arr = np.asarray(img, dtype=np.float32) + tint + 7 * rng.standard_normal((h, w, 3), dtype=np.float32)
    arr *= rng.uniform(0.85, 1.15)  # exposure
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def sample_metadata(n: int, rng: np.random.Generator, id_offset: int) -> pd.DataFrame:
    """Locations clustered around PLACES (heavy-tailed popularity, some exact duplicates), scenes, ids."""
    weights = np.array([p[5] for p in PLACES]) ** 1.5
    place = rng.choice(len(PLACES), size=n, p=weights / weights.sum())
    spread = rng.choice([0.02, 0.3, 1.5], size=n, p=[0.3, 0.5, 0.2])  # city centre, city, region
    lat = np.array([PLACES[p][1] for p in place]) + rng.normal(0, 1, n) * spread
    lon = np.array([PLACES[p][2] for p in place]) + rng.normal(0, 1, n) * spread
    dup = rng.random(n) < 0.1  # the same famous spot, photographed many times
    lat[dup] = [PLACES[p][1] for p in place[dup]]
    lon[dup] = [PLACES[p][2] for p in place[dup]]
    scene = rng.choice(3, size=n, p=[0.2, 0.35, 0.45])
    probs = rng.dirichlet([0.3, 0.3, 0.3], size=n) * 0.3
    probs[np.arange(n), scene] += 0.7
    ids = id_offset + np.arange(n)
    return pd.DataFrame({
        "IMG_ID": [f"{i % 97:02x}/{i % 89:02x}/{i}.jpg" for i in ids],
        "AUTHOR": [f"{1000 + i % 37}@N00" for i in ids],
        "LAT": np.clip(lat, -89.9, 89.9).round(6),
        "LON": ((lon + 180) % 360 - 180).round(6),
        "S3_Label": scene,
        "S16_Label": scene * 5 + rng.integers(0, 5, n),
        "S365_Label": scene * 120 + rng.integers(0, 120, n),
        "Prob_indoor": probs[:, 0], "Prob_natural": probs[:, 1], "Prob_urban": probs[:, 2],
        "place": place,
    })


def generate(root: DataRoot, cfg: Any = None, n_train: int = 900, n_val: int = 300, seed: int = 0,
             ) -> dict[str, tuple[Path, Path]]:
    """Write the demo world under `root` (idempotent) and return {dataset: (urls_csv, meta_csv)}.

    Images go to <root>/sources/demo/, metadata to <root>/meta/demo_places365.csv and
    demo_val_places365.csv, URL lists (file:// URLs, no header) to <root>/meta/<name>_urls.csv.
    With a config, its fetch.demo_size sets the number of photos (3/4 training, 1/4 held out).
    """
    if cfg is not None:
        n_train, n_val = cfg.fetch.demo_size * 3 // 4, cfg.fetch.demo_size - cfg.fetch.demo_size * 3 // 4
    params = {"n_train": n_train, "n_val": n_val, "seed": seed, "version": 1}
    src = root.path / "sources" / "demo"
    stamp = src / "world.json"
    out = {name: (root.meta / f"{name}_urls.csv", root.meta / f"{name}_places365.csv")
           for name in ("demo", "demo_val")}
    if stamp.is_file() and json.loads(stamp.read_text()) == params and all(
        u.is_file() and m.is_file() for u, m in out.values()
    ):
        return out
    rng = np.random.default_rng(seed)
    splits = {"demo": sample_metadata(n_train, rng, 10_000_000),
              "demo_val": sample_metadata(n_val, rng, 20_000_000)}
    src.mkdir(parents=True, exist_ok=True)
    for name, meta in splits.items():
        urls = []
        for row in meta.itertuples(index=False):
            img_rng = np.random.default_rng([seed, int(row.IMG_ID.rsplit("/", 1)[1][:-4])])
            portrait = img_rng.random() < 0.2
            img = render(row.place, row.S3_Label, img_rng, (360, 480) if portrait else (480, 360))
            path = src / row.IMG_ID.replace("/", "_")
            img.save(path, "JPEG", quality=92)
            urls.append(f"{row.IMG_ID},{path.resolve().as_uri()}")
        urls_csv, meta_csv = out[name]
        write_text_atomic(urls_csv, "\n".join(urls) + "\n")
        write_bytes_atomic(meta_csv, meta[PUBLISHED_COLUMNS].to_csv(index=False).encode())
    write_text_atomic(stamp, json.dumps(params))
    return out
