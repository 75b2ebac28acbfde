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
from datastore.optout import LOG_NAME, append_removal, read_log
from datastore.policy import RetrievalPolicy

ENTRY_COLUMNS = ("doc", "position", "value", "sentence")


class ShardUnavailable(StoreError):
    """A shard (remote) did not answer in time; `shards` names it."""

    def __init__(self, message: str, shards: list[str]):
        super().__init__(message)
        self.shards = shards


class UnknownDocuments(StoreError):
    """An opt-out named doc ids this store does not hold."""


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

    def __init__(self, path: str | os.PathLike, manifest: Manifest, shards: list[Shard], docs):
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
        self._masks: dict[RetrievalPolicy, np.ndarray] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(len(shards), os.cpu_count() or 1)))
        self.dead_docs = np.zeros(len(docs), dtype=bool)  # opted-out documents (tombstones)
        self._optout_lock = threading.Lock()
        self._seen_log: tuple[int, int] | None = None
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
        return cls(path, manifest, shards, docs)

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
        key = policy or RetrievalPolicy()
        with self._lock:
            if key not in self._masks:
                docs = self.doc_mask(policy)
                self._masks[key] = None if docs.all() else bitmap(docs[self.entry_doc])
            return self._masks[key]

    def _log_stamp(self) -> tuple[int, int] | None:
        try:
            st = (self.path / LOG_NAME).stat()
        except FileNotFoundError:
            return None
        return (st.st_size, st.st_mtime_ns)

    def maybe_reload_optouts(self) -> None:
        """Re-read the log if another process appended to it (a stat call per search)."""
        if self._log_stamp() != self._seen_log:
            self.reload_optouts()

    def opt_out(self, by: str, values: list[str]) -> tuple[dict, list[str], int]:
        """Remove documents durably: resolve, append to the log (fsync'd), tombstone.

        Returns (log record, removed doc ids, removed entries). Unknown doc ids raise
        `UnknownDocuments` and nothing is logged; an owner, source or span that matches
        nothing here is still logged, so a later rebuild never ingests it."""
        values = [v for v in values if v]
        if not values:
            raise ValueError("an opt-out needs at least one non-empty value")
        c = self._doc_cols
        with self._optout_lock:
            self.maybe_reload_optouts()
            if by == "doc_ids":
                unknown = [v for v in values if v not in self._doc_index]
                if unknown:
                    raise UnknownDocuments(f"unknown doc id(s) in {self.path.name}: {', '.join(unknown[:20])}")
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
            removed = c["doc_id"][hit & ~self.dead_docs].tolist()
            record = append_removal(self.path, by, values, c["doc_id"][hit].tolist())
            dead = self.dead_docs | hit
            self.dead_docs = dead
            self._seen_log = self._log_stamp()
            self.invalidate_masks()
        per_doc = self.entries_per_doc
        return record, removed, int(per_doc[np.isin(c["doc_id"], removed)].sum())

    def reload_optouts(self) -> None:
        """Tombstone every document the opt-out log removes (doc id, owner, source, span)."""
        stamp = self._log_stamp()
        rem = read_log(self.path)
        dead = np.zeros(len(self.docs), dtype=bool)
        if rem.records:
            c = self._doc_cols
            dead |= np.isin(c["doc_id"], list(rem.doc_ids))
            if rem.owners:
                dead |= np.isin(c["owner"], list(rem.owners))
            if rem.sources:
                dead |= np.isin(c["source"], list(rem.sources))
            if rem.spans:
                texts = self.docs.column("text").to_pylist()
                dead |= np.array([any(sp in t for sp in rem.spans) for t in texts], dtype=bool)
        self.dead_docs = dead
        self._seen_log = stamp
        self.invalidate_masks()

    def invalidate_masks(self) -> None:
        with self._lock:
            self._masks.clear()

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
        if allowed is not None:  # post-filter: never trust a selector alone
            safe = np.where(bad, 0, ids)
            bad |= ((allowed[safe >> 3] >> (safe & 7)) & 1) == 0
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


