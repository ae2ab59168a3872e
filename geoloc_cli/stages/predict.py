"""predict: geolocate photos with an inference checkpoint: top-k places and the scene.

Each photo is handled on its own: a missing, unreadable or corrupt file is reported as an error row
and the other photos are still predicted; `run` returns how many failed (the CLI's exit code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from geoloc_cli import console
from geoloc_cli.config import Config
from geoloc_cli.store import DataRoot

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
SCENES = ("indoor", "natural", "urban")


def collect(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded to the images they contain (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        else:
            out.append(p)
    return out


def load_photo(path: Path):
    """RGB PIL image (EXIF orientation applied), or an error string."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        return f"no such file: {path}"
    try:
        with Image.open(path) as im:
            im.draft("RGB", (1024, 1024))  # huge JPEGs decode at reduced scale
            return ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot read {path}: {type(e).__name__}: {e}"


class Predictor:
    """A loaded checkpoint (and its embedded segmenter) that turns photos into ranked places."""

    def __init__(self, ckpt: Path, device: str = "cpu") -> None:
        from geoloc_cli.inference import CellSet
        from geoloc_cli.model import load_inference_checkpoint

        self.model, self.meta, seg_tensors = load_inference_checkpoint(ckpt, device)
        self.device = self.model.heads[next(iter(self.model.heads))].weight.device
        self.cells = CellSet.from_meta(self.meta["partitionings"])
        self.spec = self.meta["spec"]
        self.segmenter = None
        if self.spec["seg_channels"]:
            from geoloc_cli.segmentation import Segmenter

            self.segmenter = Segmenter.from_state(seg_tensors, self.meta["segmenter"], device=str(self.device))

    def __call__(self, images: list, top_k: int) -> list[dict[str, Any]]:
        import torch
        from PIL import Image

        from geoloc_cli.data import transform
        from geoloc_cli.inference import probabilities
        from geoloc_cli.metrics import hierarchical_probs

        maps = self.segmenter(images) if self.segmenter is not None else [None] * len(images)
        xs, ss = zip(*(transform(im, Image.fromarray(m) if m is not None else None, self.spec["img_size"],
                                 self.meta["preprocess"], False, None) for im, m in zip(images, maps, strict=True)),
                     strict=True)
        probs = probabilities(self.model, torch.stack(xs), torch.stack(ss), self.spec["seg_channels"],
                              self.device, None)
        cells = self.cells
        hier = hierarchical_probs({n: probs[n] for n in cells.names}, cells.parents, cells.finest)
        hier /= hier.sum(-1, keepdims=True)
        out = []
        for i in range(len(images)):
            top = np.argsort(-hier[i])[:top_k]
            out.append({
                "top": [{"rank": r + 1, "lat": float(cells.lat[cells.finest][c]),
                         "lon": float(cells.lon[cells.finest][c]), "cell": cells.hex_id[cells.finest][c],
                         "probability": float(hier[i, c])} for r, c in enumerate(top)],
                "scene": {SCENES[j] if len(probs["scene"][i]) == 3 else str(j): float(p)
                          for j, p in enumerate(probs["scene"][i])} if "scene" in probs else {},
            })
        return out


def run(cfg: Config, photos: list[Path], model: Path | None = None, as_json: bool = False,
        batch_size: int = 16) -> int:
    from geoloc_cli.dist import resolve_device

    ckpt = Path(model) if model else DataRoot(cfg.root).run(cfg.train.run) / "model.safetensors"
    predictor = Predictor(ckpt, str(resolve_device(cfg.runtime.device)))
    files = collect(photos)
    results: list[dict[str, Any]] = []
    with console.progress("predict", len(files), unit="photo") as bar:
        for s in range(0, len(files), batch_size):
            chunk = files[s:s + batch_size]
            loaded = [(f, load_photo(f)) for f in chunk]
            ok = [(f, im) for f, im in loaded if not isinstance(im, str)]
            preds = predictor([im for _, im in ok], cfg.predict.top_k) if ok else []
            by_file = {str(f): p for (f, _), p in zip(ok, preds, strict=True)}
            for f, im in loaded:
                results.append({"file": str(f), **by_file.get(str(f), {"error": im})})
            bar.advance(len(chunk))
    failed = sum("error" in r for r in results)
    if as_json:
        console.print_json(results)
    else:
        _show(results)
    return failed


def _show(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        if "error" in r:
            console.error(r["error"])
            continue
        scene = max(r["scene"], key=r["scene"].get) if r["scene"] else "-"
        for t in r["top"]:
            rows.append((Path(r["file"]).name if t["rank"] == 1 else "", t["rank"], f"{t['lat']:.4f}",
                         f"{t['lon']:.4f}", t["cell"], f"{100 * t['probability']:.1f}%",
                         f"{scene} {100 * r['scene'][scene]:.0f}%" if t["rank"] == 1 and r["scene"] else ""))
    if rows:
        console.table("predictions", ["photo", "rank", "lat", "lon", "cell", "p", "scene"], rows)
