"""The data root's rules: atomic writes, one string type and one id name in tables, locks, generations."""

import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from geoloc_cli import store
from geoloc_cli.errors import LockedError, StorageError


def test_atomic_path_leaves_nothing_on_failure_and_final_files_are_0644(tmp_path: Path):
    target = tmp_path / "a" / "file.txt"
    with pytest.raises(RuntimeError), store.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert not target.exists() and list(target.parent.iterdir()) == []
    store.write_text_atomic(target, "whole")
    assert target.read_text() == "whole" and (target.stat().st_mode & 0o777) == 0o666 & ~store._UMASK


def test_a_write_the_os_refuses_is_one_storage_error_naming_the_file(tmp_path: Path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(StorageError, match=r"ro/x.json"):
            store.write_json_atomic(folder / "x.json", {"a": 1})
    finally:
        folder.chmod(0o700)


def test_parquet_tables_use_one_string_type_and_carry_their_metadata(tmp_path: Path):
    path = tmp_path / "t.parquet"
    store.write_parquet_atomic(pd.DataFrame({store.ID: ["a", "b"], "n": [1, 2]}), path, meta={"generation": "g1"})
    schema = pq.read_schema(path)
    assert str(schema.field(store.ID).type) == "string"  # pandas alone would write large_string
    assert store.parquet_meta(path) == {"generation": "g1"}
    assert store.read_parquet(path, "table")[store.ID].tolist() == ["a", "b"]


def test_one_writer_per_folder_and_shared_holders_keep_an_exclusive_one_out(tmp_path: Path):
    with store.locked(tmp_path, "fetch"), pytest.raises(LockedError, match="another geoloc fetch"), \
            store.locked(tmp_path, "fetch"):
        pass
    with store.locked(tmp_path, "fetch", shared=True), store.locked(tmp_path, "fetch", shared=True), \
            pytest.raises(LockedError), store.locked(tmp_path, "fetch"):
        pass
    with store.locked(tmp_path, "fetch"):  # released when the holders ended
        pass


def test_a_generation_commits_all_its_files_or_none(tmp_path: Path):
    with store.generation(tmp_path) as staged:
        store.write_text_atomic(staged.path("a.txt"), "1")
        store.write_text_atomic(staged.path("b.txt"), "1")
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text() == "1"
    with pytest.raises(RuntimeError), store.generation(tmp_path) as staged:
        store.write_text_atomic(staged.path("a.txt"), "2")
        raise RuntimeError("killed before the commit")
    store.recover(tmp_path)
    assert (tmp_path / "a.txt").read_text() == "1" and not list(tmp_path.glob(".*.tmp"))


def test_data_root_layout():
    root = store.DataRoot(Path("/r"))
    assert root.shards("mp16") == Path("/r/datasets/mp16/shards")
    assert store.shard_part(root.shards("mp16") / "images-000003.tar") == \
        Path("/r/datasets/mp16/shards/.parts/images-000003.parquet")
    assert store.seg_shard_for("images-000003.tar") == "seg-000003.tar"
    assert root.model("x") == Path("/r/runs/x/model.safetensors")
