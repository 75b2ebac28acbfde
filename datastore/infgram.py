"""∞-gram stores: infini-gram suffix arrays over token ids, with exact opt-out and tracing.

The `infini-gram` package (Apache-2.0) does the heavy lifting: its bundled suffix-array
builder (`rust_indexing`) and its C++ engine (counts, next-token distributions, maximal
verbatim spans). This module writes its files, opens one engine over all of a store's
shards, and keeps SILO's promises on top of it — exact by construction, whatever ids reach
it:

- **Layout.** Each shard folder holds the usual documents files (`silo.datastore.writer`) and
  `sa/` with the engine's files for that shard: `tokenized.0` (every document as a
  separator `0xFFFF` followed by its tokens, little-endian u16), `offset.0` (u64 byte
  offset of each document) and `table.0` (the suffix array). One extra separator closes
  the file: without it the engine's next-token shortcut reports "document ends" for every
  occurrence of a context that also ends the shard (a bug of 2.6.0). Documents start with
  BOS and never contain EOS: the separator *is* the end of a document, and the engine
  reports it as `eos_token_id`. The engine's document index is global across the shards
  passed in order — exactly the store's global document index.
- **Matches never span a document separator.** A query's EOS is the separator; it may
  stand only first (a document start) or last (a document end); anywhere else the count
  is 0, `[sep]` alone counts the live documents and `[sep, sep]` (an empty document)
  nothing. Suffix matching never extends past a context's last separator. An id outside
  the vocabulary (the separator's own id included) occurs nowhere; a negative id is
  refused. The engine's one-call shortcuts (`infgram_prob`, `attribute`) know no such
  rule, so they are used only for separator-free queries with nothing subtracted.
- **Exact opt-out.** From the acknowledgement on, removed documents contribute nothing.
  The engine's own takedown engine (`InfiniGramEngineDiff`) only shortens spans and still
  counts removed text, so an index is a *state*: either the main engine minus a small
  engine over the removed documents (`count = main - diff`, exact because a legal query
  cannot straddle two documents: the diff holds each removed document between
  separators, as the main index does), or — when fewer tokens are kept than removed — an
  engine over the kept documents alone, or nothing at all when nothing is kept.
- **Counts are exact whenever a removal is involved.** Above `max_support` occurrences
  the engine estimates a next-token distribution from a sample (exact ones cost ~0.4 ms
  per distinct continuation: seconds for a frequent context). When the diff holds the
  context, every token the diff continues it with gets its count exactly (`main.count -
  diff.count` of context + token); tokens the diff never continues with have only live
  occurrences, so the engine's estimates stand, rescaled so that all counts sum to the
  live total. No count of a removed occurrence survives.
- **Snapshots, never teardown.** A state is immutable and swapped in by one assignment;
  every call reads it once, so a thread mid-call keeps a consistent (main, diff) pair
  whatever replaces or evicts it. Engines are freed by reference counting, never closed.
- **Policy views** (a retrieval policy's documents only) are states of the same kind,
  bounded: a policy keeping nothing is the empty state (no build), the smaller side of
  kept/excluded is indexed, at most `max_view_tokens` tokens (else `TooMuchWork` naming
  the cap), at most `max_views` views and `max_view_bytes` bytes cached, at most
  `VIEW_BUILDS` built at once, each built outside every lock a request takes (others keep
  serving; requests for the same view wait for the one build).
- **No removed text on disk.** Every suffix array of removed (or kept) documents is
  written into a private folder `silo-infgram-<pid>-*` under the system temp folder and
  deleted as soon as the engine has mapped it (on Linux an unlinked mapped file lives on
  until unmapped; the engine reads its files only when it opens them). A kill -9 during a
  build leaves the folder behind: opening an index sweeps the folders of dead pids.
- **Paths.** The engine finds its files by *substring* of their full path ("table",
  "offset", …) and crashes on a stray match anywhere in it, parent folders included; it
  is therefore always opened through clean symbolic links in a private folder.
"""

from __future__ import annotations

import copy
import operator
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import infini_gram
import numpy as np
from infini_gram.engine import InfiniGramEngine
from silo.datastore.errors import StoreError, TooMuchWork
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore

