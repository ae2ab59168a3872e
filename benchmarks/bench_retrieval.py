"""Retrieval: queries/s and recall@10 of FAISS indexes against exact search, their memory and build time.

    python benchmarks/bench_retrieval.py                        # MP-16 size: 4.7 M x 1024 fp16 (~9 GB + index)
    python benchmarks/bench_retrieval.py --n 500000 --queries 200

The gallery is synthetic but clustered like photo embeddings: `--clusters` centres (places), each row its
centre plus noise, L2-normalised, stored fp16 as `geoloc index` stores it, and memory-mapped from a .npy file
as `geoloc index` galleries are (written once under --cache and reused, so the MP-16 size runs on a machine
with less RAM than gallery plus index); queries are new draws from the same mixture. Exact search is geoloc's
numpy search over the whole gallery (retrieval.exact_search: float32 chunks, a running top k) - the ground
truth of recall@10. Then each FAISS index geoloc builds (retrieval.build_faiss: flat = exact inner product in
float32, ivf = inverted lists over fp16 codes at a few nprobe values, hnsw; `--indexes` picks) is timed: build (train
+ add), the memory it added (RssAnon: the process's own pages, not the gallery's page cache), queries/s for a
batch of queries, recall@10. An index that would not fit in the memory available is skipped with a line that
says so. Refinement itself searches only a query's top cells, far fewer rows; this is the global search a
FAISS gallery does before filtering.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))
from geoloc_cli.inference import retrieval  # noqa: E402


def proc_gb(field: str) -> float:
    """A /proc/self/status memory field in GiB. RssAnon is the process's own memory (indexes, copies),
    without the memory-mapped gallery's page cache, which VmRSS counts and the kernel can drop."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def gallery(n: int, d: int, clusters: int, noise: float, seed: int,
            cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) fp16 unit rows around `clusters` centres, built in chunks (float32 of one chunk at a time);
    with `cache`, written once to a .npy there (atomically: a killed run leaves none) and memory-mapped."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    path = cache / f"gallery-{n}x{d}-c{clusters}-noise{noise}-seed{seed}.npy" if cache else None
    if path is not None and path.is_file():
        return np.load(path, mmap_mode="r"), centres
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        out = np.lib.format.open_memmap(tmp, "w+", np.float16, (n, d))
    else:
        out = np.empty((n, d), np.float16)
    for s in range(0, n, 262_144):
        m = min(262_144, n - s)
        x = centres[rng.integers(0, clusters, m)] + noise * rng.standard_normal((m, d), dtype=np.float32) / d**0.5
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    if path is None:
        return out, centres
    out.flush()
    del out
    tmp.rename(path)
    return np.load(path, mmap_mode="r"), centres


