"""The dataset registry and its sources, all on loopback: a fake Hugging Face Hub (through HF_ENDPOINT,
with a gated repo), plain-HTTP archives, local zip / tar.gz / byte-split tar parts, id rules, user
mirrors, kill-and-resume of an archive import, and the README table."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from loopback import LoopbackServer, make_jpeg
from test_fetch import kill_after, make_cfg, manifest, stored, write_meta

from geoloc_cli import sources
from geoloc_cli.errors import ConfigError, InputError
from geoloc_cli.fetch import remote
from geoloc_cli.sources import Archive, MetaFile, Preset, Remote
from geoloc_cli.stages import fetch as stage
from geoloc_cli.store import DataRoot

README = Path(__file__).resolve().parents[1] / "README.md"
JPEG = make_jpeg(320, 240)


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    """A loopback server that is also the Hub (HF_ENDPOINT), with an empty cache and no stored token."""
    import huggingface_hub.constants as hf_constants

    with LoopbackServer() as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url("").rstrip("/"))
        for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        yield srv


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def register(monkeypatch, p: Preset) -> None:
    monkeypatch.setitem(sources.PRESETS, p.name, p)


def meta_at(path: Path, ids: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_meta(path, ids)


def meta_csv_bytes(ids: list[str], tmp_path: Path) -> bytes:
    return write_meta(tmp_path / "meta-src.csv", ids).read_bytes()


# ------------------------------------------------------------------------------------------ id rules


def test_id_rules_match_each_published_naming():
    assert sources.member_keys("cmu", "gps_query_imgs/Paris_00042_123456_abcdef.jpg")[0] == "123456_abcdef.jpg"
    assert sources.member_keys("cmu", "q/New_York_00007_9_x.jpg")[0] == "9_x.jpg"
    assert sources.member_keys("mp16pro", "./images/85_8d_5447294963.jpg")[0] == "85_8d_5447294963.jpg"
    assert sources.meta_key("mp16pro", "85/8d/5447294963.jpg") == "85_8d_5447294963.jpg"
    assert sources.member_keys("stem", "images/test/00/123.jpg")[0] == "123"
    assert sources.member_keys("name", "im2gps3ktest/1_a_b.jpg") == ["1_a_b.jpg", "1_a_b"]
    assert sources.meta_key("name", "sub/1_a_b.jpg") == "1_a_b.jpg"
    for not_image in ("README.txt", "folder/", "__MACOSX/._x.jpg", "noext"):
        assert sources.member_keys("name", not_image) == []


def test_registry_is_complete_and_checksums_look_right():
    assert set(sources.PRESETS) == {"mp16", "yfcc25600", "im2gps", "im2gps3k", "yfcc4k", "osv5m"}
    for p in map(sources.with_split, sources.PRESETS.values()):
        assert p.meta.mirrors and p.size and p.licence and p.terms, p.name
        assert p.archives or p.urls is not None, p.name
        remotes = [*p.meta.mirrors, *(r for a in p.archives for part in a.parts for r in part)]
        assert all(r.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", r.sha256) for r in remotes)
        assert not any("TIBHannover" in (r.url + r.hf_repo) for r in remotes), "a dead host is listed"
        assert all(a.rule in sources.RULES and a.kind in ("zip", "tar", "tar.gz", "tar-parts") for a in p.archives)
    mp16 = sources.PRESETS["mp16"]
    assert mp16.archives[0].file_names == [f"mp-16-images{i:02d}" for i in range(19)]
    assert all(r.gated for part in mp16.archives[0].parts for r in part)
    assert sources.PRESETS["yfcc25600"].urls.gone and not sources.PRESETS["yfcc25600"].urls.mirrors
    test, train = sources.with_split(sources.PRESETS["osv5m"]), sources.with_split(sources.PRESETS["osv5m"], "train")
    assert test.meta.mirrors[0].hf_path == "test.csv" and train.archives[0].file_names[-1] == "97.zip"
    assert sources.dataset_name(test, None) == "osv5m" and sources.dataset_name(train, "train") == "osv5m_train"


def test_readme_table_is_the_registry():
    text = README.read_text()
    assert sources.sources_table() in text, "README's data-sources table drifted: paste sources.sources_table()"
    assert "## Responsible use" in text and "fetch.mirrors" in text


# -------------------------------------------------------------------------------------- the Hub


def _t3k(hub: LoopbackServer, tmp_path: Path, gated: bool = False) -> tuple[Preset, list[str]]:
    ids = [f"{k}_abc_{k}@N00.jpg" for k in range(6)]
    hub.hub[("test/G3", "im2gps3k_places365.csv")] = meta_csv_bytes(ids, tmp_path)
    members = {f"im2gps3ktest/{i}": JPEG for i in ids[:5]} | {"im2gps3ktest/stray.jpg": JPEG, "README": b"x"}
    hub.hub[("test/img2gps3k", "im2gps3ktest.zip")] = zip_bytes(members)
    if gated:
        hub.gated.add("test/img2gps3k")
    p = Preset("t3k", "test set", MetaFile("t3k_places365.csv", (
        Remote(hf_repo="test/G3", hf_path="im2gps3k_places365.csv", repo_type="model"),)),
        archives=(Archive("zip", ((Remote(hf_repo="test/img2gps3k", hf_path="im2gps3ktest.zip", gated=gated),),)),),
        size="6", licence="test", terms="test")
    return p, ids


def test_hub_archive_preset_end_to_end_cached_and_offline(hub, tmp_path, monkeypatch):
    p, ids = _t3k(hub, tmp_path)
    register(monkeypatch, p)
    root = tmp_path / "root"
    out = stage.run(make_cfg(root), source="t3k")["t3k"]
    assert out["ok"] == 5 and out["status"] == {"ok": 5, "missing": 1}
    assert out["archive"]["unmatched"] == 2 and out["archive"]["missing"] == 1
    listing = (DataRoot(root).dataset("t3k") / "unmatched.txt").read_text().split()
    assert sorted(listing) == ["README", "im2gps3ktest/stray.jpg"]
    m = manifest(root, "t3k")
    assert list(m["id"]) == ids and list(m["status"]) == ["ok"] * 5 + ["missing"]
    assert m["lat"].notna().all() and m.loc[0, "url"] == "im2gps3ktest.zip:im2gps3ktest/" + ids[0]
    assert sorted(stored(root, "t3k")) == [f"{k:09d}" for k in range(5)]
    assert hub.hits["/datasets/test/img2gps3k/resolve/main/im2gps3ktest.zip"] >= 1
    # the Hub's cache serves a second dataset with the Hub switched off
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = sum(hub.hits.values())
    (root / "meta" / "t3k_places365.csv").unlink()
    again = stage.run(make_cfg(root), source="t3k", name="t3k-again")["t3k-again"]
    assert again["ok"] == 5 and sum(hub.hits.values()) == before


def test_gated_repo_is_one_clear_error_until_a_token_has_access(hub, tmp_path, monkeypatch):
    p, _ = _t3k(hub, tmp_path, gated=True)
    register(monkeypatch, p)
    root = tmp_path / "root"
    for token in (None, "hf_no_access"):  # 401 without a token, 403 with one that lacks access
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(InputError) as e:
            stage.run(make_cfg(root), source="t3k")
        msg = str(e.value)
        assert "\n" not in msg and "test/img2gps3k" in msg
        assert "https://huggingface.co/datasets/test/img2gps3k" in msg and "HF_TOKEN" in msg and "hf auth login" in msg
        assert not DataRoot(root).shards("t3k").exists()
    hub.tokens.add("hf_granted")
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    assert stage.run(make_cfg(root), source="t3k")["t3k"]["ok"] == 5


# ------------------------------------------------------------------------------------ mirrors, HTTP


def test_user_mirror_first_checksums_and_a_file_by_hand_wins(tmp_path, monkeypatch):
    ids = ["a.jpg", "b.jpg"]
    good = meta_csv_bytes(ids, tmp_path)
    with LoopbackServer() as srv:
        srv.files["mine_places365.csv"] = good
        srv.files["bad.csv"] = b"IMG_ID,LAT,LON\nx,1,2\n"
        srv.files["imgs.tar.gz"] = tar_bytes({f"d/{i}": JPEG for i in ids}, "w:gz")
        p = Preset("mine", "t", MetaFile("mine_places365.csv", (
            Remote(url=srv.url("file/bad.csv"), sha256="0" * 64), Remote(url=LoopbackServer.refused_url()))),
            archives=(Archive("tar.gz", ((Remote(url=srv.url("file/imgs.tar.gz")),),)),), size="2", licence="t",
            terms="t")
        register(monkeypatch, p)
        root = tmp_path / "root"
        with pytest.raises(InputError) as e:
            stage.run(make_cfg(root), source="mine")
        assert "mine_places365.csv is missing" in str(e.value) and f"!= expected {'0' * 64}" in str(e.value)
        assert "connect" in str(e.value).lower() and str(root / "meta" / "mine_places365.csv") in str(e.value)
        assert not (root / "meta" / "mine_places365.csv").exists()
        out = stage.run(make_cfg(root, f"fetch.mirrors=[{srv.url('file')}]"), source="mine")["mine"]
        assert out["ok"] == 2 and srv.hits["/file/mine_places365.csv"] == 1
        assert (root / "meta" / "mine_places365.csv").read_bytes() == good
        # put by hand: no mirror is asked again
        meta_at(root / "meta" / "mine_places365.csv", ["a.jpg"])
        hits = srv.hits["/file/mine_places365.csv"]
        out = stage.run(make_cfg(root, f"fetch.mirrors=[{srv.url('file')}]"), source="mine", name="mine2")["mine2"]
        assert out["items"] == 1 and srv.hits["/file/mine_places365.csv"] == hits


def test_plain_http_archive_download_resumes_from_its_part_file(tmp_path):
    data = tar_bytes({f"x/Paris_{k:05d}_{k}_s.jpg": JPEG for k in range(3)}, "w:gz")
    with LoopbackServer() as srv:
        srv.files["q.tar.gz"] = data
        dest = tmp_path / "downloads" / "q.tar.gz"
        dest.parent.mkdir()
        (dest.parent / "q.tar.gz.part").write_bytes(data[:1000])  # what a killed download left
        assert remote.download_resumable(srv.url("file/q.tar.gz"), dest) == dest
        assert dest.read_bytes() == data and srv.ranges == [1000]
        assert remote.download_resumable(srv.url("file/q.tar.gz"), dest) == dest and srv.hits["/file/q.tar.gz"] == 1
        with pytest.raises(remote.Unavailable, match="404"):
            remote.download_resumable(srv.url("file/none.tar.gz"), tmp_path / "none.tar.gz")


def test_cmu_names_in_a_local_zip_and_byte_split_tar_parts(tmp_path, monkeypatch):
    root = tmp_path / "root"
    ids = [f"{k}_s.jpg" for k in range(4)]
    meta_at(root / "meta" / "im2gps_places365.csv", ids)  # by hand: the registry's hosts are not asked
    z = tmp_path / "gps_query_imgs.zip"
    z.write_bytes(zip_bytes({f"gps_query_imgs/Rome_{k:05d}_{i}": JPEG for k, i in enumerate(ids)}))
    out = stage.run(make_cfg(root), source="im2gps", archive=z)["im2gps"]
    assert out["ok"] == 4 and out["archive"]["rule"] == "cmu"
    # MP16-Pro: one tar cut into parts, members ./images/<IMG_ID with / as _>
    mp_ids = [f"{k:02x}/{k + 1:02x}/{1000 + k}.jpg" for k in range(5)]
    meta_at(root / "meta" / "mp16_places365.csv", mp_ids)
    whole = tar_bytes({f"./images/{i.replace('/', '_')}": make_jpeg(200 + 20 * k, 150) for k, i in enumerate(mp_ids)})
    parts = tmp_path / "parts"
    parts.mkdir()
    cut = [0, 700, len(whole) // 2, len(whole)] + [len(whole)] * 16
    for k in range(19):
        (parts / f"mp-16-images{k:02d}").write_bytes(whole[cut[k]:cut[k + 1]] if k < 3 else b"")
    out = stage.run(make_cfg(root), source="mp16", archive=parts / "mp-16-images00")["mp16"]
    assert out["ok"] == 5 and out["archive"]["unmatched"] == 0
    assert list(manifest(root, "mp16")["id"]) == mp_ids
    (parts / "mp-16-images07").unlink()
    with pytest.raises(InputError, match="mp-16-images07"):
        stage.run(make_cfg(root), source="mp16", archive=parts / "mp-16-images00", name="other")


def test_worker_processes_write_the_same_shards_as_one(tmp_path):
    ids = [f"{k}.jpg" for k in range(10)]
    meta = meta_at(tmp_path / "m.csv", ids)
    archive = tmp_path / "w.tar.gz"
    archive.write_bytes(tar_bytes({f"w/{i}": make_jpeg(300 + k, 200) for k, i in enumerate(ids[:9])}, "w:gz"))
    shards = []
    for processes in (1, 2):
        root = tmp_path / f"root{processes}"
        out = stage.run(make_cfg(root, f"fetch.processes={processes}", "fetch.shard_size=3"), archive=archive,
                        meta=meta)["w"]
        assert out["status"] == {"ok": 9, "missing": 1}
        shards.append({p.name: p.read_bytes() for p in sorted(DataRoot(root).shards("w").glob("*.tar"))})
    assert len(shards[0]) == 4 and shards[0] == shards[1]


def test_osv5m_split_keeps_admin_columns(hub, tmp_path):
    hub.hub[("osv5m/osv5m", "test.csv")] = (
        b"id,latitude,longitude,thumb_original_url,country,sub-region,region,city\n"
        b"101,48.85,2.35,u,FR,Ile-de-France,Paris,Paris\n202,-33.9,151.2,u,AU,,NSW,Sydney\n303,1,2,u,SG,,,\n")
    for k in range(5):
        hub.hub[("osv5m/osv5m", f"images/test/{k:02d}.zip")] = zip_bytes(
            {f"{k:02d}/{i}.jpg": JPEG for i in [(101, 202)[k]] } if k < 2 else {})
    root = tmp_path / "root"
    out = stage.run(make_cfg(root), source="osv5m")["osv5m"]
    assert out["status"] == {"ok": 2, "missing": 1}
    m = manifest(root, "osv5m")
    assert list(m["id"]) == ["101", "202", "303"] and m.loc[0, "lat"] == pytest.approx(48.85)
    assert list(m["country"]) == ["FR", "AU", "SG"] and m.loc[0, "sub-region"] == "Ile-de-France"
    assert pd.isna(m.loc[1, "sub-region"]) and pd.isna(m.loc[2, "city"])
    meta = pd.read_csv(root / "meta" / "osv5m_places365.csv")
    assert {"IMG_ID", "LAT", "LON", "country"} <= set(meta.columns)
    with pytest.raises(ConfigError, match="unknown split"):
        stage.run(make_cfg(root), source="osv5m", split="val")
    with pytest.raises(ConfigError, match="no splits"):
        stage.run(make_cfg(root), source="im2gps", split="train")


def test_a_list_with_no_surviving_copy_says_so_and_what_to_do(tmp_path):
    root = tmp_path / "root"
    meta_at(root / "meta" / "yfcc25600_places365.csv", ["a"])
    with pytest.raises(InputError) as e:
        stage.run(make_cfg(root), source="yfcc25600")
    msg = str(e.value)
    assert "no surviving public copy" in msg and "--archive" in msg and "fetch.mirrors" in msg


# ------------------------------------------------------------------------------------ kill and resume


def test_archive_import_killed_and_resumed_loses_and_duplicates_nothing(tmp_path):
    n = 160
    ids = [f"{k}_p.jpg" for k in range(n)]
    meta = write_meta(tmp_path / "m.csv", ids + ["lost.jpg"])
    archive = tmp_path / "a.tar"
    big = make_jpeg(1600, 1200, 95)
    archive.write_bytes(tar_bytes({f"imgs/{i}": big for i in reversed(ids)}))
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "geoloc_cli", "fetch", "--archive", str(archive), "--meta", str(meta), "--name", "k",
           "--root", str(root), "-q", "--set", "fetch.shard_size=4", "--set", "fetch.processes=1"]
    shards = DataRoot(root).shards("k")
    done_before = kill_after(cmd, shards, 3, timeout=60)
    assert 3 <= done_before < n // 4, "the run was not killed mid-way"
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = manifest(root, "k")
    assert len(m) == n + 1 and m["key"].is_unique and m["id"].is_unique
    assert list(m["id"][:n]) == list(reversed(ids)), "keys follow the archive's order"
    assert (m.status[:n] == "ok").all() and m.status.iloc[n] == "missing"
    assert sorted(stored(root, "k")) == [f"{k:09d}" for k in range(n)]
    assert not list(shards.glob(".*tmp"))


# ------------------------------------------------------------------------------------ review fixes


def test_a_preset_refuses_a_list_of_your_own_and_via_needs_a_preset(tmp_path):
    cfg = make_cfg(tmp_path / "root")
    with pytest.raises(ConfigError, match="is a preset"):
        stage.run(cfg, source="im2gps", urls=tmp_path / "x.csv")
    with pytest.raises(ConfigError, match="is a preset"):
        stage.run(cfg, source="im2gps", meta=tmp_path / "x.csv")
    with pytest.raises(ConfigError, match="--via"):
        stage.run(cfg, source=str(tmp_path), via="archive")


def test_members_over_max_bytes_are_too_large_without_being_read(tmp_path, monkeypatch):
    from geoloc_cli.fetch import reader

    ids = ["small.jpg", "huge.jpg"]
    meta = write_meta(tmp_path / "m.csv", ids)
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes({"small.jpg": JPEG, "huge.jpg": b"\xff" * 50_000}))
    read: list[str] = []
    members = reader.archive_members

    def spy(kind, paths):
        for m in members(kind, paths):
            yield reader.Member(m.name, m.size, lambda m=m: read.append(m.name) or m.read())

    monkeypatch.setattr(stage, "archive_members", spy)  # what the stage calls
    out = stage.run(make_cfg(tmp_path / "root", "fetch.max_bytes=40000"), archive=archive, meta=meta,
                    name="t")["t"]
    assert out["status"] == {"ok": 1, "too_large": 1} and read == ["small.jpg"]


def test_same_named_files_of_two_places_never_share_a_download(tmp_path):
    """OSV-5M's images/test/00.zip and images/train/00.zip: separate downloads, and a user's mirror holds
    each under its path in the repository."""
    with LoopbackServer() as srv:
        srv.files["a/00.zip"], srv.files["b/00.zip"] = b"test split", b"train split"
        root = DataRoot(tmp_path / "root")
        a = remote.fetch_remote(Remote(url=srv.url("file/a/00.zip")), root)
        b = remote.fetch_remote(Remote(url=srv.url("file/b/00.zip")), root)
        assert a != b and (a.read_bytes(), b.read_bytes()) == (b"test split", b"train split")
    osv_part = sources.with_split(sources.PRESETS["osv5m"], "train").archives[0].parts[0][0]
    assert remote._user_remotes(["https://mirror.example/osv"], osv_part.mirror_path)[0].url == \
        "https://mirror.example/osv/images/train/00.zip"


def test_a_dataset_is_not_continued_from_another_kind_of_source(tmp_path):
    """An archive's keys follow its own order, a URL list's the list's: shards of the two never mix."""
    ids = ["a.jpg", "b.jpg"]
    meta = write_meta(tmp_path / "m.csv", ids)
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes({i: JPEG for i in ids}))
    cfg = make_cfg(tmp_path / "root")
    assert stage.run(cfg, archive=archive, meta=meta, name="t")["t"]["ok"] == 2
    urls = tmp_path / "t_urls.csv"
    urls.write_text("".join(f"{i},http://127.0.0.1:9/{i}\n" for i in ids))
    with pytest.raises(InputError, match="fetched from archive .* now from list"):
        stage.run(cfg, urls=urls, meta=meta, name="t")
