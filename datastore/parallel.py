"""Running a build's independent shard jobs: in this process, in worker processes, or on Ray.

A job is (shard number, document range); its result is the shard's `ShardInfo` as a dict.
Every backend runs the same function, `build_shard`, which loads the model once per
worker (a process-level cache), so `--backend ray` is the local build spread over a Ray
cluster — no cluster code of our own. Failed jobs are retried (`retries`), finished
shards are skipped by the caller (resume), and progress shows shards, entries and ETA.

Workers split the machine's cores between them (torch threads = cores // workers), and
the in-process path does the same, so every backend computes bit-identical keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass

from tqdm import tqdm

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class ShardJob:
    shard: int
    doc_range: tuple[int, int]
    entries: int


_WORKER_CACHE: dict[str, object] = {}


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(workers, 1))


def build_shard(settings: dict, job: ShardJob, threads: int) -> dict:
    """One shard job; the model, tokens and trained index are loaded once per worker."""
    import dataclasses
    from pathlib import Path

    import faiss
    import torch

    from datastore.build import BuildArgs, DocTokens, _write_shard
    from silo.lm import load_causal_lm

    torch.set_num_threads(threads)
    faults = os.environ.get("SILO_TEST_FAIL_ONCE")  # fault injection for the retry tests only
    if faults and not (Path(faults) / f"shard-{job.shard}").exists():
        (Path(faults) / f"shard-{job.shard}").touch()
        raise RuntimeError(f"injected failure of shard {job.shard}")
    key = json_key(settings)
    if _WORKER_CACHE.get("key") != key:
        args = BuildArgs(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in settings["args"].items()})
        out = Path(args.out)
        model, tok = load_causal_lm(args.model)
        _WORKER_CACHE.update(key=key, args=args, model=model, tok=tok, docs=DocTokens(out / "build", out),
                             trained=faiss.read_index(str(out / "build" / "trained.faiss")))
    c = _WORKER_CACHE
    info = _write_shard(c["args"], c["model"], c["tok"], c["docs"], job.shard, job.doc_range, c["trained"],
                        settings["factory"], Path(c["args"].out))
    return dataclasses.asdict(info)


def json_key(settings: dict) -> str:
    import json

    return json.dumps(settings, sort_keys=True, default=str)


def run_jobs(jobs: list[ShardJob], settings: dict, backend: str = "local", workers: int = 1,
             ray_address: str | None = None, retries: int = 2, progress: bool = True,
             on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Run shard jobs on a backend; returns ShardInfo dicts in job order."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    bar = tqdm(total=sum(j.entries for j in jobs), desc=f"build {len(jobs)} shards ({backend}, {workers} workers)",
               unit="tok", unit_scale=True, disable=not progress)
    results: dict[int, dict] = {}

    def done(job: ShardJob, info: dict) -> None:
        results[job.shard] = info
        bar.update(job.entries)
        bar.set_postfix(shards=f"{len(results)}/{len(jobs)}")
        if on_done:
            on_done(info)

    threads = _threads_per_worker(workers)
    if backend == "ray":
        _run_ray(jobs, settings, workers, threads, ray_address, retries, done)
    elif workers == 1:
        for job in jobs:
            done(job, _with_retries(lambda job=job: build_shard(settings, job, threads), retries))
    else:
        _run_processes(jobs, settings, workers, threads, retries, done)
    bar.close()
    for j in jobs:  # a job finished by a worker whose answer was lost (a retried Ray pool)
        if j.shard not in results and _finished(settings, j):
            import json
            from pathlib import Path

            results[j.shard] = json.loads((Path(settings["args"]["out"]) / "shards" / f"{j.shard:05d}" / "shard.json").read_text())
    return [results[j.shard] for j in jobs]


def _with_retries(fn: Callable[[], dict], retries: int) -> dict:
    for attempt in range(retries + 1):
        try:
            return fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")


def _run_processes(jobs, settings, workers, threads, retries, done) -> None:
    import multiprocessing as mp

    attempts = {j.shard: 0 for j in jobs}
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        pending: dict[Future, ShardJob] = {pool.submit(build_shard, settings, j, threads): j for j in jobs}
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
                    pending[pool.submit(build_shard, settings, job, threads)] = job


def _run_ray(jobs, settings, workers, threads, ray_address, retries, done) -> None:
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("--backend ray needs Ray: pip install 'silo-lm[distributed]'") from e
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=ray_address, num_cpus=None if ray_address else os.cpu_count(),
                 include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)

    @ray.remote(num_cpus=threads, max_restarts=retries, max_task_retries=retries)
    class ShardBuilder:  # one per worker: the model is loaded once, then reused for every shard
        def build(self, settings: dict, job: ShardJob) -> dict:
            return build_shard(settings, job, threads)

    try:
        actors = [ShardBuilder.remote() for _ in range(min(workers, len(jobs)) or 1)]
        pool = ray.util.ActorPool(actors)
        attempts = {j.shard: 0 for j in jobs}
        queue = list(jobs)
        for job in queue:
            pool.submit(lambda a, j: a.build.remote(settings, j), job)
        remaining = len(queue)
        while remaining:
            try:
                info = pool.get_next_unordered()
            except ray.exceptions.RayError:
                # ActorPool does not say which job failed: rerun the unfinished ones
                failed = [j for j in jobs if not _finished(settings, j)]
                for j in failed:
                    attempts[j.shard] += 1
                    if attempts[j.shard] > retries:
                        raise
                remaining = len(failed)
                pool = ray.util.ActorPool([ShardBuilder.remote() for _ in range(min(workers, len(failed)) or 1)])
                for j in failed:
                    pool.submit(lambda a, j: a.build.remote(settings, j), j)
                continue
            remaining -= 1
            job = next(j for j in jobs if f"{j.shard:05d}" == info["name"])
            done(job, info)
    finally:
        if started_here:
            ray.shutdown()


def _finished(settings: dict, job: ShardJob) -> bool:
    from pathlib import Path

    return (Path(settings["args"]["out"]) / "shards" / f"{job.shard:05d}" / "shard.json").is_file()
