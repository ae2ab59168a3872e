"""geoloc fetch against a loopback server: statuses, shards, resume, kill, retry, parts, presets, EXIF."""

from __future__ import annotations

import io
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from loopback import LoopbackServer, bomb_jpeg, make_jpeg
from PIL import Image
from typer.testing import CliRunner

from geoloc_cli.cli import app
from geoloc_cli.config import FetchConfig, load_config
from geoloc_cli.data import places365
from geoloc_cli.data.store import DataRoot, iter_shard
from geoloc_cli.errors import ConfigError, InputError
from geoloc_cli.fetch import downloader, reader, supervisor, writer
from geoloc_cli.fetch.downloader import process_image
from geoloc_cli.stages import fetch as stage

FAST = ["fetch.read_timeout=0.4", "fetch.connect_timeout=0.5", "fetch.deadline=3", "fetch.retries=1",
        "fetch.max_bytes=200000", "fetch.shard_size=4", "fetch.processes=1", "fetch.concurrency=16"]


@pytest.fixture(scope="module")
def server():
    with LoopbackServer() as srv:
        srv.httpd.slow_seconds = 1.0
        yield srv


def make_cfg(root: Path, *extra: str):
    cfg = load_config(None, FAST + list(extra))
    cfg.paths.root = str(root)
    return cfg


