"""Fetch throughput: geoloc vs img2dataset on the same loopback server, plus a memory check.

    .venv/bin/python benchmarks/bench_fetch.py [--images 2000] [--urls N] [--rounds 3] [--processes 2]
        [--skip-img2dataset] [--memory-rows 0]

1. Generates N photo-like 1024x768 JPEGs (cached in benchmarks/out/bench_images/).
2. Serves them from a fast asyncio HTTP/1.1 server (keep-alive, bodies preloaded in memory) in its own
   process, so the server costs both tools the same and little.
3. Runs `geoloc fetch --urls` and img2dataset (own venv benchmarks/.venv-img2dataset, created on first
   use; resize_mode keep_ratio, image_size 320, encode jpg, webdataset, same process count) on the same
   URL list, timing each command end to end (start-up included), alternating the tools for --rounds
   rounds, and prints images/s and the ratio (of the medians, and the median of the per-round ratios).
4. Streams a synthetic 4.7 M-row URL list (+ metadata) through geoloc's list reading and shard
   planning (no downloads) and reports the peak RSS of that process.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
REPO = HERE.parent
VENV = HERE / ".venv-img2dataset"
PY = Path(sys.executable)


# ------------------------------------------------------------------------------------------- images


def make_images(n: int, folder: Path) -> list[Path]:
    """Photo-like 1024x768 JPEGs: smooth random colour fields plus mild sensor noise (~100-200 KB)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    todo = [p for p in paths if not p.is_file()]
    if todo:
        print(f"generating {len(todo)} images in {folder} ...", flush=True)
    yy, xx = np.mgrid[0:768, 0:1024].astype(np.float32)
    for p in todo:
        rng = np.random.default_rng(int(p.stem))
        img = np.zeros((768, 1024, 3), np.float32)
        for c in range(3):
            a, b, f1, f2 = rng.uniform(-1, 1, 4)
            img[..., c] = 128 + 60 * np.sin(xx * f1 / 90 + yy * f2 / 70) + 50 * np.cos((xx * a + yy * b) / 200)
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, "JPEG", quality=88)
    return paths


# ------------------------------------------------------------------------------------------- server


class _Http(asyncio.Protocol):
    """Minimal HTTP/1.1 GET server: /<index>.jpg -> preloaded body; keep-alive; pipelining-safe."""

    bodies: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            path = head.split(b" ", 2)[1].decode()
            try:
                body = self.bodies[int(path.rsplit("/", 1)[1].split(".")[0].split("_")[0]) % len(self.bodies)]
                status = b"200 OK"
            except (ValueError, IndexError):
                body, status = b"not found", b"404 Not Found"
            self.t.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)


def serve(folder: str, port_q: mp.Queue) -> None:
    _Http.bodies = [p.read_bytes() for p in sorted(Path(folder).glob("*.jpg"))]

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(_Http, "127.0.0.1", 0, backlog=1024)
        port_q.put(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------- runs


def ensure_img2dataset() -> Path:
    exe = VENV / "bin" / "img2dataset"
    if not exe.is_file():
        print(f"creating {VENV} with img2dataset (pins old webdataset/pandas) ...", flush=True)
        subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "img2dataset"], check=True)
    return exe


