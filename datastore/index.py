"""FAISS index choice and use: one trained index per store, shards as partitions of it.

Choice (autofaiss-style, sized from the store's *total* entries, never from the shard
count, so 1 or 8 shards answer alike): Flat while the raw vectors fit the budget and
n ≤ `FLAT_MAX`; otherwise IVF with nlist = 2^round(log2(4·√n)) (at most 262144) and PQ
with the largest M (dividing d, sub-vectors of ≥ 2 dims) whose M + 8 bytes per vector fit
the budget. From 16,384 lists on, the coarse quantizer is an HNSW graph over the
centroids (`IVF16384_HNSW32`), so assigning one query stays cheap (a flat quantizer over
16k centroids costs ~3 ms per single query on 2 cores). Trained once on
min(64·nlist, n) vectors, saved as the store's `trained.faiss`; every shard's
`index.faiss` is a copy of it holding that shard's entries (global ids, `add_with_ids`
on the IVF itself: no IDMap, whose ids shift after removals).

A store that keeps its fp16 keys gets 4-bit fast-scan PQ instead (`PQ{M}x4fs`, M up to d,
M/2 bytes per vector: the bytes of 8-bit PQ with half the sub-quantizers). Its lists are
scanned with SIMD lookups held in registers (5.7x faster than 8-bit PQ at d=64, 1M
entries), and its coarser codes are made exact again by re-ranking `FAST_SCAN_REFINE × k`
candidates from the keys (`default_refine`).

Search over IVF shards: the query batch is assigned to lists once (`assign`); the local
shards form one group index whose inverted lists are the shards' lists merged
(`merge_from`, at load), searched with `search_preassigned`, so N shards cost what one
does; a remote shard server receives the same assignment. Flat shards are exact and
searched one by one. Every search takes an `IDSelectorBitmap` of live, policy-allowed
entries (~1.2× a clean search), and callers post-filter too, because some index types
ignore selectors (`IndexShardsIVF` does).

Lists on SSD (`lists="ssd"`, a store option set at build time and switchable at load):
the shard's `index.faiss` is memory-mapped with `IO_FLAG_MMAP` instead of read into RAM,
so its inverted lists (codes and ids) are page cache, not process memory; the coarse
quantizer, the opt-out bitmaps and the per-document metadata stay in RAM. No second file
and no path inside the index (the trap of `OnDiskInvertedLists` files, faiss#1528): the
lists are read in place from the file the RAM layout reads, so a store moves as a folder.
faiss maps 8-bit PQ's array lists; fast-scan's packed blocks cannot be mapped (faiss 1.15
reads them into RAM whatever the flags), so an SSD store gets 8-bit codes
(`choose_factory(..., lists="ssd")`) and a fast-scan store asked to map is refused. Mapped
shards are joined by `HStackInvertedLists` (read-only, no copy) instead of `merge_from`.

Exact re-ranking (`refine`): with fp16 keys kept, `refine_factor × k` candidates are
re-scored with exact distances and the best k kept. Fast-scan indexes honour the same
selectors, `search_preassigned`, `merge_from` and `remove_ids` (compaction), so opt-outs,
policies, shards and ingest work alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os

import faiss
import numpy as np

FLAT_MAX = 200_000
PQ_CHOICES = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
HNSW_FROM = 16384  # nlist from which the coarse quantizer is an HNSW graph (a flat one costs ms per query)
PRECOMPUTED_TABLE_MAX = 64 << 20  # IVF-PQ's per-list distance table, if it is at most this big
DEFAULT_NPROBE = 32
LISTS = ("ram", "ssd")  # where an IVF store's inverted lists live while it serves
RANDOM_LISTS_BELOW = 1 << 20  # mapped lists smaller than this on average are read at random (`advise_random`)
FAST_SCAN_REFINE = 4  # candidates per neighbour re-ranked exactly on fast-scan stores (tools/bench.py fastknn)


def nlist_for(n: int) -> int:
    # 4·√n lists (as a power of two) at every size, at most 262144. autofaiss jumps to 16k–65k
    # lists at 1M entries: a k-means over millions of keys, fine on a GPU, hours on 2 CPU
    # cores. With 4·√n and 64 training keys per list, training costs O(n), like adding.
    return int(min(262144, max(1, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def choose_factory(n: int, dim: int, memory_budget: int | None = None, rerank: bool = False,
                   lists: str = "ram") -> str:
    """A FAISS factory string for a store of `n` vectors of `dim` under `memory_budget`
    bytes; `rerank`: the store keeps exact keys, so an IVF store gets fast-scan PQ — unless
    its lists are to be served from SSD (`lists="ssd"`), which needs mappable 8-bit codes."""
    assert n >= 0 and dim > 0 and lists in LISTS, (n, dim, lists)
    budget = memory_budget if memory_budget is not None else 4 << 30
    if n <= FLAT_MAX and n * (dim * 4 + 8) <= budget:
        return "Flat"
    nlist = min(nlist_for(n), max(1, n // 39))
    per_vector = budget / max(n, 1) - 8
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= HNSW_FROM else f"IVF{nlist}"
    if rerank and lists == "ram":  # 4-bit codes: M/2 bytes, M even (codes are packed two per byte, 32 vectors per block)
        m = next((m for m in PQ_CHOICES if dim % m == 0 and m % 2 == 0 and m // 2 <= per_vector), None)
        if m is not None:
            return f"{quantizer},PQ{m}x4fs"
    m = next((m for m in PQ_CHOICES if dim % m == 0 and m <= per_vector and m <= dim // 2), None)
    if m is None:
        m = next(m for m in reversed(PQ_CHOICES) if dim % m == 0)
    return f"{quantizer},PQ{m}"


def is_fast_scan(factory: str | None) -> bool:
    """Whether a factory string names a 4-bit fast-scan code (`PQ64x4fs`, `PQ32x4fsr`, …)."""
    return bool(factory) and "x4fs" in factory.split(",")[-1]


def default_refine(factory: str | None) -> int:
    """Re-ranking factor a store's index needs when no tuned default says otherwise: fast-scan
    codes rank too coarsely alone (recall@64 ~0.8), exact re-ranking restores it."""
    return FAST_SCAN_REFINE if is_fast_scan(factory) else 1


def new_index(factory: str, dim: int, metric: str = "l2") -> faiss.Index:
    mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.index_factory(dim, factory, mt)
    if not is_ivf(index):  # flat-like indexes keep no ids of their own
        index = faiss.IndexIDMap2(index)
    elif hasattr(index, "do_polysemous_training"):
        # on by default for IVF-PQ, ~100x slower training, and only for Hamming filtering we never use
        index.do_polysemous_training = False
    return index


def is_ivf(index: faiss.Index | None) -> bool:
    return index is not None and faiss.try_extract_index_ivf(index) is not None


def train_size(factory: str, n: int) -> int:
    ivf = factory.split(",")[0]
    if not ivf.startswith("IVF"):
        return 0
    nlist = int(ivf[3:].split("_")[0])
    return min(n, max(64 * nlist, 10_000))  # FAISS wants 39–256 points per centroid


class UnmappableLists(ValueError):
    """The index's lists cannot be served from SSD (fast-scan blocks)."""


