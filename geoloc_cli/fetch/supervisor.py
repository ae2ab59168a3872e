"""The distributor side of fetch: worker processes (spawned or forked), the job queue, progress
events back to the main process, stall detection, and a worker's error reaching the CLI as the same
one-line error (errors.worker_error)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from geoloc_cli import console, http
from geoloc_cli.config import FetchConfig
from geoloc_cli.errors import USER_ERRORS, ConfigError, GeolocError, InputError, worker_error
from geoloc_cli.fetch.downloader import PILLOW_BLOCKS_CACHED, Fetcher, Network
from geoloc_cli.fetch.writer import ShardJob, archive_shard, run_shard
from geoloc_cli.store import (
    OK,
)

# Every item ends within fetch.deadline once it has a slot, so when none has finished for this many
# deadlines while work is queued, a worker is stuck (a deadlock in a native library, say).
STALL_DEADLINES = 4
STALL_MIN_S = 60.0


def run_archive_jobs(cfg: FetchConfig, jobs: Iterator[ShardJob], total: int, label: str) -> Counter:
    """Process shard jobs here (one process) or on a pool of cfg.processes, at most two jobs per process
    queued."""
    processes = cfg.processes
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    counts: Counter = Counter()
    with console.progress(label, total=total, unit="img", ok=0, failed=0) as bar:
        def done(c: Counter) -> None:
            counts.update(c)
            bar.advance(sum(c.values()), ok=counts[OK], failed=sum(counts.values()) - counts[OK])

        if processes <= 1:
            for job in jobs:
                done(archive_shard(job, cfg))
            return counts
        with ProcessPoolExecutor(processes, mp_context=worker_context()) as pool:
            pending: set = set()
            for job in jobs:
                pending.add(pool.submit(archive_shard, job, cfg))
                if len(pending) >= 2 * processes:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        done(f.result())
            for f in pending:
                done(f.result())
    return counts


def run_jobs(cfg: FetchConfig, jobs: Iterator[ShardJob], n_jobs: int, total: int, label: str) -> Counter:
    """Run shard jobs on cfg.processes worker processes; show progress; return counts by status."""
    processes = max(1, min(cfg.processes, n_jobs))  # a worker per job at most: each start costs CPU
    ctx = worker_context()
    net = Network(tls=http.env_tls(), proxies=_proxies())
    try:  # once, here: forked workers share it, and a bad certificate setting fails the run, not each item
        http.ssl_context(*net.tls)
    except OSError as e:
        raise ConfigError(f"cannot load TLS certificates (SSL_CERT_FILE={os.environ.get('SSL_CERT_FILE')!r}, "
                          f"SSL_CERT_DIR={os.environ.get('SSL_CERT_DIR')!r}): {e}") from None
    job_q, events = ctx.Queue(maxsize=max(2, processes * 2)), ctx.Queue()
    workers = [ctx.Process(target=worker_main, args=(cfg, net, job_q, events, os.getpid()), daemon=True)
               for _ in range(processes)]
    for w in workers:
        w.start()
    feed_error: list[BaseException] = []
    progress = [time.monotonic()]  # when an item last finished or a worker last took a job
    feeder = threading.Thread(target=_feed, args=(jobs, job_q, processes, feed_error, progress), daemon=True)
    feeder.start()
    counts: Counter = Counter()
    stall = max(STALL_MIN_S, STALL_DEADLINES * cfg.deadline)
    try:
        with console.progress(label, total=total, unit="img", ok=0, failed=0) as bar:
            done = 0
            while done < n_jobs:
                if time.monotonic() - progress[0] > stall:
                    raise InputError(f"no item finished for {stall:.0f} s ({STALL_DEADLINES} x fetch.deadline): a "
                                     "fetch worker is stuck and was stopped; run the same command again to resume")
                for ev in drain(events, 0.5):
                    progress[0] = time.monotonic()
                    if ev[0] == "items":
                        counts.update(ev[1])
                        bar.advance(sum(ev[1].values()), ok=counts[OK], failed=sum(counts.values()) - counts[OK])
                    elif ev[0] == "shard":
                        done += 1
                    elif ev[2][0] in USER_ERRORS:  # a worker's user or OS error, as if it happened here
                        raise USER_ERRORS[ev[2][0]](ev[2][1])
                    else:
                        raise InputError(f"writing shard {ev[1]} failed:\n{ev[2][1]}")
                if feed_error:
                    raise feed_error[0]
                if done < n_jobs and not any(w.is_alive() for w in workers):
                    raise InputError(f"all fetch workers exited with {n_jobs - done} shard(s) left; "
                                     "run the same command again to resume")
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
    return counts


def worker_context() -> Any:
    """The multiprocessing context the workers start in.

    fork when this process runs no other Python thread: a worker then starts in milliseconds with every
    module already imported (a fork server has to import pandas, pyarrow, httpx and Pillow again first:
    ~1.5 s of a 2,000-image run). With other threads around (a progress bar, a server in a test) fork
    could copy a lock another thread holds, so a fork server preloaded with the download module is used.
    """
    if threading.active_count() == 1 and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["geoloc_cli.fetch.downloader", "geoloc_cli.fetch.writer"])
    return ctx


def _proxies() -> dict[str, Any]:
    try:
        return http.env_proxies()
    except ValueError as e:
        raise ConfigError(f"{e}; unset the variable or point it to an http:// proxy") from None


def _feed(jobs: Iterator[ShardJob], job_q: Any, processes: int, errors: list[BaseException],
          progress: list[float]) -> None:
    try:
        for job in jobs:
            job_q.put(job)  # blocks until a worker has room for it
            progress[0] = time.monotonic()
    except BaseException as e:  # reported by the main thread
        errors.append(e)
    for _ in range(processes):
        job_q.put(None)
SHARDS_PER_WORKER = 2  # active shards per worker process (overlaps one shard's tail with the next)


def worker_main(cfg: FetchConfig, net: Network, jobs: Any, events: Any, parent_pid: int) -> None:
    """Entry point of a worker process: run shard jobs from `jobs` until a None arrives.

    Events sent: ("items", Counter of statuses) every ~0.2 s, ("shard", shard_index, Counter) per
    finished shard, ("error", shard_index, (error name, message)) if writing a shard failed: the
    errors.worker_error of a user or operating-system error (disk full), else ("", the traceback of a bug).
    """
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # Pillow's own guard at the configured size
    if "PILLOW_BLOCKS_MAX" not in os.environ:  # the user's own setting wins
        # By default Pillow hands every image buffer back to the OS, so the next image maps and
        # page-faults it in again: ~450 faults, ~1 ms of system time per image. Reusing a few freed
        # blocks removes that; pixels are the same.
        Image.core.set_blocks_max(PILLOW_BLOCKS_CACHED)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_worker(cfg, net, jobs, events, parent_pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _watch_parent(pid: int) -> None:
    """A worker whose main process was killed exits at once: it must not race a resumed run."""
    while True:
        await asyncio.sleep(0.5)
        if not _alive(pid):
            os._exit(0)


async def _worker(cfg: FetchConfig, net: Network, jobs: Any, events: Any, parent_pid: int) -> None:
    loop = asyncio.get_running_loop()
    fetcher = Fetcher(cfg, net)
    pending: Counter = Counter()
    unfinished = [0]  # items of this worker's active shards not yet reported
    getter = ThreadPoolExecutor(1, thread_name_prefix="jobs")

    def report(status: str) -> None:
        pending[status] += 1
        unfinished[0] -= 1

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(0.2)
            if pending:
                events.put(("items", Counter(pending)))
                pending.clear()

    async def shard_task(job: ShardJob) -> None:
        try:
            counts = await run_shard(fetcher, job, report)
            if pending:
                events.put(("items", Counter(pending)))
                pending.clear()
            events.put(("shard", job.shard, counts))
        except (GeolocError, OSError) as e:  # disk full, read-only...: the one line the user needs
            events.put(("error", job.shard, worker_error(e)))
        except Exception:
            events.put(("error", job.shard, ("", traceback.format_exc())))

    flusher = asyncio.create_task(flush_forever())
    watchdog = asyncio.create_task(_watch_parent(parent_pid))
    tasks: set[asyncio.Task] = set()
    try:
        while True:
            # Take another shard only when this worker would otherwise run out of requests to make, so
            # one worker never hoards the shards another one is idle for, and a shard's tail overlaps
            # the next one's start.
            while len(tasks) >= SHARDS_PER_WORKER or unfinished[0] > cfg.concurrency:
                await asyncio.sleep(0.05)
            job = await loop.run_in_executor(getter, jobs.get)
            if job is None:
                break
            unfinished[0] += len(job.keys)
            t = asyncio.create_task(shard_task(job))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        flusher.cancel()
        watchdog.cancel()
        await fetcher.close()
        getter.shutdown(wait=False)


def drain(q: Any, timeout: float) -> list[Any]:
    """Everything on a multiprocessing queue now, waiting up to `timeout` for the first event."""
    out = []
    with contextlib.suppress(queue.Empty):
        out.append(q.get(timeout=timeout))
        while True:
            out.append(q.get_nowait())
    return out