def _tree_cpu(root_pid: int, seen: dict[int, float]) -> None:
    """Record utime+stime (s) of every live process descended from root_pid (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
    for pid, t in cpu.items():
        p = pid
        while p in parents and p != root_pid and p > 1:
            p = parents[p]
        if p == root_pid:
            seen[pid] = max(seen.get(pid, 0.0), t)


LAST_CPU: dict[str, float] = {}


def proc_cpu(pid: int) -> float:
    """utime+stime (s) of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of `cmd`; its CPU seconds (whole process tree, sampled) go to LAST_CPU["cpu"]."""
    t0 = time.perf_counter()
    with open(OUT / "fetch" / "last_stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        seen: dict[int, float] = {}
        while proc.poll() is None:
            _tree_cpu(proc.pid, seen)
            time.sleep(0.25)  # sampling /proc costs CPU too: keep it rare
    dt = time.perf_counter() - t0
    LAST_CPU["cpu"] = sum(seen.values())
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                 + (OUT / "fetch" / "last_stderr.txt").read_text()[-3000:])
    return dt


def count_tar_jpgs(folder: Path) -> tuple[int, tuple[int, int] | None]:
    """Number of .jpg members over all tars below `folder`, and the size of one of them."""
    n, size = 0, None
    for tar in sorted(folder.rglob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".jpg"):
                    n += 1
                    if size is None:
                        size = Image.open(io.BytesIO(t.extractfile(m).read())).size
    return n, size


def run_geoloc(urls: Path, processes: int, work: Path) -> tuple[float, int, tuple[int, int] | None]:
    root = work / "geoloc-root"
    shutil.rmtree(root, ignore_errors=True)
    geoloc = REPO / ".venv" / "bin" / "geoloc"
    cmd = [str(geoloc) if geoloc.is_file() else "geoloc", "fetch", "--urls", str(urls), "--name", "bench",
           "--root", str(root), "--quiet", "--set", f"fetch.processes={processes}"]
    dt = timed(cmd)
    n, size = count_tar_jpgs(root / "datasets" / "bench" / "shards")
    return dt, n, size


def run_img2dataset(urls: Path, processes: int, work: Path) -> tuple[float, int, tuple[int, int] | None]:
    exe = ensure_img2dataset()
    out = work / "img2dataset-out"
    shutil.rmtree(out, ignore_errors=True)
    csv = work / "urls_header.csv"
    csv.write_text("url\n" + "".join(line.split(",", 1)[1] for line in urls.read_text().splitlines(True)))
    cmd = [str(exe), "--url_list", str(csv), "--input_format", "csv", "--url_col", "url",
           "--output_folder", str(out), "--output_format", "webdataset", "--processes_count", str(processes),
           "--thread_count", "64", "--image_size", "320", "--resize_mode", "keep_ratio",
           "--encode_format", "jpg", "--number_sample_per_shard", "1000", "--timeout", "10",
           "--retries", "0", "--compute_hash", "None", "--enable_wandb", "False"]
    dt = timed(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    n, size = count_tar_jpgs(out)
    return dt, n, size


# ------------------------------------------------------------------------------------------- memory


def memory_check(rows: int, work: Path) -> None:
    """Stream a synthetic list of `rows` items through list reading + metadata lookup + job building."""
    urls, meta = work / "synthetic_urls.csv", work / "synthetic_places365.csv"
    if not urls.is_file() or urls.read_bytes().count(b"\n") != rows:
        print(f"writing a synthetic {rows:,}-row URL list and metadata ...", flush=True)
        block = 1_000_000
        with open(urls, "w") as fu, open(meta, "w") as fm:
            fm.write("IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban\n")
            for start in range(0, rows, block):
                ids = np.arange(start, min(rows, start + block))
                names = [f"{i % 97:02x}/{i % 89:02x}/{i}.jpg" for i in ids]
                fu.writelines(f"{n},http://farm{i % 9}.staticflickr.com/{i % 5000}/{i}_{i * 7919 % 2**31:x}.jpg\n"
                              for n, i in zip(names, ids, strict=True))
                fm.writelines(f"{n},{i % 997}@N00,{(i % 180) - 89.5},{(i % 360) - 179.5},{i % 3},{i % 16},"
                              f"{i % 365},0.2,0.3,0.5\n" for n, i in zip(names, ids, strict=True))
    code = f"""
