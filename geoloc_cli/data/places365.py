"""The published metadata format, `*_places365.csv` (GeoEstimation / TransLocator), and its one reader.

Columns: IMG_ID (the image's id: text, even where it reads "NA"), LAT, LON (degrees), AUTHOR, the scene
labels S3_Label / S16_Label / S365_Label with their probabilities (Places365 hierarchy: S3 0, 1, 2 =
indoor, natural, urban), and where a source has them the administrative areas country, region,
sub-region, city (OSV-5M; MP16-Pro's address columns). fetch reads it into the manifest, partition reads
the positions, filter and train use the scene labels, the demo world writes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geoloc_cli.errors import InputError
from geoloc_cli.geo import sphere

ID, LAT, LON = "IMG_ID", "LAT", "LON"
SCENES3 = ("indoor", "natural", "urban")  # S3_Label 0, 1, 2
SCENE_COLUMNS = {3: "S3_Label", 16: "S16_Label", 365: "S365_Label"}  # scene head size -> column
SCENE_PROBS = ["Prob_indoor", "Prob_natural", "Prob_urban"]
ADMIN_COLUMNS = ["country", "region", "sub-region", "city"]
# every column but the id and the position, with its Arrow type (pyarrow.type_for_alias) as the manifest
# stores it; names, not pyarrow objects: predict of an export imports this module without pyarrow
META_TYPES: dict[str, str] = {
    "AUTHOR": "string", **dict.fromkeys(SCENE_COLUMNS.values(), "int32"),
    **dict.fromkeys(SCENE_PROBS, "float64"), **dict.fromkeys(ADMIN_COLUMNS, "string")}
META_COLUMNS = list(META_TYPES)
PUBLISHED_COLUMNS = [ID, "AUTHOR", LAT, LON, *SCENE_COLUMNS.values(), *SCENE_PROBS]  # the published files' order


def read_chunks(path: Path, chunksize: int = 500_000, columns: Sequence[str] | None = None,
                allow_missing: bool = True) -> Iterator[Any]:
    """A *_places365.csv as pandas chunks (`columns`: only these, IMG_ID/LAT/LON always): ids stay text,
    numeric columns are numbers (empty cells missing; a missing position only with `allow_missing`:
    fetch lists such rows as no_gps). A missing file or column, bad CSV, a non-number or a position out
    of range is an InputError naming the file (and the line and column)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"metadata file not found: {path}")
    import pandas as pd  # only here: its import costs ~0.5 s of every fetch otherwise

    text = [c for c, kind in META_TYPES.items() if kind == "string"]  # AUTHOR, admin areas
    numeric = [LAT, LON, *(c for c in META_TYPES if c not in text)]
    wanted = None if columns is None else list(dict.fromkeys([ID, LAT, LON, *columns]))
    line = 2  # of the chunk's first row (the header is line 1)
    try:
        # an empty cell is missing, except in the id and the author (text as given, "NA" included)
        empty = {c: [""] for c in [*numeric, *text] if c != "AUTHOR"}
        reader = pd.read_csv(path, dtype=dict.fromkeys([ID, *text], str), keep_default_na=False,
                             na_values=empty, chunksize=chunksize,
                             usecols=(lambda c: c in wanted) if wanted else None)
        for chunk in reader:
            _check_columns(chunk, path)
            for col in [c for c in numeric if c in chunk]:
                chunk[col] = _numbers(chunk[col], col, path, line, allow_missing)
            if not allow_missing and (empty := chunk[ID].str.len().to_numpy() == 0).any():
                raise InputError(f"{path}: line {line + int(np.argmax(empty))}, column {ID}: '' is empty")
            line += len(chunk)
            yield chunk
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: malformed metadata CSV: {str(e).strip()}") from None


def _check_columns(chunk: Any, path: Path) -> None:
    missing = [c for c in (ID, LAT, LON) if c not in chunk.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (expected *_places365.csv; header: "
                         f"{', '.join(map(str, chunk.columns))})")


def _numbers(raw: Any, col: str, path: Path, line: int, allow_missing: bool) -> Any:
    import pandas as pd

    values = pd.to_numeric(raw, errors="coerce")
    bad = (values.isna() & raw.notna()).to_numpy()
    if bad.any():
        row = int(bad.argmax())
        raise InputError(f"{path}: line {line + row}, column {col}: {raw.iloc[row]!r} is not a number")
    if col in sphere.COORDINATE_LIMITS:
        sphere.check_coordinates(values.to_numpy(), raw, col, path, line, allow_missing=allow_missing)
    return values


def read_points(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IMG_ID as an object array of str, LAT, LON) of every row; every row must have an id and a
    position (what partitioning needs)."""
    import pandas as pd

    chunks = list(read_chunks(path, columns=[], allow_missing=False))
    df = pd.concat(chunks, ignore_index=True) if chunks else None
    if df is None or df.empty:
        raise InputError(f"{path}: no rows")
    return (df[ID].to_numpy(dtype=object), df[LAT].to_numpy(np.float64), df[LON].to_numpy(np.float64))
