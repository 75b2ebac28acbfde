"""Compaction: rewrite shards without opted-out entries; swap atomically; lose nothing.

Opt-out tombstones hide removed documents at once; compaction makes them physically gone.
Every shard holding a tombstoned document not yet removed from its files is rewritten
into a new folder beside the old one (`NNNNN-cG`, G the compaction's generation):

- the index without those vectors (`remove_ids` on an in-memory copy — never on a
  memory-mapped or in-place file);
- the entry columns with those rows set to the "no entry" sentinel, fp16 keys zeroed;
- the documents' text and sentence offsets dropped, and `removed` set in `docs.parquet`
  (the document keeps its id, source and license, so a status request can still answer);
- passage stores: BM25 re-indexed without the removed text in *every* shard, because
  BM25 statistics are store-wide (they leave the removed passages out, and the manifest
  records them: `build.bm25`); ∞-gram stores: the shard's suffix array rebuilt.

Then the manifest — the one file that says which folders are the store — is replaced
atomically (write, fsync, rename), and only after that are the old folders deleted. A
crash at any point leaves either the old store or the new one, both whole; folders no
manifest names are swept by the next compaction. Entry ids stay stable (removed ids
simply vanish), so the dense-id bitmaps keep working. One compaction at a time per store
(`StoreLock`); opt-outs keep landing meanwhile (the log is never rewritten).
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
import pyarrow as pa
import pyarrow.parquet as pq
from silo.datastore.infgram import SA_DIR, ShardTokens, write_suffix_array
from silo.datastore.lock import StoreLock
from silo.datastore.manifest import Manifest, ShardInfo, fsync_path
from silo.datastore.passages import bm25_statistics, passage_texts, write_bm25
from silo.datastore.store import Datastore, Shard
from silo.datastore.writer import fsync_tree, sentinel, sweep_orphans


def compact(path: str | os.PathLike, only_shards: set[int] | None = None, progress: bool = False) -> dict:
    """Rewrite the shards that still hold removed entries (only `only_shards`, when given:
    a shard server compacts its own); returns what was done. Takes the store's lock."""
    Manifest.load(path)  # not a store: say so before the lock creates a folder there
    with StoreLock(path, "compaction"):
        return _compact(Path(path), only_shards)


def _text_without(s: Shard, store: Datastore, dead_local: np.ndarray, out: Path) -> None:
    """The shard's text and sentence files with the dead documents' content dropped."""
    first = s.info.first_doc
    text_offsets, sent_offsets, sentences = [0], [0], []
    with open(out / "text.bin", "wb") as f:
        for local in range(s.info.documents):
            if not dead_local[local]:
                raw = store.doc_text(first + local).encode("utf-8")
                f.write(raw)
                sentences.extend(store.docs.sentence_starts(first + local).tolist())
            else:
                raw = b""
            text_offsets.append(text_offsets[-1] + len(raw))
            sent_offsets.append(len(sentences))
    np.save(out / "text_offsets.npy", np.asarray(text_offsets, dtype=np.int64))
    np.save(out / "sentences.npy", np.asarray(sentences, dtype=np.int32))
    np.save(out / "sentence_offsets.npy", np.asarray(sent_offsets, dtype=np.int64))