def read_shard_index(path: str, lists: str = "ram") -> faiss.Index:
    """A shard's index as loaded for serving: IVF-PQ's precomputed distance table is not
    built per shard (`group_index` builds it once, for the group). `lists="ssd"`: the
    inverted lists (a Flat index: its vectors) stay in the file, memory-mapped."""
    assert lists in LISTS, lists
    if lists == "ram":
        return faiss.read_index(path, faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
    with open(path, "rb") as f:  # faiss maps one kind per read: Flat codes (behind an id map) or IVF lists
        flat = f.read(4) in (b"IxM2", b"IxMp")
    index = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC if flat else
                             faiss.IO_FLAG_MMAP | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
    if is_ivf(index) and os.path.getsize(path) / faiss.extract_index_ivf(index).nlist < RANDOM_LISTS_BELOW:
        advise_random(path)
    if is_ivf(index) and not lists_mapped(index):
        raise UnmappableLists(f"{path}: this index's lists ({type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)).__name__}, fast-scan "
                              "blocks) cannot be memory-mapped by faiss; serve them in RAM, or give the store 8-bit codes "
                              "for SSD: silo datastore reindex STORE --out NEW --lists ssd")
    return index


_MADV_NORMAL, _MADV_RANDOM, _MADV_PAGEOUT = 0, 1, 21


def _mappings(path: str) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of `path` (none without procfs)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            fields = [line.split() for line in f]
    except OSError:
        return []
    return [tuple(int(x, 16) for x in f[0].split("-")) for f in fields if len(f) >= 6 and f[5] == real]


def advise_random(path: str, random: bool = True) -> int:
    """Tell the kernel this process's mappings of `path` are read at random (`MADV_RANDOM`;
    `random=False`: back to the default readahead), and return how many it found.

    A probed list of a 10M-entry store is ~24 KB, but a page fault on a mapping reads ahead
    as a sequential file read would (`read_ahead_kb`: 8 MB on this machine's disk): one cold
    query read ~100 MB, 220 ms instead of 26 ms (BENCHMARKS.md). `read_shard_index` advises
    this for lists under `RANDOM_LISTS_BELOW` on average; longer lists are left to
    readahead, which reads them in sequence."""
    ranges = _mappings(path)
    for start, end in ranges:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_RANDOM if random else _MADV_NORMAL)
    return len(ranges)


