"""The published metadata format (*_places365.csv) and its one reader."""

from pathlib import Path

import numpy as np
import pytest

from geoloc_cli import places365
from geoloc_cli.errors import InputError


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("IMG_ID,LAT\na,1\n", "missing column(s) LON"),
        ("IMG_ID,LAT,LON\na,1,2\nb,north,3\n", "line 3, column LAT: 'north' is not a number"),
        ("IMG_ID,LAT,LON\na,1,2\nb,91,3\n", "line 3, column LAT: 91.0 is not a number in [-90, 90]"),
        ("IMG_ID,LAT,LON\na,1,2\nb,1,-180.5\n", "line 3, column LON"),
        ("IMG_ID,LAT,LON\na,1,\n", "line 2, column LON"),
        ("IMG_ID,LAT,LON\na,1,2\n,3,4\n", "line 3, column IMG_ID: '' is empty"),
        ("IMG_ID,LAT,LON\n", "no rows"),
        ("", "malformed metadata CSV"),
    ],
)
def test_bad_points_are_one_line_errors_naming_file_line_and_column(tmp_path: Path, content: str,
                                                                   message: str) -> None:
    path = tmp_path / "meta.csv"
    path.write_text(content)
    with pytest.raises(InputError) as err:
        places365.read_points(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value) and "np.float64" not in str(err.value)


def test_chunks_keep_ids_as_text_allow_missing_positions_and_count_lines_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("IMG_ID,AUTHOR,LAT,LON,S3_Label,country\nNA,NA,1,2,0,FR\n0012,,,,,\nc,x,5,6,2,\n")
    chunks = list(places365.read_chunks(path, chunksize=2))
    assert [len(c) for c in chunks] == [2, 1]
    first = chunks[0]
    assert first["IMG_ID"].tolist() == ["NA", "0012"]  # never NaN, never the number 12
    assert first["AUTHOR"].iloc[0] == "NA" and np.isnan(first["LAT"].iloc[1])
    assert first["S3_Label"].iloc[0] == 0 and first["country"].iloc[0] == "FR"
    assert first["AUTHOR"].iloc[1] == "" and first["country"].isna().iloc[1]  # empty: missing, not '' (but AUTHOR)
    path.write_text("IMG_ID,LAT,LON,S3_Label\n" + "a,1,2,0\n" * 3 + "b,1,2,urban\n")
    with pytest.raises(InputError, match="line 5, column S3_Label: 'urban' is not a number"):
        list(places365.read_chunks(path, chunksize=2))
    # only the asked columns (the id and the position always)
    assert list(next(places365.read_chunks(path, columns=[])).columns) == ["IMG_ID", "LAT", "LON"]


def test_the_schema_is_one_list() -> None:
    assert places365.PUBLISHED_COLUMNS[:4] == ["IMG_ID", "AUTHOR", "LAT", "LON"]
    assert set(places365.PUBLISHED_COLUMNS) - {"IMG_ID", "LAT", "LON"} <= set(places365.META_COLUMNS)
    assert places365.SCENE_COLUMNS[3] == "S3_Label" and places365.SCENES3[2] == "urban"
