"""Retrieval refinement (PIGEON's cluster refinement): inside a photo's most likely cells, the nearest
training photos in embedding space give its position - what lifts street- and city-level accuracy over a
cell's centre.

The gallery is a dataset's cached embeddings (`geoloc embed`, read with embeddings.gather) with the
positions, ids and authors of its manifest; `geoloc index` writes it under datasets/<name>/gallery/ as one
generation (store.generation):
  embeddings.npy   (n, dim) float16, rows L2-normalised (cosine similarity = inner product); only the RGB
                   feature, the part a query photo's RGB branch gives
  items.parquet    id, author (null where the metadata has none), lat, lon of each row
  faiss.index      only for whole-gallery search of a large gallery (retrieval.index): IndexFlatIP, or IVF
                   or HNSW over fp16 vectors
  gallery.json     what made it: the dataset, the embedder record, a fingerprint of the embedder's weights,
                   the count, the index type, and how many photos were left out for sharing an id or an
                   author with an evaluation dataset (so a gallery never holds an evaluation photo).

Refinement: a query's top `top_cells` finest cells of the hierarchical prediction; its k most similar
gallery photos in those cells, exactly (only the rows of those cells are scored: a few hundred for an MP-16
fine cell); with top_cells 0 the whole gallery (exact numpy search, or the FAISS index's `candidates`
nearest, left-out photos dropped); their positions aggregated on the sphere. A query with no
neighbour keeps its cell centre. Queries are the RGB branch's pooled feature of the evaluation view, as
`geoloc embed` computes it, so the refining model must be the gallery's embedder (checked by fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geoloc_cli.data.store import ID, OK
from geoloc_cli.errors import ConfigError, InputError

if TYPE_CHECKING:
    import pandas as pd

    from geoloc_cli.inference.geolocate import CellSet

RECORD = "gallery.json"
EMBEDDINGS = "embeddings.npy"
ITEMS = "items.parquet"
FAISS = "faiss.index"
CHUNK = 65_536  # gallery rows scored at a time by exact search (a float32 chunk of 1024-d is 256 MiB)


# ------------------------------------------------------------------------------------------ vectors


def normalise(x: np.ndarray, out_dtype: Any = np.float16) -> np.ndarray:
    """Rows scaled to unit length (in float32, in chunks: MP-16's gallery is 4.7 M rows), as `out_dtype`."""
    out = np.empty(x.shape, out_dtype)
    for s in range(0, len(x), CHUNK):
        v = x[s:s + CHUNK].astype(np.float32)
        out[s:s + CHUNK] = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return out


def fingerprint(state: dict[str, Any]) -> str:
    """sha256 of a state dict's tensors (names and float32 values, in name order): the same backbone
    weights give the same fingerprint whether read from embedder.safetensors or from a checkpoint."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def exact_search(queries: np.ndarray, emb: np.ndarray, k: int,
                 allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (q, k) best first, of the k largest inner products over the whole gallery
    (rows -1 / scores -inf where fewer than k are allowed). Gallery chunks are scored in float32 and merged
    into a running top k, so memory stays at one chunk whatever the gallery's size."""
    q = np.ascontiguousarray(queries, np.float32)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for s in range(0, len(emb), CHUNK):
        sims = q @ emb[s:s + CHUNK].astype(np.float32).T
        if allowed is not None:
            sims[:, ~allowed[s:s + CHUNK]] = -np.inf
        # the chunk's own top k first, so the merge sorts out 2k columns, not k + chunk (and no (q, chunk)
        # array of row numbers is made)
        n = sims.shape[1]
        mine = np.argpartition(sims, n - k, axis=1)[:, n - k:] if n > k else np.broadcast_to(np.arange(n), sims.shape)
        cat_s = np.concatenate([best_s, np.take_along_axis(sims, mine, 1)], axis=1)
        cat_i = np.concatenate([best_i, mine + s], axis=1)
        top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]  # cat_s has k + min(k, n) > k columns
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


# ------------------------------------------------------------------------------------------ FAISS