import math, resource, time
from pathlib import Path
from geoloc_cli.fetch import reader
from geoloc_cli.config import load_config
from geoloc_cli.stages import fetch as f
from geoloc_cli.store import DataRoot
cfg = load_config(None, [])
t0 = time.perf_counter()
meta = reader.MetaIndex(Path({str(meta)!r}))
t1 = time.perf_counter()
n = reader.count_rows(Path({str(urls)!r}))
wanted = {{s: False for s in range(math.ceil(n / cfg.fetch.shard_size))}}
items = found = 0
for job in f.iter_jobs(cfg, DataRoot(Path({str(work / 'mem-root')!r})), "mem", Path({str(urls)!r}), meta,
                       wanted, False, False):
    items += len(job["keys"])
    found += sum(1 for v in job["lat"] if v == v)
t2 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{{items:,}} items in {{len(wanted):,}} shard jobs ({{found:,}} with metadata); metadata index "
      f"{{t1 - t0:.1f}} s, list streaming {{t2 - t1:.1f}} s; peak RSS {{rss:,.0f}} MB")
"""
    subprocess.run([str(PY), "-c", code], check=True)


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="distinct 1024x768 JPEGs served")
    ap.add_argument("--urls", type=int, default=0,
                    help="URLs to fetch (default: one per image); URL i serves image i mod --images, so a longer "
                         "run measures the steady rate with start-up a smaller share")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--skip-img2dataset", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate the two tools this many times; report the median of each and of the per-round "
                         "ratios (a round's two runs share the machine's state of the moment)")
    ap.add_argument("--memory-rows", type=int, default=4_723_695, help="0 = skip the memory check")
    args = ap.parse_args()
    work = OUT / "fetch"
    work.mkdir(parents=True, exist_ok=True)
    make_images(args.images, OUT / "bench_images")
    # Both tools start from bytecode, as installed packages do (img2dataset's venv was compiled by pip;
    # an editable geoloc in a PYTHONDONTWRITEBYTECODE shell would otherwise compile itself every run).
    subprocess.run([str(PY), "-m", "compileall", "-q", str(REPO / "geoloc_cli")], check=True)

    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    server = ctx.Process(target=serve, args=(str(OUT / "bench_images"), port_q), daemon=True)
    server.start()
    port = port_q.get(timeout=60)
    urls = work / "urls.csv"
    n_urls = args.urls or args.images
    urls.write_text("".join(f"img{i},http://127.0.0.1:{port}/{i}.jpg\n" for i in range(n_urls)))
    print(f"{n_urls} URLs of {args.images} 1024x768 JPEGs on 127.0.0.1:{port}; {os.cpu_count()} CPUs; "
          f"processes={args.processes}", flush=True)
    try:
        rates: dict[str, list[float]] = {"geoloc": [], "img2dataset": []}
        tools = [("geoloc", run_geoloc)] + ([] if args.skip_img2dataset else [("img2dataset", run_img2dataset)])
        for r in range(args.rounds):
            for tool, fn in tools:
                server_cpu = proc_cpu(server.pid)
                dt, n, size = fn(urls, args.processes, work)
                server_ms = 1000 * (proc_cpu(server.pid) - server_cpu) / max(n, 1)
                rates[tool].append(n / dt)
                cpu_ms = 1000 * LAST_CPU["cpu"] / max(n, 1)
                print(f"round {r + 1}: {tool:<12} {n} images in {dt:6.2f} s = {n / dt:6.1f} images/s, "
                      f"~{cpu_ms:.1f} CPU ms/image, server {server_ms:.1f} (stored {size[0]}x{size[1]})" if size
                      else f"{tool}: no images stored", flush=True)
        med = {t: float(np.median(v)) for t, v in rates.items() if v}
        for t, v in med.items():
            print(f"median {t:<12} {v:6.1f} images/s")
        if "img2dataset" in med:
            paired = [g / i for g, i in zip(rates["geoloc"], rates["img2dataset"], strict=True)]
            print(f"ratio geoloc / img2dataset = {med['geoloc'] / med['img2dataset']:.2f}x (of the medians), "
                  f"{float(np.median(paired)):.2f}x (median of rounds {', '.join(f'{p:.2f}' for p in paired)}); "
                  "target >= 3x")
    finally:
        server.terminate()
    if args.memory_rows:
        memory_check(args.memory_rows, work)
    print(f"(this process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
