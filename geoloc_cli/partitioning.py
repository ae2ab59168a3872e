"""Adaptive S2 geo-cell partitionings (GeoEstimation), class assignment, cell tables and the hierarchy.

The algorithm (GeoEstimation's create_cells.py): map every image to its S2 cell
at lvl_min; drop cells with count <= tau_min together with their images; while some cell holds more
than tau_max images and level < lvl_max, move the images of every over-full cell one level down and
recount; finally drop cells with count <= tau_min.

How it is fast: leaf cell ids are sorted once. On sorted leaf ids every S2 cell is a contiguous run
(a cell's descendants are the id range [range_min, range_max]), so counting cells at any level is a
run-length pass over a monotone array: no hashing, no Python loop over points, and each splitting
pass touches only the images that are still in over-full cells.

Class labels follow the published files: create_cells.py numbers cells in the order in which their
first image appears in the image list (Python dict insertion order), so class 0 is the cell of the
first kept image of the input, class 1 the next new cell, and so on. (The published run fed images
through multiprocessing's imap_unordered in chunks of 1000, so its order was the input order up to
chunk reordering; ours is exactly the input order, which makes the labels reproducible.) Mean
coordinates are summed in input order, the published summation order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc_cli import geo, store
from geoloc_cli.errors import InputError

CELL_COLUMNS = ["class_label", "hex_id", "imgs_per_cell", "latitude_mean", "longitude_mean"]
PARTITIONS_JSON = "partitions.json"
LABELS_FILE = "labels.parquet"
HIERARCHY_JSON = "hierarchy.json"
GENERATION = "generation"  # the id of the `geoloc partition` run that wrote a file, in each of its files
DEFAULT_ORDER = ("coarse", "middle", "fine")


# --------------------------------------------------------------------------------------------------
# Building partitionings


class SortedPoints:
    """Leaf S2 ids of a point set, sorted once and shared by every partitioning built from it."""

    def __init__(self, lat: np.ndarray, lon: np.ndarray) -> None:
        self.lat = np.ascontiguousarray(lat, dtype=np.float64)
        self.lon = np.ascontiguousarray(lon, dtype=np.float64)
        leaf = geo.cell_ids(self.lat, self.lon)
        # Ties (duplicate coordinates) may come in any order: nothing below depends on it.
        self.order = np.argsort(leaf)  # sorted position -> input index
        self.leaf = leaf[self.order]

    def __len__(self) -> int:
        return self.leaf.size


@dataclass
class Partition:
    """One built partitioning: its cell table and each input point's class (-1 = dropped)."""

    cells: pd.DataFrame
    labels: np.ndarray


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start index, length) of each run of equal values in a sorted array."""
    n = sorted_values.size
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1])
    return starts, np.diff(np.append(starts, n))


def partition_points(
    points: SortedPoints, tau_min: int, tau_max: int, lvl_min: int = 2, lvl_max: int = 30
) -> Partition:
    """The published algorithm on pre-sorted points; see the module docstring."""
    if not 0 <= lvl_min <= lvl_max <= geo.MAX_LEVEL:
        raise ValueError(f"need 0 <= lvl_min <= lvl_max <= 30, got {lvl_min}, {lvl_max}")
    cell = geo.parent(points.leaf, lvl_min)  # monotone, because leaf ids are sorted
    _, counts = _runs(cell)
    kept = np.flatnonzero(np.repeat(counts > tau_min, counts))  # sorted positions still in play
    leaf, cell = points.leaf[kept], cell[kept]

    _, counts = _runs(cell)
    active = np.flatnonzero(np.repeat(counts > tau_max, counts))  # images of over-full cells
    level = lvl_min
    while active.size and level < lvl_max:
        level += 1
        # The children of an over-full cell hold all of its images, so counting runs among the
        # active images alone gives the new cells' full counts.
        children = geo.parent(leaf[active], level)
        cell[active] = children
        _, counts = _runs(children)
        active = active[np.repeat(counts > tau_max, counts)]

    starts, counts = _runs(cell)
    keep = counts > tau_min
    input_index = points.order[kept]
    # Published class order: by the first (input-order) image of each cell.
    first = np.minimum.reduceat(input_index, starts)[keep] if starts.size else np.zeros(0, np.int64)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    run_label = np.full(starts.size, -1, dtype=np.int64)
    run_label[keep] = rank

    labels = np.full(len(points), -1, dtype=np.int64)
    labels[input_index] = np.repeat(run_label, counts)
    cell_ids = np.empty(first.size, dtype=np.uint64)
    cell_ids[rank] = cell[starts[keep]]
    return Partition(_cell_table(cell_ids, labels, points.lat, points.lon), labels)


def _cell_table(cell_ids: np.ndarray, labels: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> pd.DataFrame:
    n = cell_ids.size
    member = labels >= 0
    # bincount adds weights one by one in input order: the published (sequential) summation.
    counts = np.bincount(labels[member], minlength=n)
    lat_sum = np.bincount(labels[member], weights=lat[member], minlength=n)
    lon_sum = np.bincount(labels[member], weights=lon[member], minlength=n)
    return pd.DataFrame(
        {
            "class_label": np.arange(n, dtype=np.int64),
            "hex_id": pd.array(geo.to_token(cell_ids), dtype=object),
            "imgs_per_cell": counts.astype(np.int64),
            "latitude_mean": lat_sum / np.maximum(counts, 1),
            "longitude_mean": lon_sum / np.maximum(counts, 1),
        }
    )


def build_partitioning(
    lat: np.ndarray, lon: np.ndarray, tau_min: int, tau_max: int, lvl_min: int = 2, lvl_max: int = 30
) -> pd.DataFrame:
    """The cell table (CELL_COLUMNS) of the published adaptive partitioning of these points."""
    return partition_points(SortedPoints(lat, lon), tau_min, tau_max, lvl_min, lvl_max).cells


def build_partitionings(
    lat: np.ndarray,
    lon: np.ndarray,
    thresholds: Mapping[str, tuple[int, int]],
    lvl_min: int = 2,
    lvl_max: int = 30,
) -> dict[str, Partition]:
    """Several partitionings ({name: (tau_min, tau_max)}) of one point set, sorting the ids once."""
    points = SortedPoints(lat, lon)
    return {name: partition_points(points, tmin, tmax, lvl_min, lvl_max) for name, (tmin, tmax) in thresholds.items()}


# --------------------------------------------------------------------------------------------------
# Class assignment and hierarchy (S2 containment)


def _containing(query: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
    """For each query cell id, the row of `table_ids` whose cell contains it (-1 if none).

    When cells nest, the coarsest containing cell wins (as GeoEstimation's assign_classes.py, which
    tries levels from coarse to fine). Partitionings never nest, which allows one binary search.
    """
    out = np.full(query.size, -1, dtype=np.int64)
    if table_ids.size == 0 or query.size == 0:
        return out
    lo, hi = geo.cell_range(table_ids)
    by_lo = np.argsort(lo, kind="stable")
    lo, hi = lo[by_lo], hi[by_lo]
    q_lo, q_hi = geo.cell_range(query)
    if np.all(lo[1:] > hi[:-1]):  # disjoint ranges: the candidate is the last cell starting <= query
        k = np.searchsorted(lo, q_lo, side="right") - 1
        k_safe = np.maximum(k, 0)
        hit = (k >= 0) & (q_hi <= hi[k_safe])
        out[hit] = by_lo[k_safe[hit]]
        return out
    levels = geo.level_of(table_ids)
    q_level = geo.level_of(query)
    for level in np.unique(levels):  # coarse to fine
        rows = np.flatnonzero(levels == level)
        ids = table_ids[rows]
        by_id = np.argsort(ids)
        todo = np.flatnonzero((out < 0) & (q_level >= level))
        anc = geo.parent(query[todo], int(level))
        k = np.minimum(np.searchsorted(ids[by_id], anc), ids.size - 1)
        hit = ids[by_id][k] == anc
        out[todo[hit]] = rows[by_id[k[hit]]]
    return out


def table_cell_ids(cells: pd.DataFrame) -> np.ndarray:
    return geo.from_token(cells["hex_id"].tolist())


def assign_classes(lat: np.ndarray, lon: np.ndarray, cells: pd.DataFrame) -> np.ndarray:
    """Class label (int64) of each point: the table cell among its S2 ancestors, levels 0..30; -1 if none.

    The published assign_classes.py only tried levels 2..29 and so never found the level-30 cells of
    the fine partitioning; everything else agrees with it.
    """
    leaf = geo.cell_ids(lat, lon)
    row = _containing(leaf, table_cell_ids(cells))
    labels = cells["class_label"].to_numpy(dtype=np.int64)
    return np.where(row >= 0, labels[np.maximum(row, 0)], -1)


def assign_points(points: SortedPoints, cells: pd.DataFrame) -> np.ndarray:
    """`assign_classes` for points whose leaf ids are already computed and sorted (several tables, one
    pass of S2 ids; sorted queries also make the binary searches cache-friendly)."""
    row = _containing(points.leaf, table_cell_ids(cells))
    labels = cells["class_label"].to_numpy(dtype=np.int64)
    out = np.empty(len(points), dtype=np.int64)
    out[points.order] = np.where(row >= 0, labels[np.maximum(row, 0)], -1)
    return out


def build_hierarchy(
    tables: Mapping[str, pd.DataFrame], order: Sequence[str] = DEFAULT_ORDER
) -> dict[str, np.ndarray]:
    """For each cell of the finest partitioning (order[-1]), its class in every partitioning of `order`.

    Returns {name: int64 array of length n_fine}; the finest maps to itself (0..n-1), the others give
    the class whose cell contains the fine cell (S2 id containment), -1 if none. Hierarchical
    prediction is p_hier(c) = prod over names of p_name(hierarchy[name][c]).

    GeoEstimation's Hierarchy class looked up the parents of the fine cell's *mean coordinate*; that
    point normally lies inside the cell, and where it does the two agree. Containment of the cell
    itself is exact, also for cells whose mean falls outside (e.g. cells crossing the antimeridian).
    """
    missing = [name for name in order if name not in tables]
    if missing:
        raise ValueError(f"hierarchy needs partitionings {missing}")
    fine = tables[order[-1]]
    fine_ids = table_cell_ids(fine)
    out: dict[str, np.ndarray] = {}
    for name in order:
        cells = tables[name]
        labels = cells["class_label"].to_numpy(dtype=np.int64)
        row = _containing(fine_ids, table_cell_ids(cells))
        out[name] = np.where(row >= 0, labels[np.maximum(row, 0)], -1)
    # Rows of the fine table are in class order (read_cells sorts), so the fine column is 0..n-1.
    out[order[-1]] = fine["class_label"].to_numpy(dtype=np.int64)
    return out


# --------------------------------------------------------------------------------------------------
# Files: cell tables, metadata points, label mapping, partitions.json


def _bad(path: Path, line: int, column: str, value: object, why: str) -> InputError:
    return InputError(f"{path}: line {line}, column {column}: {value!r} {why}")


def _preamble(path: Path) -> tuple[int, dict[str, str]]:
    """Number of `key: value` lines before the CSV header (the published files have two)."""
    import gzip

    meta: dict[str, str] = {}
    opener = gzip.open if path.suffix == ".gz" else open  # the packaged published tables are gzipped
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        for line in f:
            text = line.strip()
            if "," in text or ":" not in text:
                break
            key, _, value = text.partition(":")
            meta[key.strip()] = value.strip()
    return len(meta), meta


def read_cells(path: Path) -> pd.DataFrame:
    """Read a cell table (with or without the preamble, LF or CRLF); rows sorted by class_label.

    hex_id is always a string. `df.attrs["num_images"]` holds the preamble's image count (or None).
    Malformed content raises InputError naming the file, line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cell table not found: {path}")
    try:
        skip, meta = _preamble(path)
        raw = pd.read_csv(path, skiprows=skip, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, OSError) as e:  # OSError: a .gz that is not gzip
        raise InputError(f"{path}: not a text file ({e})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"{path}: not a readable cell table: {str(e).strip()}") from None
    missing = [c for c in CELL_COLUMNS if c not in raw.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(raw.columns)})")
    if raw.empty:
        raise InputError(f"{path}: no cells")
    first_line = skip + 2  # 1-based file line of the first data row
    cells = pd.DataFrame(
        {
            "class_label": _column_numbers(raw, "class_label", path, first_line, integer=True),
            "hex_id": _column_tokens(raw, path, first_line),
            "imgs_per_cell": _column_numbers(raw, "imgs_per_cell", path, first_line, integer=True),
            "latitude_mean": _column_numbers(raw, "latitude_mean", path, first_line, limit=90),
            "longitude_mean": _column_numbers(raw, "longitude_mean", path, first_line, limit=180),
        }
    )
    labels = cells["class_label"].to_numpy()
    if not np.array_equal(np.sort(labels), np.arange(labels.size)):
        dup = pd.Series(labels).duplicated().to_numpy()
        row = int(np.argmax(dup)) if dup.any() else int(np.argmax((labels < 0) | (labels >= labels.size)))
        raise _bad(path, first_line + row, "class_label", int(labels[row]), f"breaks 0..{labels.size - 1} numbering")
    cells = cells.sort_values("class_label", kind="stable").reset_index(drop=True)
    num_images = meta.get("num_images")
    cells.attrs["num_images"] = int(num_images) if num_images and num_images.isdigit() else None
    return cells


