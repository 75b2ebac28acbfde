"""∞-gram stores: infini-gram suffix arrays over token ids, with exact opt-out and tracing.

The `infini-gram` package (Apache-2.0) does the heavy lifting: its bundled suffix-array
builder (`rust_indexing`) and its C++ engine (counts, next-token distributions, maximal
verbatim spans). This module writes its files, opens one engine over all of a store's
shards, and keeps SILO's promises on top of it:

- **Layout.** Each shard folder holds the usual documents files (`datastore.writer`) and
  `sa/` with the engine's files for that shard: `tokenized.0` (every document as a
  separator `0xFFFF` followed by its tokens, little-endian u16), `offset.0` (u64 byte
  offset of each document) and `table.0` (the suffix array). One extra separator closes
  the file: without it the engine's next-token shortcut reports "document ends" for every
  occurrence of a context that also ends the shard (a bug of 2.6.0). Documents start with
  BOS and never contain EOS: the separator *is* the end of a document, and the engine
  reports it as `eos_token_id`. The engine's document index is global across the shards
  passed in order — exactly the store's global document index.
- **Exact opt-out.** From the acknowledgement on, removed documents contribute nothing:
  the engine's own takedown engine (`InfiniGramEngineDiff`) only shortens spans and
  still counts removed text, so this module builds, in a private temporary folder, a
  small index of the tombstoned documents' tokens (from `tokenized.0`) and subtracts its
  counts from the main index's (`count = main - removed`, exact since a separator-free
  n-gram never spans documents), and filters removed documents out of every document
  list. Compaction rebuilds the shard's suffix array with removed documents emptied (a
  lone separator keeps every document index in place).
- **Paths.** The engine finds its files by *substring* of their full path ("table",
  "offset", …) and crashes on a stray match anywhere in it, parent folders included; it
  is therefore always opened through clean symbolic links in a private folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import infini_gram
import numpy as np
from infini_gram.engine import InfiniGramEngine

from datastore.errors import StoreError
from datastore.policy import RetrievalPolicy
from datastore.store import Datastore

SA_DIR = "sa"
HACK = 100_000  # bytes of overlap between suffix-array parts (the package's own constant)
MAX_MATCH = 1024  # tokens a suffix match may span
LOAD_TO_RAM_MAX = 1 << 30  # index files up to this size are read into memory (counts ~3x faster than mapped)
_WIDTH = {"u16": 2, "u32": 4}


def token_dtype(vocab_size: int) -> str:
    """u16 holds every id below 65535 (65535 itself is the document separator)."""
    return "u16" if vocab_size < 0xFFFF else "u32"


def separator(dtype: str) -> int:
    return (1 << (8 * _WIDTH[dtype])) - 1


def _indexer() -> str:
    exe = Path(infini_gram.__file__).resolve().parent / "rust_indexing"
    if not exe.is_file():
        raise StoreError(f"{exe}: the infini-gram package's suffix-array builder is missing")
    return str(exe)


def write_suffix_array(folder: Path, docs, dtype: str = "u16", cpus: int | None = None,
                       mem_bytes: int = 4 << 30) -> int:
    """Write `folder/tokenized.0`, `offset.0` and `table.0` for `docs` (token-id arrays; an
    empty array keeps a document's place). Returns the number of tokens indexed. Uses the
    package's `rust_indexing` (make-part -> merge -> concat), as its own indexer does."""
    w, sep = _WIDTH[dtype], separator(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = "<u2" if w == 2 else "<u4"
    offsets, pos, n_tokens = [], 0, 0
    with open(folder / "tokenized.0", "wb") as f:
        for doc in docs:
            arr = np.asarray(doc, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= sep):
                raise StoreError(f"token ids must be in [0, {sep - 1}] for {dtype} indexes ({sep} separates documents)")
            data = np.concatenate(([sep], arr)).astype(np_dtype).tobytes()
            offsets.append(pos)
            f.write(data)
            pos += len(data)
            n_tokens += arr.size
        f.write(np.asarray([sep], dtype=np_dtype).tobytes())  # the closing separator (see the module docstring)
        pos += w
    np.asarray(offsets, dtype="<u8").tofile(folder / "offset.0")
    ratio = int(np.ceil(np.log2(max(pos, 2)) / 8))  # bytes per suffix-array pointer
    cpus = cpus or os.cpu_count() or 1
    if pos < 2 * HACK * cpus:  # small inputs: one part (several parts break `concat` on tiny files)
        cpus = 1
    batches = 1
    while batches * (mem_bytes // 8) < pos:
        batches *= 2
    jobs = batches * cpus
    part = pos // jobs + (-(pos // jobs) % w)
    exe = _indexer()
    work = Path(tempfile.mkdtemp(prefix="silo-sa-", dir=folder.parent))
    parts, merged = work / "p", work / "m"
    parts.mkdir()
    merged.mkdir()
    data, table = str((folder / "tokenized.0").resolve()), folder / "table.0"
    try:
        for b in range(0, jobs, cpus):
            procs = [subprocess.Popen([exe, "make-part", "--data-file", data, "--parts-dir", str(parts),
                                       "--start-byte", str(i * part), "--end-byte", str(min((i + 1) * part + HACK, pos)),
                                       "--ratio", str(ratio), "--token-width", str(w)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for i in range(b, min(b + cpus, jobs))]
            for p in procs:
                _, err = p.communicate()
                if p.returncode:
                    raise StoreError(f"suffix-array build failed: {err.decode(errors='replace')[-500:]}")
        for step in (["merge", "--data-file", data, "--parts-dir", str(parts), "--merged-dir", str(merged),
                      "--num-threads", str(cpus), "--hacksize", str(HACK)],
                     ["concat", "--data-file", data, "--merged-dir", str(merged), "--merged-file",
                      str(work / "sa.out"), "--num-threads", str(cpus)]):
            r = subprocess.run([exe, *step, "--ratio", str(ratio), "--token-width", str(w)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if r.returncode:
                raise StoreError(f"suffix-array build failed ({step[0]}): {r.stderr.decode(errors='replace')[-500:]}")
        if (work / "sa.out").stat().st_size != (pos // w) * ratio:
            raise StoreError("the suffix-array builder wrote a table of the wrong size")
        os.replace(work / "sa.out", table)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return n_tokens


class ShardTokens:
    """The documents' token ids of one shard, read from its `tokenized.0` (memory-mapped)."""

    def __init__(self, folder: Path, dtype: str):
        self.dtype, w = dtype, _WIDTH[dtype]
        self.data = np.memmap(folder / "tokenized.0", dtype="<u2" if w == 2 else "<u4", mode="r")
        self.starts = np.fromfile(folder / "offset.0", dtype="<u8").astype(np.int64) // w
        self.ends = np.append(self.starts[1:], len(self.data) - 1)  # the closing separator is not a document's

    def doc(self, local: int) -> np.ndarray:
        return np.asarray(self.data[self.starts[local] + 1 : self.ends[local]], dtype=np.int64)

    def unigrams(self, size: int) -> np.ndarray:
        """Token counts over the shard (separators excluded)."""
        counts = np.zeros(size, dtype=np.int64)
        sep = separator(self.dtype)
        for lo in range(0, len(self.data), 1 << 24):
            chunk = np.asarray(self.data[lo : lo + (1 << 24)])
            chunk = chunk[chunk != sep]
            counts += np.bincount(chunk, minlength=size)[:size]
        return counts


def _linked(folders: list[Path], into: Path) -> list[str]:
    """Clean paths to the shards' suffix-array folders (see the module docstring)."""
    out = []
    for i, f in enumerate(folders):
        link = into / f"s{i}"
        os.symlink(f.resolve(), link)
        out.append(str(link))
    return out


def _longest(n: int, occurs: Callable[[int], bool]) -> int:
    """The largest length ≤ n for which `occurs` holds, for a property that holds up to some
    length and not beyond (a longer span never occurs more often): doubling, then bisection,
    as the engine itself searches."""
    lo, hi = 0, 1
    while hi <= n and occurs(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, n + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if occurs(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Span:
    """A maximal run of tokens [start, end) of a text that occurs verbatim in the store."""

    start: int
    end: int
    count: int  # occurrences in live documents
    docs: list[int]  # global document indexes (up to the caller's cap, live only)


class InfgramIndex:
    """One engine over a store's shards, with exact takedown of tombstoned documents."""

    def __init__(self, sa_folders: list[Path], dtype: str, eos_id: int, vocab_size: int,
                 unigram: np.ndarray | None = None):
        self.dtype, self.sep, self.eos = dtype, separator(dtype), eos_id
        self.vocab_size, self.folders = vocab_size, sa_folders
        self._tmp = Path(tempfile.mkdtemp(prefix="silo-infgram-"))
        (self._tmp / "main").mkdir()
        self.kw = dict(eos_token_id=eos_id, vocab_size=min(vocab_size, self.sep) if dtype == "u16" else vocab_size,
                       version=4, token_dtype=dtype)
        size = sum(f.stat().st_size for folder in sa_folders for f in folder.iterdir())
        self.main = InfiniGramEngine(index_dir=_linked(sa_folders, self._tmp / "main"),
                                     load_to_ram=size <= LOAD_TO_RAM_MAX, **self.kw)
        self.shards = [ShardTokens(f, dtype) for f in sa_folders]
        self.doc_starts = np.cumsum([0] + [len(s.starts) for s in self.shards])
        self.unigram = unigram if unigram is not None else \
            sum((s.unigrams(vocab_size) for s in self.shards), np.zeros(vocab_size, np.int64))
        self.removed: np.ndarray = np.zeros(self.doc_starts[-1], dtype=bool)
        self.diff = None  # the engine over the tombstoned documents, when there are any
        self._diff_unigram = np.zeros(vocab_size, np.int64)
        self._lock = threading.Lock()
        self._generation = 0

    # ------------------------------------------------------------------ takedown

    def set_removed(self, removed: np.ndarray) -> None:
        """Subtract these documents (global indexes, a boolean mask) from every answer."""
        removed = np.asarray(removed, dtype=bool)
        with self._lock:
            if np.array_equal(removed, self.removed):
                return
            self._generation += 1
            folder = self._tmp / f"removed-{self._generation}"
            docs = [self.doc_tokens(int(d)) for d in np.flatnonzero(removed)]
            diff = None
            if docs:
                write_suffix_array(folder / "sa", docs, self.dtype, cpus=1)
                (folder / "link").mkdir()
                diff = InfiniGramEngine(index_dir=_linked([folder / "sa"], folder / "link"), **self.kw)
            counts = np.zeros(self.vocab_size, np.int64)
            for d in docs:
                counts += np.bincount(d, minlength=self.vocab_size)[: self.vocab_size]
            # the engine keeps raw pointers into its files: the old one stays referenced until replaced
            self.diff, self._diff_unigram, self.removed = diff, counts, removed

    def doc_tokens(self, d: int) -> np.ndarray:
        s = int(np.searchsorted(self.doc_starts, d, side="right") - 1)
        return self.shards[s].doc(d - int(self.doc_starts[s]))

    # ------------------------------------------------------------------ counts

    def _q(self, ids) -> list[int]:
        return [self.sep if t == self.eos else int(t) for t in ids]  # EOS is a document's end: a separator

    def count(self, ids) -> int:
        """Occurrences of a token sequence in live documents (EOS matches a document's end)."""
        return self._count(self._q(ids))

    def _unigram_count(self, t: int) -> int:
        """Live occurrences of one token; 0 for a document's end (EOS or the separator), which
        the unigram counts leave out."""
        if t in (self.eos, self.sep) or not 0 <= t < self.vocab_size:
            return 0
        return int(self.unigram[t] - self._diff_unigram[t])

    def _count(self, q: list[int]) -> int:
        if not q:
            return int(self.unigram.sum() - self._diff_unigram.sum())
        n = self.main.count(q)["count"]
        diff = self.diff
        return n - diff.count(q)["count"] if diff is not None and n else n

    def longest_suffix(self, context) -> tuple[int, int]:
        """(length, count) of the longest suffix of `context` that occurs in live documents —
        doubling then binary search, as the engine does, on exact (takedown-aware) counts."""
        ctx = list(context)
        if self.diff is None:  # the engine's own search, in one call
            r = self.main.infgram_prob(self._q(ctx) or [self.sep], 0) if ctx else None
            if r is None or "error" in r:
                return 0, self.count([])
            return int(r["suffix_len"]), int(r["prompt_cnt"]) if r["suffix_len"] else self.count([])
        n = len(ctx)
        lo = _longest(n, lambda length: self.count(ctx[n - length:]) > 0)
        return lo, self.count(ctx[n - lo:]) if lo else self.count([])

    def infgram_prob(self, context, target: int) -> tuple[int, int, int]:
        """(suffix length, its count, count followed by `target`) for the longest suffix of
        `context` that occurs in live documents; suffix length 0 = the unigram distribution."""
        sl, n = self.longest_suffix(context)
        if sl == 0:
            return 0, n, self._unigram_count(int(target))
        tail = list(context)[len(context) - sl:]
        return sl, n, self.count([*tail, target])

    def match(self, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each position t ≥ 1 of a document: the length and count of the longest suffix
        of ids[:t] in the store, and how often it continues with ids[t] — incrementally: a
        match grows by at most one token per position, and the count of the grown match is
        the previous position's continuation count, so a position usually costs one count."""
        ids = self._q(ids)
        n = len(ids) - 1
        sl, sc, cc = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
        total = self._count([])
        length, count = 0, total  # the empty suffix: every token
        grown = None  # count of ids[t-length-1 : t], the previous match plus ids[t-1], when known
        for t in range(1, len(ids)):
            # the context gained ids[t-1]: try the previous match plus it, else shrink (suffix counts
            # only fall as a suffix grows, so the longest one that occurs is found by bisection)
            cand = min(length + 1, t, MAX_MATCH)
            c = grown if grown is not None and cand == length + 1 else self._count(ids[t - cand : t])
            if c > 0:
                length, count = cand, c
            else:
                lo, hi = 0, cand
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    m = self._count(ids[t - mid : t])
                    if m > 0:
                        lo, count = mid, m
                    else:
                        hi = mid
                length = lo
                if lo == 0:
                    count = total
            target = ids[t]
            if length == 0:
                cont = self._unigram_count(target)
                grown = None  # a unigram count, which may differ from the engine's for a separator
            else:
                cont = self._count(ids[t - length : t + 1])
                grown = cont
            sl[t - 1], sc[t - 1], cc[t - 1] = length, count, cont
        return sl, sc, cc

    def next_tokens(self, context, max_support: int = 1000) -> tuple[int, int, dict[int, int]]:
        """(suffix length, its count, {next token: count}) for the longest matching suffix
        (the ∞-gram distribution); counts above `max_support` occurrences are estimated from
        a sample by the engine (its `approx`), exact otherwise."""
        sl, n = self.longest_suffix(context)
        if sl == 0 or n == 0:
            live = self.unigram - self._diff_unigram
            return 0, int(live.sum()), {int(t): int(c) for t, c in enumerate(live) if c > 0}
        tail = self._q(list(context)[len(context) - sl:])
        support = max(max_support, n if self.diff is not None else 0)
        main = self.main.ntd(tail, max_support=support)["result_by_token_id"]
        counts = {int(t): int(r["cont_cnt"]) for t, r in main.items()}
        if self.diff is not None:
            for t, r in self.diff.ntd(tail, max_support=support)["result_by_token_id"].items():
                counts[int(t)] = counts.get(int(t), 0) - int(r["cont_cnt"])
        return sl, n, {t: c for t, c in counts.items() if c > 0}

    # ------------------------------------------------------------------ documents

    def documents(self, ids, limit: int = 10) -> list[int]:
        """Global indexes of up to `limit` live documents holding this token sequence."""
        q = self._q(ids)
        found = self.main.find(q)
        out: list[int] = []
        for s, (lo, hi) in enumerate(found.get("segment_by_shard", [])):
            step = max(1, (hi - lo) // (4 * limit) or 1)
            for rank in range(lo, hi, step):
                d = int(self.main.get_doc_by_rank(s=s, rank=rank, max_disp_len=1)["doc_ix"])
                if not self.removed[d] and d not in out:
                    out.append(d)
                    if len(out) >= limit:
                        return out
        return out

    def spans(self, ids, min_len: int, max_docs: int = 10, max_count: int = 10**6) -> list[Span]:
        """The maximal spans (≥ `min_len` tokens) of `ids` that occur verbatim in live
        documents: for each start, the longest run found; runs inside an earlier one dropped
        (OLMoTrace's definition)."""
        ids = [int(t) for t in ids]
        spans: list[Span] = []
        if self.diff is None:
            out = self.main.attribute(self._q(ids), [], min_len, max_count, False)
            for sp in out.get("spans", []):
                spans.append(Span(int(sp["l"]), int(sp["r"]), int(sp["count"]), []))
        else:
            best_end = 0
            for start in range(len(ids)):
                length = _longest(len(ids) - start, lambda n, a=start: self.count(ids[a : a + n]) > 0)
                end = start + length
                if length >= min_len and end > best_end:
                    spans.append(Span(start, end, self.count(ids[start:end]), []))
                    best_end = end
        for sp in spans:
            sp.docs = self.documents(ids[sp.start : sp.end], max_docs)
        return [sp for sp in spans if sp.count > 0 and sp.docs]

    def close(self) -> None:
        self.main = self.diff = None
        shutil.rmtree(self._tmp, ignore_errors=True)


class InfgramStore(Datastore):
    """An ∞-gram store opened for counts, next-token distributions and verbatim tracing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._index: InfgramIndex | None = None
        self._index_lock = threading.Lock()
        self._synced = -1
        self._views: dict = {}  # (policy, tombstone version) -> InfgramIndex

    @classmethod
    def open(cls, path: str | os.PathLike, load_index: bool = True, only_shards: set[int] | None = None,
             with_text: bool = True) -> InfgramStore:
        store = super().open(path, load_index=load_index, only_shards=only_shards, with_text=with_text)
        if store.manifest.kind != "infgram":
            raise StoreError(f"{path} is a {store.manifest.kind} store, not an ∞-gram store")
        if load_index:
            folders = [s.path / SA_DIR for s in store.shards]
            missing = [str(f) for f in folders if not (f / "table.0").is_file()]
            if missing:
                raise StoreError(f"{', '.join(missing)}: missing suffix arrays")
            b = store.manifest.build
            store._index = InfgramIndex(folders, b["token_dtype"], int(b["eos_token_id"]), int(b["vocab_size"]))
            if int(store._index.doc_starts[-1]) != store.n_documents:
                raise StoreError(f"{path}: the suffix arrays hold {int(store._index.doc_starts[-1])} documents, "
                                 f"the store {store.n_documents}")
        return store

    @property
    def index(self) -> InfgramIndex:
        """The engine, with every acknowledged removal subtracted (synced on each use)."""
        return self.index_for(None)

    def index_for(self, policy: RetrievalPolicy | None) -> InfgramIndex:
        """The engine seen through a retrieval policy: every document the policy (or an
        opt-out) keeps out is subtracted, exactly. The plain view is kept in sync with the
        tombstones; a policy's view is built once per (policy, tombstones) and cached (it
        costs a suffix array over the excluded documents' text)."""
        if self._index is None:
            raise StoreError(f"store {self.path} was opened without its suffix arrays")
        self.maybe_reload_optouts()
        version = self.tombstone_version
        if policy is None or policy.is_open:
            if self._synced != version:
                with self._index_lock:
                    self._index.set_removed(self.dead_docs & ~self.docs.removed)
                    self._synced = version
            return self._index
        key = (policy, version)
        with self._index_lock:
            view = self._views.get(key)
            if view is None:
                base = self._index
                view = InfgramIndex(base.folders, base.dtype, base.eos, base.vocab_size, unigram=base.unigram)
                view.set_removed(~self.doc_mask(policy) & ~self.docs.removed)
                for old in list(self._views)[:-1]:  # keep two views: an unbounded cache is a leak
                    self._views.pop(old).close()
                self._views[key] = view
            return view

    def close(self) -> None:
        for view in [self._index, *self._views.values()]:
            if view is not None:
                view.close()
        super().close()