def evict_cached(path: str) -> None:
    """Drop `path`'s pages from this process's mappings (`MADV_PAGEOUT`) and from the page
    cache (`POSIX_FADV_DONTNEED`): the next read goes to the disk. Cold-cache measurements
    without root (no `drop_caches`); a no-op where the kernel has neither call."""
    for start, end in _mappings(path):
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def lists_mapped(index: faiss.Index) -> bool:
    """Whether an IVF index's inverted lists are memory-mapped from its file (or stacked from such)."""
    il = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    return isinstance(il, faiss.OnDiskInvertedLists | faiss.HStackInvertedLists)


def group_index(indexes: list[faiss.Index], trained: faiss.Index | None = None) -> faiss.Index:
    """One IVF index whose inverted lists hold every given shard's entries (the shards'
    lists are moved into the first one's: memory stays one copy). Same trained quantizer
    and codes, so it answers exactly as the shards searched together — and costs what one
    index costs: each list's distance table is computed once per query, not once per shard.
    Memory-mapped shards cannot be merged into (their lists are read-only files): they are
    stacked under an empty copy of `trained`, which keeps them, and their mappings, alive."""
    assert indexes and all(is_ivf(i) for i in indexes)
    if len(indexes) > 1 and lists_mapped(indexes[0]):
        assert trained is not None and is_ivf(trained) and trained.ntotal == 0, "stacking mapped shards needs the trained index"
        group = faiss.clone_index(trained)
        ivf = faiss.extract_index_ivf(group)
        stack = faiss.InvertedListsPtrVector()
        for other in indexes:
            stack.push_back(faiss.extract_index_ivf(other).invlists)
        lists = faiss.HStackInvertedLists(stack.size(), stack.data())
        ivf.replace_invlists(lists, False)
        ivf.ntotal = group.ntotal = sum(i.ntotal for i in indexes)
        group.referenced_objects = [indexes, stack, lists]  # freed (and unmapped) with the group
    else:
        group = indexes[0]
        ivf = faiss.extract_index_ivf(group)
        for other in indexes[1:]:
            ivf.merge_from(faiss.extract_index_ivf(other), 0)
    pq = faiss.downcast_index(ivf)
    if isinstance(pq, faiss.IndexIVFPQ) and pq.by_residual and pq.metric_type == faiss.METRIC_L2:
        table = pq.nlist * pq.pq.M * pq.pq.ksub * 4
        pq.use_precomputed_table = 1 if table <= PRECOMPUTED_TABLE_MAX else -1  # a big table: RAM over ~10% speed
        if pq.use_precomputed_table == 1:
            pq.precompute_table()
    return group