def _column_numbers(
    raw: pd.DataFrame, column: str, path: Path, first_line: int, integer: bool = False, limit: float | None = None
) -> np.ndarray:
    values = pd.to_numeric(raw[column].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if integer:
        bad |= values != np.round(values)
    if limit is not None:
        bad |= np.abs(values) > limit
    if bad.any():
        row = int(np.argmax(bad))
        what = "is not an integer" if integer else f"is not a number in [-{limit}, {limit}]"
        raise _bad(path, first_line + row, column, raw[column].iloc[row], what)
    return values.astype(np.int64) if integer else values


def _column_tokens(raw: pd.DataFrame, path: Path, first_line: int) -> np.ndarray:
    tokens = raw["hex_id"].str.strip()
    ids = np.zeros(len(tokens), dtype=np.uint64)
    parsed = np.zeros(len(tokens), dtype=bool)
    for row, token in enumerate(tokens.tolist()):
        try:
            ids[row], parsed[row] = geo.token_to_id(token), True
        except ValueError:
            break
    bad = ~(parsed & geo.is_valid(ids))
    if bad.any():
        row = int(np.argmax(bad))
        raise _bad(path, first_line + row, "hex_id", tokens.iloc[row], "is not an S2 cell token")
    dup = tokens.duplicated().to_numpy()
    if dup.any():
        row = int(np.argmax(dup))
        raise _bad(path, first_line + row, "hex_id", tokens.iloc[row], "appears twice")
    return tokens.to_numpy(dtype=object)


def write_cells(cells: pd.DataFrame, path: Path, num_images: int) -> None:
    """Write a cell table in the published format: preamble, header, CRLF rows, floats as repr()."""
    lines = [f"num_images: {int(num_images)}", "min_concept_probability: ---", ",".join(CELL_COLUMNS)]
    cols = [cells[c].tolist() for c in CELL_COLUMNS]
    lines += [f"{int(c)},{h},{int(n)},{float(la)!r},{float(lo)!r}" for c, h, n, la, lo in zip(*cols, strict=True)]
    store.write_text_atomic(Path(path), "\r\n".join(lines) + "\r\n")


def cells_filename(tau_min: int, tau_max: int) -> str:
    return f"cells_{tau_min}_{tau_max}.csv"


@dataclass
class Points:
    """Image ids and coordinates read from a metadata CSV."""

    img_id: np.ndarray  # object array of str
    lat: np.ndarray
    lon: np.ndarray


def read_points(path: Path) -> Points:
    """IMG_ID, LAT, LON of every row of a metadata CSV (*_places365.csv; places365.read_points checks
    every value; errors name the file, the 1-based line and the column)."""
    from geoloc_cli import places365

    return Points(*places365.read_points(Path(path)))


def export_mapping(
    img_ids: Sequence[str] | np.ndarray, labels: Mapping[str, np.ndarray], path: Path,
    order: Sequence[str] = DEFAULT_ORDER,
) -> int:
    """Write the published label mapping {IMG_ID: [coarse, middle, fine]} as JSON (atomically).

    Like GeoEstimation's assign_classes.py, images without a class in every partitioning are left
    out. Returns the number of images written.
    """
    missing = [name for name in order if name not in labels]
    if missing:
        raise ValueError(f"label mapping needs partitionings {missing}")
    columns = np.stack([np.asarray(labels[name], dtype=np.int64) for name in order], axis=1)
    keep = np.flatnonzero((columns >= 0).all(axis=1))
    ids = np.asarray(img_ids, dtype=object)[keep].tolist()
    rows = columns[keep].tolist()
    compact = (",", ":")
    body = ",".join(f"{json.dumps(str(i))}:{json.dumps(r, separators=compact)}" for i, r in zip(ids, rows, strict=True))
    store.write_text_atomic(Path(path), "{" + body + "}\n")
    return len(ids)


def _partitions_dir(path: Path, dataset: str) -> Path:
    """`path` itself, or the partitions directory of `dataset` when `path` is a data root."""
    path = Path(path)
    candidates = [path]
    if path.parts[-2:] != ("partitions", dataset):  # already the dataset's directory: no second guess
        candidates.append(store.DataRoot(path).partitions(dataset))
    for candidate in candidates:
        if (candidate / PARTITIONS_JSON).is_file():
            return candidate
    where = " or ".join(str(c) for c in candidates)
    raise InputError(f"no {PARTITIONS_JSON} in {where} (run `geoloc partition`)")


def read_partitions_json(path: Path, dataset: str = "mp16") -> tuple[Path, dict[str, dict]]:
    """(directory, {name: {file, tau_min, tau_max, num_cells, ...}}) in the order it was written."""
    directory = _partitions_dir(path, dataset)
    store.check_committed(directory)
    file = directory / PARTITIONS_JSON
    try:
        info = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) and "file" in v for v in info.values()):
        raise InputError(f"{file}: expected {{name: {{file, tau_min, tau_max, num_cells}}}}")
    return directory, info