SA_DIR = "sa"
HACK = 100_000  # bytes of overlap between suffix-array parts (the package's own constant)
MAX_MATCH = 1024  # tokens a suffix match may span
LOAD_TO_RAM_MAX = 1 << 30  # index files up to this size are read into memory (counts ~3x faster than mapped)
TMP_PREFIX = "silo-infgram-"  # + pid + "-": private build folders under the system temp folder
MAX_VIEW_TOKENS = 4_000_000  # tokens one policy view may index (a ~4 s build on one core, ~20 MB mapped)
MAX_VIEWS = 8  # policy views cached per store
MAX_VIEW_BYTES = 256 << 20  # bytes of cached policy views per store
VIEW_BUILDS = 2  # policy views built at once per store
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(root: str | os.PathLike | None = None) -> list[Path]:
    """Delete the build folders of dead processes (a kill -9 mid-build leaves one, with the
    removed documents' tokens in it). Returns what was deleted."""
    root = Path(root or tempfile.gettempdir())
    gone = []
    for folder in root.glob(f"{TMP_PREFIX}*"):
        m = re.match(rf"{re.escape(TMP_PREFIX)}(\d+)-", folder.name)
        if m and int(m[1]) != os.getpid() and not _pid_alive(int(m[1])):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


@contextmanager
def _scratch() -> Iterator[Path]:
    """A private folder that exists only while engines are opened from it."""
    folder = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _linked(folders: list[Path], into: Path) -> list[str]:
    """Clean paths to the shards' suffix-array folders (see the module docstring)."""
    into.mkdir(exist_ok=True)
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