def _rewrite(store: Datastore, s: Shard, dead_local: np.ndarray, out: Path, bm25: tuple | None) -> ShardInfo:
    docs = store.docs
    lo, hi = s.info.first_doc, s.info.first_doc + s.info.documents
    dead_entries = np.repeat(dead_local, docs.n_entries[lo:hi])
    ntotal = -1
    if (s.path / "index.faiss").is_file():
        index = faiss.read_index(str(s.path / "index.faiss"))  # in memory, never memory-mapped
        index.remove_ids(faiss.IDSelectorBatch(s.info.first_entry + np.flatnonzero(dead_entries).astype(np.int64)))
        faiss.write_index(index, str(out / "index.faiss"))
        ntotal = int(index.ntotal)
    for name, col in s.columns.items():
        arr = np.array(col)
        arr[dead_entries] = sentinel(arr.dtype)
        np.save(out / f"{name}.npy", arr)
    if s.keys is not None:
        keys = np.array(s.keys)
        keys[dead_entries] = 0
        np.save(out / "keys.npy", keys)
    table = pq.read_table(s.path / "docs.parquet")
    removed = table.column("removed").to_numpy(zero_copy_only=False) | dead_local
    table = table.set_column(table.schema.get_field_index("removed"), "removed", pa.array(removed))
    pq.write_table(table, out / "docs.parquet")
    _text_without(s, store, dead_local, out)
    if bm25 is not None:
        write_bm25, texts, stats = bm25
        write_bm25(texts, stats, out / "bm25")
    if (s.path / SA_DIR).is_dir():  # ∞-gram: the suffix array again, removed documents emptied (indexes kept)
        old = ShardTokens(s.path / SA_DIR, store.manifest.build["token_dtype"])
        write_suffix_array(out / SA_DIR, [np.zeros(0, np.int64) if dead_local[i] else old.doc(i)
                                          for i in range(s.info.documents)], store.manifest.build["token_dtype"])
    info = replace(s.info, name=out.name, index_entries=ntotal)
    (out / "shard.json").write_text(json.dumps(asdict(info)))
    fsync_tree(out)
    return info


def _compact(path: Path, only_shards: set[int] | None) -> dict:
    t0 = time.perf_counter()
    sweep_orphans(path)
    store = Datastore.open(path, load_index=False)
    m = store.manifest
    gen = len(m.compactions) + 1
    docs = store.docs
    todo = store.dead_docs & ~docs.removed  # tombstoned, still in the files
    dead_by_shard = [todo[s.info.first_doc : s.info.first_doc + s.info.documents] for s in store.shards]
    rewrite = [bool(d.any()) and (only_shards is None or no in only_shards) for no, d in enumerate(dead_by_shard)]
    bm25 = None
    stale = bool((m.build.get("bm25") or {}).get("stale"))  # shards added by live ingest
    if (any(rewrite) or (stale and only_shards is None)) and "bm25" in m.retrievers:
        # BM25 scores carry store-wide statistics: every shard is re-indexed without the removed text
        rewrite = [True] * len(store.shards)
        texts = passage_texts(store, store.dead_docs | docs.removed)
        bm25 = (write_bm25, texts, bm25_statistics(texts))
        m.build["bm25"] = {**m.build.get("bm25", {}), "passages": bm25[2]["passages"], "avg_len": bm25[2]["avg_len"],
                           "stale": False}
    new_shards, rewritten, removed_entries = [], [], 0
    for no, s in enumerate(store.shards):
        if not rewrite[no]:
            new_shards.append(s.info)
            continue
        base = s.info.name.split("-c")[0]
        out = path / "shards" / f"{base}-c{gen}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        shard_bm25 = None if bm25 is None else (bm25[0], bm25[1][no], bm25[2])
        new_shards.append(_rewrite(store, s, dead_by_shard[no], out, shard_bm25))
        rewritten.append(out.name)
        lo = s.info.first_doc
        removed_entries += int(docs.n_entries[lo : lo + s.info.documents][dead_by_shard[no]].sum())
    if not rewritten:
        return {"rewritten_shards": 0, "removed_entries": 0, "seconds": time.perf_counter() - t0}
    fsync_path(path / "shards")
    old = [s.path for s, info in zip(store.shards, new_shards, strict=True) if s.info.name != info.name]
    m.shards = new_shards
    m.compactions.append({"generation": gen, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "removed_entries": removed_entries, "shards": rewritten,
                          "removed_documents": int(sum(int(d.sum()) for d, r in zip(dead_by_shard, rewrite,
                                                                                   strict=True) if r))})
    m.save(path)  # the atomic switch
    store.close()
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return {"rewritten_shards": len(rewritten), "removed_entries": removed_entries,
            "seconds": time.perf_counter() - t0}