def write_list(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{i},{u}\n" for i, u in rows))
    return path


def write_meta(path: Path, ids: list[str]) -> Path:
    n = len(ids)
    pd.DataFrame({
        "IMG_ID": ids, "AUTHOR": [f"{k}@N00" for k in range(n)], "LAT": np.linspace(-40, 40, n),
        "LON": np.linspace(-100, 100, n), "S3_Label": [k % 3 for k in range(n)], "S16_Label": 5,
        "S365_Label": 77, "Prob_indoor": 0.1, "Prob_natural": 0.2, "Prob_urban": 0.7,
    }).to_csv(path, index=False)
    return path


def manifest(root: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(DataRoot(root).manifest(name))


def stored(root: Path, name: str) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard, asserting that no key appears twice."""
    out: dict[str, dict[str, bytes]] = {}
    for tar in sorted(DataRoot(root).shards(name).glob("images-*.tar")):
        for key, files in iter_shard(tar):
            assert key not in out, f"duplicate key {key}"
            out[key] = files
    return out


# Route -> expected status (the refused connection and an unsupported scheme are added below).
ROUTES = {
    "img/a.jpg": "ok", "png/alpha.png": "ok", "redirect/r": "ok", "flaky/f": "ok", "429once/q": "ok",
    "404/x": "http_404", "410/x": "http_410", "429/x": "http_429", "500/x": "http_5xx",
    "slow/x": "timeout", "truncated/x": "truncated", "truncjpeg/x": "truncated", "html/x": "not_image",
    "big/x": "too_large", "bomb.png": "decompression_bomb", "bomb.jpg": "decompression_bomb",
    "loop/x": "too_many_redirects",
}


def test_every_status_one_row_each_and_readable_shards(server, tmp_path):
    rows = [(f"id{k}", server.url(route)) for k, route in enumerate(ROUTES)]
    rows += [("refused", server.refused_url()), ("ftp", "ftp://example.org/x.jpg"),
             ("missing", (tmp_path / "nope.jpg").as_uri())]
    expected = list(ROUTES.values()) + ["connect_error", "bad_url", "io_error"]
    ids = [r[0] for r in rows]
    urls = write_list(tmp_path / "list.csv", rows)
    meta = write_meta(tmp_path / "meta.csv", ids[::-1])  # another order than the list
    stats = stage.fetch_list(make_cfg(tmp_path / "root"), DataRoot(tmp_path / "root"), "t", urls, meta)

    m = manifest(tmp_path / "root", "t")
    assert list(m["key"]) == [f"{k:09d}" for k in range(len(rows))]
    assert list(m["id"]) == ids
    assert dict(zip(m["id"], m["status"], strict=True)) == dict(zip(ids, expected, strict=True))
    assert stats["ok"] == 5 and stats["rows"] == len(rows)
    assert (m.loc[m.status != "ok", "error"] != "").all()
    # Retries: flaky and 429once needed exactly two requests, 404 exactly one (never retried).
    assert server.hits["/flaky/f"] == 2 and server.hits["/429once/q"] == 2 and server.hits["/404/x"] == 1
    # Metadata joined on id, in the manifest and in the shard json.
    by_id = pd.read_csv(meta).set_index("IMG_ID")
    ok = m[m.status == "ok"]
    np.testing.assert_allclose(ok["lat"], by_id.loc[ok["id"], "LAT"])
    assert list(ok["S3_Label"]) == list(by_id.loc[ok["id"], "S3_Label"])
    assert list(ok["AUTHOR"]) == list(by_id.loc[ok["id"], "AUTHOR"])

    samples = stored(tmp_path / "root", "t")
    assert sorted(samples) == sorted(ok["key"])
    for key, files in samples.items():
        info = json.loads(files["json"])
        img = Image.open(io.BytesIO(files["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) == 320
        assert info["key"] == key and (info["width"], info["height"]) == img.size
        assert info["lat"] == pytest.approx(by_id.loc[info["id"], "LAT"])
    redirected = samples[m.loc[m.id == "id2", "key"].item()]
    assert Image.open(io.BytesIO(redirected["jpg"])).size == (400, 320)  # 500x400 source
    stats_file = json.loads((DataRoot(tmp_path / "root").dataset("t") / "stats.json").read_text())
    assert stats_file["status"]["ok"] == 5 and sum(stats_file["status"].values()) == len(rows)


def test_process_image_guards_and_resize():
    opts = FetchConfig(resize_shorter=320, max_pixels=10_000_000)
    jpeg, w, h, ow, oh = process_image(make_jpeg(1024, 768), opts)
    assert (w, h, ow, oh) == (427, 320, 1024, 768) and Image.open(io.BytesIO(jpeg)).size == (427, 320)
    _, w, h, ow, oh = process_image(make_jpeg(200, 300), opts)  # small images are scaled up to the same size
    assert (w, h, ow, oh) == (320, 480, 200, 300)
    with pytest.raises(Exception) as e:
        process_image(bomb_jpeg(), opts)
    assert e.value.status == "decompression_bomb"
    _, w, h, _, _ = process_image(make_jpeg(300, 200), FetchConfig(resize_shorter=0))
    assert (w, h) == (300, 200)
    with pytest.raises(downloader.ItemFailure, match="after resizing"):  # a sliver blown up to gigapixels
        process_image(make_jpeg(2, 4000), opts)


def _pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32)


def test_opencv_and_pillow_paths_agree(monkeypatch):
    pytest.importorskip("cv2")
    assert downloader._cv2.getNumThreads() == 1, "OpenCV's thread pool in a parent deadlocks forked workers"
    opts = FetchConfig(resize_shorter=320)
    # DCT scale 1/2, 1/4, 1, upscaling, and a long side that DCT rounding would shift by pixels
    for w, h in [(1024, 768), (3000, 2000), (500, 400), (200, 300), (522, 4493)]:
        src = make_jpeg(w, h)
        fast = process_image(src, opts)
        monkeypatch.setattr(downloader, "_cv2", None)
        slow = process_image(src, opts)
        monkeypatch.undo()
        assert fast[1:3] == slow[1:3] == downloader._target_size(w, h, 320), (w, h)
        assert fast[3:] == slow[3:] == (w, h)
        assert np.abs(_pixels(fast[0]) - _pixels(slow[0])).mean() < 3, (w, h)  # same image, both in RGB order


def test_pillow_handles_what_opencv_would_get_wrong():
    opts = FetchConfig(resize_shorter=320)
    whole = make_jpeg(1024, 768)
    with pytest.raises(downloader.ItemFailure) as e:  # libjpeg alone would return a grey-filled image
        process_image(whole[: len(whole) * 2 // 3], opts)
    assert e.value.status == "truncated"
    im = Image.open(io.BytesIO(whole))
    exif = im.getexif()
    exif[0x0112] = 6  # stored sideways, shown rotated 90 degrees clockwise
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    _, w, h, ow, oh = process_image(buf.getvalue(), opts)
    assert (w, h, ow, oh) == (320, 427, 768, 1024), "both sizes as shown, upright"


def test_manifest_table_keeps_every_value():
    row = {name: None for name in writer.MANIFEST_SCHEMA.names}
    row.update(key="000000001", id='a "quoted",\nid', url="http://x/é.jpg", lat=float("nan"),
               lon=float("inf"), status="ok", bytes=2**40, width=427, S3_Label=2, Prob_urban=0.25)
    gone = {**row, "key": "000000002", "status": "io_error", "error": "no such file /p/\udce9t\u00e9.jpg"}
    table = writer.manifest_table([row, gone])
    assert table.schema == writer.MANIFEST_SCHEMA
    first, second = table.to_pylist()
    assert first == {**row, "lat": None, "lon": None}
    assert second["status"] == "io_error" and second["error"] == "no such file /p/?t\u00e9.jpg"
    old = table.drop_columns(["orig_width", "orig_height"])  # a part from before they were kept
    conformed = writer._conform(old)
    assert conformed.schema == writer.MANIFEST_SCHEMA and conformed.column("orig_width").null_count == 2


def test_list_reading_chunks_exactly_and_names_bad_rows(tmp_path):
    n = 120_000  # > one 4 MB read block, so chunks are cut across Arrow batches
    big = write_list(tmp_path / "big.csv", [(f"id{i:06d}", f"http://h/{i}_{'x' * 30}.jpg") for i in range(n)])
    chunks = list(reader.read_list_chunks(big, 50_000))
    assert [len(c) for c in chunks] == [50_000, 50_000, 20_000]
    ids = [i for c in chunks for i in c.column("id").to_pylist()]
    assert ids == [f"id{i:06d}" for i in range(n)] and reader.count_rows(big) == n
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('007,"http://h/a,b.jpg"\nNA,http://h/c.jpg\n')
    (table,) = reader.read_list_chunks(quoted, 10)
    assert table.to_pylist() == [{"id": "007", "url": "http://h/a,b.jpg"}, {"id": "NA", "url": "http://h/c.jpg"}]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,http://h/a.jpg\nb,http://h/b.jpg,extra\n")
    with pytest.raises(InputError, match="bad.csv.*malformed URL list"):
        reader.count_rows(bad)
    with pytest.raises(InputError, match="not found"):
        reader.count_rows(tmp_path / "missing.csv")


def _stuck_worker(*args) -> None:
    time.sleep(3600)  # a worker deadlocked in native code: alive, silent


@pytest.mark.slow
def test_a_stuck_worker_stops_the_run_with_a_clear_error(tmp_path, monkeypatch):
    import multiprocessing as mp

    photo = tmp_path / "p.jpg"
    photo.write_bytes(make_jpeg(64, 48))
    urls = write_list(tmp_path / "l.csv", [("a", photo.as_uri())])
    monkeypatch.setattr(supervisor, "worker_main", _stuck_worker)
    monkeypatch.setattr(supervisor, "STALL_MIN_S", 0.0)
    monkeypatch.setattr(supervisor, "worker_context", lambda: mp.get_context("fork"))  # the patch reaches the child
    t0 = time.monotonic()
    with pytest.raises(InputError, match="stuck.*again to resume"):
        stage.run(make_cfg(tmp_path / "root", "fetch.deadline=0.5"), urls=urls, name="s")
    assert time.monotonic() - t0 < 15, "the stall must be noticed after a few deadlines, and the worker stopped"


def test_workers_fork_only_without_other_threads(monkeypatch):
    # A lone main thread cannot hold a lock at fork time; with a server thread around, a fork server is used.
    monkeypatch.setattr(supervisor.threading, "active_count", lambda: 1)
    assert supervisor.worker_context().get_start_method() == "fork"
    monkeypatch.setattr(supervisor.threading, "active_count", lambda: 2)
    assert supervisor.worker_context().get_start_method() == "forkserver"


def test_flickr_suffix_and_part_parsing():
    u = "http://farm4.staticflickr.com/3209/2766212356_4fa6a2a4e1.jpg"
    assert reader.flickr_sized(u, "_z") == "http://farm4.staticflickr.com/3209/2766212356_4fa6a2a4e1_z.jpg"
    assert reader.flickr_sized(u.replace(".jpg", "_b.jpg"), "_z") == u.replace(".jpg", "_b.jpg")
    assert reader.flickr_sized(u, "") == u
    assert reader.flickr_sized("http://example.org/2766212356_4fa6a2a4e1.jpg", "_z").endswith("e1.jpg")
    assert stage.parse_part("1/4") == (1, 4) and stage.parse_part(None) == (0, 1)
    with pytest.raises(ConfigError):
        stage.parse_part("4/4")


def test_meta_index_lookup(tmp_path):
    meta = reader.MetaIndex(write_meta(tmp_path / "m.csv", ["a", "NA", "c"]))
    got = meta.lookup(np.array(["c", "zzz", "NA"], dtype=object))
    assert got["LAT"][0] == pytest.approx(40) and got["LAT"][1] is None and got["LAT"][2] == pytest.approx(0)
    assert got["AUTHOR"] == ["2@N00", None, "1@N00"]
    gaps = tmp_path / "gaps.csv"  # a label column with an empty cell reads as floats in pandas
    gaps.write_text("IMG_ID,LAT,LON,S3_Label\na,1,2,1\nb,3,4,\n")
    got = reader.MetaIndex(gaps).lookup(np.array(["a", "b"], dtype=object))
    assert got["S3_Label"] == [1, None] and all(isinstance(v, int) for v in got["S3_Label"][:1])
    gaps.write_text("IMG_ID,LAT,LON,S3_Label\na,1,2,1.5\n")
    with pytest.raises(InputError, match="gaps.csv.*malformed"):
        reader.MetaIndex(gaps)


def test_resume_skips_done_shards(server, tmp_path):
    root = tmp_path / "root"
    urls = write_list(tmp_path / "l.csv", [(f"r{k}", server.url(f"img/resume{k}.jpg")) for k in range(10)])
    cfg = make_cfg(root)
    stage.fetch_list(cfg, DataRoot(root), "r", urls)
    shards = DataRoot(root).shards("r")
    first = {p.name: p.stat().st_mtime_ns for p in [*shards.glob("images-*"), *shards.glob(".parts/images-*")]}
    assert len(first) == 6  # 3 shards of 4, 4, 2 items: tar + part each
    assert sorted(p.name for p in shards.iterdir() if not p.name.startswith(".")) == [
        "images-000000.tar", "images-000001.tar", "images-000002.tar"]  # the folder holds only shards
    (shards / ".parts/images-000001.parquet").unlink()  # as if killed between the tar and its part
    hits = dict(server.hits)
    stage.fetch_list(cfg, DataRoot(root), "r", urls)
    assert (shards / "images-000000.tar").stat().st_mtime_ns == first["images-000000.tar"]
    assert all(server.hits[f"/img/resume{k}.jpg"] == hits[f"/img/resume{k}.jpg"] for k in (0, 1, 2, 3, 8, 9))
    assert all(server.hits[f"/img/resume{k}.jpg"] == hits[f"/img/resume{k}.jpg"] + 1 for k in (4, 5, 6, 7))
    assert len(stored(root, "r")) == 10 and (manifest(root, "r").status == "ok").all()
    with pytest.raises(InputError, match="shard_size"):
        stage.fetch_list(make_cfg(root, "fetch.shard_size=5"), DataRoot(root), "r", urls)


def test_retry_failed_keeps_successes_and_skips_gone(server, tmp_path):
    root = tmp_path / "root"
    rows = [("ok0", server.url("img/rf0.jpg")), ("t1", server.url("toggle/rf1")), ("g2", server.url("404/rf2")),
            ("ok3", server.url("img/rf3.jpg")), ("ok4", server.url("img/rf4.jpg")), ("ok5", server.url("img/rf5"))]
    urls = write_list(tmp_path / "l.csv", rows)
    cfg = make_cfg(root)
    server.httpd.failing = True
    stage.fetch_list(cfg, DataRoot(root), "f", urls)
    assert list(manifest(root, "f").status) == ["ok", "http_5xx", "http_404", "ok", "ok", "ok"]
    shard1 = DataRoot(root).shards("f") / "images-000001.tar"
    mtime1 = shard1.stat().st_mtime_ns
    server.httpd.failing = False
    hits_ok, hits_gone = server.hits["/img/rf0.jpg"], server.hits["/404/rf2"]
    stage.fetch_list(cfg, DataRoot(root), "f", urls, retry_failed=True)
    assert list(manifest(root, "f").status) == ["ok", "ok", "http_404", "ok", "ok", "ok"]
    assert server.hits["/img/rf0.jpg"] == hits_ok and server.hits["/404/rf2"] == hits_gone
    assert shard1.stat().st_mtime_ns == mtime1  # a shard without failures is not rewritten
    assert sorted(stored(root, "f")) == [f"{k:09d}" for k in (0, 1, 3, 4, 5)]
    stage.fetch_list(cfg, DataRoot(root), "f", urls, retry_failed=True, retry_gone=True)
    assert server.hits["/404/rf2"] == hits_gone + 1


def test_parts_are_disjoint_and_combine(server, tmp_path):
    root = tmp_path / "root"
    urls = write_list(tmp_path / "l.csv", [(f"p{k}", server.url(f"img/part{k}.jpg")) for k in range(14)])
    s0 = stage.fetch_list(make_cfg(root), DataRoot(root), "p", urls, part=(0, 2))
    names0 = {p.name for p in DataRoot(root).shards("p").glob("*.tar")}
    assert names0 == {"images-000000.tar", "images-000002.tar"} and s0["rows"] == 8
    s1 = stage.fetch_list(make_cfg(root), DataRoot(root), "p", urls, part=(1, 2))
    assert s1["rows"] == 14 and s1["shards_done"] == 4
    m = manifest(root, "p")
    assert list(m["id"]) == [f"p{k}" for k in range(14)] and (m.status == "ok").all()
    assert sorted(stored(root, "p")) == [f"{k:09d}" for k in range(14)]


def test_parts_of_another_split_are_refused_while_one_runs(tmp_path):
    """0/2 and 0/4 would both write shard 0: while a run splits the list in 2, one splitting it in 4 stops
    with a one-line LockedError; another slice of the same split, and a later run of any split, go ahead."""
    from geoloc_cli.errors import LockedError

    root = DataRoot(tmp_path / "root")
    with stage.fetch_lock(root, "p", (0, 2)):
        with pytest.raises(LockedError, match=r"fetched in 2 parts right now \(--part i/2\)"), \
                stage.fetch_lock(root, "p", (1, 4)):
            pass
        with stage.fetch_lock(root, "p", (1, 2)):
            pass
    with stage.fetch_lock(root, "p", (1, 4)):
        pass


def kill_after(cmd: list[str], shards: Path, parts: int, timeout: float = 30) -> int:
    """Run cmd, SIGKILL it once `parts` shards are done; return how many were done then."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(list(shards.glob(".parts/*.parquet"))) < parts:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(list(shards.glob(".parts/*.parquet")))


@pytest.mark.slow
def test_kill_and_resume(server, tmp_path):
    root = tmp_path / "root"
    n = 48
    urls = write_list(tmp_path / "l.csv", [(f"k{k}", server.url(f"imgslow/kill{k}.jpg")) for k in range(n)])
    cmd = [sys.executable, "-m", "geoloc_cli", "fetch", "--urls", str(urls), "--name", "k", "--root", str(root),
           "-q", *sum((["--set", s] for s in FAST + ["fetch.concurrency=2"]), [])]
    shards = DataRoot(root).shards("k")
    done_before = kill_after(cmd, shards, 2)
    assert 2 <= done_before < n // 4, "the run was not killed mid-way"
    time.sleep(0.7)  # orphaned workers notice their parent is gone and exit
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = manifest(root, "k")
    assert len(m) == n and m["key"].is_unique and (m.status == "ok").all()
    assert sorted(stored(root, "k")) == [f"{k:09d}" for k in range(n)]
    assert sorted(p.relative_to(shards).as_posix() for p in shards.rglob("*") if p.is_file()) == sorted(
        [f"{d}images-{s:06d}.{ext}" for s in range(n // 4)
         for d, ext in (("", "tar"), (".records/", "tar.json"), (".parts/", "parquet"))])  # no temporaries left


def test_missing_preset_metadata_says_what_and_how(server, tmp_path, monkeypatch):
    from geoloc_cli.data import sources

    p = sources.Preset("im2gps", "t", sources.MetaFile("im2gps_places365.csv", (
        sources.Remote(url=server.url("404/meta.csv")),)), urls=sources.MetaFile("im2gps_urls.csv", (
            sources.Remote(url=server.url("file/im2gps_urls.csv")),)))
    monkeypatch.setitem(sources.PRESETS, "im2gps", p)
    server.httpd.files["im2gps_urls.csv"] = f"a,{server.url('img/preset.jpg')}\n".encode()
    root = tmp_path / "root"
    with pytest.raises(InputError) as e:
        stage.run(make_cfg(root), source="im2gps")
    msg = str(e.value)
    assert "im2gps_places365.csv" in msg and server.url("404/meta.csv") in msg
    assert str(root / "meta" / "im2gps_places365.csv") in msg
    (root / "meta").mkdir(parents=True, exist_ok=True)
    write_meta(root / "meta" / "im2gps_places365.csv", ["a"])  # supplied by hand: now it runs
    out = stage.run(make_cfg(root), source="im2gps")
    assert out["im2gps"]["ok"] == 1
    assert (root / "meta" / "im2gps_urls.csv").read_bytes() == server.httpd.files["im2gps_urls.csv"]


def _gps_jpeg(path: Path, lat: tuple | None, lon: tuple | None, refs: tuple[str, str] = ("N", "E")) -> None:
    exif = Image.Exif()
    if lat is not None:  # a dict set as the GPS tag: Pillow before 11.1 does not save a get_ifd() update
        exif[0x8825] = {1: refs[0], 2: lat, 3: refs[1], 4: lon}
    Image.open(io.BytesIO(make_jpeg(480, 360))).save(path, "JPEG", exif=exif)


def test_folder_import_reads_exif_gps(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    _gps_jpeg(photos / "paris.jpg", (48.0, 51.0, 29.0), (2.0, 17.0, 40.0))
    _gps_jpeg(photos / "sub" / "rio.jpg", (22.0, 54.0, 0.0), (43.0, 12.0, 0.0), ("S", "W"))
    _gps_jpeg(photos / "nogps.jpg", None, None)
    _gps_jpeg(photos / "nofix.jpg", (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))  # what a camera without a fix writes
    root = tmp_path / "root"
    out = stage.run(make_cfg(root), source=str(photos), name="trip")
    m = manifest(root, "trip").set_index("id")
    assert out["trip"]["ok"] == 2 and m.loc["nogps.jpg", "status"] == "no_gps" == m.loc["nofix.jpg", "status"]
    assert m.loc["paris.jpg", "lat"] == pytest.approx(48.858, abs=1e-3)
    assert m.loc["paris.jpg", "lon"] == pytest.approx(2.2944, abs=1e-3)
    assert m.loc["sub/rio.jpg", "lat"] == pytest.approx(-22.9) and m.loc["sub/rio.jpg", "lon"] == pytest.approx(-43.2)
    assert len(stored(root, "trip")) == 2
    # the metadata file holds only located photos, so partition can read it as points
    from geoloc_cli.geo.partitioning import read_points

    assert len(read_points(root / "meta" / "trip_places365.csv").img_id) == 2


def test_folder_import_takes_positions_and_scenes_from_meta(tmp_path):
    """Test-set archives (im2gps, yfcc4k) come as photos plus a *_places365.csv keyed by file name."""
    photos = tmp_path / "im2gps"
    (photos / "sub").mkdir(parents=True)
    _gps_jpeg(photos / "1_a_1_x@N00.jpg", (48.0, 51.0, 29.0), (2.0, 17.0, 40.0))  # EXIF says Paris
    _gps_jpeg(photos / "sub" / "2_b_2_y@N00.jpg", None, None)
    _gps_jpeg(photos / "3_c.jpg", (22.0, 54.0, 0.0), (43.0, 12.0, 0.0), ("S", "W"))  # not in meta: EXIF
    _gps_jpeg(photos / "4_d.jpg", None, None)  # in neither
    meta = write_meta(tmp_path / "im2gps_places365.csv", ["1_a_1_x@N00.jpg", "2_b_2_y@N00.jpg", "gone.jpg"])
    root = tmp_path / "root"
    out = stage.run(make_cfg(root), source=str(photos), meta=meta, name="im2gps")
    m = manifest(root, "im2gps").set_index("id")
    published = pd.read_csv(meta).set_index("IMG_ID")
    assert out["im2gps"]["ok"] == 3 and m.loc["4_d.jpg", "status"] == "no_gps"
    assert m.loc["1_a_1_x@N00.jpg", "lat"] == published.loc["1_a_1_x@N00.jpg", "LAT"], "meta wins over EXIF"
    assert m.loc["sub/2_b_2_y@N00.jpg", "lon"] == published.loc["2_b_2_y@N00.jpg", "LON"]  # by file name
    assert m.loc["sub/2_b_2_y@N00.jpg", "S3_Label"] == published.loc["2_b_2_y@N00.jpg", "S3_Label"]
    assert m.loc["3_c.jpg", "lat"] == pytest.approx(-22.9)
    # a later run without --meta (resume, --retry-failed) keeps the first run's positions and labels
    stage.run(make_cfg(root), source=str(photos), name="im2gps", retry_failed=True)
    again = manifest(root, "im2gps").set_index("id")
    pd.testing.assert_frame_equal(again[["status", "lat", "lon", "S3_Label"]], m[["status", "lat", "lon", "S3_Label"]])
    # a --meta that cannot be read is not remembered; a non-number in it is named with its line
    with pytest.raises(InputError, match="metadata file not found"):
        stage.run(make_cfg(root), source=str(photos), meta=tmp_path / "typo.csv", name="typo")
    assert stage.run(make_cfg(root), source=str(photos), name="typo")["typo"]["ok"] == 2  # EXIF only
    bad = tmp_path / "bad.csv"
    bad.write_text("IMG_ID,LAT,LON\n3_c.jpg,north,2.3\n")
    with pytest.raises(InputError, match="bad.csv: line 2, column LAT: 'north' is not a number"):
        stage.run(make_cfg(root), source=str(photos), meta=bad, name="bad")
    bad.write_text("IMG_ID,LAT,LON,S3_Label\n" + "a,1,2,0\n" * 3 + "b,1,2,urban\n")
    with pytest.raises(InputError, match="bad.csv: line 5, column S3_Label: 'urban' is not a number"):
        reader.MetaIndex(bad)  # a URL list's --meta is read by the same reader, line numbers across chunks
    with pytest.raises(InputError, match="line 5, column S3_Label"):
        list(places365.read_chunks(bad, chunksize=2))
    # a file name found in two sub-folders matches neither
    _gps_jpeg(photos / "1_a_1_x@N00.jpeg", None, None)
    (photos / "other").mkdir()
    _gps_jpeg(photos / "other" / "2_b_2_y@N00.jpg", None, None)
    out = stage.run(make_cfg(root), source=str(photos), meta=meta, name="twice")
    m = manifest(root, "twice").set_index("id")
    assert m.loc["sub/2_b_2_y@N00.jpg", "status"] == "no_gps" == m.loc["other/2_b_2_y@N00.jpg", "status"]
    assert m.loc["1_a_1_x@N00.jpg", "status"] == "ok"


def test_cli_fetch_and_bad_part(server, tmp_path):
    urls = write_list(tmp_path / "l.csv", [("c0", server.url("img/cli0.jpg")), ("c1", server.url("404/cli1"))])
    args = ["fetch", "--urls", str(urls), "--name", "cli", "--root", str(tmp_path / "root"), "-q"]
    args += sum((["--set", s] for s in FAST), [])
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "http_404" in r.output and "ok" in r.output
    loud = CliRunner().invoke(app, [a for a in args if a != "-q"] + ["--name", "loud"])
    assert "fetch loud: 2/2 (" in loud.output and " done in " in loud.output, "in a log: plain lines, no bar"
    assert list(manifest(tmp_path / "root", "cli").status) == ["ok", "http_404"]
    r = CliRunner().invoke(app, [*args, "--part", "2/2"])
    assert r.exit_code == 2 and "--part" in r.output
    missing = tmp_path / ("deep" * 30) / "none.csv"
    r = CliRunner().invoke(app, ["fetch", "--urls", str(missing), "--root", str(tmp_path)])
    assert r.exit_code == 1 and str(missing) in r.output, "a path in an error is never wrapped in a log"
    (tmp_path / "empty.csv").write_text("")
    r = CliRunner().invoke(app, ["fetch", "--urls", str(tmp_path / "empty.csv"), "--root", str(tmp_path)])
    assert r.exit_code == 1 and "empty" in r.output


def test_unreadable_tls_certificates_fail_the_run_not_every_item(server, tmp_path, monkeypatch):
    from geoloc_cli.fetch import http

    urls = write_list(tmp_path / "l.csv", [("c0", server.url("img/tls0.jpg"))])
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    http.ssl_context.cache_clear()
    args = ["fetch", "--urls", str(urls), "--name", "tls", "--root", str(tmp_path / "root"), "-q"]
    try:
        r = CliRunner().invoke(app, args + sum((["--set", s] for s in FAST), []))
    finally:
        http.ssl_context.cache_clear()
    assert r.exit_code == 2 and "SSL_CERT_FILE" in r.output and "No such file" in r.output, r.output


def test_an_unusable_proxy_setting_fails_the_run(server, tmp_path, monkeypatch):
    urls = write_list(tmp_path / "l.csv", [("c0", server.url("img/p0.jpg"))])
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    args = ["fetch", "--urls", str(urls), "--name", "px", "--root", str(tmp_path / "root"), "-q"]
    r = CliRunner().invoke(app, args + sum((["--set", s] for s in FAST), []))
    assert r.exit_code == 2 and "socks5" in r.output and "http:// proxy" in r.output, r.output


def test_https_end_to_end_with_verified_certificates(tmp_path, monkeypatch):
    """The whole fetch over TLS: the parent loads the CA once, forked workers verify the server with it."""
    trustme = pytest.importorskip("trustme")
    from geoloc_cli.fetch import http

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    http.ssl_context.cache_clear()
    try:
        with LoopbackServer(tls=server_ctx) as srv:
            urls = write_list(tmp_path / "l.csv", [(f"s{k}", srv.url(f"img/s{k}.jpg")) for k in range(6)]
                              + [("r", srv.url("redirect/r")), ("gone", srv.url("404/g"))])
            out = stage.run(make_cfg(tmp_path / "root"), urls=urls, name="tls")
    finally:
        http.ssl_context.cache_clear()
    assert out["tls"]["status"] == {"ok": 7, "http_404": 1}
    assert len(stored(tmp_path / "root", "tls")) == 7


def test_damaged_shard_is_fetched_again_with_a_warning(server, tmp_path, capsys):
    root = tmp_path / "root"
    urls = write_list(tmp_path / "l.csv", [(f"d{k}", server.url(f"img/dmg{k}.jpg")) for k in range(8)])
    cfg = make_cfg(root)
    stage.fetch_list(cfg, DataRoot(root), "d", urls)
    tar = DataRoot(root).shards("d") / "images-000001.tar"
    whole = tar.read_bytes()
    tar.write_bytes(whole[: len(whole) // 2])
    hits = dict(server.hits)
    capsys.readouterr()
    stats = stage.fetch_list(cfg, DataRoot(root), "d", urls)
    assert "images-000001.tar is damaged" in capsys.readouterr().err
    assert all(server.hits[f"/img/dmg{k}.jpg"] == hits[f"/img/dmg{k}.jpg"] + 1 for k in (4, 5, 6, 7))
    assert tar.stat().st_size == len(whole) and stats["ok"] == 8 and len(stored(root, "d")) == 8
