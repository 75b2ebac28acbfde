"""Writing a store: one `StoreWriter` per new shard — `add(keys, entries, docs)`, `publish()`.

The engine knows no LM: whoever embeds text (the build, a Ray worker, live ingest — all on
the `silo/` side) hands it arrays. A shard is written into a fresh temporary folder (one
per attempt: a retried job never shares files with an attempt still running), every file
is fsync'd, and the folder is renamed into `shards/NAME`. A shard folder counts only once
the manifest names it: a build writes the manifest last (`Manifest.save`), and live ingest
adds shards to an existing store by one atomic manifest switch (`commit_shards`), so a
crash at any point leaves the store as it was before, or as after.

Files of a shard (entry columns are fixed-width arrays of the narrowest type that fits,
memory-mapped when served; sentinel = "no entry": -1, or the dtype's maximum for values):

    index.faiss                 the store's trained index with this shard's entries (vector stores)
    keys.npy                    float16 (entries, dim), with --keep-keys: exact re-ranking
    value.npy                   uint16|uint32  next token (token stores)
    doc.npy, position.npy,      int32  global document, token position, sentence of the entry
    sentence.npy                       (passages also end, char_start, char_end)
    docs.parquet                doc_id, source, license, tier, owner, first_entry, n_entries, n_tokens, removed
    text.bin, text_offsets.npy  UTF-8 text of each document, int64 byte offsets (documents + 1)
    sentences.npy, sentence_offsets.npy   int32 sentence-start characters, int64 offsets (documents + 1)
    shard.json                  its `ShardInfo` (written last)
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from silo.datastore.errors import StoreError
from silo.datastore.lock import StoreLock
from silo.datastore.manifest import Manifest, ShardInfo, fsync_path

ENTRY_COLUMNS: dict[str, dict[str, str]] = {
    "token": {"value": "value", "doc": "int32", "position": "int32", "sentence": "int32"},
    "passage": {"doc": "int32", "position": "int32", "end": "int32", "sentence": "int32", "char_start": "int32",
                "char_end": "int32"},
    "infgram": {},
}
DOC_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("license", pa.string()), ("tier", pa.string()),
    ("owner", pa.string()), ("first_entry", pa.int64()), ("n_entries", pa.int64()), ("n_tokens", pa.int64()),
    ("removed", pa.bool_()),
])


def value_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type holding every token id, with its maximum left as the sentinel."""
    return "uint16" if vocab_size < np.iinfo(np.uint16).max else "uint32"


def sentinel(dtype: str | np.dtype) -> int:
    dt = np.dtype(dtype)
    return int(np.iinfo(dt).max) if dt.kind == "u" else -1