def faiss_module() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def choose_index(kind: str, n: int, exact_max: int, top_cells: int = 1) -> str:
    """retrieval.index resolved for a gallery of n rows: auto = exact, unless refinement searches the whole
    gallery (top_cells 0) and it has more than exact_max rows: then IVF (exact when FAISS is not installed).
    Searching inside the top cells is exact whatever the index: it scores a few hundred rows per query."""
    if kind == "auto":
        kind = "exact" if top_cells > 0 or n <= exact_max or faiss_module() is None else "ivf"
    if kind != "exact" and faiss_module() is None:
        raise ConfigError(f"retrieval.index={kind} needs FAISS: pip install 'geoloc[retrieval]' (or set "
                          "retrieval.index=exact)")
    return kind


def build_faiss(emb: np.ndarray, kind: str, nlist: int = 0, hnsw_m: int = 32, seed: int = 0) -> Any:
    """A FAISS inner-product index over unit rows: flat (exact, float32), ivf (inverted lists over fp16
    codes, k-means trained on a sample), hnsw (graph over fp16 codes). Rows go in by chunks (float32 copies
    of one chunk at a time)."""
    faiss = faiss_module()
    d, ip = emb.shape[1], faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return _filled_flat(faiss, emb)
    if kind == "ivf":
        nlist = nlist or max(1, int(4 * np.sqrt(len(emb))))
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_fp16, ip)
        sample = np.random.default_rng(seed).choice(len(emb), min(len(emb), 40 * nlist), replace=False)
        index.train(emb[np.sort(sample)].astype(np.float32))
    else:
        assert kind == "hnsw", kind
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, hnsw_m, ip)
        index.train(emb[: min(len(emb), 10_000)].astype(np.float32))
    for s in range(0, len(emb), CHUNK):
        index.add(emb[s:s + CHUNK].astype(np.float32))
    return index


def _filled_flat(faiss: Any, emb: np.ndarray) -> Any:
    """IndexFlatIP over `emb`, its float32 rows written straight into the index's storage, sized once.
    Adding chunk by chunk grows a std::vector, whose reallocation briefly holds old and new copies: at
    MP-16 size (4.7 M x 1024, 18 GB of float32) that needs up to 36 GB and failed with std::bad_alloc on a
    24 GB machine, where this needs the 18 GB."""
    n, d = emb.shape
    index = faiss.IndexFlatIP(d)
    index.codes.resize(n * d * 4)
    rows = faiss.rev_swig_ptr(index.codes.data(), n * d * 4).view(np.float32).reshape(n, d)
    for s in range(0, n, CHUNK):
        rows[s:s + CHUNK] = emb[s:s + CHUNK]
    index.ntotal = n
    return index