def quantizer_of(index: faiss.Index) -> faiss.Index:
    return faiss.extract_index_ivf(index).quantizer


def assign(quantizer: faiss.Index, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(coarse distances, list numbers), each (n, nprobe): the lists every shard will scan."""
    return quantizer.search(queries, nprobe)


def _params(ivf: bool, nprobe: int | None, allowed: np.ndarray | None):
    params = faiss.SearchParametersIVF() if ivf else faiss.SearchParameters()
    if ivf:
        params.nprobe = int(nprobe or DEFAULT_NPROBE)
    selector = None
    if allowed is not None:
        # n is the bitmap's size in *bytes*: ids past its end are rejected, never read
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(allowed))
        params.sel = selector
    return params, selector


def search_assigned(index: faiss.Index, queries: np.ndarray, k: int, lists: np.ndarray, coarse: np.ndarray,
                    allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of an IVF index scanning only the given lists of each query."""
    assert queries.dtype == np.float32 and queries.ndim == 2 and queries.shape[1] == index.d, queries.shape
    assert lists.shape == coarse.shape == (len(queries), lists.shape[1]) and k > 0
    params, selector = _params(True, lists.shape[1], allowed)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    coarse = np.ascontiguousarray(coarse, dtype=np.float32)
    n = len(queries)
    distances, ids = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64)
    # the numpy wrapper of search_preassigned takes no SearchParameters (no selector): the C one does
    faiss.extract_index_ivf(index).search_preassigned_c(
        n, faiss.swig_ptr(queries), k, faiss.swig_ptr(lists), faiss.swig_ptr(coarse), faiss.swig_ptr(distances),
        faiss.swig_ptr(ids), False, params)
    del selector  # kept alive until here: FAISS holds a raw pointer during search
    return distances, ids


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None,
           allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one index; `allowed` is a packed little-endian bitmap over global ids."""
    assert queries.dtype == np.float32 and queries.ndim == 2 and queries.shape[1] == index.d, (
        queries.dtype, queries.shape, index.d)
    assert k > 0
    params, selector = _params(is_ivf(index), nprobe, allowed)
    distances, ids = index.search(queries, k, params=params)
    del selector
    return distances, ids


_FP16: dict[int, faiss.Index] = {}  # per dimension, a codec whose decode widens fp16 rows (SIMD, thread-safe)


def widen_fp16(keys: np.ndarray) -> np.ndarray:
    """fp16 rows (..., d) as float32, exactly: FAISS's fp16 scalar quantizer decodes them with
    SIMD conversions, ~6x faster than numpy's `astype` (a re-ranking's largest cost)."""
    assert keys.dtype == np.float16, keys.dtype
    d = keys.shape[-1]
    codec = _FP16.get(d)
    if codec is None:
        codec = _FP16.setdefault(d, faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16))
    flat = np.ascontiguousarray(keys).reshape(-1, d)
    if not len(flat):
        return np.zeros(keys.shape, np.float32)
    return codec.sa_decode(flat.view(np.uint8)).reshape(keys.shape)


def exact_distances(queries: np.ndarray, keys: np.ndarray, metric: str) -> np.ndarray:
    """Distances of queries (n, d) to their candidates' keys (n, c, d): squared L2 or inner
    product, in float32 (the fp16 keys are widened first)."""
    keys = widen_fp16(keys) if keys.dtype == np.float16 else keys.astype(np.float32, copy=False)
    dots = np.einsum("ncd,nd->nc", keys, queries, optimize=True)
    if metric == "ip":
        return dots
    return (np.einsum("ncd,ncd->nc", keys, keys, optimize=True) - 2 * dots
            + np.einsum("nd,nd->n", queries, queries)[:, None])


def bitmap(mask: np.ndarray) -> np.ndarray:
    """Boolean mask over ids -> the packed bitmap `IDSelectorBitmap` reads (bit i of byte i>>3)."""
    return np.packbits(mask.astype(bool), bitorder="little")