def column_dtypes(kind: str, value: str | None) -> dict[str, str]:
    return {c: (value or "uint32") if t == "value" else t for c, t in ENTRY_COLUMNS[kind].items()}


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path` (and `path` itself)."""
    for f in [*path.rglob("*"), path]:
        fsync_path(f)


def shard_name(no: int) -> str:
    return f"{no:05d}"


class StoreWriter:
    """One new shard of a store. Give it the global range it covers (entries and documents,
    known from the caller's plan), then `add` batches in any order and `publish`.

    `index` is a copy of the store's trained index (None for stores without vectors);
    `keep_keys` keeps fp16 keys for exact re-ranking."""

    def __init__(self, store: str | os.PathLike, name: str, kind: str, first_entry: int, entries: int,
                 first_doc: int, index: faiss.Index | None = None, keep_keys: bool = False,
                 value_type: str | None = None):
        assert kind in ENTRY_COLUMNS, kind
        assert entries >= 0 and first_entry >= 0 and first_doc >= 0, (entries, first_entry, first_doc)
        self.store, self.name, self.kind = Path(store), name, kind
        self.first_entry, self.n, self.first_doc = first_entry, entries, first_doc
        self.index = index
        self.tmp = self.store / "shards" / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir(parents=True)
        self.dtypes = column_dtypes(kind, value_type)
        self.cols = {c: self._array(c, (entries,), dt, sentinel(dt)) for c, dt in self.dtypes.items()}
        self.keys = None
        if keep_keys:
            assert index is not None, "keys are kept for a vector index"
            self.keys = self._array("keys", (entries, index.d), "float16", 0)
        self.written = 0
        self._docs: list[dict] = []
        self._text = open(self.tmp / "text.bin", "wb")  # noqa: SIM115 - closed in publish
        self._text_offsets, self._sentences, self._sentence_offsets = [0], [], [0]

    def _array(self, name: str, shape: tuple, dtype: str, fill: int) -> np.ndarray:
        arr = np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        if arr.size:
            arr[...] = fill
        return arr

    def add(self, keys: np.ndarray | None, entries: dict[str, np.ndarray], docs: Iterable[dict] = ()) -> None:
        """Entries with their global ids (`entries["id"]`, within this shard's range), their
        column values and, for vector stores, their keys (n, dim) float32; and the next
        documents of the shard, in order (doc_id, source, license, tier, owner, first_entry,
        n_entries, n_tokens, sentence_starts, text)."""
        for doc in docs:
            self._add_doc(doc)
        ids = np.asarray(entries.get("id", np.zeros(0, np.int64)), dtype=np.int64)
        if len(ids) == 0:
            return
        local = ids - self.first_entry
        assert local.min() >= 0 and local.max() < self.n, (self.name, int(ids.min()), int(ids.max()))
        for c, arr in self.cols.items():
            arr[local] = np.asarray(entries[c])
        if self.index is not None:
            assert keys is not None and keys.shape == (len(ids), self.index.d), (None if keys is None else keys.shape)
            keys = np.ascontiguousarray(keys, dtype=np.float32)
            self.index.add_with_ids(keys, ids)
            if self.keys is not None:
                self.keys[local] = keys.astype(np.float16)
        self.written += len(ids)

    def _add_doc(self, doc: dict) -> None:
        raw = doc["text"].encode("utf-8")
        self._text.write(raw)
        self._text_offsets.append(self._text_offsets[-1] + len(raw))
        starts = list(doc.get("sentence_starts") or [])
        self._sentences.extend(starts)
        self._sentence_offsets.append(self._sentence_offsets[-1] + len(starts))
        self._docs.append({k: doc.get(k) for k in DOC_SCHEMA.names if k != "removed"} | {"removed": False})

    def publish(self, extra: Callable[[Path], None] | None = None) -> ShardInfo:
        """Write what is left, make every file durable, move the folder into `shards/NAME`;
        `extra(folder)` may add files first (a BM25 index). Returns the shard's `ShardInfo`
        — in no manifest yet. If another attempt already published this shard (same
        inputs, same bytes), ours is discarded."""
        if self.cols and self.written != self.n:  # (∞-gram shards have no entry rows: their index is `extra`)
            raise StoreError(f"shard {self.name}: {self.written} of {self.n} entries were added")
        self._text.close()
        np.save(self.tmp / "text_offsets.npy", np.asarray(self._text_offsets, dtype=np.int64))
        np.save(self.tmp / "sentences.npy", np.asarray(self._sentences, dtype=np.int32))
        np.save(self.tmp / "sentence_offsets.npy", np.asarray(self._sentence_offsets, dtype=np.int64))
        pq.write_table(pa.Table.from_pylist(self._docs, schema=DOC_SCHEMA), self.tmp / "docs.parquet")
        for arr in [*self.cols.values(), *([self.keys] if self.keys is not None else [])]:
            arr.flush()
        self.cols.clear()
        self.keys = None
        if self.index is not None:
            assert self.index.ntotal == self.n, (self.index.ntotal, self.n)
            faiss.write_index(self.index, str(self.tmp / "index.faiss"))
        if extra is not None:
            extra(self.tmp)
        info = ShardInfo(name=self.name, first_entry=self.first_entry, entries=self.n, first_doc=self.first_doc,
                         documents=len(self._docs))
        (self.tmp / "shard.json").write_text(json.dumps(asdict(info)))
        fsync_tree(self.tmp)
        final = self.store / "shards" / self.name
        if (final / "shard.json").is_file():
            shutil.rmtree(self.tmp, ignore_errors=True)
            return ShardInfo(**json.loads((final / "shard.json").read_text()))
        shutil.rmtree(final, ignore_errors=True)  # an unfinished folder of an older layout
        os.replace(self.tmp, final)
        fsync_path(final.parent)
        return info

    def abort(self) -> None:
        self._text.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def sweep_attempts(store: str | os.PathLike) -> list[str]:
    """Delete temporary shard folders of attempts that never published (call under the lock)."""
    shards = Path(store) / "shards"
    gone = [d.name for d in shards.glob(".*.tmp-*") if d.is_dir()] if shards.is_dir() else []
    for name in gone:
        shutil.rmtree(shards / name, ignore_errors=True)
    return gone


def sweep_orphans(store: str | os.PathLike) -> list[str]:
    """Delete shard folders no manifest names — unfinished attempts, shards of a killed ingest
    or compaction, folders a compaction replaced (call under the store's lock)."""
    store = Path(store)
    keep = {s.name for s in Manifest.load(store).shards}
    removed = sweep_attempts(store)
    shards = store / "shards"
    for d in shards.iterdir() if shards.is_dir() else ():
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d)
            removed.append(d.name)
    return removed


def commit_shards(store: str | os.PathLike, infos: list[ShardInfo], record: dict,
                  check: Callable[[Manifest], None] | None = None, lock: bool = True) -> Manifest:
    """Add published shards to a store by one atomic manifest switch (live ingest): the
    shards must continue the store's entry and document ranges. `check(manifest)` may
    refuse (raise) under the lock; `record` is kept in `manifest.ingests`."""
    def switch() -> Manifest:
        m = Manifest.load(store)
        if check is not None:
            check(m)
        for info in infos:
            if info.first_entry != m.entries or info.first_doc != m.documents:
                raise StoreError(f"shard {info.name} starts at entry {info.first_entry} / document {info.first_doc}, "
                                 f"but the store ends at {m.entries} / {m.documents}: it changed meanwhile")
            m.shards.append(info)
            m.entries += info.entries
            m.documents += info.documents
        m.ingests.append({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "shards": [i.name for i in infos]})
        m.save(store)  # the atomic switch: before it the store is as it was, after it as it is now
        return m

    if not lock:
        return switch()
    with StoreLock(store, "ingest"):
        return switch()
