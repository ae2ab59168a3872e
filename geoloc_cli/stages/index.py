"""`geoloc index`: the retrieval gallery of a dataset (default retrieval.dataset, else train.dataset) from its
cached embeddings, for `--refine knn` in predict and evaluate. Layout and search: geoloc_cli/inference/retrieval.py.

Photos of the evaluation datasets (evaluate.datasets and retrieval.exclude, those fetched) are left out by id
and, where both metadata have authors (retrieval.exclude_authors), by author; the counts are reported and
recorded in gallery.json.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from geoloc_cli import console
from geoloc_cli.config import Config
from geoloc_cli.data.store import DataRoot, locked, read_parquet, recover
from geoloc_cli.errors import InputError


def run(cfg: Config, dataset: str | None = None) -> dict[str, Any]:
    """Build and save the gallery; returns its record."""
    from geoloc_cli.data.embeddings import load_embedder, read_record
    from geoloc_cli.inference import retrieval

    root = DataRoot(cfg.root)
    name = dataset or retrieval.gallery_dataset(cfg)
    made = read_record(root.emb(name))
    if made is None:
        raise InputError(f"dataset {name!r} has no embeddings: run `geoloc embed {name}` first (with "
                         "model.pretrained set to the checkpoint that will refine)")
    folder = root.gallery(name)
    with locked(folder, "index"):
        recover(folder)
        start = time.monotonic()
        manifest = read_parquet(root.manifest(name), f"manifest of {name!r}", f"run `geoloc fetch {name}`")
        emb, items = retrieval.collect(root.emb(name), retrieval.gallery_rows(manifest), int(made["dim"]))
        emb, items, excluded = _exclude(cfg, root, name, emb, items)
        kind = retrieval.choose_index(cfg.retrieval.index, len(emb), cfg.retrieval.exact_max,
                                      cfg.retrieval.top_cells)
        index = retrieval.build_faiss(emb, kind, seed=cfg.runtime.seed) if kind != "exact" else None
        record = {"dataset": name, "embedder": made,
                  "embedder_fingerprint": retrieval.fingerprint(
                      {k: v for k, v in load_embedder(root.emb(name)).items() if not k.startswith("seg.")}),
                  "count": len(emb), "dim": int(emb.shape[1]), "index": kind, "excluded": excluded,
                  "build_seconds": round(time.monotonic() - start, 2)}
        retrieval.save(folder, emb, items, record, index)
    left = ", ".join(f"{v['by_id']:,} by id and {v['by_author']:,} by author for {d}" for d, v in excluded.items())
    console.info(f"index {name}: {len(emb):,} photos ({emb.shape[1]}-d, {kind} search) in "
                 f"{record['build_seconds']:.1f} s into {folder}" + (f"; left out {left}" if left else ""))
    return record


def _exclude(cfg: Config, root: DataRoot, name: str, emb, items) -> tuple[Any, Any, dict[str, dict[str, int]]]:
    """The gallery without the photos of the evaluation datasets (by id; by author too where configured)."""
    from geoloc_cli.inference import retrieval

    drop = np.zeros(len(items), bool)
    excluded = {}
    for other in dict.fromkeys([*cfg.evaluate.datasets, *cfg.retrieval.exclude]):
        if other == name:
            raise InputError(f"{name} is both the gallery and an evaluation dataset (evaluate.datasets / "
                             "retrieval.exclude): a gallery never contains an evaluation photo")
        if not root.manifest(other).is_file():
            console.warn(f"index {name}: evaluation dataset {other!r} is not fetched: its photos cannot be "
                         "checked for now (evaluate checks again)")
            continue
        bad, excluded[other] = retrieval.leakage(items, read_parquet(root.manifest(other), f"manifest of {other!r}"),
                                                 cfg.retrieval.exclude_authors)
        drop |= bad
    if drop.all():
        raise InputError(f"index {name}: every photo shares an id or author with an evaluation dataset "
                         f"({', '.join(excluded)}); nothing is left for a gallery")
    return emb[~drop], items[~drop].reset_index(drop=True), excluded
