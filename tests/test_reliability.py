"""Reliability on real disks and real runs (issue 15): OS failures as one line, damaged shards redone,
generations, one writer per target, input checks, exit codes, make clean."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from geoloc_cli import partitioning as part
from geoloc_cli import store
from geoloc_cli.cli import app
from geoloc_cli.errors import InputError
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


# -------------------------------------------------------------------------------- 3: generations


KILL_AT_RENAME = """
import os, signal, sys
from pathlib import Path
from geoloc_cli import store

folder, kill_at = Path(sys.argv[1]), int(sys.argv[2])
real, calls = os.replace, [0]

def replace(src, dst):  # SIGKILL this process at its kill_at-th rename
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)

os.replace = replace
with store.generation(folder) as staged:
    for name in ("a.csv", "b.parquet", "c.json"):
        staged.path(name).write_text("new")
    staged.remove("old-only.json")
"""


def test_a_kill_at_any_rename_leaves_the_old_set_or_the_new_one(tmp_path: Path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_RENAME)
    outcomes = set()
    for kill_at in range(1, 8):  # a file each (3 renames inside write_text_atomic's temps), the journal, the commit
        folder = tmp_path / f"f{kill_at}"
        folder.mkdir()
        for name in ("a.csv", "b.parquet", "c.json", "old-only.json"):
            (folder / name).write_text("old")
        r = subprocess.run([sys.executable, str(script), str(folder), str(kill_at)], cwd=REPO, capture_output=True)
        if r.returncode == 0:
            continue  # fewer renames than kill_at: it finished
        assert r.returncode == -signal.SIGKILL, r.stderr
        store.recover(folder)  # what the next `geoloc partition` does first, under its lock
        state = {p.name: p.read_text() for p in folder.iterdir()}
        assert state in ({"a.csv": "old", "b.parquet": "old", "c.json": "old", "old-only.json": "old"},
                         {"a.csv": "new", "b.parquet": "new", "c.json": "new"}), (kill_at, state)
        outcomes.add(state["a.csv"])
    assert outcomes == {"old", "new"}  # both sides of the commit point were hit


def test_readers_refuse_an_interrupted_commit_and_a_mixed_set(tmp_path: Path):
    meta = tmp_path / "meta.csv"
    rng = np.random.default_rng(0)
    rows = [f"i{k},{lat:.4f},{lon:.4f}" for k, (lat, lon) in enumerate(rng.uniform(-60, 60, (400, 2)))]
    meta.write_text("IMG_ID,LAT,LON\n" + "\n".join(rows) + "\n")
    out = tmp_path / "cells"
    args = ["partition", "--input", str(meta), "--output", str(out), "--root", str(tmp_path / "r"), "-q",
            "--set", "partition.tau_min=2", "--set", "partition.tau_max={coarse: 80, middle: 40, fine: 20}"]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = (out / "labels.parquet").read_bytes()
    assert part.load_labels(out).attrs["generation"] and part.load_hierarchy(out) is not None
    assert CliRunner().invoke(app, args).exit_code == 0
    (out / "labels.parquet").write_bytes(first)  # the old labels beside the new tables: a mix
    with pytest.raises(InputError, match="does not belong with partitions.json"):
        part.load_labels(out)
    (out / store.GENERATION_JOURNAL).write_text("{}")
    with pytest.raises(InputError, match="interrupted"):
        part.load_partitions(out)
    (out / store.GENERATION_JOURNAL).unlink()
    (out / ".hierarchy.json.x.tmp").write_text("left by a kill")
    assert CliRunner().invoke(app, args).exit_code == 0
    assert not list(out.glob(".*.tmp")) and part.load_labels(out).attrs["generation"]


# ------------------------------------------------------------------------------ 4: one writer per target


HOLD_LOCK = """
import sys, time
from pathlib import Path
from geoloc_cli import store

with store.locked(Path(sys.argv[1]), sys.argv[2], shared=sys.argv[3] == "shared"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    from tests.worlds import build_world

    return build_world(tmp_path_factory.mktemp("locks"))


def _hold(tmp: Path, folder: Path, stage: str, shared: bool = False) -> subprocess.Popen:
    script = tmp / "hold.py"
    script.write_text(HOLD_LOCK)
    proc = subprocess.Popen([sys.executable, str(script), str(folder), stage, "shared" if shared else "x"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize(
    ("cmd", "folder", "stage"),
    [
        (["fetch", "demo"], "datasets/demo", "fetch"),
        (["partition", "--cells", "all"], "partitions/demo", "partition"),
        (["filter"], "datasets/demo", "filter"),
        (["segment", "demo"], "datasets/demo/seg", "segment"),
        (["train"], "runs/demo", "train"),
    ],
)
def test_a_second_writer_stops_at_once_naming_the_first(world, tmp_path: Path, cmd, folder, stage):
    cfg, root = world
    holder = _hold(tmp_path, root / folder, stage)
    try:
        r = CliRunner().invoke(app, [*cmd, "-c", str(cfg), "-q"])
        assert r.exit_code == 1, r.output
        assert f"is being written by another geoloc {stage} (pid {holder.pid}: " in r.output.replace("\n", "")
        assert "Traceback" not in r.output
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_writer_leaves_no_lock_that_blocks(world, tmp_path: Path):
    cfg, root = world
    holder = _hold(tmp_path, root / "datasets/demo", "filter")
    assert CliRunner().invoke(app, ["filter", "-c", str(cfg), "-q"]).exit_code == 1
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    r = CliRunner().invoke(app, ["filter", "-c", str(cfg), "-q"])
    assert r.exit_code == 0, r.output


def test_fetch_parts_share_a_dataset_but_not_a_part(world, tmp_path: Path):
    cfg, root = world
    holder = _hold(tmp_path, root / "datasets/demo", "fetch-part-0-of-2")
    try:
        urls = root / "meta" / "demo_urls.csv"
        args = ["fetch", "--urls", str(urls), "--name", "demo", "-c", str(cfg), "-q"]
        r = CliRunner().invoke(app, [*args, "--part", "0/2"])
        assert r.exit_code == 1 and "fetch-part-0-of-2" in r.output
        r = CliRunner().invoke(app, [*args, "--part", "1/2"])  # another part of the same dataset: fine
        assert "being written" not in r.output
    finally:
        holder.kill()
        holder.wait()
    shared = _hold(tmp_path, root / "datasets/demo", "fetch", shared=True)  # a --part run is going on
    try:
        r = CliRunner().invoke(app, ["fetch", "--urls", str(urls), "--name", "demo", "-c", str(cfg), "-q"])
        assert r.exit_code == 1 and "being written by another geoloc fetch" in r.output
    finally:
        shared.kill()
        shared.wait()
