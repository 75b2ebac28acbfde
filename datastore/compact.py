"""Compaction: rewrite shards without opted-out entries; swap atomically; lose nothing.

Opt-out tombstones hide removed entries at once; compaction makes them physically gone.
For every shard holding removed entries still present in its files, a new shard folder is
written beside the old one: the index without those vectors (`remove_ids` on an in-memory
copy — never on a memory-mapped or in-place file) and `entries.parquet` with their
values blanked. The documents file is rewritten with the removed documents' text and
sentences blanked. Then the manifest — the one file that says which folders are the
store — is replaced atomically (write, fsync, rename). Only after that are the old files
deleted. A crash at any point leaves either the old store or the new one, both whole;
folders no manifest names are swept by the next compaction (`sweep_orphans`).

Entry ids stay stable (removed ids simply vanish), so the dense-id bitmaps keep working.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datastore.lock import StoreLock
from datastore.manifest import Manifest
from datastore.store import Datastore


def _fsync_tree(path: Path) -> None:
    for f in [path, *path.rglob("*")]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sweep_orphans(path: str | os.PathLike) -> list[str]:
    """Delete shard folders and documents files that the manifest does not name."""
    path = Path(path)
    m = Manifest.load(path)
    keep = {s.name for s in m.shards}
    removed = []
    for d in (path / "shards").iterdir():
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d)
            removed.append(d.name)
    for f in path.glob("docs*.parquet*"):
        if f.name != m.docs_file:
            f.unlink()
            removed.append(f.name)
    return removed


def _passage_texts(store: Datastore, dead_by_shard: list[np.ndarray]) -> tuple[dict, list[list[str]]]:
    """Every shard's passage texts with removed ones as '', and the store-wide BM25 stats."""
    from datastore.passages import bm25_statistics

    texts = store.docs.column("text")
    out = []
    for s, dead in zip(store.shards, dead_by_shard, strict=True):
        e = s.entries
        live = (e["position"] >= 0) & ~dead
        out.append([texts[int(d)].as_py()[a:b] if ok else "" for d, a, b, ok in
                    zip(e["doc"], e["char_start"], e["char_end"], live, strict=True)])
    return bm25_statistics(out), out


def compact(path: str | os.PathLike, only_shards: set[int] | None = None, progress: bool = False) -> dict:
    """Rewrite the shards that still hold removed entries (only `only_shards`, when given:
    a shard server compacts its own); returns what was done. Takes the store's lock."""
    with StoreLock(path, "compaction"):
        return _compact(Path(path), only_shards)


def _compact(path: Path, only_shards: set[int] | None) -> dict:
    t0 = time.perf_counter()
    sweep_orphans(path)
    store = Datastore.open(path, load_index=False)
    m = store.manifest
    gen = len(m.compactions) + 1
    dead_docs = store.dead_docs
    # an entry still present in the files has its position; compaction blanks it to -1
    dead_by_shard = [dead_docs[s.entries["doc"]] & (s.entries["position"] >= 0) for s in store.shards]
    bm25 = [(s.path / "bm25").is_dir() for s in store.shards]
    rewrite = [bool(d.any()) and (only_shards is None or no in only_shards) for no, d in enumerate(dead_by_shard)]
    bm25_stats = None
    if any(rewrite) and any(bm25):
        # BM25 scores carry store-wide statistics: every shard is re-indexed without the removed text
        rewrite = [r or b for r, b in zip(rewrite, bm25, strict=True)]
        bm25_stats, passage_texts = _passage_texts(store, dead_by_shard)
    new_shards, rewritten, removed_entries = [], [], 0
    for no, s in enumerate(store.shards):
        dead = dead_by_shard[no]
        if not rewrite[no]:
            new_shards.append(s.info)
            continue
        dead_ids = s.info.first_entry + np.flatnonzero(dead).astype(np.int64)
        name = f"{no:05d}-c{gen}"
        tmp = path / "shards" / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ntotal = -1
        if (s.path / "index.faiss").is_file():
            index = faiss.read_index(str(s.path / "index.faiss"))  # in memory, never mmapped
            index.remove_ids(faiss.IDSelectorBatch(dead_ids))
            faiss.write_index(index, str(tmp / "index.faiss"))
            ntotal = int(index.ntotal)
        if bm25[no]:
            from datastore.passages import write_bm25

            write_bm25(passage_texts[no], bm25_stats, tmp / "bm25")
        table = pq.read_table(s.path / "entries.parquet")
        cols = {c: table.column(c).to_numpy().copy() for c in table.column_names}
        for c in cols:
            if c != "doc":
                cols[c][dead] = -1
        pq.write_table(pa.table(cols), tmp / "entries.parquet", compression="zstd")
        _fsync_tree(tmp)
        new_shards.append(replace(s.info, name=name, index_entries=ntotal))
        rewritten.append(name)
        removed_entries += int(dead.sum())
    if not rewritten:
        return {"rewritten_shards": 0, "removed_entries": 0, "seconds": time.perf_counter() - t0}

    docs = store.docs.to_pylist()
    for i in np.flatnonzero(dead_docs):
        docs[i]["text"], docs[i]["sentence_starts"] = "", []
    docs_file = f"docs-c{gen}.parquet"
    pq.write_table(pa.Table.from_pylist(docs, schema=store.docs.schema), path / docs_file, compression="zstd")
    _fsync_tree(path / docs_file)
    old = [s.path for s, info in zip(store.shards, new_shards, strict=True) if s.info.name != info.name]
    old_docs = path / m.docs_file
    m.shards, m.docs_file = new_shards, docs_file
    m.compactions.append({"generation": gen, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "removed_entries": removed_entries, "shards": rewritten,
                          "removed_documents": int(dead_docs.sum())})
    m.save(path)  # the atomic switch
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    old_docs.unlink(missing_ok=True)
    return {"rewritten_shards": len(rewritten), "removed_entries": removed_entries,
            "seconds": time.perf_counter() - t0}
