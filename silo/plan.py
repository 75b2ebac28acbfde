"""Capacity planning: a trillion-token store, extrapolated from costs measured here.

`calibrate()` builds a small store with the real pipeline and measures what a plan needs:
keys per second (the forward pass), adds per second, the two costs of an IVF-PQ search
(one centroid distance, one PQ code scanned), and bytes per entry of everything the store
keeps — the FAISS index (in RAM), the memory-mapped entry columns (on disk, in the page
cache when hot), fp16 keys for exact re-ranking (SSD), text, per-document metadata (RAM) —
and the resident memory of a serving process without its index (runtime + model); and
what inverted lists on SSD cost here (`calibrate_ssd`: memory-mapped search time warm,
as a ratio to RAM, and the read time of a page a cold search faults in).
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
With lists on SSD (`lists="ssd"`) a node's RAM holds the centroids, the metadata and the
hot part of the lists (`page_cache_fraction`); nodes are then bounded by SSD capacity too;
a warm query scans as measured (`ssd_warm_ratio`), a cold one also reads each probed list
from the disk, page by page (`t_page_cold`).
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
from silo.datastore import index as ix
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
         refine: int = 4, k: int = 64, ssd_read_s: float = 100e-6, lists: str = "ram",
         ssd_per_node: float = 16 * TB, ssd_fraction: float = 0.8, page_cache_fraction: float = 0.1) -> dict:
    """Nodes, RAM, disk, build hours and query latency for a store of `tokens` tokens, its
    inverted lists in RAM or on SSD (`lists="ssd"`: memory-mapped, `page_cache_fraction`
    of them hot in each node's page cache; nodes then also bounded by `ssd_per_node`)."""
    if tokens <= 0:
        raise SiloError("tokens must be positive")
    if lists not in ("ram", "ssd"):
        raise SiloError(f"lists must be ram or ssd, got {lists!r}")
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
    meta_bytes = entries * calib["entry_meta_bytes"]
    keys_bytes = entries * 2 * dim if refine > 1 else 0.0
    text_bytes = tokens * calib["text_bytes_per_token"]
    disk_bytes = meta_bytes + keys_bytes + text_bytes + index_bytes
    in_ram = index_bytes if lists == "ram" else index_bytes * page_cache_fraction  # lists, or their hot part
    need = math.ceil((in_ram + doc_ram) / per_node)
    if lists == "ssd":
        need = max(need, math.ceil(disk_bytes / (ssd_per_node * ssd_fraction)))
    nodes = nodes or need
    workers = workers or nodes
    ram_bytes = in_ram + doc_ram + nodes * (centroid_bytes + calib.get("rss_base_bytes", 0.0))
    build_seconds = tokens / (calib["keys_per_second"] * workers) + entries / (calib["adds_per_second"] * workers)
    assign_s = 2 * math.log2(max(nlist, 2)) * 32 * dim * calib["t_centroid"] / 4  # HNSW: ~log(nlist) hops of 32
    list_entries = entries / nodes / nlist
    scan_s = nprobe * list_entries * calib["t_code"] / min(cores_per_node, nprobe)
    refine_s = refine * k * calib.get("ssd_seek_s", ssd_read_s) / cores_per_node if refine > 1 else 0.0
    rpc_s = calib.get("rpc_overhead_s", 0.001)
    ssd_measured = all(x in calib for x in ("ssd_warm_ratio", "ssd_seek_s", "ssd_bandwidth"))
    warm_ratio = calib.get("ssd_warm_ratio", 1.0) if lists == "ssd" else 1.0
    seek, bandwidth = calib.get("ssd_seek_s", ssd_read_s), calib.get("ssd_bandwidth", 2e9)
    list_bytes = list_entries * (code + 8)
    list_read_s = seek + list_bytes / bandwidth  # one probed list: a seek, then its bytes in sequence
    cold_scan_s = scan_s + nprobe * list_read_s / min(cores_per_node, nprobe)
    latency = assign_s + scan_s * warm_ratio + refine_s + rpc_s
    cold_latency = assign_s + (cold_scan_s if lists == "ssd" else scan_s) + refine_s + rpc_s
    layout = (f"inverted lists in RAM ({index_bytes / GB:,.0f} GiB in all)" if lists == "ram" else
              f"inverted lists on SSD, memory-mapped ({index_bytes / GB:,.0f} GiB on disk), {page_cache_fraction:.0%} "
              f"of them hot in the page cache; {ssd_fraction:.0%} of {ssd_per_node / TB:.0f} TiB of SSD per node "
              f"usable; warm scans {warm_ratio:.2f}x RAM; a cold list ({list_bytes / 2**20:,.1f} MiB) is read in "
              f"{list_read_s * 1e3:.1f} ms: {seek * 1e6:.0f} µs seek + {bandwidth / 2**20:,.0f} MiB/s "
              f"({'measured here' if ssd_measured else 'assumed: no SSD calibration'})")
    return {
        "tokens": tokens, "kind": kind, "entries": entries, "index": factory, "dim": dim, "nlist": nlist,
        "code_bytes": code, "nodes_needed": need, "nodes": nodes, "fits": need <= nodes,
        "entries_per_node": entries / nodes, "index_bytes": index_bytes, "ram_bytes": ram_bytes,
        "ram_per_node_bytes": ram_bytes / nodes, "metadata_disk_bytes": meta_bytes, "keys_disk_bytes": keys_bytes,
        "text_disk_bytes": text_bytes, "disk_bytes": disk_bytes, "lists": lists,
        "disk_per_node_bytes": disk_bytes / nodes, "cold_query_latency_s": cold_latency,
        "build_workers": workers, "build_hours": build_seconds / 3600,
        "build_worker_hours": build_seconds * workers / 3600, "query_latency_s": latency,
        "latency_parts_s": {"assign": assign_s, "scan": scan_s, "refine": refine_s},
        "assumptions": [
            layout,
            f"one index: {code}+8 B/entry of codes and ids in RAM, split over the nodes; the {nlist:,} centroids "
            f"(d={dim}, {centroid_bytes / GB:.2f} GiB) and the runtime "
            f"({calib.get('rss_base_bytes', 0) / GB:.2f} GiB measured) on every node; {ram_fraction:.0%} of "
            f"{ram_per_node / GB:.0f} GiB usable",
            f"per-document metadata {calib.get('doc_ram_bytes_per_entry', 0):.2f} B/entry in RAM; entry columns "
            f"{calib['entry_meta_bytes']:.1f} B/entry memory-mapped from disk; text "
            f"{calib['text_bytes_per_token']:.2f} B/token on disk (all as measured)",
            f"exact re-ranking: {refine}x{k} candidates per query, fp16 keys ({2 * dim} B/entry) on SSD, "
            f"{calib.get('ssd_seek_s', ssd_read_s) * 1e6:.0f} µs per random read "
            f"({'measured here' if 'ssd_seek_s' in calib else 'assumed'})" if refine > 1 else "no re-ranking keys",
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
    kw = kw | {"lists": "ssd", "workers": kw.get("workers") or token["build_workers"]}
    ssd = {"token": plan(tokens, calib, "token", **kw), "passage": plan(tokens, calib, "passage", **kw)}
    return {"token": token, "passage": passage, "ssd": ssd, "published": PUBLISHED}


def _rss_anon() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return float(line.split()[1]) * 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def calibrate_ssd(index: faiss.Index, queries: np.ndarray, folder: Path, nprobe: int = 16) -> dict:
    """What lists on SSD cost here, on `index` written to `folder` and read back in both
    layouts: the mapped layout's warm search time as a ratio to RAM; and this disk's random
    read latency and sequential bandwidth (`disk_speed`), from which a cold list's read is
    planned (a list at trillion scale is megabytes, far past this store's)."""
    path = folder / "calibration-lists.faiss"
    faiss.write_index(index, str(path))
    try:
        ram, ssd = ix.read_shard_index(str(path), "ram"), ix.read_shard_index(str(path), "ssd")
        for x in (ram, ssd):
            faiss.extract_index_ivf(x).nprobe = nprobe
            x.search(queries, 16)  # the mapped lists' pages are now in the page cache
        times = {"ram": [], "ssd": []}
        for _ in range(3):  # alternated, best of 3: a neighbour's load hits both alike
            for name, x in (("ram", ram), ("ssd", ssd)):
                t = time.perf_counter()
                x.search(queries, 16)
                times[name].append(time.perf_counter() - t)
        warm_ratio = min(times["ssd"]) / min(times["ram"])
        seek, bandwidth = disk_speed(folder)
        return {"ssd_warm_ratio": warm_ratio, "ssd_seek_s": seek, "ssd_bandwidth": bandwidth}
    finally:
        path.unlink(missing_ok=True)


def disk_speed(folder: Path, size: int = 64 << 20) -> tuple[float, float]:
    """This disk's uncached random 4 KB read (p50 seconds) and sequential read (bytes/s), on
    a file of `size` random bytes written in `folder` and evicted from the page cache."""
    path = folder / "calibration-disk.bin"
    try:
        with open(path, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            for off in range(0, size, 1 << 20):
                os.pread(fd, 1 << 20, off)
            bandwidth = size / (time.perf_counter() - t)
            # the whole file evicted, readahead off, 200 distinct pages: every read goes to the disk
            # (evicting page by page fails where the sequential read left large folios)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            lat = []
            for page in np.random.default_rng(0).choice(size // 4096, 200, replace=False):
                t = time.perf_counter()
                os.pread(fd, 4096, int(page) * 4096)
                lat.append(time.perf_counter() - t)
        finally:
            os.close(fd)
        return float(np.median(lat)), bandwidth
    finally:
        path.unlink(missing_ok=True)
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
    ssd = calibrate_ssd(index, q, out)
    entry_meta = sum((s.path / f"{c}.npy").stat().st_size for s in store.shards for c in s.columns) / n
    text = sum((s.path / "text.bin").stat().st_size + (s.path / "docs.parquet").stat().st_size
               for s in store.shards) / n
    doc_ram = sum(a.nbytes for a in (store.docs.first_entry, store.docs.n_entries, store.docs.n_tokens,
                                     *store.docs.codes.values())) / n + store.docs.doc_ids.nbytes / n
    calib = {"dim": dim, "entries": n, "build_seconds": build_s, "keys_per_second": n / build_s,
             "adds_per_second": adds, "t_centroid": t_centroid, "t_code": t_code, "entry_meta_bytes": entry_meta,
             "text_bytes_per_token": text, "doc_ram_bytes_per_entry": doc_ram,
             "rss_base_bytes": rss_base, **ssd,
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
        path.write_text(json.dumps(calib, indent=2))  # where --calibration says, for the next plan to read
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
