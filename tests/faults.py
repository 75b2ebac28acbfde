"""Fault injection for crash tests: run a function in a child process killed with SIGKILL
right before its Nth file-system step.

The steps counted are the calls that change what is on disk (write, rename, fsync,
truncate, delete, mkdir, FAISS and parquet writes). `count_steps` runs the function once
to completion and returns how many it makes; `run_killed(…, kill_at=n)` for every n in
1..steps kills it at every point in between. Children come from a fork server that has
imported the heavy libraries but run nothing (forking a process whose OpenMP or gRPC
threads are running is unsafe), so each run costs milliseconds, not an interpreter start.

Production code has no test hooks: everything here is patched in the child only.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import shutil
import signal
from pathlib import Path

from silo.build import shard_worker as _REAL_SHARD_WORKER  # before any test patches it

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["faults", "numpy", "faiss", "pyarrow.parquet", "silo.datastore.store",
                                     "silo.datastore.compact", "silo.build", "silo.ingest"])
    return _CTX


def _install(kill_at: int, counter: list[int]) -> None:
    import faiss
    import numpy as np
    import pyarrow.parquet as pq

    targets = [(os, "replace"), (os, "rename"), (os, "fsync"), (os, "ftruncate"), (os, "unlink"), (os, "mkdir"),
               (os, "write"), (shutil, "rmtree"), (faiss, "write_index"), (pq, "write_table"), (np, "save"),
               (Path, "write_text"), (Path, "write_bytes"), (Path, "unlink"), (Path, "mkdir")]
    for mod, name in targets:
        real = getattr(mod, name)

        def step(*a, _real=real, **k):
            counter[0] += 1
            if counter[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*a, **k)

        setattr(mod, name, step)


def _child(target: str, args: tuple, kwargs: dict, kill_at: int, steps_file: str) -> None:
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    counter = [0]
    _install(kill_at, counter)
    fn(*args, **kwargs)
    with open(steps_file, "w") as f:  # reached only when not killed
        f.write(str(counter[0]))


def run_killed(target: str, *args, kill_at: int = 0, tmp: str | os.PathLike, **kwargs) -> int | None:
    """Run `module:function(*args, **kwargs)` in a child killed before its `kill_at`th step
    (0: never). Returns the steps it made if it finished, None if it was killed."""
    steps_file = Path(tmp) / f"steps-{os.getpid()}-{kill_at}"
    steps_file.unlink(missing_ok=True)
    p = _context().Process(target=_child, args=(target, args, kwargs, kill_at, str(steps_file)))
    p.start()
    p.join(300)
    if p.is_alive():
        p.kill()
        raise AssertionError(f"{target} hung (kill_at={kill_at})")
    if p.exitcode == -signal.SIGKILL:
        return None
    if p.exitcode != 0:
        raise AssertionError(f"{target} failed with exit code {p.exitcode} (kill_at={kill_at})")
    return int(steps_file.read_text())


def count_steps(target: str, *args, tmp: str | os.PathLike, **kwargs) -> int:
    steps = run_killed(target, *args, kill_at=0, tmp=tmp, **kwargs)
    assert steps is not None
    return steps


def build(args: dict) -> None:
    """A token-store build (a picklable target for `run_killed`)."""
    from silo.build import BuildArgs, build_store

    build_store(BuildArgs(**args))


def flaky_shard_worker(settings: dict, shard: int, doc_range: tuple[int, int], cache: dict) -> dict:
    """`silo.build.shard_worker` whose first attempt at every shard fails (a marker file per
    shard in $FAULTS_DIR says it already failed): for the retry tests of worker processes."""
    marker = Path(os.environ["FAULTS_DIR"]) / f"shard-{shard}"
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected failure of shard {shard}")
    return _REAL_SHARD_WORKER(settings, shard, doc_range, cache)
