"""`Datastore`: a store folder opened for search, with attribution of every entry.

    store = Datastore.open("STORE")
    distances, ids = store.search(queries, k=8, policy=RetrievalPolicy(tiers=("restricted",)))
    store.values(ids); store.attribute(ids[0])

Search fans out to every shard in parallel (FAISS releases the GIL) and merges the
per-shard top-k by distance — for exact indexes, the same answer one big index gives.
Each shard search carries a bitmap of the entries this call may see (policy ∧ not opted
out) as an `IDSelectorBitmap`; results are post-filtered against the same bitmap because
some FAISS paths ignore selectors (REFERENCE.md), so nothing disallowed ever leaves here.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from datastore.index import bitmap, search
from datastore.manifest import (
    FingerprintMismatch,
    Manifest,
    ShardInfo,
    StoreError,
    model_fingerprint,
)
from datastore.optout import LOG_NAME, OptOutLog
from datastore.policy import RetrievalPolicy

ENTRY_COLUMNS = ("doc", "position", "value", "sentence")


class ShardUnavailable(StoreError):
    """A shard (remote) did not answer in time; `shards` names it."""

    def __init__(self, message: str, shards: list[str]):
        super().__init__(message)
        self.shards = shards


class UnknownDocuments(StoreError):
    """An opt-out named doc ids this store does not hold."""


class MaskCache:
    """A small LRU of packed policy bitmaps, capped in bytes: every distinct policy a client
    sends costs n_entries/8 bytes, so an unbounded cache is a memory leak anyone can drive."""

    MISSING = object()

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._items:
                return self.MISSING
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value: np.ndarray | None) -> None:
        size = 0 if value is None else value.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= 0 if old is None else old.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class SearchResult:
    distances: np.ndarray  # (n, k) float32; inf (l2) / -inf (ip) where no hit
    ids: np.ndarray  # (n, k) int64 global entry ids; -1 where no hit
    missing: list[str]  # shards that did not answer (only with allow_partial)

    @property
    def partial(self) -> bool:
        return bool(self.missing)


@dataclass
class Shard:
    info: ShardInfo
    path: Path
    index: faiss.Index | None
    entries: dict[str, np.ndarray]  # ENTRY_COLUMNS, row i = entry info.first_entry + i


class Datastore:
    """A token or passage store opened read-only for search and attribution."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest, shards: list[Shard], docs,
                 mask_cache_bytes: int = 64 << 20):
        self.path = Path(path)
        self.manifest = manifest
        self.shards = shards
        self.docs = docs  # pyarrow Table, row i = document index i
        self.entry_doc = np.concatenate([s.entries["doc"] for s in shards]) if shards else np.zeros(0, np.int32)
        # derived once at load: every lookup and stats call uses them
        self.entries_per_doc = np.bincount(self.entry_doc, minlength=len(docs))
        self._shard_starts = np.array([s.info.first_entry for s in shards], dtype=np.int64)
        self._doc_cols = {c: np.asarray(docs.column(c).to_pylist(), dtype=object)
                          for c in ("doc_id", "source", "license", "tier", "owner")}
        self._doc_index = {d: i for i, d in enumerate(self._doc_cols["doc_id"])}
        self._masks = MaskCache(mask_cache_bytes)
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(len(shards), os.cpu_count() or 1)))
        # Tombstones only ever grow while a process runs. `_optout_lock` orders every change
        # (log reads and opt-outs); `tombstone_version` counts them, so a mask computed from an
        # older tombstone set can never be served from the cache after a newer one exists.
        self.dead_docs = np.zeros(len(docs), dtype=bool)
        self.tombstone_version = 0
        self.removal_records: list[dict] = []  # every log record applied, in log order
        self._optout_lock = threading.Lock()
        self._log = OptOutLog(self.path)
        self.open_options: dict = {}  # how this store was opened (`reopen` repeats it)
        self.remotes: list = []  # remote shard groups (server.remote), searched beside local shards
        self.reload_optouts()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike, load_index: bool = True, only_shards: set[int] | None = None) -> Datastore:
        """Open a store; `only_shards` loads just those shards' indexes (a shard server)."""
        path = Path(path)
        manifest = Manifest.load(path)
        shards = []
        for no, info in enumerate(manifest.shards):
            d = path / "shards" / info.name
            index = None
            if load_index and info.index != "bm25" and (only_shards is None or no in only_shards):
                try:
                    index = faiss.read_index(str(d / "index.faiss"))
                except RuntimeError as e:
                    raise StoreError(f"{d / 'index.faiss'}: unreadable FAISS index ({str(e).splitlines()[0]})") from e
                expected = info.entries if info.index_entries < 0 else info.index_entries
                if index.ntotal != expected:
                    raise StoreError(f"{d}: index has {index.ntotal} entries, manifest says {expected}")
            try:
                table = pq.read_table(d / "entries.parquet")
            except (OSError, Exception) as e:
                raise StoreError(f"{d / 'entries.parquet'}: unreadable ({e})") from e
            entries = {c: table.column(c).to_numpy() for c in table.column_names}
            if len(entries["doc"]) != info.entries:
                raise StoreError(f"{d}: entries.parquet has {len(entries['doc'])} rows, manifest says {info.entries}")
            shards.append(Shard(info, d, index, entries))
        try:
            docs = pq.read_table(path / manifest.docs_file)
        except Exception as e:
            raise StoreError(f"{path / manifest.docs_file}: unreadable ({e})") from e
        store = cls(path, manifest, shards, docs)
        store.open_options = {"load_index": load_index, "only_shards": only_shards}
        return store

    def reopen(self) -> Datastore:
        """The store as its manifest now says (after a compaction or an ingest), opened the
        way this one was (a main server with remote shards loads no index), with the same
        remote shard groups and at least this one's tombstones."""
        fresh = type(self).open(self.path, **self.open_options)
        fresh.remotes = self.remotes
        return fresh

    def check_model(self, model_dir: str | os.PathLike) -> None:
        """Refuse a model other than the one this store was built with."""
        fp = model_fingerprint(model_dir)
        if fp != self.manifest.model_fingerprint:
            raise FingerprintMismatch(
                f"store {self.path} was built with model {self.manifest.model} "
                f"(fingerprint {self.manifest.model_fingerprint}); {model_dir} has fingerprint {fp}. "
                "Keys from another model are meaningless: use the store's model or rebuild the store.")

    # ------------------------------------------------------------------ masks

    @property
    def n_entries(self) -> int:
        return int(self.manifest.entries)

    def doc_mask(self, policy: RetrievalPolicy | None) -> np.ndarray:
        c = self._doc_cols
        base = ~self.dead_docs
        if policy is None or policy.is_open:
            return base
        return base & policy.doc_mask(c["tier"], c["license"], c["source"], c["owner"], c["doc_id"])

    def allowed_bitmap(self, policy: RetrievalPolicy | None) -> np.ndarray | None:
        """Packed bitmap over global entry ids of what `policy` (and opt-out) lets through;
        None when everything is allowed (a clean search is a little faster)."""
        key = (policy or RetrievalPolicy(), self.tombstone_version)
        hit = self._masks.get(key)
        if hit is not MaskCache.MISSING:
            return hit
        docs = self.doc_mask(policy)
        mask = None if docs.all() else bitmap(docs[self.entry_doc])
        self._masks.put(key, mask)
        return mask

    def maybe_reload_optouts(self) -> None:
        """Apply what other processes appended to the log (a stat, and a read of the new
        bytes only, per search)."""
        if self._log_size() != self._log.offset:
            with self._optout_lock:
                self._apply(self._log.read_new())

    def _log_size(self) -> int:
        try:
            return (self.path / LOG_NAME).stat().st_size
        except FileNotFoundError:
            return 0

    def _apply(self, records: list[dict]) -> None:
        """Tombstone what `records` remove (caller holds `_optout_lock`). Merges, never replaces."""
        if not records:
            return
        c = self._doc_cols
        dead = self.dead_docs.copy()
        for rec in records:
            dead |= self.match_docs(rec["by"], rec["values"], rec.get("scope_owner"))
            dead |= np.isin(c["doc_id"], rec["doc_ids"])
        self.removal_records.extend(records)
        if (dead != self.dead_docs).any():
            self.dead_docs = dead
            self.tombstone_version += 1

    def match_docs(self, by: str, values: list[str], scope_owner: str | None = None) -> np.ndarray:
        """Boolean mask over documents that a removal (kind `by`, `values`) names; a scoped
        removal (made with an owner's credential) only ever reaches that owner's documents."""
        c = self._doc_cols
        if by == "doc_ids":
            hit = np.isin(c["doc_id"], values)
        elif by == "owner":
            hit = np.isin(c["owner"], values)
        elif by == "source":
            hit = np.isin(c["source"], values)
        elif by == "span":
            texts = self.docs.column("text").to_pylist()
            hit = np.array([any(v in t for v in values) for t in texts], dtype=bool)
        else:
            raise ValueError(f"unknown opt-out kind {by!r}")
        if scope_owner is not None:
            hit &= c["owner"] == scope_owner
        return hit

    def opt_out(self, by: str, values: list[str], scope_owner: str | None = None, made_by: str = "admin",
                reason: str = "", require_known: bool = True) -> tuple[dict, list[str], int]:
        """Remove documents durably: resolve, append to the log (fsync'd), tombstone.

        Returns (log record, newly removed doc ids, their entries). Unknown doc ids raise
        `UnknownDocuments` and nothing is logged (unless `require_known` is False: a server
        logs a removal in every store, so no rebuild of any of them ingests the text); an
        owner, source or span that matches nothing here is still logged, for the same reason."""
        values = [v for v in values if v]
        if not values:
            raise ValueError("an opt-out needs at least one non-empty value")
        with self._optout_lock:
            self._apply(self._log.read_new())
            if by == "doc_ids" and require_known:
                unknown = [v for v in values if v not in self._doc_index]
                if unknown:
                    raise UnknownDocuments(f"unknown doc id(s) in {self.path.name}: {', '.join(unknown[:20])}")
            hit = self.match_docs(by, values, scope_owner)
            removed = self.doc_ids_of(hit & ~self.dead_docs)
            record = self._log.append(by, values, self.doc_ids_of(hit), scope_owner=scope_owner,
                                      made_by=made_by, reason=reason)
            self._apply(self._log.read_new())  # our own record (and any that raced in), in log order
        return record, removed, self.entries_of(removed)

    # ------------------------------------------------------------------ documents

    @property
    def n_documents(self) -> int:
        return len(self.docs)

    def doc_ids_of(self, mask: np.ndarray) -> list[str]:
        return self._doc_cols["doc_id"][mask].tolist()

    def doc_id(self, doc: int) -> str:
        return self._doc_cols["doc_id"][doc]

    def doc_owner(self, doc: int) -> str | None:
        return self._doc_cols["owner"][doc]

    def doc_source(self, doc: int) -> str | None:
        return self._doc_cols["source"][doc]

    def doc_text(self, doc: int) -> str:
        return self.docs.column("text")[int(doc)].as_py()

    def is_compacted(self, doc: int) -> bool:
        """Physically gone: compaction blanked the document's text and entries."""
        return self.dead_docs[doc] and self.doc_text(doc) == "" and bool(self.manifest.compactions)

    def entries_of(self, doc_ids: list[str]) -> int:
        return int(self.entries_per_doc[np.isin(self._doc_cols["doc_id"], doc_ids)].sum())

    def reload_optouts(self) -> None:
        """Tombstone every document the opt-out log removes (doc id, owner, source, span)."""
        with self._optout_lock:
            self._apply(self._log.read_new())

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               policy: RetrievalPolicy | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (distances, global entry ids) per query; id -1 where fewer than k exist.
        Raises `ShardUnavailable` if a remote shard is down or late."""
        res = self.search_ex(queries, k, nprobe, policy, allow_partial=False)
        return res.distances, res.ids

    def search_ex(self, queries: np.ndarray, k: int, nprobe: int | None = None,
                  policy: RetrievalPolicy | None = None, allow_partial: bool = False) -> SearchResult:
        """`search`, with partial answers on request: a shard that is down or late is then
        listed in `missing` instead of failing the call — never silently."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise ValueError(f"queries must be (n, {self.manifest.dim}), got {queries.shape}")
        self.maybe_reload_optouts()
        version = self.tombstone_version
        allowed = self.allowed_bitmap(policy)
        local = [s for s in self.shards if s.index is not None]
        jobs = [self._pool.submit(search, s.index, queries, k, nprobe, allowed) for s in local]
        jobs += [self._pool.submit(r.search, queries, k, nprobe, policy) for r in self.remotes]
        results, missing = [], []
        for job in jobs:
            try:
                results.append(job.result())
            except ShardUnavailable as e:
                if not allow_partial:
                    raise
                missing.extend(e.shards)
        if not results:
            nq = len(queries)
            return SearchResult(np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64), missing)
        dist = np.concatenate([r[0] for r in results], axis=1)
        ids = np.concatenate([r[1] for r in results], axis=1)
        bad = ids < 0
        safe = np.where(bad, 0, ids)
        if allowed is not None:  # post-filter: never trust a selector alone
            bad |= ((allowed[safe >> 3] >> (safe & 7)) & 1) == 0
        if self.tombstone_version != version:  # an opt-out was acknowledged while we searched
            bad |= self.dead_docs[self.entry_doc[safe]]
        worst = np.inf if self.manifest.metric == "l2" else -np.inf
        dist = np.where(bad, worst, dist)
        ids = np.where(bad, -1, ids)
        order = np.argsort(dist if self.manifest.metric == "l2" else -dist, axis=1, kind="stable")[:, :k]
        return SearchResult(np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1), missing)

    # ------------------------------------------------------------------ metadata

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self._shard_starts, ids, side="right") - 1
        return shard, ids - self._shard_starts[np.clip(shard, 0, None)]

    def entries(self, ids: np.ndarray, columns: tuple[str, ...] = ENTRY_COLUMNS) -> dict[str, np.ndarray]:
        """Entry columns for global ids (any shape); -1 ids give -1 everywhere."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        valid = (flat >= 0) & (flat < self.n_entries)
        out = {c: np.full(flat.shape, -1, dtype=np.int64) for c in columns}
        shard, local = self._locate(np.where(valid, flat, 0))
        for si, s in enumerate(self.shards):
            sel = valid & (shard == si)
            if sel.any():
                for c in columns:
                    if c in s.entries:
                        out[c][sel] = s.entries[c][local[sel]]
        return {c: v.reshape(ids.shape) for c, v in out.items()}

    def values(self, ids: np.ndarray) -> np.ndarray:
        return self.entries(ids)["value"]

    def doc_row(self, doc: int) -> dict:
        return self.docs.slice(int(doc), 1).to_pylist()[0]

    def doc_index(self, doc_id: str) -> int | None:
        return self._doc_index.get(doc_id)

    def attribute(self, ids: np.ndarray, scores: np.ndarray | None = None) -> list[dict]:
        """Who and what each entry is: doc_id, source, license, tier, owner, sentence text."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ent = self.entries(ids)
        out = []
        for j, eid in enumerate(ids):
            if eid < 0:
                continue
            doc = self.doc_row(ent["doc"][j])
            starts = doc["sentence_starts"]
            s = int(ent["sentence"][j])
            end = starts[s + 1] if s + 1 < len(starts) else len(doc["text"])
            hit = {
                "entry_id": int(eid), "doc_id": doc["doc_id"], "source": doc["source"],
                "license": doc["license"], "tier": doc["tier"], "owner": doc["owner"],
                "sentence_index": s, "sentence": doc["text"][starts[s]:end].strip() if starts else "",
                "position": int(ent["position"][j]),
            }
            if scores is not None:
                hit["score"] = float(np.asarray(scores).ravel()[j])
            out.append(hit)
        return out

    def stats(self) -> dict:
        """Entries and documents (all and live), shards, per tier and per source, bytes on disk."""
        live_docs = ~self.dead_docs
        per_doc = self.entries_per_doc
        groups: dict[str, dict] = {"tiers": {}, "sources": {}}
        for group, col in (("tiers", "tier"), ("sources", "source")):
            values = self._doc_cols[col]
            for v in sorted(set(values.tolist())):
                sel = (values == v) & live_docs
                groups[group][v] = {"documents": int(sel.sum()), "entries": int(per_doc[sel].sum())}
        return {
            "kind": self.manifest.kind, "documents": len(self.docs), "live_documents": int(live_docs.sum()),
            "entries": self.n_entries, "live_entries": int(per_doc[live_docs].sum()),
            "shards": len(self.shards), "index": self.manifest.shards[0].index if self.shards else None,
            "bytes": sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()), **groups,
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False)