def faiss_search(index: Any, queries: np.ndarray, k: int, nprobe: int = 32, ef: int = 128) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """(scores, rows) of FAISS's k nearest, on a GPU when this FAISS build has one and a device is there."""
    faiss = faiss_module()
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(ef, k)
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and not hasattr(index, "hnsw"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    s, i = index.search(np.ascontiguousarray(queries, np.float32), k)
    return s, i.astype(np.int64)


# ------------------------------------------------------------------------------------------ gallery


@dataclass
class Gallery:
    emb: np.ndarray  # (n, dim) float16 unit rows (memory-mapped)
    items: pd.DataFrame  # id, author, lat, lon per row
    record: dict[str, Any]
    index: Any = None  # the FAISS index, or None for exact search
    _cells: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.emb)

    def cell_groups(self, cells: CellSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(finest class of each row (-1 outside every cell), rows sorted by class, start of each class in that
        order): positions assigned to the refining model's own cells, once per set of cells."""
        key = hash(tuple(cells.hex_id[cells.finest]))
        if key not in self._cells:
            import pandas as pd

            from geoloc_cli.geo.partitioning import assign_classes

            fine = cells.finest
            table = pd.DataFrame({"hex_id": cells.hex_id[fine], "class_label": np.arange(len(cells.hex_id[fine]))})
            cls = assign_classes(self.items["lat"].to_numpy(), self.items["lon"].to_numpy(), table)
            self._cells[key] = group_rows(cls, len(table))
        return self._cells[key]


def group_rows(cls: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cls, rows sorted by class, start of each class in that order): what `neighbours` reads a cell's rows
    from (class -1, outside every cell, sorts first and belongs to none)."""
    order = np.argsort(cls, kind="stable")
    return cls, order, np.searchsorted(cls[order], np.arange(n_classes + 1))


def eval_keys(manifest: pd.DataFrame) -> tuple[set[str], set[str]]:
    """(ids, authors) of a dataset's photos: what a gallery must not contain."""
    ok = manifest[manifest["status"] == OK]
    authors = ok["AUTHOR"].dropna().astype(str) if "AUTHOR" in ok else []
    return set(ok[ID].astype(str)), set(authors)


def leaks(items: pd.DataFrame, ids: set[str], authors: set[str], by_author: bool) -> dict[str, np.ndarray]:
    """Masks over gallery rows: sharing an id with the evaluation photos, and (by_author) an author."""
    out = {"id": items[ID].astype(str).isin(ids).to_numpy()}
    has = items["author"].notna().to_numpy()
    out["author"] = (has & items["author"].astype(str).isin(authors).to_numpy()) if by_author and authors \
        else np.zeros(len(items), bool)
    return out


def leakage(items: pd.DataFrame, manifest: pd.DataFrame, by_author: bool) -> tuple[np.ndarray, dict[str, int]]:
    """(gallery rows that leak, the check's counts: by id, and by author alone) against one evaluation
    dataset's manifest."""
    leak = leaks(items, *eval_keys(manifest), by_author)
    return leak["id"] | leak["author"], {"by_id": int(leak["id"].sum()),
                                         "by_author": int((leak["author"] & ~leak["id"]).sum())}


def gallery_dataset(cfg: Any) -> str:
    """The dataset whose gallery refines: retrieval.dataset, else the training dataset."""
    return cfg.retrieval.dataset or cfg.train.dataset


def gallery_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's stored, located photos in shard order: key, shard, id, author, lat, lon."""
    import pandas as pd

    ok = manifest[(manifest["status"] == OK) & manifest["lat"].notna() & manifest["lon"].notna()]
    author = ok["AUTHOR"] if "AUTHOR" in ok else pd.Series([None] * len(ok), index=ok.index)
    rows = pd.DataFrame({"key": ok["key"], "shard": ok["shard"], ID: ok[ID].astype(str),
                         "author": author.where(author.notna(), None), "lat": ok["lat"], "lon": ok["lon"]})
    return rows.sort_values(["shard", "key"], kind="stable").reset_index(drop=True)


def collect(emb_dir: Path, rows: pd.DataFrame, dim: int) -> tuple[np.ndarray, pd.DataFrame]:
    """(unit fp16 RGB embeddings, their rows) of `rows` that were embedded (photos that did not decode have
    none), through embeddings.gather."""
    from geoloc_cli.data.embeddings import gather

    keys = {shard: g["key"].tolist() for shard, g in rows.groupby("shard", sort=False)}
    order = np.concatenate([g.index.to_numpy() for _, g in rows.groupby("shard", sort=False)])
    emb, found = gather(emb_dir, keys)
    kept = rows.loc[order[found]].reset_index(drop=True)
    return normalise(emb[:, :dim]), kept


def save(folder: Path, emb: np.ndarray, items: pd.DataFrame, record: dict[str, Any], index: Any) -> None:
    """The gallery's files as one generation (a killed write leaves the previous gallery or none)."""
    from geoloc_cli.data.store import atomic_path, generation, write_json_atomic, write_parquet_atomic

    with generation(folder) as staged:  # every file through atomic_path: an OS failure is one StorageError
        with atomic_path(staged.path(EMBEDDINGS)) as tmp, open(tmp, "wb") as f:
            np.save(f, emb)
        write_parquet_atomic(items[[ID, "author", "lat", "lon"]], staged.path(ITEMS))
        if index is not None:
            with atomic_path(staged.path(FAISS)) as tmp:
                faiss_module().write_index(index, str(tmp))
        else:
            staged.remove(FAISS)
        write_json_atomic(staged.path(RECORD), record)


def load(folder: Path, with_index: bool = True) -> Gallery:
    """A gallery, memory-mapped; its FAISS index only `with_index` (whole-gallery search needs it, search
    inside cells does not, and an MP-16 flat index is 18 GB)."""
    import pandas as pd

    from geoloc_cli.data.store import check_committed

    record_path = Path(folder) / RECORD
    if not record_path.is_file():
        raise InputError(f"no gallery in {folder}: run `geoloc index` first (after `geoloc embed`)")
    check_committed(folder)
    record = json.loads(record_path.read_text())
    emb = np.load(Path(folder) / EMBEDDINGS, mmap_mode="r")
    items = pd.read_parquet(Path(folder) / ITEMS)
    assert len(emb) == len(items) == record["count"], (len(emb), len(items), record["count"])
    index = None
    if with_index and record["index"] != "exact":
        faiss = faiss_module()
        if faiss is None:
            raise ConfigError(f"{folder} has a FAISS index ({record['index']}): pip install 'geoloc[retrieval]'")
        index = faiss.read_index(str(Path(folder) / FAISS))
    return Gallery(emb, items, record, index)


def check_embedder(gallery: Gallery, model: Any, folder: Path) -> None:
    """Refuse a gallery embedded by another backbone than the refining model's RGB branch."""
    have = fingerprint(model.rgb.state_dict())
    if gallery.record["embedder_fingerprint"] != have:
        raise ConfigError(f"the gallery in {folder} was embedded by another backbone "
                          f"({gallery.record['embedder'].get('pretrained')!r}) than this model's RGB branch: run "
                          "`geoloc embed --set model.pretrained=<this checkpoint>` (after deleting the dataset's "
                          "emb/), then `geoloc index`")


# ------------------------------------------------------------------------------------------ queries


def embed_pixels(model: Any, pixels: Any, device: Any, amp: Any = None) -> np.ndarray:
    """(B, 3, S, S) or crop stacks (B, K, 3, S, S) of the evaluation view -> (B, dim) unit float32 RGB
    features (a stack's crops averaged), as `geoloc embed` computes them."""
    import torch

    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=amp or torch.float32,
                                                enabled=amp is not None):
        x = pixels.to(device)
        return unit_queries(model.embed(x.flatten(0, 1) if x.ndim == 5 else x), x.shape[1] if x.ndim == 5 else 0)


