"""`Datastore`: a store folder opened for search, with attribution of every entry.

    store = Datastore.open("STORE")
    distances, ids = store.search(queries, k=8, policy=RetrievalPolicy(tiers=("restricted",)))
    store.values(ids); store.attribute(ids[0])

One index, many shards: for an IVF store the shards' inverted lists are merged at load
into one group index over the store's trained quantizer (`silo.datastore.index`); a query
batch is assigned to lists once and the group (and every remote shard server, which gets
the assignment) scans only those lists — an N-shard store answers exactly like the same
store in one shard, at the cost of one. Flat shards are searched one by one (exact).

What RAM holds: the FAISS index, small per-document arrays (`silo.datastore.docs`), the
tombstones (one bool per document) and a bounded cache of packed policy bitmaps. Entry
columns, fp16 keys and text are memory-mapped files, read on demand.

Each search carries a bitmap of the entries this call may see (policy ∧ not opted out)
as an `IDSelectorBitmap`; results are post-filtered against the same bitmap, and against
tombstones added while the search ran, because some FAISS paths ignore selectors
(`IndexShardsIVF`). Nothing disallowed ever leaves here.

Tombstones come from two logs: the store's own `optout.log`, and the removal ledger its
manifest names (`silo.datastore.ledger`: the corpus's record of removals, shared by every
store built from it). Both are read on open and re-checked (one `stat` each) before every
search; a ledger that cannot be read refuses the open (`LedgerMissing`).
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
from silo.datastore import index as ix
from silo.datastore.docs import CODED, Documents, read_shard_docs
from silo.datastore.errors import FingerprintMismatch, StoreError
from silo.datastore.ledger import fingerprint, ledger_log
from silo.datastore.manifest import Manifest, ShardInfo, model_fingerprint, tokenizer_fingerprint
from silo.datastore.optout import OptOutLog, new_record
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.writer import ENTRY_COLUMNS, sentinel

TRAINED_NAME = "trained.faiss"


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
    index: faiss.Index | None  # loaded index (Flat shards; None once merged into the group, or not loaded)
    columns: dict[str, np.ndarray]  # entry columns, memory-mapped; row i = entry info.first_entry + i
    keys: np.ndarray | None  # fp16 keys, memory-mapped (--keep-keys)


def _column(path: Path, n: int) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable ({e})") from e
    if len(arr) != n:
        raise StoreError(f"{path}: {len(arr)} rows, manifest says {n}")
    # a plain ndarray view of the same mapped pages: indexing an `np.memmap` builds a memmap
    # per result (~15 µs each), which a kNN-LM token pays several times
    return np.asarray(arr)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _read_index(path: Path, expected: int, lists: str = "ram") -> faiss.Index:
    try:
        index = ix.read_shard_index(str(path), lists)
    except ix.UnmappableLists as e:
        raise StoreError(str(e)) from e
    except RuntimeError as e:
        raise StoreError(f"{path}: unreadable FAISS index ({str(e).splitlines()[0]})") from e
    if index.ntotal != expected:
        raise StoreError(f"{path}: index has {index.ntotal} entries, manifest says {expected}")
    return index


class Datastore:
    """A token, passage or ∞-gram store opened read-only for search and attribution."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest, shards: list[Shard], docs: Documents,
                 trained: faiss.Index | None = None, group: faiss.Index | None = None,
                 mask_cache_bytes: int = 64 << 20):
        self.path = Path(path)
        self.manifest = manifest
        self.shards = shards
        self.docs = docs
        self.trained = trained  # the store's trained, empty index: its quantizer assigns queries
        self.group = group  # the local IVF shards' entries in one index
        self.entries_per_doc = docs.n_entries
        self._shard_starts = np.array([s.info.first_entry for s in shards], dtype=np.int64)
        self._masks = MaskCache(mask_cache_bytes)
        self._pool = ThreadPoolExecutor(max_workers=8)  # remote shard calls: waiting, not computing
        # Tombstones only ever grow while a process runs. `_optout_lock` orders every change
        # (log reads and opt-outs); `tombstone_version` counts them, so a mask computed from an
        # older tombstone set can never be served from the cache after a newer one exists.
        self.dead_docs = np.zeros(docs.n, dtype=bool)
        self.tombstone_version = 0
        self.removal_records: list[dict] = []  # every log record applied, in log order (once per receipt)
        self._receipts: set[str] = set()
        self._optout_lock = threading.Lock()
        self._log = OptOutLog(self.path)
        # the corpus's removal ledger, if the store was built with one: unreadable -> refused
        self._ledger = ledger_log(manifest.ledger, self.path) if manifest.ledger else None
        self._logs = [self._log] + ([self._ledger] if self._ledger is not None else [])
        # per log, the bytes consumed (a torn tail seen included) whose records are tombstoned
        # (set only after `_tombstone`): a search whose `stat` finds these sizes skips the lock
        self._applied = [0] * len(self._logs)
        self.open_options: dict = {}  # how this store was opened (`reopen` repeats it)
        self.opened_stamp = self._manifest_stamp()
        self.lists = manifest.lists  # where the inverted lists live: "ram" or "ssd" (memory-mapped)
        self.remotes: list = []  # remote shard groups (silo.server.remote), searched beside local shards
        self.reload_optouts()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike, load_index: bool = True, only_shards: set[int] | None = None,
             with_text: bool = True, lists: str | None = None, local_from: int | None = None) -> Datastore:
        """Open a store; `only_shards` loads just those shards' indexes (a shard server),
        `load_index=False` none (compaction); `local_from`: shards before this number are
        served remotely, the ones after (added by a live ingest since) are loaded here — a
        main server in front of shard servers; `lists`: "ram" or "ssd" (memory-mapped
        inverted lists), default the manifest's."""
        path = Path(path)
        stamp = _stamp(path / "manifest.json")
        manifest = Manifest.load(path)
        if local_from is not None:
            only_shards = set(range(local_from, len(manifest.shards)))
        lists = lists or manifest.lists
        if lists not in ix.LISTS:
            raise StoreError(f"{path}: lists {lists!r}: choose one of {', '.join(ix.LISTS)}")
        kinds = ENTRY_COLUMNS.get(manifest.kind)
        if kinds is None:
            raise StoreError(f"{path}: unknown store kind {manifest.kind!r}")
        vectors = manifest.dim > 0 and manifest.index not in ("bm25", "infgram")
        trained = None
        if vectors and (path / TRAINED_NAME).is_file():
            trained = _read_index(path / TRAINED_NAME, 0)
        shards, tables, texts = [], [], []
        for no, info in enumerate(manifest.shards):
            d = path / "shards" / info.name
            index = None
            if vectors and load_index and (only_shards is None or no in only_shards):
                index = _read_index(d / "index.faiss", info.entries if info.index_entries < 0 else info.index_entries,
                                    lists)
            columns = {c: _column(d / f"{c}.npy", info.entries) for c in kinds}
            keys = _column(d / "keys.npy", info.entries) if manifest.keep_keys and (d / "keys.npy").is_file() else None
            table, text = read_shard_docs(d, info.documents, with_text)
            shards.append(Shard(info, d, index, columns, keys))
            tables.append(table)
            texts.append(text)
        docs = Documents(tables, texts, [s.info.first_doc for s in shards])
        if int(docs.n_entries.sum()) != manifest.entries or docs.n != manifest.documents:
            raise StoreError(f"{path}: documents hold {int(docs.n_entries.sum())} entries in {docs.n} documents; "
                             f"the manifest says {manifest.entries} in {manifest.documents}")
        group = None
        local = [s for s in shards if s.index is not None]
        if local and ix.is_ivf(local[0].index):
            group = ix.group_index([s.index for s in local], trained)
            for s in local:
                s.index = None  # its lists now live in the group
            if trained is None:
                trained = group
        store = cls(path, manifest, shards, docs, trained, group)
        store.lists = lists
        store.open_options = {"load_index": load_index, "only_shards": only_shards, "with_text": with_text,
                              "lists": lists}
        if local_from is not None:  # recomputed at each reopen: an ingest adds shards
            store.open_options |= {"only_shards": None, "local_from": local_from}
        store.opened_stamp = stamp  # as read before the manifest: a switch during the open is seen later
        return store

    def reopen(self) -> Datastore:
        """The store as its manifest now says (after a compaction or an ingest), opened the
        way this one was (a main server with remote shards loads no index), with the same
        remote shard groups. It reads the whole opt-out log, so it has every tombstone."""
        fresh = type(self).open(self.path, **self.open_options)
        fresh.remotes = self.remotes
        return fresh

    def _manifest_stamp(self) -> tuple[int, int] | None:
        return _stamp(self.path / "manifest.json")

    def manifest_changed(self) -> bool:
        """Has another process switched the manifest (an ingest, a compaction, tuned
        defaults) since this store was opened? One `stat` per call."""
        return self._manifest_stamp() != self.opened_stamp

    @property
    def reads_weights(self) -> bool:
        """Whether the store's entries come from its model's weights (keys, the LM's own
        passage embeddings), or only from its tokenizer (∞-gram, BM25, an embedder of its own)."""
        m = self.manifest
        return m.kind == "token" or (m.kind == "passage" and "dense" in m.retrievers and not m.build.get("embedder"))

    def check_model(self, model_dir: str | os.PathLike) -> None:
        """Refuse a model other than the one this store was built with; a store that reads
        only its tokenizer serves any model with that tokenizer (a retrieval-trained LM
        beside the plain one)."""
        if not self.reads_weights:
            tfp = tokenizer_fingerprint(model_dir)
            if tfp != self.manifest.tokenizer_fingerprint:
                raise FingerprintMismatch(
                    f"store {self.path} was built with the tokenizer of {self.manifest.model} (fingerprint "
                    f"{self.manifest.tokenizer_fingerprint}); {model_dir}'s tokenizer has fingerprint {tfp}. Token ids "
                    "of another tokenizer are meaningless: use a model with the store's tokenizer or rebuild the store.")
            return
        fp = model_fingerprint(model_dir)
        if fp != self.manifest.model_fingerprint:
            raise FingerprintMismatch(
                f"store {self.path} was built with model {self.manifest.model} "
                f"(fingerprint {self.manifest.model_fingerprint}); {model_dir} has fingerprint {fp}. "
                "Keys from another model are meaningless: use the store's model or rebuild the store.")

    @property
    def n_entries(self) -> int:
        return int(self.manifest.entries)

    @property
    def n_documents(self) -> int:
        return self.docs.n

    @property
    def metric(self) -> str:
        return self.manifest.metric

    @property
    def can_refine(self) -> bool:
        return bool(self.shards) and all(s.keys is not None for s in self.shards)

    def refine_for(self, refine: int | None) -> int:
        """The re-ranking factor a search applies for a requested `refine` (None: the store's
        tuned default, else what its index needs, `index.default_refine`); 1 without keys."""
        if refine is None:
            refine = self.manifest.defaults.get("refine", ix.default_refine(self.manifest.index))
        return refine if refine and refine > 1 and self.can_refine else 1

    # ------------------------------------------------------------------ masks and tombstones

    def doc_mask(self, policy: RetrievalPolicy | None) -> np.ndarray:
        base = ~self.dead_docs
        if policy is None or policy.is_open:
            return base
        return base & policy.doc_mask(self.docs)

    def allowed_bitmap(self, policy: RetrievalPolicy | None) -> np.ndarray | None:
        """Packed bitmap over global entry ids of what `policy` (and opt-out) lets through;
        None when everything is allowed (a clean search is a little faster). Documents own
        contiguous entry ranges, so the per-document mask expands by `np.repeat`."""
        key = (policy or RetrievalPolicy(), self.tombstone_version)
        hit = self._masks.get(key)
        if hit is not MaskCache.MISSING:
            return hit
        docs = self.doc_mask(policy)
        mask = None if docs.all() else ix.bitmap(np.repeat(docs, self.entries_per_doc))
        self._masks.put(key, mask)
        return mask

    def maybe_reload_optouts(self) -> None:
        """Apply what other processes appended to the log and the ledger (a stat each, and
        a read of the new bytes only, per search). The fast path compares with the bytes
        *applied*, not read: a reload in another thread reads new records before it
        tombstones them, and a search that skipped the lock in between would miss an
        acknowledged removal. A torn tail counts as applied once seen (it is never a
        record), so it does not send every search down the locked path; an append that
        cuts it leaves the log longer than it was (`OptOutLog.append_record`), so it is seen."""
        if any(log.size() != applied for log, applied in zip(self._logs, self._applied, strict=True)):
            with self._optout_lock:
                self._sync()

    def _sync(self) -> None:
        """Read every log's new records and tombstone them (caller holds `_optout_lock`).
        If anything fails, every log is read again from where it was: none is skipped."""
        offsets = [(log.offset, log.consumed) for log in self._logs]
        try:
            records = [rec for log in self._logs for rec in log.read_new()]
            self._tombstone(records)
        except BaseException:
            for log, (offset, consumed) in zip(self._logs, offsets, strict=True):
                log.offset, log.consumed = offset, consumed
            raise
        self._applied = [log.consumed for log in self._logs]

    def _tombstone(self, records: list[dict]) -> None:
        """Mark what `records` remove. Merges, never replaces."""
        records = [r for r in records if r["receipt"] not in self._receipts]  # a record in log and ledger
        if not records:
            return
        dead = self.dead_docs.copy()
        for rec in records:
            dead |= self.match_docs(rec["by"], rec["values"], rec.get("scope_owner"))
            dead |= self.docs.indexes_of(rec["doc_ids"])
        self._receipts.update(r["receipt"] for r in records)
        self.removal_records.extend(records)
        if (dead != self.dead_docs).any():
            self.dead_docs = dead
            self.tombstone_version += 1

    def match_docs(self, by: str, values: list[str], scope_owner: str | None = None) -> np.ndarray:
        """Boolean mask over documents that a removal (kind `by`, `values`) names; a scoped
        removal (made with an owner's credential) only ever reaches that owner's documents."""
        docs = self.docs
        if by == "doc_ids":
            hit = docs.indexes_of(values)
        elif by == "owner":
            hit = docs.where("owner", values, glob=False)
        elif by == "source":
            hit = docs.where("source", values, glob=False)
        elif by == "span":
            hit = np.zeros(docs.n, dtype=bool)
            for v in values:
                hit |= docs.find_span(v)
        else:
            raise ValueError(f"unknown opt-out kind {by!r}")
        if scope_owner is not None:
            hit &= docs.where("owner", [scope_owner], glob=False)
        return hit

    def fingerprints(self, mask: np.ndarray) -> list[dict]:
        """Content fingerprints (`silo.datastore.ledger.fingerprint`) of the documents in `mask`
        whose text is still in the files (opened with text)."""
        out = []
        for d in np.flatnonzero(mask):
            if self.docs.removed[d]:
                continue
            try:
                fp = fingerprint(self.doc_id(d), self.doc_text(d))
            except (StoreError, ValueError, AttributeError):  # opened without text: ids still remove it
                continue
            if fp is not None:
                out.append(fp)
        return out

    @property
    def ledger_path(self) -> Path | None:
        return None if self._ledger is None else self._ledger.path

    def opt_out(self, by: str, values: list[str], scope_owner: str | None = None, made_by: str = "admin",
                reason: str = "", require_known: bool = True, record: dict | None = None
                ) -> tuple[dict, list[str], int]:
        """Remove documents durably: resolve, append to the ledger and the log (fsync'd), tombstone.

        Returns (log record, newly removed doc ids, their entries). Unknown doc ids raise
        `UnknownDocuments` and nothing is logged (unless `require_known` is False: a server
        logs a removal in every store, so no rebuild of any of them ingests the text); an
        owner, source or span that matches nothing here is still logged, for the same reason.
        `record` (from `silo.datastore.removal.remove`, which has already appended it to every
        ledger) is appended to this store's log unchanged: one receipt everywhere."""
        values = [v for v in values if v]
        if not values:
            raise ValueError("an opt-out needs at least one non-empty value")
        with self._optout_lock:
            self._sync()
            if by == "doc_ids" and require_known:
                unknown = [v for v in values if self.doc_index(v) is None]
                if unknown:
                    raise UnknownDocuments(f"unknown doc id(s) in {self.path.name}: {', '.join(unknown[:20])}")
            hit = self.match_docs(by, values, scope_owner)
            removed = self.doc_ids_of(hit & ~self.dead_docs)
            if record is None:
                record = new_record(by, values, self.doc_ids_of(hit), scope_owner, made_by, reason,
                                    self.fingerprints(hit))
                if self._ledger is not None:
                    self._ledger.append_record(record)  # the corpus's record first: it outlives this store
            self._log.append_record(record)
            self._sync()  # our own record (and any that raced in), in log order
        return record, removed, self.entries_of(removed)

    def reload_optouts(self) -> None:
        """Tombstone every document the opt-out log and the ledger remove (doc id, owner, source, span)."""
        with self._optout_lock:
            self._sync()

    # ------------------------------------------------------------------ documents

    def doc_index(self, doc_id: str) -> int | None:
        return self.docs.index_of(doc_id)

    def doc_ids_of(self, mask: np.ndarray) -> list[str]:
        return self.docs.ids_of(mask)

    def doc_id(self, doc: int) -> str:
        return self.docs.doc_id(doc)

    def doc_owner(self, doc: int) -> str | None:
        return self.docs.value("owner", doc)

    def doc_source(self, doc: int) -> str | None:
        return self.docs.value("source", doc)

    def doc_text(self, doc: int) -> str:
        return self.docs.text(doc)

    def doc_provenance(self, doc: int) -> dict:
        """What attribution shows of a document: its id, source, license, tier and owner."""
        d = int(doc)
        return {"doc_id": self.doc_id(d), **{c: self.docs.value(c, d) for c in CODED}}

    def doc_row(self, doc: int) -> dict:
        """Everything about one document (its text read now)."""
        d = int(doc)
        return {**self.doc_provenance(d),
                "first_entry": int(self.docs.first_entry[d]), "n_entries": int(self.docs.n_entries[d]),
                "n_tokens": int(self.docs.n_tokens[d]), "sentence_starts": self.docs.sentence_starts(d).tolist(),
                "text": self.doc_text(d), "removed": bool(self.docs.removed[d])}

    def is_compacted(self, doc: int) -> bool:
        """Physically gone: a compaction rewrote the files without the document's entries and text."""
        return bool(self.docs.removed[int(doc)])

    def entries_of(self, doc_ids: list[str]) -> int:
        return int(self.entries_per_doc[self.docs.indexes_of(doc_ids)].sum())

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, policy: RetrievalPolicy | None = None,
               refine: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (distances, global entry ids) per query; id -1 where fewer than k exist.
        Raises `ShardUnavailable` if a remote shard is down or late."""
        res = self.search_ex(queries, k, nprobe, policy, allow_partial=False, refine=refine)
        return res.distances, res.ids

    def search_ex(self, queries: np.ndarray, k: int, nprobe: int | None = None,
                  policy: RetrievalPolicy | None = None, allow_partial: bool = False,
                  refine: int | None = None, assigned: tuple[np.ndarray, np.ndarray] | None = None) -> SearchResult:
        """`search`, with partial answers on request (a shard that is down or late is then
        listed in `missing` instead of failing the call — never silently), exact
        re-ranking of `refine × k` candidates (stores with kept keys; default: the store's
        `refine` default), and a given list assignment `assigned` = (coarse distances,
        lists) — what a shard server receives from the main server."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise ValueError(f"queries must be (n, {self.manifest.dim}), got {queries.shape}")
        if not np.isfinite(queries).all():
            raise ValueError("queries must be finite (no NaN or infinity)")
        refine = self.refine_for(refine)
        self.maybe_reload_optouts()
        version = self.tombstone_version
        allowed = self.allowed_bitmap(policy)
        kk = k * refine
        nq = len(queries)
        parts, missing = [], []
        if self.trained is not None and ix.is_ivf(self.trained):
            nprobe = int(nprobe or self.manifest.defaults.get("nprobe") or ix.DEFAULT_NPROBE)
            coarse, lists = assigned if assigned is not None else ix.assign(ix.quantizer_of(self.trained), queries,
                                                                            nprobe)
            jobs = [self._pool.submit(r.search, queries, kk, nprobe, policy, (coarse, lists)) for r in self.remotes]
            if self.group is not None:
                parts.append(ix.search_assigned(self.group, queries, kk, lists, coarse, allowed))
        else:
            jobs = [self._pool.submit(r.search, queries, kk, nprobe, policy, None) for r in self.remotes]
            parts += [ix.search(s.index, queries, kk, nprobe, allowed) for s in self.shards if s.index is not None]
        for job in jobs:
            try:
                parts.append(job.result())
            except ShardUnavailable as e:
                if not allow_partial:
                    raise
                missing.extend(e.shards)
        worst = np.inf if self.metric != "ip" else -np.inf
        if not parts:
            return SearchResult(np.full((nq, k), worst, np.float32), np.full((nq, k), -1, np.int64), missing)
        dist = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        bad = (ids < 0) | (ids >= self.n_entries)
        safe = np.where(bad, 0, ids)
        if allowed is not None:  # post-filter: never trust a selector alone
            bad |= ((allowed[safe >> 3] >> (safe & 7)) & 1) == 0
        if self.tombstone_version != version:  # an opt-out was acknowledged while we searched
            bad |= self.dead_docs[np.maximum(self.entries(safe, ("doc",))["doc"], 0)]
        dist = np.where(bad, worst, dist)
        ids = np.where(bad, -1, ids)
        if refine > 1:
            dist = self.distances_to(queries, ids)
        order = np.argsort(dist if self.metric != "ip" else -dist, axis=1, kind="stable")[:, :k]
        dist, ids = np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=worst)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return SearchResult(dist.astype(np.float32), ids, missing)

    def distances_to(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact distances (n, c) of each query (n, d) to its candidates (n, c) from their kept
        fp16 keys (stores with `keep_keys`); the worst value (inf, or -inf for inner
        products) for -1."""
        assert self.can_refine, "exact distances need the kept keys"
        assert queries.ndim == 2 and ids.ndim == 2 and len(queries) == len(ids), (queries.shape, ids.shape)
        worst = np.inf if self.metric != "ip" else -np.inf
        dist = ix.exact_distances(np.asarray(queries, np.float32), self.keys_of(ids), self.metric)
        return np.where(ids >= 0, dist, worst).astype(np.float32)

    def allowed(self, ids: np.ndarray, policy: RetrievalPolicy | None = None) -> np.ndarray:
        """Whether each global entry id may be served now: it exists (not -1, not removed by
        a compaction) and its document is neither opted out (the logs re-read first, as a
        search does) nor outside `policy`. What a pointer walking the store checks at each
        step, so it can never step into a removed entry."""
        self.maybe_reload_optouts()
        ids = np.asarray(ids, dtype=np.int64)
        ok = self.entries(ids, ("doc",))["doc"] >= 0
        bits = self.allowed_bitmap(policy)
        if bits is not None:
            safe = np.where(ok, ids, 0)
            ok &= ((bits[safe >> 3] >> (safe & 7)) & 1) == 1
        return ok

    def keys_of(self, ids: np.ndarray) -> np.ndarray:
        """fp16 keys of global ids (n, c) -> (n, c, d); zeros for -1."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        out = np.zeros((len(flat), self.manifest.dim), dtype=np.float16)
        valid = flat >= 0
        shard, local = self._locate(np.where(valid, flat, 0))
        if len(self.shards) == 1 and valid.all():  # the common case: one gather, no scatter
            return self.shards[0].keys[local].reshape(*np.shape(ids), self.manifest.dim)
        for si, s in enumerate(self.shards):
            sel = np.flatnonzero(valid & (shard == si))
            if len(sel):
                out[sel] = s.keys[local[sel]]  # a plain gather: sorting the reads costs more than it saves
        return out.reshape(*np.shape(ids), self.manifest.dim)

    # ------------------------------------------------------------------ entries and attribution

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self._shard_starts, ids, side="right") - 1
        return shard, ids - self._shard_starts[np.clip(shard, 0, None)]

    def entries(self, ids: np.ndarray, columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Entry columns (int64) for global ids of any shape; -1 for -1 ids and for entries
        a compaction removed."""
        columns = tuple(ENTRY_COLUMNS[self.manifest.kind]) if columns is None else columns
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        valid = (flat >= 0) & (flat < self.n_entries)
        out = {c: np.full(flat.shape, -1, dtype=np.int64) for c in columns}
        shard, local = self._locate(np.where(valid, flat, 0))
        for si, s in enumerate(self.shards):
            sel = valid & (shard == si)
            if sel.any():
                for c in columns:
                    col = s.columns[c]
                    v = col[local[sel]].astype(np.int64)
                    out[c][sel] = np.where(v == sentinel(col.dtype), -1, v)
        return {c: v.reshape(ids.shape) for c, v in out.items()}

    def values(self, ids: np.ndarray) -> np.ndarray:
        return self.entries(ids, ("value",))["value"]

    def entry_docs(self, ids: np.ndarray) -> np.ndarray:
        """Global document of each entry id (-1 for -1): documents own contiguous entry ranges."""
        ids = np.asarray(ids, dtype=np.int64)
        d = np.searchsorted(self.docs.first_entry, ids, side="right") - 1
        return np.where(ids >= 0, d, -1)

    def attribute(self, ids: np.ndarray, scores: np.ndarray | None = None) -> list[dict]:
        """Who and what each entry is: doc_id, source, license, tier, owner, sentence text."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ent = self.entries(ids, ("doc", "sentence", "position"))
        out, sentences = [], {}  # (doc, sentence) -> text: read once per call, never the whole document
        for j, eid in enumerate(ids):
            if eid < 0 or ent["doc"][j] < 0:
                continue
            d, s = int(ent["doc"][j]), int(ent["sentence"][j])
            if (d, s) not in sentences:
                starts = self.docs.sentence_starts(d)
                end = int(starts[s + 1]) if s + 1 < len(starts) else 1 << 62
                sentences[d, s] = self.docs.text_slice(d, int(starts[s]), end).strip() if len(starts) else ""
            hit = {"entry_id": int(eid), **self.doc_provenance(d), "sentence_index": s, "sentence": sentences[d, s],
                   "position": int(ent["position"][j])}
            if scores is not None:
                hit["score"] = float(np.asarray(scores).ravel()[j])
            out.append(hit)
        return out

    def stats(self) -> dict:
        """Entries and documents (all and live), shards, per tier and per source, bytes on disk."""
        live = ~self.dead_docs
        per_doc = self.entries_per_doc
        groups: dict[str, dict] = {"tiers": {}, "sources": {}}
        for group, col in (("tiers", "tier"), ("sources", "source")):
            codes, values = self.docs.codes[col], self.docs.values[col]
            docs = np.bincount(codes[live], minlength=len(values))
            entries = np.bincount(codes[live], weights=per_doc[live], minlength=len(values))
            for i in np.argsort(values.astype(str)):
                if not docs[i]:  # only removed documents have it: naming it would leak what was removed
                    continue
                groups[group][str(values[i])] = {"documents": int(docs[i]), "entries": int(entries[i])}
        return {
            "kind": self.manifest.kind, "documents": self.n_documents, "live_documents": int(live.sum()),
            "entries": self.n_entries, "live_entries": int(per_doc[live].sum()),
            "shards": len(self.shards), "index": self.manifest.index,
            "lists": self.lists if self.manifest.dim and self.manifest.index != "Flat" else "",
            "bytes": sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()), **groups,
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False)

