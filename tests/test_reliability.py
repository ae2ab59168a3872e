"""Reliability on real disks and real runs (issue 15): OS failures as one line, damaged shards redone,
generations, one writer per target, input checks, exit codes, make clean."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner
from worlds import build_world

from geoloc_cli.cli import app
from geoloc_cli.config import load_config
from geoloc_cli.data import store
from geoloc_cli.data.store import (
    ShardWriter,
    check_shard,
    drop_damaged,
    migrate_shard_folder,
    remove_shard_temps,
    shard_done,
    shard_part,
    shard_record,
)
from geoloc_cli.errors import InputError, StorageError
from geoloc_cli.fetch import reader
from geoloc_cli.geo import partitioning as part

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
    from geoloc_cli.data.dataset import tar_offsets

    assert len(tar_offsets(path)) == 3
    shard_record(path).write_text(json.dumps(record | {"members": 4}))  # same size, other members
    with pytest.raises(InputError, match="3 members, 4 when it was written"):
        tar_offsets(path)
    shard_record(path).write_text(json.dumps(record))
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
    part = shard_part(path)
    part.parent.mkdir()
    part.write_bytes(b"x")
    assert not shard_done(path)  # damaged: its part does not make it done
    assert drop_damaged(path) and not path.exists() and not part.exists()


def test_a_shard_is_done_when_intact_with_its_part_and_old_layouts_move(tmp_path: Path):
    path = _shard(tmp_path / "images-000000.tar")
    assert check_shard(path) is None and not shard_done(path)  # killed between the tar and its part
    shard_part(path).parent.mkdir(exist_ok=True)
    shard_part(path).write_bytes(b"rows")
    assert shard_done(path)
    # an older geoloc's layout: record and part beside the shard (segment: parts/)
    shard_record(path).rename(tmp_path / "images-000000.tar.json")
    shard_part(path).rename(tmp_path / "images-000000.parquet")
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts/seg-000001.parquet").write_bytes(b"seg rows")
    assert shard_done(path)  # readers understand the old layout before a writer moves it
    whole = path.read_bytes()
    path.write_bytes(whole + bytes(512))
    assert "when it was written" in check_shard(path)  # its record where it used to be
    path.write_bytes(whole)
    migrate_shard_folder(tmp_path)
    assert shard_done(path) and shard_record(path).is_file()
    assert shard_part(tmp_path / "seg-000001.tar").read_bytes() == b"seg rows"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["images-000000.tar"]
    # temporaries of killed writers go, for the named shards only
    for sub, name in (("", ".images-000000.tar.x1.tmp"), (".parts", ".images-000000.parquet.x2.tmp"),
                      (".records", ".images-000000.tar.json.x3.tmp"), ("", ".images-000007.tar.x4.tmp")):
        (tmp_path / sub / name).write_bytes(b"")
    remove_shard_temps([path])
    assert [p.name for p in tmp_path.rglob("*.tmp")] == [".images-000007.tar.x4.tmp"]


# -------------------------------------------------------------------------------- 3: generations


KILL_AT_RENAME = """
import os, signal, sys
from pathlib import Path
from geoloc_cli.data import store

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
from geoloc_cli.data import store

