"""FAISS index choice and use: Flat when small, IVF-PQ sized from a memory budget.

Rules (autofaiss-style, see REFERENCE.md): Flat while the raw vectors fit the budget and
n ≤ `FLAT_MAX`; otherwise IVF with nlist = 2^round(log2(4·√n)) (at most 262144; a
trillion-token store is sharded first) and PQ with the largest M (dividing d, sub-vectors of ≥ 2 dims)
whose M + 8 bytes per vector fit the budget. Trained on min(64·nlist, n) vectors.

Ids: Flat is wrapped in `IndexIDMap2` (it stores no ids); IVF stores a 64-bit id per
entry already, so `add_with_ids` goes to the IVF directly. Searches take an
`IDSelectorBitmap` of live, policy-allowed entries — cheap (~1.2× a clean search) — and
the caller post-filters too, because some index types ignore selectors.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

FLAT_MAX = 200_000
PQ_CHOICES = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)


def nlist_for(n: int) -> int:
    # 4·√n lists (as a power of two) at every size, at most 262144. autofaiss jumps to 16k–65k
    # lists at 1M entries: a k-means over millions of keys, fine on a GPU, hours on 2 CPU
    # cores. With 4·√n and 64 training keys per list, training costs O(n), like adding.
    return int(min(262144, max(1, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def choose_factory(n: int, dim: int, memory_budget: int | None = None, metric: str = "l2") -> str:
    """A FAISS factory string for `n` vectors of `dim` under `memory_budget` bytes."""
    assert n >= 0 and dim > 0, (n, dim)
    budget = memory_budget if memory_budget is not None else 4 << 30
    if n <= FLAT_MAX and n * (dim * 4 + 8) <= budget:
        return "Flat"
    nlist = min(nlist_for(n), max(1, n // 39))
    per_vector = budget / max(n, 1) - 8
    m = next((m for m in PQ_CHOICES if dim % m == 0 and m <= per_vector and m <= dim // 2), None)
    if m is None:
        m = next(m for m in reversed(PQ_CHOICES) if dim % m == 0)
    return f"IVF{nlist},PQ{m}"


def new_index(factory: str, dim: int, metric: str = "l2") -> faiss.Index:
    mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.index_factory(dim, factory, mt)
    if not is_ivf(index):  # flat-like indexes keep no ids of their own
        index = faiss.IndexIDMap2(index)
    elif hasattr(index, "do_polysemous_training"):
        # on by default for IVF-PQ, ~100x slower training, and only for Hamming filtering we never use
        index.do_polysemous_training = False
    return index


def is_ivf(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


def train_size(factory: str, n: int) -> int:
    ivf = factory.split(",")[0]
    if not ivf.startswith("IVF"):
        return 0
    nlist = int(ivf[3:].split("_")[0])
    return min(n, max(64 * nlist, 10_000))  # FAISS wants 39–256 points per centroid


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None,
           allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one index; `allowed` is a packed little-endian bitmap over global ids."""
    assert queries.dtype == np.float32 and queries.ndim == 2 and queries.shape[1] == index.d, (
        queries.dtype, queries.shape, index.d)
    assert k > 0
    params = faiss.SearchParametersIVF() if is_ivf(index) else faiss.SearchParameters()
    if nprobe is not None and is_ivf(index):
        params.nprobe = int(nprobe)
    selector = None
    if allowed is not None:
        selector = faiss.IDSelectorBitmap(len(allowed) * 8, faiss.swig_ptr(allowed))
        params.sel = selector
    if is_ivf(index):
        ivf = faiss.extract_index_ivf(index)
        if nprobe is None:
            params.nprobe = ivf.nprobe
    distances, ids = index.search(queries, k, params=params)
    del selector  # kept alive until here: FAISS holds a raw pointer during search
    return distances, ids


def bitmap(mask: np.ndarray) -> np.ndarray:
    """Boolean mask over ids -> the packed bitmap `IDSelectorBitmap` reads (bit i of byte i>>3)."""
    return np.packbits(mask.astype(bool), bitorder="little")