def partitions_generation(info: dict[str, dict]) -> str | None:
    """The generation partitions.json names (None: written before geoloc kept generations)."""
    found = {entry.get(GENERATION) for entry in info.values()}
    return found.pop() if len(found) == 1 else None


def _same_generation(directory: Path, file: str, have: str | None, want: str | None) -> None:
    if want is not None and have != want:
        raise InputError(f"{directory / file} (generation {have}) does not belong with {PARTITIONS_JSON} (generation "
                         f"{want}): an interrupted or concurrent `geoloc partition`? run it again")


def load_partitions(root_or_dir: Path, dataset: str = "mp16") -> dict[str, pd.DataFrame]:
    """Cell tables by name (partitions.json order) from a partitions directory or a data root; each
    table must have the size partitions.json recorded for it."""
    directory, info = read_partitions_json(root_or_dir, dataset)
    tables = {name: read_cells(directory / entry["file"]) for name, entry in info.items()}
    for name, entry in info.items():
        if entry.get("num_cells", len(tables[name])) != len(tables[name]):
            raise InputError(f"{directory / entry['file']} has {len(tables[name])} cells, {PARTITIONS_JSON} says "
                             f"{entry['num_cells']}: run `geoloc partition` again")
    return tables


def load_labels(root_or_dir: Path, dataset: str = "mp16") -> pd.DataFrame:
    """labels.parquet, checked to be of the same generation as partitions.json (in `.attrs["generation"]`)."""
    directory, info = read_partitions_json(root_or_dir, dataset)
    path = directory / LABELS_FILE
    labels = store.read_parquet(path, "partition labels", "run `geoloc partition --cells all`")
    labels = labels.rename(columns={"IMG_ID": store.ID})  # written so by geoloc before 0.2
    labels.attrs[GENERATION] = partitions_generation(info)
    _same_generation(directory, LABELS_FILE, store.parquet_meta(path).get(GENERATION), labels.attrs[GENERATION])
    return labels


def load_hierarchy(root_or_dir: Path, dataset: str = "mp16") -> dict[str, np.ndarray] | None:
    """The hierarchy written by `geoloc partition` ({name: parent class per fine cell}), or None."""
    directory, info = read_partitions_json(root_or_dir, dataset)
    file = directory / HIERARCHY_JSON
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    _same_generation(directory, HIERARCHY_JSON, data.get(GENERATION), partitions_generation(info))
    return {name: np.asarray(data["classes"][name], dtype=np.int64) for name in data["order"]}


def hierarchy_to_json(hierarchy: Mapping[str, np.ndarray], order: Sequence[str]) -> dict:
    return {"order": list(order), "classes": {name: hierarchy[name].tolist() for name in order}}