with store.locked(Path(sys.argv[1]), sys.argv[2], shared=sys.argv[3] == "shared"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
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


# ------------------------------------------------------------------------ 1: operating-system failures


def _no_space_under(root: Path, monkeypatch: pytest.MonkeyPatch, err: int = errno.ENOSPC) -> None:
    """Every rename into place under `root` fails as on a full (or read-only) disk; nothing else does."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).startswith(str(root)):
            raise OSError(err, os.strerror(err), str(src))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize(  # in pipeline order: each stage runs on what the ones before it left in the world
    "cmd",
    [["partition", "--cells", "all"], ["filter"], ["segment"], ["train", "--set", "train.epochs=1"], ["evaluate"],
     ["export"]],
    ids=lambda c: c[0],
)
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_a_rerun_completes(world, cmd, monkeypatch: pytest.MonkeyPatch):
    cfg, root = world
    with monkeypatch.context() as m:
        _no_space_under(root, m)
        r = CliRunner().invoke(app, [*cmd, "-c", str(cfg), "-q"])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error: no space left on device while writing " + str(root)), r.output
    assert "Traceback" not in r.output and len([x for x in lines if x.startswith("error")]) == 1
    assert not [p for p in root.rglob(".*.tmp")], "temporary files are removed"
    r = CliRunner().invoke(app, [*cmd, "-c", str(cfg), "-q"])  # the disk has room again
    assert r.exit_code == 0, r.output


def test_a_read_only_root_and_a_root_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    meta = tmp_path / "meta.csv"
    meta.write_text("IMG_ID,LAT,LON\na,1,2\nb,3,4\nc,5,6\n")
    (tmp_path / "file").write_text("not a folder")
    args = ["partition", "--input", str(meta), "--tau-min", "0", "--tau-max", "2"]
    r = CliRunner().invoke(app, [*args, "--root", str(tmp_path / "file")])
    assert r.exit_code == 1 and "a path component is a file, not a folder" in r.output, r.output
    assert str(tmp_path / "file") in r.output.replace("\n", "") and "Traceback" not in r.output
    out = tmp_path / "ro"
    _no_space_under(out, monkeypatch, errno.EROFS)
    r = CliRunner().invoke(app, [*args, "--output", str(out)])
    assert r.exit_code == 1 and f"read-only file system while writing {out}" in r.output.replace("\n", "")
    assert not list(out.glob(".*.tmp"))


def test_torch_save_failure_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def save(*_a, **_k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . basic_ios::clear: iostream error")

    with pytest.raises(StorageError, match=r"while writing .*resume\.pt") as err, \
            store.atomic_path(tmp_path / "resume.pt") as tmp:
        save(tmp)
    assert "basic_ios" not in str(err.value) and not list(tmp_path.iterdir())


FETCH_WITH_SMALL_FILES = """
import resource, sys
from geoloc_cli.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))  # files beyond 8 kB fail: EFBIG in the workers too
sys.argv = ["geoloc", *sys.argv[1:]]
main()
"""


def _photo_import(tmp_path: Path, root: Path, shard_size: int) -> list[str]:
    """`geoloc fetch` arguments importing 6 incompressible 96 px photos (with positions) into `root`."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg", quality=95)
    meta = tmp_path / "meta.csv"
    meta.write_text("IMG_ID,LAT,LON\n" + "".join(f"p{i}.jpg,{i},{i}\n" for i in range(6)))
    return ["fetch", str(photos), "--meta", str(meta), "--name", "p", "--root", str(root), "-q", "--set",
            "fetch.processes=1", "--set", "fetch.resize_shorter=0", "--set", f"fetch.shard_size={shard_size}"]


def test_a_worker_write_failure_is_one_line_and_a_rerun_loses_nothing(tmp_path: Path):
    script = tmp_path / "small.py"
    script.write_text(FETCH_WITH_SMALL_FILES)
    args = _photo_import(tmp_path, tmp_path / "r", 3)
    r = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "file too large while writing" in r.stderr and "images-00000" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr
    assert not list((tmp_path / "r").rglob(".*.tmp"))
    r = subprocess.run([sys.executable, "-m", "geoloc_cli", *args], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r/datasets/p/stats.json").read_text())["ok"] == 6


# --------------------------------------------------------------------------- 5, 6: inputs and exit codes


def test_exit_code_policy(tmp_path: Path):
    root = ["--root", str(tmp_path / "r"), "-q"]
    photo = tmp_path / "photo.jpg"
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 120, 200)).save(photo)
    ok, gone = photo.resolve().as_uri(), (tmp_path / "gone.jpg").resolve().as_uri()
    some = tmp_path / "some.csv"
    some.write_text(f"a,{ok}\nb,{gone}\n")
    none = tmp_path / "none.csv"
    none.write_text(f"a,{gone}\nb,{gone}x\n")
    (tmp_path / "empty").mkdir()
    cases = [
        (["fetch", "--urls", str(some), "--name", "some", *root], 0),  # partly failed: done
        (["fetch", "--urls", str(none), "--name", "none", *root], 1),  # every item failed
        (["fetch", "nosuchpreset", *root], 2),  # an unknown preset is a usage error
        (["fetch", "--part", "3/2", *root], 2),
        (["predict", str(tmp_path / "empty"), *root], 1),  # a folder without photos
    ]
    for args, code in cases:
        r = CliRunner().invoke(app, args)
        assert r.exit_code == code, (args, r.output)
        assert "Traceback" not in r.output
    r = CliRunner().invoke(app, ["fetch", "--urls", str(none), "--name", "none", *root])
    assert r.exit_code == 1 and "every item failed" in r.output  # also when nothing was left to fetch


def test_duplicate_ids_and_positions_out_of_range(tmp_path: Path, capsys):
    from geoloc_cli.data import places365

    urls = tmp_path / "l.csv"
    urls.write_text("".join(f"id{k % 5},file:///x{k}.jpg\n" for k in range(9)))
    with pytest.raises(InputError, match=r"l.csv: image ids must be unique, 4 appear more than once: 'id0' on lines "
                                         r"1, 6; 'id1' on lines 2, 7; 'id2' on lines 3, 8 \(and 1 more\)"):
        reader.count_rows(urls)
    urls.write_text("a,file:///a.jpg\nb,file:///b.jpg\n")
    assert reader.count_rows(urls) == 2
    meta = tmp_path / "m.csv"
    for row, where, shown in (("b,95,3", "line 3, column LAT", "95.0"), ("b,1,200.5", "line 3, column LON", "200.5")):
        meta.write_text(f"IMG_ID,LAT,LON\na,1,2\n{row}\n")
        for read in (lambda p: list(places365.read_chunks(p)), part.read_points):  # every reader, one check
            with pytest.raises(InputError) as err:
                read(meta)
            assert f"m.csv: {where}: {shown} is not a number in" in str(err.value), str(err.value)
            assert "np.float64" not in str(err.value)
    meta.write_text("IMG_ID,LAT,LON\na,1,2\nb,,\n")  # a photo without a position is allowed in fetch's metadata
    assert len(next(places365.read_chunks(meta))) == 2
    meta.write_text("IMG_ID,LAT,LON\na,1,2\nb,3,4\na,5,6\n")  # metadata: the documented rule, said aloud
    capsys.readouterr()
    assert reader.MetaIndex(meta).lookup(np.array(["a"], dtype=object))["LAT"] == [1.0]
    warning = capsys.readouterr().err
    assert "1 IMG_ID rows repeat an earlier id (first on line 4); each id's first row is used" in warning