def queries(centres: np.ndarray, q: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    d = centres.shape[1]
    x = centres[rng.integers(0, len(centres), q)] + noise * rng.standard_normal((q, d), dtype=np.float32) / d**0.5
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cell_search_qps(emb: np.ndarray, q: np.ndarray, k: int, n_cells: int, seed: int) -> float:
    """queries/s of --refine knn's default search (retrieval.top_cells=1): exact, over the gallery rows of the
    query's predicted cell only (retrieval.neighbours). Rows are dealt to `n_cells` cells at random, so a
    cell's photos lie spread over the memory-mapped file as a real cell's do; each query gets a random cell."""
    rng = np.random.default_rng(seed + 2)
    groups = retrieval.group_rows(rng.integers(0, n_cells, len(emb)), n_cells)
    gallery = retrieval.Gallery(emb, items=None, record={})
    gallery.cell_groups = lambda _cells: groups  # (rows -> cells without positions to assign)
    top = rng.integers(0, n_cells, (len(q), 1))
    t = time.perf_counter()
    retrieval.neighbours(gallery, None, q, top, k, top_cells=1, candidates=1000)
    return len(q) / (time.perf_counter() - t)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth, strict=True)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4_700_000, help="gallery rows")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--clusters", type=int, default=0, help="centres of the synthetic mixture (0: n / 235, MP-16's "
                   "4.7 M photos over 20,000 places, the same density at any --n)")
    p.add_argument("--noise", type=float, default=1.5, help="noise norm around a centre (1 = as far as the centre)")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", default="8,32,128", help="IVF lists visited, comma-separated")
    p.add_argument("--cells", type=int, default=12_895, help="cells the gallery is dealt to for the in-cell "
                   "search (MP-16's fine partition: 12,895 cells, ~365 photos each)")
    p.add_argument("--indexes", default="flat,ivf", help="FAISS indexes to build and time, comma-separated, of "
                   "flat (float32: 4 n dim bytes), ivf and hnsw (slow to build at full size); '' = exact search only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path(__file__).parent / "out" / "retrieval"),
                   help="where the synthetic gallery's .npy is written once and memory-mapped from ('' = in RAM)")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up in a log while a long run goes on
    faiss = retrieval.faiss_module()
    a.clusters = a.clusters or max(1, a.n // 235)
    t = time.perf_counter()
    emb, centres = gallery(a.n, a.dim, a.clusters, a.noise, a.seed, Path(a.cache) if a.cache else None)
    q = queries(centres, a.queries, a.noise, a.seed)
    out = {"n": a.n, "dim": a.dim, "clusters": a.clusters, "noise": a.noise, "queries": a.queries, "k": a.k,
           "gallery_gb": round(emb.nbytes / 2**30, 2),
           "synthesis_s": round(time.perf_counter() - t, 1), "threads": faiss.omp_get_max_threads() if faiss else None}
    print(f"gallery {a.n:,} x {a.dim} fp16: {out['gallery_gb']} GB, made or mapped in {out['synthesis_s']} s")
    t = time.perf_counter()
    _, truth = retrieval.exact_search(q, emb, a.k)
    secs = time.perf_counter() - t
    out["exact_numpy"] = {"qps": round(a.queries / secs, 2), "recall@10": 1.0, "memory_gb": 0.0, "build_s": 0.0}
    print(f"exact numpy: {a.queries / secs:,.1f} queries/s")
    qps = cell_search_qps(emb, q, a.k, a.cells, a.seed)
    out["exact_in_top_cell"] = {"qps": round(qps, 1), "cells": a.cells, "rows_per_cell": round(a.n / a.cells)}
    print(f"exact in the query's top cell (--refine knn's default; {a.n / a.cells:,.0f} rows per cell): "
          f"{qps:,.0f} queries/s")
    if faiss is None:
        print("faiss is not installed: pip install 'geoloc[retrieval]'")
    kinds = [k for k in a.indexes.split(",") if k]
    if set(kinds) - {"flat", "ivf", "hnsw"}:
        p.error(f"--indexes: {a.indexes!r}: expected flat, ivf and/or hnsw")
    for kind in kinds if faiss else []:
        need = a.n * a.dim * (4 if kind == "flat" else 2) / 2**30  # float32 rows, or fp16 codes
        if need > 0.9 * available_gb():
            print(f"faiss_{kind}: skipped, needs ~{need:.1f} GB and {available_gb():.1f} GB is available")
            out[f"faiss_{kind}"] = {"skipped": f"needs ~{need:.1f} GB, {available_gb():.1f} GB available"}
            continue
        before = proc_gb("RssAnon")
        t = time.perf_counter()
        index = retrieval.build_faiss(emb, kind, seed=a.seed)
        build = time.perf_counter() - t
        mem = proc_gb("RssAnon") - before
        for nprobe in [int(x) for x in a.nprobe.split(",")] if kind == "ivf" else [0]:
            t = time.perf_counter()
            _, found = retrieval.faiss_search(index, q, a.k, nprobe=nprobe or 32)
            secs = time.perf_counter() - t
            name = f"faiss_{kind}" + (f"_nprobe{nprobe}" if nprobe else "")
            out[name] = {"qps": round(a.queries / secs, 1), "recall@10": round(recall(found, truth), 4),
                         "memory_gb": round(mem, 2), "build_s": round(build, 1)}
            print(f"{name}: build {build:.1f} s, +{mem:.2f} GB resident, {a.queries / secs:,.1f} queries/s, "
                  f"recall@10 {out[name]['recall@10']:.3f}")
        del index
    # peak resident set, the gallery's mapped pages included (they are page cache the kernel can drop)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
