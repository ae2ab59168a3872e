"""predict: geolocate photos with an inference checkpoint: top-k places (with names) and the scene.

Two backends give the same numbers: ONNX Runtime on an exported checkpoint (`geoloc export`; no torch
is imported at all, so a cold start is fast) and torch (GPUs, checkpoints not exported). Each photo is
handled on its own: a missing, unreadable, corrupt or oversized file is reported as an error and the
other photos are still predicted; `run` returns how many failed (the CLI's exit code).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geoloc_cli import console
from geoloc_cli.config import Config
from geoloc_cli.data.photo import exif_gps, photos_in, to_rgb
from geoloc_cli.data.store import DataRoot
from geoloc_cli.errors import ConfigError, GeolocError, InputError, require
from geoloc_cli.inference.geolocate import RADII

FORMATS = ("table", "json", "csv", "geojson")


def collect(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded to the images they contain (sorted); a folder without photos
    is an error (exit 1), not an empty answer."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += photos_in(p)
        else:
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------ reading


@dataclass
class Photo:
    image: Any  # PIL RGB image
    gps: tuple[float, float] | None  # (lat, lon) from EXIF


def load_photo(path: Path, max_pixels: int = 100_000_000, draft: int = 1024) -> Photo | str:
    """An RGB photo (EXIF orientation applied, transparency over white) and its EXIF GPS, or an error string."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        return f"no such file: {path}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return f"{path}: {w} x {h} pixels is over the limit of {max_pixels:,} (fetch.max_pixels)"
                gps = exif_gps(im)
                im.draft("RGB", (draft, draft))  # huge JPEGs decode at reduced scale
                return Photo(to_rgb(ImageOps.exif_transpose(im)), gps)
    except Image.DecompressionBombError as e:  # Pillow's own guard fires at open for the largest ones
        return f"{path}: over the limit of decodable pixels: {e}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        return f"cannot read {path}: {type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------ backends


class TorchModel:
    """The checkpoint run with torch (and its embedded segmenter): the same preprocessing as ONNX."""

    name = "torch"

    def __init__(self, ckpt: Path, meta: dict[str, Any], device: str) -> None:
        from geoloc_cli.model.network import load_inference_checkpoint

        self.model, self.meta, seg_tensors = load_inference_checkpoint(ckpt, device)
        self.spec = meta["spec"]
        self.device = next(self.model.parameters()).device
        self.segmenter = None
        if self.spec["seg_channels"]:
            from geoloc_cli.model.segmentation import Segmenter

            self.segmenter = Segmenter.from_state(seg_tensors, self.meta["segmenter"], device=str(self.device),
                                                  precision="fp32")

    def close(self) -> None:
        """Nothing to release (OnnxModel has loader threads)."""

    def probabilities(self, images: list[Any]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        from geoloc_cli.inference.geolocate import probabilities, views

        maps = self.segmenter(images) if self.segmenter is not None else [None] * len(images)
        pairs = [views(im, Image.fromarray(m) if m is not None else None, self.spec["img_size"],
                       self.meta["preprocess"]) for im, m in zip(images, maps, strict=True)]
        x = torch.from_numpy(np.concatenate([p[0] for p in pairs]))
        s = torch.from_numpy(np.concatenate([p[1] for p in pairs]))
        return probabilities(self.model, x, s, self.spec["seg_channels"], self.device, None)


def open_model(ckpt: Path, backend: str, device: str) -> tuple[Any, dict[str, Any]]:
    """(model with .probabilities(images), checkpoint metadata) for the chosen backend.

    auto: ONNX Runtime when a current export sits beside the checkpoint and no GPU was asked for."""
    import importlib.util

    from geoloc_cli.data.store import read_checkpoint_meta as read_meta
    from geoloc_cli.inference.onnx_runtime import NO_ONNXRUNTIME, OnnxModel, export_status

    if Path(ckpt).suffix == ".onnx" or Path(ckpt).is_dir():  # an export on its own: no checkpoint, no torch
        if backend == "torch":
            raise ConfigError(f"predict.backend=torch needs the checkpoint (.safetensors), not the export {ckpt}")
        net = OnnxModel.of_export(ckpt)
        return net, net.meta
    meta = read_meta(ckpt)
    status = export_status(ckpt, meta)
    if backend == "auto":
        if status != "ok" and "different checkpoint" in status:
            console.warn(f"{status}; using torch")
        backend = "onnx" if status == "ok" and not device.startswith("cuda") else "torch"
    if backend == "onnx":
        if status != "ok":
            raise InputError(f"predict.backend=onnx: {status}")
        return OnnxModel.of_checkpoint(ckpt, meta), meta
    if status == NO_ONNXRUNTIME and importlib.util.find_spec("torch") is None:
        raise GeolocError(f"{ckpt} has a current ONNX export, but {status}")  # not the whole training stack
    require("torch", "timm")  # no current ONNX export: the torch path needs the training stack
    from geoloc_cli.dist import resolve_device

    return TorchModel(ckpt, meta, str(resolve_device(device))), meta


# ------------------------------------------------------------------------------------------ run


def run(cfg: Config, photos: list[Path], model: Path | None = None, as_json: bool = False,
        fmt: str | None = None, map_path: Path | None = None, backend: str | None = None,
        refine: str | None = None) -> int:
    fmt = fmt or ("json" if as_json else "table")
    if fmt not in FORMATS:
        raise ConfigError(f"output format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if map_path is not None and Path(map_path).suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--map {map_path}: expected an .html file")
    files = collect(photos)  # before the model loads: an empty folder fails at once
    ckpt = Path(model) if model else DataRoot(cfg.root).model(cfg.train.run)
    backend = backend or cfg.predict.backend
    if refine and backend == "onnx":
        raise ConfigError("--refine knn needs the torch backend: the ONNX export has no embedding output")
    net, meta = open_model(ckpt, "torch" if refine else backend, cfg.runtime.device)
    try:
        from geoloc_cli.inference.retrieval import Refiner

        refiner = Refiner.open(cfg, net.model) if refine else None
        results, maps = predict_files(net, meta, files, cfg.predict.top_k, cfg.predict.batch_size,
                                      cfg.fetch.max_pixels, refiner)
    finally:
        net.close()
    failed = sum("error" in r for r in results)
    show(results, fmt)
    if map_path is not None:
        from geoloc_cli.data.store import write_text_atomic

        leaflet = Path(map_path).name.lower().endswith(".leaflet.html")
        write_text_atomic(Path(map_path), html_map(results, maps, meta, leaflet=leaflet))
        console.info(f"wrote the map to {map_path}")
    if failed:
        console.warn(f"{failed} of {len(results)} photos failed")
    return failed


def predict_files(net: Any, meta: dict[str, Any], files: list[Path], top_k: int, batch_size: int,
                  max_pixels: int, refiner: Any = None,
                  ) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, np.ndarray] | None]]:
    """Per file a result ({"file", "top", "scene", "refined"?, "exif"?} or {"file", "error"}) and, for the map,
    the (finest class indices, probabilities) of its most likely cells. With a `retrieval.Refiner` (torch
    backend), "refined" is the position its gallery neighbours give."""
    from geoloc_cli.geo import gazetteer
    from geoloc_cli.inference.geolocate import CellSet

    cells = CellSet.from_meta(meta["partitionings"])
    with ThreadPoolExecutor(1) as pool:  # read the place names while the first batch runs
        names = pool.submit(gazetteer.load)
        return _predict_batches(net, cells, files, top_k, batch_size, max_pixels, names, refiner)


