"""Reliability on real disks and real runs (issue 15): OS failures as one line, damaged shards redone,
generations, one writer per target, input checks, exit codes, make clean."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_removes_only_what_the_demo_made(tmp_path: Path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    data = tmp_path / "geoloc-data"
    for d in ("demo/runs", "gpu-smoke/x", "datasets/mp16/shards"):
        (data / d).mkdir(parents=True)
    (data / "datasets/mp16/shards/images-000000.tar").write_bytes(b"real data")
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert not (data / "demo").exists() and not (data / "gpu-smoke").exists()
    assert (data / "datasets/mp16/shards/images-000000.tar").read_bytes() == b"real data"
    shutil.rmtree(data / "datasets")
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert not data.exists()  # an empty root left by the demo goes too
