"""Reliability on real disks and real runs (issue 15): OS failures as one line, damaged shards redone,
generations, one writer per target, input checks, exit codes, make clean."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from geoloc_cli.store import ShardWriter, check_shard, drop_damaged, shard_record

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


# ------------------------------------------------------------------------------------- 2: shard checks


def _shard(path: Path, n: int = 3) -> Path:
    with ShardWriter(path) as w:
        for i in range(n):
            w.add(f"{i:09d}", {"png": bytes(700 + i)})
    return path


def test_shard_record_and_check(tmp_path: Path):
    path = _shard(tmp_path / "seg-000000.tar")
    record = json.loads(shard_record(path).read_text())
    assert record["members"] == 3 and record["keys"] == [f"{i:09d}" for i in range(3)]
    assert record["size"] == path.stat().st_size and check_shard(path) is None
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert "when it was written" in check_shard(path)
    path.write_bytes(whole + bytes(10240))  # longer than recorded
    assert check_shard(path) is not None
    shard_record(path).unlink()  # a shard from before records: end-of-archive only
    path.write_bytes(whole)
    assert check_shard(path) is None
    path.write_bytes(whole[:2048])
    assert "end-of-archive" in check_shard(path)
    assert check_shard(tmp_path / "nothing.tar") == "missing"
    companion = tmp_path / "seg-000000.parquet"
    companion.write_bytes(b"x")
    assert drop_damaged(path, companion) and not path.exists() and not companion.exists()