def _predict_batches(net: Any, cells: Any, files: list[Path], top_k: int, batch_size: int, max_pixels: int,
                     names: Future, refiner: Any = None,
                     ) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, np.ndarray] | None]]:
    from geoloc_cli.inference.geolocate import hierarchical_distribution, rank_places

    results: list[dict[str, Any]] = []
    maps: list[tuple[np.ndarray, np.ndarray] | None] = []
    with console.progress("predict", len(files), unit="photo") as bar:
        for s in range(0, len(files), batch_size):
            chunk = files[s:s + batch_size]
            loaded = [load_photo(f, max_pixels) for f in chunk]
            ok = [i for i, p in enumerate(loaded) if isinstance(p, Photo)]
            with refiner.watching(net.model) if refiner else contextlib.nullcontext():
                probs = net.probabilities([loaded[i].image for i in ok]) if ok else {}
                ranked = rank_places(probs, cells, top_k) if ok else []
                hier = hierarchical_distribution(probs, cells) if ok else np.zeros((0, 0))
                refined = _refined(net, refiner, [loaded[i].image for i in ok], hier, cells) if ok and refiner else None
            for i, f in enumerate(chunk):
                if i not in ok:
                    results.append({"file": str(f), "error": loaded[i]})
                    maps.append(None)
                    continue
                j = ok.index(i)
                results.append(_describe(str(f), ranked[j] | ({"refined": refined[j]} if refined else {}),
                                         loaded[i].gps, names.result()))
                order = np.argsort(-hier[j])[:500]
                maps.append((order, hier[j][order]))
            bar.advance(len(chunk))
    return results, maps