def _apportion(estimates: dict[int, int], total: int) -> dict[int, int]:
    """Integer counts proportional to `estimates` summing to `total` (largest remainder)."""
    s = sum(estimates.values())
    if total <= 0 or s <= 0:
        return {}
    exact = {t: c * total / s for t, c in estimates.items()}
    out = {t: int(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: out[t] - exact[t])[: total - sum(out.values())]:
        out[t] += 1
    return {t: c for t, c in out.items() if c > 0}


@dataclass
class Span:
    """A maximal run of tokens [start, end) of a text that occurs verbatim in the store."""

    start: int
    end: int
    count: int  # occurrences in live documents
    docs: list[int]  # global document indexes (up to the caller's cap, live only)


@dataclass(frozen=True)
class _State:
    """What one index answers from, swapped in whole (see the module docstring)."""

    main: InfiniGramEngine | None  # None: nothing is live
    diff: InfiniGramEngine | None  # the removed documents, subtracted from main
    live: np.ndarray  # bool per global document: counted and shown
    unigram: np.ndarray  # live occurrences per token
    local_docs: np.ndarray | None  # main's document index -> global (an index over kept documents)
    live_docs: int  # live non-empty documents
    nbytes: int  # bytes of this state's own engine files


class InfgramIndex:
    """One engine over a store's shards, with exact takedown of excluded documents."""

    def __init__(self, sa_folders: list[Path], dtype: str, eos_id: int, vocab_size: int,
                 unigram: np.ndarray | None = None):
        self.dtype, self.sep, self.eos = dtype, separator(dtype), eos_id
        self.vocab_size, self.folders = vocab_size, sa_folders
        self.never = self.sep - 1  # an id no document holds (the vocabulary ends below it)
        if not 0 <= eos_id < vocab_size <= self.never:
            raise StoreError(f"eos id {eos_id} and vocabulary {vocab_size} do not fit {dtype} indexes")
        sweep_stale()
        self.kw = dict(eos_token_id=eos_id, vocab_size=min(vocab_size, self.sep) if dtype == "u16" else vocab_size,
                       version=4, token_dtype=dtype)
        size = sum(f.stat().st_size for folder in sa_folders for f in folder.iterdir())
        with _scratch() as tmp:
            main = InfiniGramEngine(index_dir=_linked(sa_folders, tmp / "main"), load_to_ram=size <= LOAD_TO_RAM_MAX,
                                    **self.kw)
        self.shards = [ShardTokens(f, dtype) for f in sa_folders]
        self.doc_starts = np.cumsum([0] + [len(s.starts) for s in self.shards])
        self.lengths = np.concatenate([s.ends - s.starts - 1 for s in self.shards]) if self.shards \
            else np.zeros(0, np.int64)
        self.unigram = unigram if unigram is not None else \
            sum((s.unigrams(vocab_size) for s in self.shards), np.zeros(vocab_size, np.int64))
        first = np.concatenate([np.asarray(s.data[s.starts + 1], np.int64) if len(s.starts) else np.zeros(0, np.int64)
                                for s in self.shards]) if self.shards else np.zeros(0, np.int64)
        self.first = np.where(self.lengths > 0, first, -1)  # each document's first token (-1: empty)
        every = self.lengths > 0
        self._full = _State(main, None, every, self.unigram, None, int(every.sum()), 0)
        self._state: _State | None = self._full
        self.removed: np.ndarray = np.zeros(len(self.lengths), dtype=bool)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ states

    @property
    def main(self) -> InfiniGramEngine | None:
        return self._st().main

    @property
    def diff(self) -> InfiniGramEngine | None:
        return self._st().diff

    @property
    def nbytes(self) -> int:
        """Bytes this index holds beyond the store's own files (its excluded or kept side)."""
        return self._st().nbytes + self.removed.nbytes * 2

    def _st(self) -> _State:
        st = self._state
        if st is None:
            raise StoreError("this ∞-gram index is closed")
        return st

    def cost(self, kept: np.ndarray) -> int:
        """Tokens a state keeping `kept` (global documents) must index: the smaller side."""
        kept = np.asarray(kept, dtype=bool) & (self.lengths > 0)
        kept_tokens = int(self.lengths[kept].sum())
        return min(kept_tokens, int(self.lengths.sum()) - kept_tokens)

    def _build(self, kept: np.ndarray) -> _State:
        """The state in which only `kept` documents count (see the module docstring)."""
        kept = np.asarray(kept, dtype=bool) & (self.lengths > 0)
        excluded = ~kept & (self.lengths > 0)
        kept_tokens, excluded_tokens = int(self.lengths[kept].sum()), int(self.lengths[excluded].sum())
        if kept_tokens == 0:
            return _State(None, None, kept, np.zeros(self.vocab_size, np.int64), None, 0, 0)
        if excluded_tokens == 0:
            return _State(self._full.main, None, kept, self.unigram, None, int(kept.sum()), 0)
        own = kept if kept_tokens < excluded_tokens else excluded
        docs = np.flatnonzero(own)
        counts = np.zeros(self.vocab_size, np.int64)

        def tokens() -> Iterator[np.ndarray]:
            for d in docs:
                toks = self.doc_tokens(int(d))
                counts[:] += np.bincount(toks, minlength=self.vocab_size)[: self.vocab_size]
                yield toks

        with _scratch() as tmp:
            write_suffix_array(tmp / "sa", tokens(), self.dtype, cpus=1)
            nbytes = sum(f.stat().st_size for f in (tmp / "sa").iterdir())
            engine = InfiniGramEngine(index_dir=_linked([tmp / "sa"], tmp / "link"), **self.kw)
        # the folder is gone: the engine maps files that no longer have a name
        if own is kept:
            return _State(engine, None, kept, counts, docs, int(kept.sum()), nbytes)
        return _State(self._full.main, engine, kept, self.unigram - counts, None, int(kept.sum()), nbytes)

    def set_removed(self, removed: np.ndarray) -> None:
        """Subtract these documents (global indexes, a boolean mask) from every answer."""
        removed = np.asarray(removed, dtype=bool)
        with self._lock:
            if np.array_equal(removed, self.removed):
                return
            state = self._build(~removed)
            self._state, self.removed = state, removed  # one assignment: readers see old or new

    def check_view(self, kept: np.ndarray, max_tokens: int = MAX_VIEW_TOKENS) -> None:
        """Refuse (`TooMuchWork`) a view keeping `kept` that would index over `max_tokens`."""
        cost = self.cost(kept)
        if cost > max_tokens:
            raise TooMuchWork(f"this retrieval policy needs a suffix array over {cost:,} tokens (the smaller of "
                              f"the documents it keeps and those it excludes); max_view_tokens is {max_tokens:,}")

    def view(self, kept: np.ndarray, max_tokens: int = MAX_VIEW_TOKENS) -> InfgramIndex:
        """A new index sharing this one's engine in which only `kept` documents count;
        refused (`TooMuchWork`) when it would index more than `max_tokens` tokens."""
        self.check_view(kept, max_tokens)
        out = copy.copy(self)
        out._lock = threading.Lock()
        out._state = self._build(kept)
        out.removed = ~np.asarray(kept, dtype=bool)
        return out

    def doc_tokens(self, d: int) -> np.ndarray:
        s = int(np.searchsorted(self.doc_starts, d, side="right") - 1)
        return self.shards[s].doc(d - int(self.doc_starts[s]))

    # ------------------------------------------------------------------ counts

    def _q(self, ids: Iterable) -> list[int]:
        """Engine ids: EOS is a document's end (the separator); an id outside the vocabulary
        (the separator's own included) occurs nowhere."""
        out = []
        for t in ids:
            try:
                t = operator.index(t)
            except TypeError:
                raise StoreError(f"token ids must be integers, got {t!r}") from None
            if t < 0:
                raise StoreError(f"token ids must not be negative, got {t}")
            out.append(self.sep if t == self.eos else t if t < self.vocab_size else self.never)
        return out

    def count(self, ids) -> int:
        """Occurrences of a token sequence in live documents (EOS first: a document's start;
        last: its end; anywhere else: nothing)."""
        return self._count(self._st(), self._q(ids))

    def _unigram_count(self, st: _State, t: int) -> int:
        """Live occurrences of one token; 0 for a document's end (EOS or the separator), which
        the unigram counts leave out."""
        if t in (self.eos, self.sep) or not 0 <= t < self.vocab_size:
            return 0
        return int(st.unigram[t])

    def _count(self, st: _State, q: list[int]) -> int:
        if not q:
            return int(st.unigram.sum())
        sep = self.sep
        if st.main is None or (sep in q and (sep in q[1:-1] or q == [sep, sep])):
            return 0
        if q == [sep]:
            return st.live_docs
        n = st.main.count(q)["count"]
        return n - st.diff.count(q)["count"] if st.diff is not None and n else n

    def _context(self, q: list[int]) -> list[int]:
        """The part of a context a suffix may match: from its last separator on."""
        for i in range(len(q) - 1, -1, -1):
            if q[i] == self.sep:
                return q[i:]
        return q

    def _longest_suffix(self, st: _State, q: list[int], at_most: int | None = None) -> tuple[int, int]:
        q = self._context(q)
        if st.main is None or not q:
            return 0, self._count(st, [])
        if st.diff is None and self.sep not in q:  # the engine's own search, in one call
            r = st.main.infgram_prob(q, 0)
            if "error" in r or not r["suffix_len"]:
                return 0, self._count(st, [])
            return int(r["suffix_len"]), int(r["prompt_cnt"])
        n = len(q)
        if at_most is not None:  # a known bound: one count when the match grew, else bisection below it
            cand = min(at_most, n)
            if cand and (c := self._count(st, q[n - cand:])) > 0:
                return cand, c
            lo = _longest(max(cand - 1, 0), lambda length: self._count(st, q[n - length:]) > 0)
        else:
            lo = _longest(n, lambda length: self._count(st, q[n - length:]) > 0)
        return lo, self._count(st, q[n - lo:]) if lo else self._count(st, [])

    def longest_suffix(self, context) -> tuple[int, int]:
        """(length, count) of the longest suffix of `context` that occurs in live documents
        (never past its last separator); (0, live tokens) when not even its last token does."""
        return self._longest_suffix(self._st(), self._q(context))

    def infgram_prob(self, context, target: int) -> tuple[int, int, int]:
        """(suffix length, its count, count followed by `target`) for the longest suffix of
        `context` that occurs in live documents; suffix length 0 = the unigram distribution."""
        st, q = self._st(), self._q(context)
        sl, n = self._longest_suffix(st, q)
        if sl == 0:
            return 0, n, self._unigram_count(st, int(target))
        return sl, n, self._count(st, [*q[len(q) - sl:], *self._q([target])])

    def match(self, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each position t ≥ 1 of a document: the length and count of the longest suffix
        of ids[:t] in the store, and how often it continues with ids[t] — incrementally: a
        match grows by at most one token per position, and the count of the grown match is
        the previous position's continuation count, so a position usually costs one count."""
        st, ids = self._st(), self._q(ids)
        n = len(ids) - 1
        sl, sc, cc = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
        total = self._count(st, [])
        length, count = 0, total  # the empty suffix: every token
        grown = None  # count of ids[t-length-1 : t], the previous match plus ids[t-1], when known
        since = 0  # where the context's last document starts (its separator): no match reaches before
        for t in range(1, len(ids)):
            if ids[t - 1] == self.sep:
                since = t - 1
            # the context gained ids[t-1]: try the previous match plus it, else shrink (suffix counts
            # only fall as a suffix grows, so the longest one that occurs is found by bisection)
            cand = min(length + 1, t - since, MAX_MATCH)
            c = grown if grown is not None and cand == length + 1 else self._count(st, ids[t - cand : t])
            if c > 0:
                length, count = cand, c
            else:
                lo, hi = 0, cand
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    m = self._count(st, ids[t - mid : t])
                    if m > 0:
                        lo, count = mid, m
                    else:
                        hi = mid
                length = lo
                if lo == 0:
                    count = total
            target = ids[t]
            if length == 0:
                cont = self._unigram_count(st, target)
                grown = None  # a unigram count, which may differ from the engine's for a separator
            else:
                cont = self._count(st, ids[t - length : t + 1])
                grown = cont
            sl[t - 1], sc[t - 1], cc[t - 1] = length, count, cont
        return sl, sc, cc

    def next_tokens(self, context, max_support: int = 1000, at_most: int | None = None
                    ) -> tuple[int, int, dict[int, int]]:
        """(suffix length, its count, {next token: count}) for the longest matching suffix
        (the ∞-gram distribution). Above `max_support` occurrences the engine estimates from a
        sample; every token a removed occurrence continues with is counted exactly (see the
        module docstring). A document's end is the token EOS.

        `at_most`: a bound the caller knows on the suffix length — a context extended by one
        token since the last call on this same index matches at most one token more than it
        did — which saves the doubling search (one count where the match grew)."""
        st, q = self._st(), self._q(context)
        sl, n = self._longest_suffix(st, q, at_most)
        if sl == 0 or n == 0:
            return 0, n, {int(t): int(c) for t in np.flatnonzero(st.unigram) if (c := st.unigram[t]) > 0}
        tail = q[len(q) - sl:]
        if tail == [self.sep]:  # a document's start: the first tokens of the live documents
            firsts = np.bincount(self.first[st.live & (self.first >= 0)], minlength=1)
            return sl, n, {int(t): int(firsts[t]) for t in np.flatnonzero(firsts)}

        def dist(engine: InfiniGramEngine, support: int) -> dict[int, int]:
            r = engine.ntd(tail, max_support=max(1, support))["result_by_token_id"]
            return {int(t): int(x["cont_cnt"]) for t, x in r.items()}

        gone = st.diff.count(tail)["count"] if st.diff is not None else 0
        if not gone:  # only live occurrences: the engine's answer (estimated above max_support)
            return sl, n, {t: c for t, c in dist(st.main, max_support).items() if c > 0}
        removed = dist(st.diff, gone)  # exact: the diff's support is the whole of it
        if n + gone <= max_support:  # small enough to be exact in main too
            counts = dist(st.main, n + gone)
            return sl, n, {t: c - removed.get(t, 0) for t, c in counts.items() if c - removed.get(t, 0) > 0}
        exact = {t: self._count(st, [*tail, self.sep if t == self.eos else t]) for t in removed}
        estimates = {t: c for t, c in dist(st.main, max_support).items() if t not in removed}
        counts = {t: c for t, c in exact.items() if c > 0}
        counts.update(_apportion(estimates, n - sum(exact.values())))
        return sl, n, counts

    # ------------------------------------------------------------------ documents

    def _documents(self, st: _State, q: list[int], limit: int) -> list[int]:
        if st.main is None or not self._count(st, q):
            return []
        found = st.main.find(q)
        out: list[int] = []
        for s, (lo, hi) in enumerate(found.get("segment_by_shard", [])):
            step = max(1, (hi - lo) // (4 * limit) or 1)
            for rank in range(lo, hi, step):
                d = int(st.main.get_doc_by_rank(s=s, rank=rank, max_disp_len=1)["doc_ix"])
                if st.local_docs is not None:
                    d = int(st.local_docs[d])
                if st.live[d] and d not in out:
                    out.append(d)
                    if len(out) >= limit:
                        return out
        return out

    def documents(self, ids, limit: int = 10) -> list[int]:
        """Global indexes of up to `limit` live documents holding this token sequence."""
        return self._documents(self._st(), self._q(ids), limit)

    def spans(self, ids, min_len: int, max_docs: int = 10, max_count: int = 10**6) -> list[Span]:
        """The maximal spans (≥ `min_len` tokens) of `ids` that occur verbatim in live
        documents: for each start, the longest run found; runs inside an earlier one dropped
        (OLMoTrace's definition). One sweep: a run's end never moves back as its start moves
        on (a run's tail occurs wherever the run does), so each step moves the start or the
        end and costs one count: O(n) counts, not a search per start."""
        st, q = self._st(), self._q(ids)
        spans: list[Span] = []
        if st.main is None:
            return []
        if st.diff is None and self.sep not in q:  # the engine's own search, in one call
            for sp in st.main.attribute(q, [], min_len, max_count, False).get("spans", []):
                spans.append(Span(int(sp["l"]), int(sp["r"]), int(sp["count"]), []))
        else:
            end = best_end = 0
            last = 0  # the count of q[start:end] when the sweep last grew it
            for start in range(len(q)):
                if end <= start:
                    end, last = start, 0
                grew = False
                while end < len(q) and (c := self._count(st, q[start : end + 1])) > 0:
                    end, last, grew = end + 1, c, True
                if end - start >= min_len and end > best_end:
                    spans.append(Span(start, end, last if grew else self._count(st, q[start:end]), []))
                    best_end = end
        for sp in spans:
            sp.docs = self._documents(st, q[sp.start : sp.end], max_docs)
        return [sp for sp in spans if sp.count > 0 and sp.docs]

    def close(self) -> None:
        """Drop this index's engines (threads mid-call keep their snapshot; nothing to delete:
        no file of it has a name any more)."""
        self._state = None


class InfgramStore(Datastore):
    """An ∞-gram store opened for counts, next-token distributions and verbatim tracing."""

    max_view_tokens = MAX_VIEW_TOKENS  # class defaults; a store's own values may be set after opening
    max_views = MAX_VIEWS
    max_view_bytes = MAX_VIEW_BYTES

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._index: InfgramIndex | None = None
        self._index_lock = threading.Lock()  # the plain index's sync only
        self._synced = -1
        self._views: OrderedDict = OrderedDict()  # (policy, tombstone version) -> InfgramIndex, LRU order
        self._building: dict = {}  # (policy, tombstone version) -> Future of the view being built
        self._views_lock = threading.Lock()  # the two dicts only: never held while building
        self._build_slots = threading.BoundedSemaphore(VIEW_BUILDS)

    @classmethod
    def open(cls, path: str | os.PathLike, load_index: bool = True, only_shards: set[int] | None = None,
             with_text: bool = True, lists: str | None = None, local_from: int | None = None) -> InfgramStore:
        store = super().open(path, load_index=load_index, only_shards=only_shards, with_text=with_text, lists=lists,
                             local_from=local_from)
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
        opt-out) keeps out is subtracted, exactly. The plain index is kept in sync with the
        tombstones (a version check per call); a policy's view is built once per (policy,
        tombstones), bounded and outside every lock other requests take (module docstring)."""
        if self._index is None:
            raise StoreError(f"store {self.path} was opened without its suffix arrays")
        self.maybe_reload_optouts()
        version = self.tombstone_version  # read before the tombstones: they are at least this new
        if policy is None or policy.is_open:
            if self._synced < version:
                with self._index_lock:
                    if self._synced < version:
                        self._index.set_removed(self.dead_docs)
                        self._synced = version
            return self._index
        key = (policy, version)
        with self._views_lock:
            view = self._views.get(key)
            if view is not None:
                self._views.move_to_end(key)
                return view
            pending = self._building.get(key)
            if pending is None:
                mine = self._building[key] = Future()
        if pending is not None:
            return pending.result()  # the same view is being built: wait for that one build
        try:
            kept = self.doc_mask(policy)
            self._index.check_view(kept, self.max_view_tokens)  # refused before waiting for a build slot
            with self._build_slots:
                view = self._index.view(kept, self.max_view_tokens)
        except BaseException as e:
            with self._views_lock:
                self._building.pop(key, None)
            mine.set_exception(e)
            raise
        with self._views_lock:
            self._building.pop(key, None)
            self._views[key] = view
            while self._views and (len(self._views) > self.max_views or
                                   sum(v.nbytes for v in self._views.values()) > self.max_view_bytes):
                self._views.popitem(last=False)  # dropped, never closed: a request may still hold it
        mine.set_result(view)
        return view

    def view_stats(self) -> dict:
        """Cached policy views: how many, their bytes, and builds in progress."""
        with self._views_lock:
            return {"views": len(self._views), "bytes": sum(v.nbytes for v in self._views.values()),
                    "building": len(self._building)}

    def close(self) -> None:
        with self._views_lock:
            self._views.clear()
        if self._index is not None:
            self._index.close()
        super().close()
