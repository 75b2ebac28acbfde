"""Re-index: the same store under another FAISS index, from its kept keys, without the LM.

A token store built with `keep_keys` holds every entry's fp16 key, so its index can be
rebuilt with another factory (fast-scan PQ, another nlist or code size) at the cost of
k-means and adding, not of running the LM over the text again. The result is a new store
folder: its entry columns, keys, text and documents are hard links to the source's (files
never written in place: compaction and ingest write new shard folders), its opt-out log a
copy (the new store starts with every tombstone the old one had, then lives its own life;
both read the same removal ledger), and its indexes new. The manifest is written last,
so an interrupted re-index leaves a folder that is not a store, never a wrong one. An
opt-out made through either store reaches both, through the ledger.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import faiss
import numpy as np
from silo.datastore import index as ix
from silo.datastore.lock import StoreLock
from silo.datastore.manifest import Manifest, StoreError
from silo.datastore.optout import LOG_NAME
from silo.datastore.store import TRAINED_NAME, Datastore
from silo.datastore.writer import fsync_tree

ADD_CHUNK = 1 << 18  # keys widened to float32 and added per call


def reindex(src: str | os.PathLike, out: str | os.PathLike, factory: str | None = None,
            memory_budget: int | None = None, seed: int = 0, progress: bool = False,
            lists: str | None = None) -> Manifest:
    """A copy of the token store `src` at `out` (which must not exist) indexed with `factory`
    (default: what a build would choose for it now, `index.choose_factory`), its lists
    served from `lists` ("ram" or "ssd"; default: as `src`'s)."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    store = Datastore.open(src, load_index=False)
    m = store.manifest
    lists = lists or m.lists
    if lists not in ix.LISTS:
        raise StoreError(f"lists must be one of {', '.join(ix.LISTS)}, got {lists!r}")
    factory = factory or ix.choose_factory(m.entries, m.dim, memory_budget, rerank=True, lists=lists)
    if lists == "ssd" and ix.is_fast_scan(factory):
        raise StoreError(f"{factory}: fast-scan lists cannot be memory-mapped from SSD; give 8-bit codes or "
                         "leave --factory out")
    if m.kind != "token" or not store.can_refine:
        raise StoreError(f"{src}: only token stores built with --keep-keys can be re-indexed (this one is a "
                         f"{m.kind} store{'' if store.can_refine else ' without kept keys'})")
    if out.exists():
        raise StoreError(f"{out} exists: re-index into a new folder")
    trained = ix.new_index(factory, m.dim, m.metric)
    with StoreLock(out, "re-index"):
        (out / "shards").mkdir(parents=True)
        live = [np.flatnonzero(store.entries(np.arange(s.info.first_entry, s.info.first_entry + s.info.entries),
                                             ("doc",))["doc"] >= 0) for s in store.shards]
        if ix.is_ivf(trained):
            rng = np.random.default_rng(seed)
            n_live = sum(len(x) for x in live)
            pick = np.sort(rng.choice(n_live, min(ix.train_size(factory, n_live), n_live), replace=False))
            flat = np.concatenate([s.info.first_entry + x for s, x in zip(store.shards, live, strict=True)])
            trained.train(ix.widen_fp16(store.keys_of(flat[pick][None])[0]))
        faiss.write_index(trained, str(out / TRAINED_NAME))
        shards = []
        for s, rows in zip(store.shards, live, strict=True):
            d = out / "shards" / s.info.name
            d.mkdir()
            for f in s.path.iterdir():
                if f.name not in ("index.faiss", "shard.json") and f.is_file():
                    os.link(f, d / f.name)
            index = faiss.clone_index(trained)
            for a in range(0, len(rows), ADD_CHUNK):
                part = rows[a : a + ADD_CHUNK]
                index.add_with_ids(ix.widen_fp16(np.asarray(s.keys[part])),
                                   (s.info.first_entry + part).astype(np.int64))
            faiss.write_index(index, str(d / "index.faiss"))
            shards.append(replace(s.info, index_entries=int(index.ntotal)))
            (d / "shard.json").write_text(json.dumps(asdict(shards[-1])))
            if progress:
                print(f"re-index: shard {s.info.name}: {index.ntotal:,} entries", flush=True)
        if (src / LOG_NAME).is_file():
            shutil.copyfile(src / LOG_NAME, out / LOG_NAME)
        store.close()
        # k, λ and T were tuned for the store's entries and still hold; nprobe and refine for the old index
        defaults = {k: v for k, v in m.defaults.items() if k not in ("nprobe", "refine")}
        m = replace(m, shards=shards, index=factory, defaults=defaults, lists=lists,
                    build={**m.build, "factory": factory, "reindexed_from": str(src.resolve()),
                           "reindex_seconds": round(time.perf_counter() - t0, 1)})
        fsync_tree(out)
        m.save(out)
    return m