def _refined(net: Any, refiner: Any, images: list[Any], hier: np.ndarray, cells: Any) -> list[dict[str, Any]]:
    """Per photo the refined position, the neighbours it came from and the settings."""
    from geoloc_cli.inference.retrieval import embed_images, top_classes

    queries = refiner.kept_queries()  # from the forward that classified these photos
    if queries is None:
        queries = embed_images(net.model, images, net.spec["img_size"], net.meta["preprocess"])
    lat, lon, used = refiner.refine(cells, queries, top_classes(hier, refiner.cfg.retrieval.top_cells))
    how = refiner.settings()
    return [{"lat": round(float(a), 6), "lon": round(float(o), 6), "neighbours": int(n), **how}
            for a, o, n in zip(lat, lon, used, strict=True)]


def _describe(file: str, ranked: dict[str, Any], gps: tuple[float, float] | None, places: Any) -> dict[str, Any]:
    from geoloc_cli.geo.sphere import haversine_km

    top = ranked["top"]
    named = places.nearest([t["lat"] for t in top], [t["lon"] for t in top])
    for t, p in zip(top, named, strict=True):
        t["place"] = p
    out = {"file": file, **ranked}
    if "refined" in out:
        r = out["refined"]
        r["place"] = places.nearest([r["lat"]], [r["lon"]])[0]
    if gps is not None:
        out["exif"] = {"lat": gps[0], "lon": gps[1], "place": places.nearest(*gps)[0],
                       "error_km": round(float(haversine_km(gps[0], gps[1], top[0]["lat"], top[0]["lon"])), 1)}
        if "refined" in out:
            out["exif"]["refined_error_km"] = round(float(haversine_km(gps[0], gps[1], out["refined"]["lat"],
                                                                       out["refined"]["lon"])), 1)
    return out


# ------------------------------------------------------------------------------------------ output


