"""Capacity planning: a trillion-token store, extrapolated from costs measured here.

`calibrate()` builds a small store with the real pipeline and measures what a plan needs:
keys per second (the forward pass), adds per second, the two costs of an IVF-PQ search
(one centroid distance, one PQ code scanned), and bytes per entry of everything the store
keeps — the FAISS index (in RAM), the memory-mapped entry columns (on disk, in the page
cache when hot), fp16 keys for exact re-ranking (SSD), text, per-document metadata (RAM) —
and the resident memory of a serving process without its index (runtime + model).
`plan()` is pure arithmetic on those numbers (tested on known inputs) and returns every
assumption beside its figures; `plans()` gives the token store and the passage-store
alternative side by side, with the published footprints of MassiveDS and CompactDS.

Model (one trained index per store, `silo.datastore.index`): the index's entries are split
over nodes; each node holds its part of every inverted list (entries·(M+8) bytes), the
store's centroids (nlist·d·4) and per-document metadata in RAM, and its mapped columns,
keys and text on disk. Nodes = what RAM needs at `ram_fraction` of each node. A query is
assigned to lists once (HNSW over the centroids: ~log(nlist) distance computations), then
every node scans its part of the `nprobe` lists in parallel (`cores` lists at a time),
and re-ranking reads refine·k fp16 keys from SSD (a random read each, `ssd_read_s`).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from silo.build import BuildArgs, build_store
from silo.datastore.index import choose_factory, new_index
from silo.datastore.store import Datastore
from silo.errors import SiloError
from silo.lm import load_causal_lm

GB = 1 << 30
TB = 1 << 40
PUBLISHED = [  # footprints of the systems we learn from (their papers and repositories)
    {"system": "MassiveDS (Shao et al. 2024)", "tokens": 1.4e12, "entries": "~4.5B passages (256 words)",
     "footprint": "~6-7 TB of fp16 768-d embeddings; Flat inner-product shards searched exhaustively; "
                  "13 SLURM workers with up to 1 TB RAM each"},
    {"system": "CompactDS (2025)", "tokens": None, "entries": "~2B passages",
     "footprint": "IVF-PQ, 65,536 lists, M=64: 456 GB RAM, plus exact re-scoring from embeddings on disk; "
                  "< 1 s per query on one node"},
    {"system": "SILO (Min et al. 2023)", "tokens": 1.0e9, "entries": "1B tokens (kNN-LM)",
     "footprint": "IVF-PQ 4096 lists x 64 B: 72 B/token + 4 KB/token of fp16 keys on disk"},
]


def parse_factory(factory: str, dim: int) -> tuple[int, int]:
    """'IVF65536,PQ64' -> (nlist, code bytes per vector). Flat -> (1, 4·dim)."""
    m = re.fullmatch(r"IVF(\d+)(?:_HNSW\d+)?,PQ(\d+)(?:x(\d+))?(?:fs)?", factory.replace(" ", ""))
    if m:
        nbits = int(m.group(3) or 8)
        return int(m.group(1)), int(m.group(2)) * nbits // 8
    if factory == "Flat":
        return 1, 4 * dim
    raise SiloError(f"cannot plan for index {factory!r}; use IVF<nlist>,PQ<M> or Flat")


def plan(tokens: float, calib: dict, kind: str = "token", factory: str | None = None,
         ram_per_node: float = 256 * GB, nodes: int | None = None, workers: int | None = None,
         cores_per_node: int = 32, nprobe: int = 32, ram_fraction: float = 0.8, passage_tokens: int = 256,
         refine: int = 4, k: int = 64, ssd_read_s: float = 100e-6) -> dict:
    """Nodes, RAM, disk, build hours and query latency for a store of `tokens` tokens."""
    if tokens <= 0:
        raise SiloError("tokens must be positive")
    dim = int(calib["dim"])
    entries = tokens if kind == "token" else math.ceil(tokens / passage_tokens)
    factory = factory or choose_factory(int(entries), dim, memory_budget=int(entries) * 72)
    nlist, code = parse_factory(factory, dim)
    index_bytes = entries * (code + 8)
    centroid_bytes = nlist * dim * 4
    doc_ram = entries * calib.get("doc_ram_bytes_per_entry", 0.0)
    per_node = ram_per_node * ram_fraction - calib.get("rss_base_bytes", 0.0) - centroid_bytes
    if per_node <= 0:
        raise SiloError(f"{ram_per_node / GB:.0f} GiB nodes cannot hold the runtime and the centroids")
    need = math.ceil((index_bytes + doc_ram) / per_node)
    nodes = nodes or need
    workers = workers or nodes
    meta_bytes = entries * calib["entry_meta_bytes"]
    keys_bytes = entries * 2 * dim if refine > 1 else 0.0
    text_bytes = tokens * calib["text_bytes_per_token"]
    ram_bytes = index_bytes + doc_ram + nodes * (centroid_bytes + calib.get("rss_base_bytes", 0.0))
    build_seconds = tokens / (calib["keys_per_second"] * workers) + entries / (calib["adds_per_second"] * workers)
    assign_s = 2 * math.log2(max(nlist, 2)) * 32 * dim * calib["t_centroid"] / 4  # HNSW: ~log(nlist) hops of 32
    scan_s = nprobe * (entries / nodes / nlist) * calib["t_code"] / min(cores_per_node, nprobe)
    refine_s = refine * k * ssd_read_s / cores_per_node if refine > 1 else 0.0
    latency = assign_s + scan_s + refine_s + calib.get("rpc_overhead_s", 0.001)
    return {
        "tokens": tokens, "kind": kind, "entries": entries, "index": factory, "dim": dim, "nlist": nlist,
        "code_bytes": code, "nodes_needed": need, "nodes": nodes, "fits": need <= nodes,
        "entries_per_node": entries / nodes, "index_bytes": index_bytes, "ram_bytes": ram_bytes,
        "ram_per_node_bytes": ram_bytes / nodes, "metadata_disk_bytes": meta_bytes, "keys_disk_bytes": keys_bytes,
        "text_disk_bytes": text_bytes, "disk_bytes": meta_bytes + keys_bytes + text_bytes + index_bytes,
        "build_workers": workers, "build_hours": build_seconds / 3600,
        "build_worker_hours": build_seconds * workers / 3600, "query_latency_s": latency,
        "latency_parts_s": {"assign": assign_s, "scan": scan_s, "refine": refine_s},
        "assumptions": [
            f"one index: {code}+8 B/entry of codes and ids in RAM, split over the nodes; the {nlist:,} centroids "
            f"(d={dim}, {centroid_bytes / GB:.2f} GiB) and the runtime "
            f"({calib.get('rss_base_bytes', 0) / GB:.2f} GiB measured) on every node; {ram_fraction:.0%} of "
            f"{ram_per_node / GB:.0f} GiB usable",
            f"per-document metadata {calib.get('doc_ram_bytes_per_entry', 0):.2f} B/entry in RAM; entry columns "
            f"{calib['entry_meta_bytes']:.1f} B/entry memory-mapped from disk; text "
            f"{calib['text_bytes_per_token']:.2f} B/token on disk (all as measured)",
            f"exact re-ranking: {refine}x{k} candidates per query, fp16 keys ({2 * dim} B/entry) on SSD, "
            f"{ssd_read_s * 1e6:.0f} µs per random read" if refine > 1 else "no re-ranking keys",
            f"build: {calib['keys_per_second']:,.0f} keys/s and {calib['adds_per_second']:,.0f} adds/s per worker as "
            f"measured ({calib.get('device', 'this machine')}), {workers} workers, no other bottleneck",
            f"query: HNSW assignment, nprobe {nprobe}, t_centroid {calib['t_centroid'] * 1e9:.1f} ns, t_code "
            f"{calib['t_code'] * 1e9:.2f} ns as measured, {cores_per_node} cores per node scan lists in parallel, "
            f"nodes in parallel, {calib.get('rpc_overhead_s', 0.001) * 1e3:.0f} ms fan-out",
            "IVF training is not counted (one job on a sample, small against adding)",
        ],
    }


def plans(tokens: float, calib: dict, **kw) -> dict:
    """The token store (kNN-LM) and the passage store (RIC-LM) for the same text, and the
    published footprints to compare with. Both are built by the same fleet (`workers`, or
    as many workers as the token store has nodes), so their build times compare."""
    token = plan(tokens, calib, "token", **kw)
    passage = plan(tokens, calib, "passage", **(kw | {"workers": kw.get("workers") or token["build_workers"]}))
    return {"token": token, "passage": passage, "published": PUBLISHED}


def _rss_anon() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return float(line.split()[1]) * 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def calibrate(model: str, corpus: str, out: str | os.PathLike, tokens: int = 200_000, nlist: int = 256,
              tiers: tuple[str, ...] = ("restricted",), progress: bool = True) -> dict:
    """Build a small store with the real pipeline and measure it; returns (and saves) the costs."""
    out = Path(out)
    store_dir = out / "calibration-store"
    shutil.rmtree(store_dir, ignore_errors=True)
    lm, _ = load_causal_lm(model)
    rss_base = _rss_anon()  # the runtime and the model: what a serving process holds besides its stores
    del lm
    t = time.perf_counter()
    m = build_store(BuildArgs(model=model, corpus=corpus, out=str(store_dir), tiers=tiers, max_tokens=tokens,
                              factory=None, window=256, stride=128, batch_size=16, keep_keys=True,
                              progress=progress))
    build_s = time.perf_counter() - t
    store = Datastore.open(store_dir)
    keys = store.keys_of(np.arange(store.n_entries)).astype(np.float32)
    dim, n = keys.shape[1], len(keys)
    # adds/s and search costs on an IVF-PQ index of the measured keys
    m_pq = next(x for x in (64, 32, 16, 8, 4) if dim % x == 0 and x <= dim // 4)
    index = new_index(f"IVF{nlist},PQ{m_pq}", dim)
    index.train(keys[: min(n, max(100 * nlist, 10_000))])
    t = time.perf_counter()
    index.add(keys)
    adds = n / (time.perf_counter() - t)
    q = keys[np.random.default_rng(0).choice(n, 1000, replace=False)]
    quant = faiss.IndexFlatL2(dim)
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
    text = sum((s.path / "text.bin").stat().st_size + (s.path / "docs.parquet").stat().st_size
               for s in store.shards) / n
    doc_ram = sum(a.nbytes for a in (store.docs.first_entry, store.docs.n_entries, store.docs.n_tokens,
                                     *store.docs.codes.values())) / n + store.docs.doc_ids.nbytes / n
    calib = {"dim": dim, "entries": n, "build_seconds": build_s, "keys_per_second": n / build_s,
             "adds_per_second": adds, "t_centroid": t_centroid, "t_code": t_code, "entry_meta_bytes": entry_meta,
             "text_bytes_per_token": text, "doc_ram_bytes_per_entry": doc_ram,
             "rss_base_bytes": rss_base,
             "device": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
             "model": str(Path(model).resolve()), "measured": time.strftime("%Y-%m-%d %H:%M"), "factory": m.index}
    (out / "calibration.json").write_text(json.dumps(calib, indent=2))
    store.close()
    shutil.rmtree(store_dir, ignore_errors=True)
    return calib


def capacity_plan(tokens: float, calibration: str | os.PathLike, calibrate_first: bool = False,
                  model: str | None = None, corpus: str | None = None, calibrate_tokens: int = 200_000,
                  **kw) -> dict:
    """`silo plan`: calibrate here (or read an earlier calibration), then `plans`."""
    path = Path(calibration)
    if calibrate_first:
        if not (model and corpus):
            raise SiloError("calibrating needs a model and a corpus (--model, --corpus)")
        calib = calibrate(model, corpus, path.parent, tokens=calibrate_tokens)
    elif path.is_file():
        calib = json.loads(path.read_text())
    else:
        raise FileNotFoundError(f"no calibration at {path}; run `silo plan --calibrate --model M --corpus C`")
    return {"calibration": calib, **plans(tokens, calib, **kw)}


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