def unit_queries(feature: Any, crops: int) -> np.ndarray:
    """RGB features (B, dim), or (B * K, dim) of K crops each -> (B, dim) unit float32 queries (crops
    averaged after normalising each)."""
    import torch

    f = feature.float()
    if crops:
        f = torch.nn.functional.normalize(f, dim=-1).view(-1, crops, f.shape[-1]).mean(1)
    return normalise(f.cpu().numpy(), np.float32)


def embed_images(model: Any, images: list[Any], size: int, pre: dict[str, Any]) -> np.ndarray:
    """PIL photos -> (B, dim) unit RGB features of their evaluation view (predict's photos)."""
    import torch

    from geoloc_cli.inference.geolocate import views

    x = np.concatenate([views(im, None, size, pre, raw=True)[0] for im in images])
    device = next(model.parameters()).device
    return embed_pixels(model, torch.from_numpy(x), device)


# ------------------------------------------------------------------------------------------ refinement


def top_classes(hier: np.ndarray, top_cells: int) -> np.ndarray:
    """(q, max(top_cells, 1)) most likely finest classes of each row of a hierarchical distribution, best first."""
    return np.argsort(-hier, axis=1, kind="stable")[:, :max(top_cells, 1)]


def neighbours(gallery: Gallery, cells: CellSet, queries: np.ndarray, top: np.ndarray, k: int, top_cells: int,
               candidates: int, allowed: np.ndarray | None = None, nprobe: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) (q, k) of each query's most similar allowed gallery photos inside its most likely finest
    cells `top` (anywhere with top_cells 0); rows -1 where fewer exist. Inside cells the search is exact and
    ignores a FAISS index: a global approximate search filtered to one cell can miss the cell's photos
    altogether (IVF's recall@10 on a synthetic MP-16-sized gallery: 0.71-0.86 at nprobe 8-512, benchmarks/README.md)."""
    allowed = np.ones(len(gallery), bool) if allowed is None else allowed
    if top_cells <= 0 and gallery.index is not None:  # FAISS: global candidates, the allowed ones kept
        s, i = faiss_search(gallery.index, queries, max(candidates, k), nprobe)
        return _first_k(s, i, (i >= 0) & allowed[np.maximum(i, 0)], k)
    if top_cells <= 0:
        return exact_search(queries, gallery.emb, k, allowed)
    _, order, starts = gallery.cell_groups(cells)
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for q in range(len(queries)):  # exact: score only the rows of the query's cells
        rows = np.concatenate([order[starts[c]:starts[c + 1]] for c in top[q]])
        rows = np.sort(rows[allowed[rows]])  # ascending: memory-mapped reads in file order
        if not len(rows):
            continue
        sims = gallery.emb[rows].astype(np.float32) @ queries[q].astype(np.float32)
        best = np.argsort(-sims, kind="stable")[:k]
        out_s[q, :len(best)], out_i[q, :len(best)] = sims[best], rows[best]
    return out_s, out_i


def _first_k(s: np.ndarray, i: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k kept of each row of FAISS's best-first results."""
    rank = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    s, i, keep = (np.take_along_axis(a, rank, 1) for a in (s, i, keep))
    return np.where(keep, s, -np.inf).astype(np.float32), np.where(keep, i, -1)


def aggregate(lat: np.ndarray, lon: np.ndarray, scores: np.ndarray, how: str, temperature: float) -> tuple[float,
                                                                                                           float]:
    """One position from neighbours' positions (best first) and similarities: top1 (the nearest one), mean
    (centroid on the sphere), weighted (centroid, weights softmax(similarity / temperature)), median
    (weighted geometric median on the sphere: robust to the odd far neighbour)."""
    if how == "top1":
        return float(lat[0]), float(lon[0])
    w = np.ones(len(lat)) if how == "mean" else np.exp((scores - scores.max()) / max(temperature, 1e-6))
    p = _xyz(lat, lon)
    c = (w[:, None] * p).sum(0)
    if how == "median":  # Weiszfeld on the unit vectors, re-projected to the sphere
        for _ in range(50):
            c = c / max(np.linalg.norm(c), 1e-12)
            d = np.maximum(np.linalg.norm(p - c, axis=1), 1e-9)
            c = ((w / d)[:, None] * p).sum(0)
    return _latlon(c)


def _xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)


def _latlon(v: np.ndarray) -> tuple[float, float]:
    x, y, z = v / max(np.linalg.norm(v), 1e-12)
    return float(np.degrees(np.arcsin(np.clip(z, -1, 1)))), float(np.degrees(np.arctan2(y, x)))


def refine(gallery: Gallery, cells: CellSet, queries: np.ndarray, top: np.ndarray, cfg: Any,
           allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, neighbours used) per query: the aggregate of its k nearest allowed gallery photos in its
    top cells (`top_classes`); the hierarchical prediction's cell centre where there is none."""
    r = cfg.retrieval
    s, i = neighbours(gallery, cells, queries, top, r.k, r.top_cells, r.candidates, allowed, r.nprobe)
    best = top[:, 0]
    lat, lon = cells.lat[cells.finest][best].copy(), cells.lon[cells.finest][best].copy()
    used = (i >= 0).sum(1)
    glat, glon = gallery.items["lat"].to_numpy(), gallery.items["lon"].to_numpy()
    for q in np.flatnonzero(used):
        rows = i[q, :used[q]]
        lat[q], lon[q] = aggregate(glat[rows], glon[rows], s[q, :used[q]], r.aggregation, r.temperature)
    return lat, lon, used


# ------------------------------------------------------------------------------------------ for the stages


REFINED = "hierarchical+knn"  # the prediction kind (metrics key, column prefix) of refined positions


@dataclass
class Refiner:
    """A loaded gallery checked against the refining model: what predict and evaluate hold for --refine knn."""

    cfg: Any
    gallery: Gallery
    folder: Path
    _kept: list[Any] = field(default_factory=list, repr=False)  # RGB outputs of the watched forward

    @classmethod
    def open(cls, cfg: Any, model: Any) -> Refiner:
        from geoloc_cli.data.store import DataRoot

        folder = DataRoot(cfg.root).gallery(gallery_dataset(cfg))
        gallery = load(folder, with_index=cfg.retrieval.top_cells == 0)
        check_embedder(gallery, model, folder)
        return cls(cfg, gallery, folder)

    def settings(self) -> dict[str, Any]:
        """What the outputs record about the refinement."""
        r = self.cfg.retrieval
        return {"method": "knn", "k": r.k, "top_cells": r.top_cells, "aggregation": r.aggregation,
                "temperature": r.temperature, "gallery": str(self.folder), "gallery_photos": len(self.gallery),
                "search": self.gallery.record["index"] if self.gallery.index is not None else "exact"}

    @contextmanager
    def watching(self, model: Any) -> Iterator[None]:
        """Keep the RGB branch's output of each forward inside the block (a forward hook), so a batch's
        queries come from the forward that classified it instead of running the branch again: half of a
        dual-branch model's work, all of an RGB-only one's. Exchange fusion runs the branch block by block,
        never as a whole: nothing is kept, and the caller embeds the batch (`embed_pixels`)."""
        self._kept = []
        handles = [
            # each forward starts afresh: what an embedding outside a forward left (exchange fusion's
            # `embed_pixels`) must not pass for the next batch's feature
            model.register_forward_pre_hook(lambda *_: self._kept.clear()),
            model.rgb.register_forward_hook(lambda _module, _args, out: self._kept.append(out.detach())),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._kept = []

    def kept_queries(self, crops: int = 0) -> np.ndarray | None:
        """Unit RGB queries from the watched forward that just ran (`crops` per photo, 0 for one view), or
        None when it kept none (exchange fusion): then embed the batch with `embed_pixels`."""
        kept, self._kept = self._kept, []
        if not kept:
            return None
        assert len(kept) == 1, f"the RGB branch ran {len(kept)} times in one forward"
        return unit_queries(kept[0], crops)

    def top(self, probs: dict[str, np.ndarray], cells: CellSet) -> np.ndarray:
        from geoloc_cli.inference.geolocate import hierarchical_distribution

        return top_classes(hierarchical_distribution(probs, cells), self.cfg.retrieval.top_cells)

    def refine(self, cells: CellSet, queries: np.ndarray, top: np.ndarray,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return refine(self.gallery, cells, queries, top, self.cfg, allowed)

    def leakage(self, rows: pd.DataFrame) -> tuple[np.ndarray, dict[str, int]]:
        """(gallery rows allowed, the check's counts) against one evaluation dataset's photos (manifest rows)."""
        ok = rows.assign(status=OK) if "status" not in rows else rows
        bad, counts = leakage(self.gallery.items, ok, self.cfg.retrieval.exclude_authors)
        return ~bad, counts

    def evaluate(self, pred: pd.DataFrame, queries: np.ndarray, top: np.ndarray, cells: CellSet,
                 rows: pd.DataFrame) -> dict[str, Any]:
        """Add the refined kind's columns to evaluate's per-image rows (lat, lon, km, neighbours) with every
        leaking gallery photo left out; returns the setup to record (settings and the leakage check)."""
        from geoloc_cli.geo.sphere import haversine_km

        allowed, leaked = self.leakage(rows)
        lat, lon, used = self.refine(cells, queries, top, allowed)
        pred[f"{REFINED}_lat"], pred[f"{REFINED}_lon"], pred[f"{REFINED}_neighbours"] = lat, lon, used
        pred[f"{REFINED}_km"] = haversine_km(lat, lon, pred["lat"].to_numpy(), pred["lon"].to_numpy())
        return {**self.settings(), "leakage_left_out": leaked, "without_neighbours": int((used == 0).sum())}