def show(results: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        console.print_json(results)
    elif fmt == "csv":
        _raw(to_csv(results))
    elif fmt == "geojson":
        _raw(json.dumps(to_geojson(results), indent=1) + "\n")
    else:
        _table(results)


def _raw(text: str) -> None:
    console.out.print(text, markup=False, highlight=False, emoji=False, end="")


def _place_name(p: dict[str, Any]) -> str:
    """'Paris, France'; with the distance when the nearest listed place is far (sea, desert, ice)."""
    far = f" ({p['km']:,.0f} km away)" if p["km"] > 50 else ""
    return f"{p['name']}, {p['country']}{far}"


CSV_COLUMNS = ["file", "rank", "lat", "lon", "probability", "cell", "place", "country", "place_km", "scene",
               "scene_probability", "true_lat", "true_lon", "error_km", "failure",
               # added after the first release's columns, so positional readers keep working
               *RADII, "refined_lat", "refined_lon", "refined_error_km"]


def to_csv(results: list[dict[str, Any]]) -> str:
    """One row per (photo, rank); a photo that could not be read is one row with only file and failure.
    true_lat/true_lon/error_km: the EXIF position and its distance to rank 1, when the photo has one. On the
    rank-1 row only: the credible radii around it and, with --refine, the refined position (and its error)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in results:
        if "error" in r:
            w.writerow({"file": r["file"], "failure": r["error"]})
            continue
        scene = max(r["scene"], key=r["scene"].get) if r["scene"] else ""
        truth = r.get("exif", {})
        for t in r["top"]:
            w.writerow({"file": r["file"], "rank": t["rank"], "lat": t["lat"], "lon": t["lon"],
                        "probability": f"{t['probability']:.6f}", "cell": t["cell"], "place": t["place"]["name"],
                        "country": t["place"]["country"], "place_km": t["place"]["km"], "scene": scene,
                        "scene_probability": f"{r['scene'][scene]:.4f}" if scene else "",
                        "true_lat": truth.get("lat", ""), "true_lon": truth.get("lon", ""),
                        **(_first_row(r) if t["rank"] == 1 else {})})
    return buf.getvalue()


def _first_row(r: dict[str, Any]) -> dict[str, Any]:
    """The CSV cells only the rank-1 row carries."""
    refined, truth = r.get("refined", {}), r.get("exif", {})
    return {"error_km": truth.get("error_km", ""), **{k: r.get(k, "") for k in RADII},
            "refined_lat": refined.get("lat", ""), "refined_lon": refined.get("lon", ""),
            "refined_error_km": truth.get("refined_error_km", "")}


def to_geojson(results: list[dict[str, Any]]) -> dict[str, Any]:
    """A FeatureCollection: a Point per candidate place (kind "prediction"; rank 1 with the credible radii)
    and per EXIF location ("exif")."""
    features = []
    for r in results:
        if "error" in r:
            continue
        for t in r["top"]:
            features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [t["lon"], t["lat"]]},
                             "properties": {"kind": "prediction", "file": r["file"], "rank": t["rank"],
                                            "probability": t["probability"], "cell": t["cell"],
                                            "place": _place_name(t["place"]), "scene": r["scene"],
                                            **({k: r[k] for k in RADII if k in r} if t["rank"] == 1 else {})}})
        if "refined" in r:
            k = r["refined"]
            features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [k["lon"], k["lat"]]},
                             "properties": {"kind": "refined", "file": r["file"], "place": _place_name(k["place"]),
                                            "neighbours": k["neighbours"]}})
        if "exif" in r:
            e = r["exif"]
            features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [e["lon"], e["lat"]]},
                             "properties": {"kind": "exif", "file": r["file"], "place": _place_name(e["place"]),
                                            "error_km": e["error_km"]}})
    return {"type": "FeatureCollection", "features": features}


def _table(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        if "error" in r:
            console.error(r["error"])
            continue
        scene = max(r["scene"], key=r["scene"].get) if r["scene"] else ""
        for t in r["top"]:
            first = t["rank"] == 1
            rows.append((Path(r["file"]).name if first else "", t["rank"], f"{t['lat']:.4f}", f"{t['lon']:.4f}",
                         _place_name(t["place"]), t["cell"], f"{100 * t['probability']:.1f}%",
                         f"{scene} {100 * r['scene'][scene]:.0f}%" if first and scene else ""))
        if "refined" in r:
            k = r["refined"]
            rows.append(("", "knn", f"{k['lat']:.4f}", f"{k['lon']:.4f}",
                         f"{_place_name(k['place'])} (refined: {k['neighbours']} gallery neighbours)", "", "", ""))
        if "exif" in r:
            e = r["exif"]
            off = f"; refined {e['refined_error_km']:,.0f} km" if "refined_error_km" in e else ""
            rows.append(("", "exif", f"{e['lat']:.4f}", f"{e['lon']:.4f}",
                         f"{_place_name(e['place'])} (true position: rank 1 is {e['error_km']:,.0f} km off{off})",
                         "", "", ""))
    if rows:
        from geoloc_cli.geo.gazetteer import ATTRIBUTION

        console.table("predictions", ["photo", "rank", "lat", "lon", "place", "cell", "p", "scene"], rows,
                      caption=ATTRIBUTION)


# ------------------------------------------------------------------------------------------ map


def html_map(results: list[dict[str, Any]], maps: list[Any], meta: dict[str, Any], max_photos: int = 50,
             leaflet: bool = False) -> str:
    """A self-contained page (maps.prediction_page): per photo the world and a close-up of its most
    likely region over Natural Earth coastlines and borders, cells shaded by probability, the top-k, the
    credible radii, the refined point (a result's "refined": {"lat", "lon"}) and the EXIF location.
    A name ending in .leaflet.html gets the interactive page on web tiles instead (maps.leaflet_page)."""
    from geoloc_cli.geo import gazetteer
    from geoloc_cli.geo import maps as m

    fine = meta["partitionings"]["names"][-1]
    tokens = meta["partitionings"]["cells"][fine]["hex_id"]
    preds: list[Any] = []
    for r, cells in list(zip(results, maps, strict=True))[:max_photos]:
        title = Path(r["file"]).name
        if "error" in r:
            preds.append((title, r["error"]))
            continue
        idx, p = cells
        keep = p >= p[0] * 1e-3  # cells 1000x less likely than the best are invisible anyway
        top = [m.Point(t["lat"], t["lon"], f"#{t['rank']} {_place_name(t['place'])}: {100 * t['probability']:.1f}%",
                       str(t["rank"])) for t in r["top"]]
        refined = r.get("refined")
        truth = r.get("exif")
        preds.append(m.Prediction(
            title, [tokens[i] for i in idx[keep]], p[keep], top,
            m.Point(refined["lat"], refined["lon"], "refined position") if refined else None,
            m.Point(truth["lat"], truth["lon"], f"EXIF: {_place_name(truth['place'])}, error "
                    f"{truth['error_km']:,.0f} km") if truth else None,
            tuple(r[k] for k in RADII) if RADII[0] in r else None))
    return m.leaflet_page(preds) if leaflet else m.prediction_page(preds, gazetteer.ATTRIBUTION, gazetteer.load())