def test_leftovers_of_killed_writers_go_at_the_next_start(world):
    cfg, root = world
    dataset = root / "datasets/demo"
    index_tmp, manifest_tmp = dataset / ".index.parquet.k1ll.tmp", dataset / ".manifest.parquet.k1ll.tmp"
    for tmp in (index_tmp, manifest_tmp):
        tmp.write_bytes(b"half a file")
    assert CliRunner().invoke(app, ["filter", "-c", str(cfg), "-q"]).exit_code == 0
    assert not index_tmp.exists() and manifest_tmp.exists()  # filter removes only what it writes
    assert CliRunner().invoke(app, ["fetch", "demo", "-c", str(cfg), "-q"]).exit_code == 0
    assert not manifest_tmp.exists()


def test_a_training_worker_error_comes_back_as_its_one_line(world, tmp_path: Path, monkeypatch):
    import torch.distributed.launcher.api as launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from geoloc_cli.stages import train

    error_file = tmp_path / "error.json"
    message = f"no space left on device while writing {world[1]}/runs/demo/.resume.pt.x.tmp"
    error_file.write_text(json.dumps({"message": {"message": f"StorageError: {message}",
                                                  "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "0"}}}))

    def launch(*_a, **_k):
        def run(*_args):
            raise ChildFailedError("geoloc", {1: ProcessFailure(1, 123, 1, str(error_file))})
        return run

    monkeypatch.setattr(launcher, "elastic_launch", launch)
    cfg = load_config(world[0], ["runtime.nproc=2", "train.run=workers", "model.seg_channels=0", "train.val_dataset="])
    with pytest.raises(StorageError) as err:
        train.launch(cfg)
    assert str(err.value) == message


def test_os_error_messages_are_one_line_with_cause_operation_and_path():
    from geoloc_cli.errors import os_error_message, storage_error

    assert os_error_message(OSError(errno.ENOSPC, "No space left on device", "/d/seg-000004.tar")) == \
        "no space left on device while writing /d/seg-000004.tar"
    denied = OSError(errno.EACCES, "Permission denied", "/d/x")
    assert os_error_message(denied) == "permission denied while accessing /d/x"
    assert os_error_message(OSError(errno.EMFILE, "Too many open files"), "reading /d/a.tar").startswith(
        "too many open files (raise `ulimit -n`) while reading /d/a.tar")
    wrapped = "Caught OSError in DataLoader worker process 0.\nOriginal Traceback:\nOSError: [Errno 5] I/O error\n"
    assert os_error_message(OSError(wrapped)) == "OSError: [Errno 5] I/O error"
    err = storage_error(OSError(errno.EROFS, "Read-only file system", "/tmp/x.tmp"), "writing /d/x")
    assert isinstance(err, OSError) and err.errno == errno.EROFS
    assert str(err) == "read-only file system while writing /d/x"
    assert storage_error(err) is err


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 64 kB file system (tmpfs), where the machine lets the tests mount one (root, no sandbox)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                                       capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_really_full_disk_in_fetch_workers(small_disk: Path, tmp_path: Path):
    args = _photo_import(tmp_path, small_disk / "r", 2)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    assert "error: no space left on device while writing " + str(small_disk / "r") in r.output.replace("\n", "")
    assert "Traceback" not in r.output and not list(small_disk.rglob(".*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # room again
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads((small_disk / "r/datasets/p/stats.json").read_text())["ok"] == 6


def test_a_read_only_folder_for_real(tmp_path: Path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        probe = out / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("this user (root?) can write into a 0o555 folder")
        except PermissionError:
            pass
        meta = tmp_path / "meta.csv"
        meta.write_text("IMG_ID,LAT,LON\na,1,2\nb,3,4\nc,5,6\n")
        r = CliRunner().invoke(app, ["partition", "--input", str(meta), "--tau-min", "0", "--tau-max", "2",
                                     "--output", str(out / "cells")])
        assert r.exit_code == 1 and "permission denied while locking" in r.output and "Traceback" not in r.output
    finally:
        out.chmod(0o755)
