"""Capacity planning: a trillion-token store, extrapolated from costs measured here.

`calibrate()` builds a small store with the real pipeline and times its stages: keys per
second (forward pass), adds per second, metadata bytes per entry, and the two costs of an
IVF-PQ search — one coarse-centroid distance and one PQ code scanned. `plan()` is pure
arithmetic on those numbers, so it is tested on known inputs; every assumption it makes
is returned with the figures and printed.

Model of the store (per entry = per token for a token store, per passage for a passage
store): index bytes = n·(M + 8) + nlist·d·4 (codes, ids, centroids); entry metadata as
measured; text (docs) as measured per token. Shards are sized so one shard's index fits
in `shard_ram_fraction` of a node's RAM; serving keeps indexes and entry metadata in RAM.
A query probes `nprobe` lists in every shard: cost = nlist·t_centroid + nprobe·(n_shard /
nlist)·t_code per shard, shards of a node searched `cores` at a time, nodes in parallel.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from datastore.index import new_index
from datastore.store import Datastore
from silo.build import BuildArgs, build_store

GB = 1 << 30


def parse_factory(factory: str, dim: int) -> tuple[int, int]:
    """'IVF65536,PQ64' -> (nlist, code bytes per vector). Flat -> (1, 4·dim)."""
    m = re.fullmatch(r"IVF(\d+)(?:_HNSW\d+)?,PQ(\d+)(?:x(\d+))?", factory.replace(" ", ""))
    if m:
        nbits = int(m.group(3) or 8)
        return int(m.group(1)), int(m.group(2)) * nbits // 8
    if factory == "Flat":
        return 1, 4 * dim
    raise ValueError(f"cannot plan for index {factory!r}; use IVF<nlist>,PQ<M> or Flat")


def plan(tokens: float, calib: dict, kind: str = "token", factory: str = "IVF65536,PQ64",
         ram_per_node: float = 256 * GB, nodes: int | None = None, workers: int | None = None,
         cores_per_node: int = 32, nprobe: int = 32, shard_ram_fraction: float = 0.5,
         passage_tokens: int = 256) -> dict:
    """Shards, bytes, RAM, nodes, build hours and query latency for a store of `tokens`."""
    if tokens <= 0:
        raise ValueError("tokens must be positive")
    dim = int(calib["dim"])
    nlist, code = parse_factory(factory, dim)
    entries = tokens if kind == "token" else math.ceil(tokens / passage_tokens)
    index_bytes_per_entry = code + 8
    centroid_bytes = nlist * dim * 4
    shard_budget = ram_per_node * shard_ram_fraction
    per_shard = max(1, int((shard_budget - centroid_bytes) // index_bytes_per_entry))
    shards = math.ceil(entries / per_shard)
    entries_per_shard = entries / shards
    index_bytes = entries * index_bytes_per_entry + shards * centroid_bytes
    meta_bytes = entries * calib["entry_meta_bytes"]
    text_bytes = tokens * calib["text_bytes_per_token"]
    serve_ram = index_bytes + meta_bytes
    need_nodes = math.ceil(serve_ram / (ram_per_node * 0.9))
    nodes = nodes or need_nodes
    workers = workers or nodes
    build_seconds = tokens / (calib["keys_per_second"] * workers) + entries / (calib["adds_per_second"] * workers)
    shard_query = nlist * calib["t_centroid"] + nprobe * (entries_per_shard / nlist) * calib["t_code"]
    shards_per_node = math.ceil(shards / nodes)
    latency = math.ceil(shards_per_node / cores_per_node) * shard_query + calib.get("rpc_overhead_s", 0.001)
    return {
        "tokens": tokens, "kind": kind, "entries": entries, "index": factory, "dim": dim, "nlist": nlist,
        "code_bytes": code, "shards": shards, "entries_per_shard": entries_per_shard,
        "index_bytes": index_bytes, "metadata_bytes": meta_bytes, "text_bytes": text_bytes,
        "serving_ram_bytes": serve_ram, "nodes_needed_for_ram": need_nodes, "nodes": nodes,
        "fits_in_ram": need_nodes <= nodes, "build_workers": workers, "build_hours": build_seconds / 3600,
        "query_latency_s": latency,
        "assumptions": [
            f"index = entries·(M+8 bytes) + nlist·d·4 per shard ({code}+8 B/entry, d={dim})",
            f"a shard's index takes ≤ {shard_ram_fraction:.0%} of a node's {ram_per_node / GB:.0f} GiB RAM",
            f"entry metadata {calib['entry_meta_bytes']:.1f} B/entry and text {calib['text_bytes_per_token']:.2f} "
            "B/token as measured; text stays on disk",
            f"build: {calib['keys_per_second']:,.0f} keys/s and {calib['adds_per_second']:,.0f} adds/s per worker "
            f"as measured ({calib.get('device', 'this machine')}), {workers} workers, no other bottleneck",
            f"query: nprobe {nprobe}, t_centroid {calib['t_centroid'] * 1e9:.1f} ns, t_code "
            f"{calib['t_code'] * 1e9:.2f} ns as measured; {cores_per_node} cores/node search shards in parallel; "
            f"{calib.get('rpc_overhead_s', 0.001) * 1e3:.0f} ms fan-out overhead",
            "IVF training is not counted (one job on a sample, small against adding)",
        ],
    }


def calibrate(model: str, corpus: str, out: str | os.PathLike, tokens: int = 200_000, nlist: int = 256,
              tiers: tuple[str, ...] = ("restricted",), progress: bool = True) -> dict:
    """Build a small store with the real pipeline and time it; returns (and saves) the costs."""
    out = Path(out)
    store_dir = out / "calibration-store"
    shutil.rmtree(store_dir, ignore_errors=True)
    t = time.perf_counter()
    m = build_store(BuildArgs(model=model, corpus=corpus, out=str(store_dir), tiers=tiers, max_tokens=tokens,
                              factory=None, window=256, stride=128, batch_size=16, keep_keys=True,
                              progress=progress))
    build_s = time.perf_counter() - t
    store = Datastore.open(store_dir)
    keys = store.keys_of(np.arange(store.n_entries)).astype(np.float32)
    dim_probe = keys.shape[1]
    n = len(keys)
    # adds/s and search costs on an IVF-PQ index of the measured keys
    m_pq = next(x for x in (64, 32, 16, 8, 4) if dim_probe % x == 0 and x <= dim_probe // 4)
    index = new_index(f"IVF{nlist},PQ{m_pq}", dim_probe)
    index.train(keys[: min(n, max(100 * nlist, 10_000))])
    t = time.perf_counter()
    index.add(keys)
    adds = n / (time.perf_counter() - t)
    q = keys[np.random.default_rng(0).choice(n, 1000, replace=False)]
    quant = faiss.IndexFlatL2(dim_probe)
    quant.add(faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, nlist))
    t = time.perf_counter()
    quant.search(q, 1)
    t_centroid = (time.perf_counter() - t) / (len(q) * nlist)
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = 16
    t = time.perf_counter()
    index.search(q, 16)
    t_search = (time.perf_counter() - t) / len(q)
    t_code = max(t_search - nlist * t_centroid, 1e-12) / (16 * n / nlist)
    entry_meta = sum((s.path / f"{c}.npy").stat().st_size for s in store.shards for c in s.columns) / n
    text = sum((s.path / "text.bin").stat().st_size for s in store.shards) / n
    calib = {"dim": dim_probe, "entries": n, "build_seconds": build_s, "keys_per_second": n / build_s,
             "adds_per_second": adds, "t_centroid": t_centroid, "t_code": t_code, "entry_meta_bytes": entry_meta,
             "text_bytes_per_token": text, "device": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
             "model": str(Path(model).resolve()), "measured": time.strftime("%Y-%m-%d %H:%M"),
             "factory": m.index}
    (out / "calibration.json").write_text(json.dumps(calib, indent=2))
    shutil.rmtree(store_dir, ignore_errors=True)
    return calib


def human_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if b < 1024 or unit == "PiB":
            return f"{b:,.1f} {unit}"
        b /= 1024
    raise AssertionError


def human_time(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 3600:
        return f"{s:.1f} s"
    return f"{s / 3600:,.1f} h"
