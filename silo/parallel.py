"""Running a build's independent shard jobs: in this process, in worker processes, or on Ray.

A job is (shard number, document range); its result is the shard's `ShardInfo` as a dict.
Every backend runs the same function (the caller's `job_fn`: the build passes
`silo.build.shard_worker`), which keeps the model loaded between the jobs of one worker, so
`--backend ray` is the local build spread over a Ray cluster — no cluster code of our
own. Retries are the backend's own: `concurrent.futures` resubmission for worker
processes, and Ray's `max_retries`/`retry_exceptions` (plus actor restarts) on Ray. A
retried attempt writes into a fresh temporary folder (`StoreWriter`), so it never shares
files with an attempt that is still running; finished shards are skipped by the caller
(resume); progress shows shards, entries and ETA.

Workers split the machine's cores between them (torch threads = cores // workers), and
the in-process path does the same, so every backend computes bit-identical keys.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass

import torch

from silo.progress import bar as progress_bar

BACKENDS = ("local", "ray")
JobFn = Callable[[dict, int, tuple[int, int], dict], dict]  # (settings, shard, doc range, worker cache) -> info


@dataclass(frozen=True)
class ShardJob:
    shard: int
    doc_range: tuple[int, int]
    entries: int


_WORKER_CACHE: dict = {}  # one per worker process: what the job function keeps loaded


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(workers, 1))


def run_job(job_fn: JobFn, settings: dict, job: ShardJob, threads: int) -> dict:
    torch.set_num_threads(threads)
    return job_fn(settings, job.shard, job.doc_range, _WORKER_CACHE)


def run_jobs(jobs: list[ShardJob], settings: dict, backend: str = "local", workers: int = 1,
             ray_address: str | None = None, retries: int = 2, progress: bool = True,
             *, job_fn: JobFn) -> list[dict]:
    """Run shard jobs on a backend; returns ShardInfo dicts in job order. `job_fn` is a
    module-level function (workers import it by name), e.g. `silo.build.shard_worker`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    bar = progress_bar(total=sum(j.entries for j in jobs), desc=f"build {len(jobs)} shards ({backend}, {workers} "
                       "workers)", unit="tok", unit_scale=True, progress=progress)
    results: dict[int, dict] = {}

    def done(job: ShardJob, info: dict) -> None:
        results[job.shard] = info
        bar.update(job.entries)
        bar.set_postfix(shards=f"{len(results)}/{len(jobs)}")

    threads = threads_per_worker(workers)
    if backend == "ray":
        _run_ray(jobs, settings, workers, threads, ray_address, retries, job_fn, done)
    else:
        _run_processes(jobs, settings, workers, threads, retries, job_fn, done)
    bar.close()
    return [results[j.shard] for j in jobs]


def _run_processes(jobs, settings, workers, threads, retries, job_fn, done) -> None:
    attempts = {j.shard: 0 for j in jobs}
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        pending: dict[Future, ShardJob] = {pool.submit(run_job, job_fn, settings, j, threads): j for j in jobs}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                try:
                    done(job, fut.result())
                except Exception:
                    attempts[job.shard] += 1
                    if attempts[job.shard] > retries:
                        raise
                    pending[pool.submit(run_job, job_fn, settings, job, threads)] = job


def _run_ray(jobs, settings, workers, threads, ray_address, retries, job_fn, done) -> None:
    try:
        import ray  # optional: the `distributed` extra
    except ImportError as e:
        raise RuntimeError("--backend ray needs Ray: pip install 'silo-lm[distributed]'") from e
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=ray_address, num_cpus=None if ray_address else os.cpu_count(),
                 include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)

    # Ray retries a failed job itself: an exception (retry_exceptions) or a dead actor
    # (max_restarts + max_task_retries); each attempt writes a fresh temporary folder
    @ray.remote(num_cpus=threads, max_restarts=retries, max_task_retries=retries)
    class ShardBuilder:  # one per worker: the model is loaded once, then reused for every shard
        @ray.method(retry_exceptions=True)
        def build(self, settings: dict, job: ShardJob) -> dict:
            return run_job(job_fn, settings, job, threads)

    try:
        actors = [ShardBuilder.remote() for _ in range(min(workers, len(jobs)) or 1)]
        pool = ray.util.ActorPool(actors)
        by_name = {j.shard: j for j in jobs}
        for job in jobs:
            pool.submit(lambda a, j: a.build.remote(settings, j), job)
        while pool.has_next():
            info = pool.get_next_unordered()
            done(by_name[int(info["name"].split("-")[0])], info)
    finally:
        if started_here:
            ray.shutdown()
