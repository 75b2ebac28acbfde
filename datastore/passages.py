"""Passage stores (RIC-LM, MassiveDS): BM25 and dense search over fixed-length passages.

A passage is a run of consecutive tokens of one document (the embedder on the `silo/`
side decides the length); passages never overlap and never cross documents. Entry
columns per passage: doc, position, end (token range), sentence, char_start, char_end —
the passage's text is its character span of the document, read on demand. Per shard
there is also a BM25 index (`bm25/`, bm25s's npy + json files, loaded with
allow_pickle=False and memory-mapped) and, with the dense retriever, `index.faiss`.

BM25 is In-Context RALM's (Lucene variant, k1 0.9, b 0.4, bm25s's word tokenizer:
lowercase, English stopwords). Every shard is scored with the statistics of the *whole*
store (passage count, document frequencies, average length), so a passage scores the
same whatever the sharding and the merged top-k is exactly one big index's; compaction
therefore re-indexes every shard, with statistics that leave removed passages out.

Between an opt-out and the compaction, the removed passages must not shape scores either
(through idf or the average length; that would also leak that their words existed). So
each shard's BM25 folder also keeps the term frequencies (`tf_*.npy`, the same postings
as bm25s's score matrix) and passage lengths (`lengths.npy`): while passages are
tombstoned but still in the files, the query's terms are scored exactly with the live
statistics — passages, document frequencies and total length minus the removed passages'
(read from those postings, so it costs what scoring costs). The store-wide statistics the
files were written with are in the manifest (`build.bm25`). Stores written before these
files existed keep their build statistics until their next compaction. Live ingest adds
a shard written with its own statistics and marks the store's `stale` (`build.bm25`):
every query is then scored the same exact way, with the statistics of every shard, until
a compaction re-indexes them all. Dense search takes query vectors from the caller's
embedder (`embed`), since the engine knows no model.

A store built with both retrievers can also be searched `hybrid`: BM25's and the dense
index's top lists (each `HYBRID_DEPTH` x k deep) fused by reciprocal rank (Cormack et
al., 2009: a passage scores Σ 1 / (RRF_K + rank) over the lists it is in), which needs no
calibration between BM25 scores and inner products.

Retrieval policy and opt-out tombstones are applied inside the search (`weight_mask` for
BM25, `IDSelectorBitmap` for FAISS) so the top-k is the exact top-k of what is allowed,
and results are post-filtered against the same bitmap.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import bm25s
import numpy as np
from bm25s.scoring import (
    _build_idf_array,
    _build_scores_and_indices_for_matrix,
    _calculate_doc_freqs,
    _select_idf_scorer,
)
from silo.datastore.errors import StoreError
from silo.datastore.manifest import Manifest
from silo.datastore.policy import RetrievalPolicy
from silo.datastore.store import Datastore

RETRIEVERS = ("bm25", "dense")  # what a store is built with
SEARCH_RETRIEVERS = (*RETRIEVERS, "hybrid")  # what a search may ask for (hybrid: both, fused)
RRF_K = 60
HYBRID_DEPTH = 2
BM25_PARAMS = {"k1": 0.9, "b": 0.4, "method": "lucene"}  # In-Context RALM's BM25
BM25_STOPWORDS = "en"
PASSAGE_COLUMNS = ("doc", "position", "end", "sentence", "char_start", "char_end")


def retrievers_needed(retriever: str) -> tuple[str, ...]:
    """The built retrievers a search retriever needs (hybrid: both)."""
    return RETRIEVERS if retriever == "hybrid" else (retriever,)


def reciprocal_rank_fusion(lists: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ranked id lists ((n, d) each, best first, -1 = none) into the top-k by
    Σ 1 / (RRF_K + rank): (scores (n, k) float32, ids (n, k) int64), -inf / -1 where fewer;
    ties go to the smaller id."""
    assert lists and all(x.ndim == 2 and x.shape[0] == lists[0].shape[0] for x in lists), [x.shape for x in lists]
    n = lists[0].shape[0]
    scores, ids = np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
    for q in range(n):
        fused: dict[int, float] = {}
        for ranked in lists:
            for rank, i in enumerate(int(x) for x in ranked[q]):
                if i >= 0:
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
        top = sorted(fused.items(), key=lambda t: (-t[1], t[0]))[:k]
        for j, (i, sc) in enumerate(top):
            ids[q, j], scores[q, j] = i, sc
    return scores, ids


# ---------------------------------------------------------------------------- BM25


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    """bm25s's word tokenizer (lowercase, English stopwords), the same at build and query time."""
    if not texts:
        return []
    toks = bm25s.tokenize(list(texts), lower=True, stopwords=BM25_STOPWORDS, return_ids=False,
                          show_progress=False)
    return [[t for t in q if t] for q in toks]


class _StoreStatsBM25(bm25s.BM25):
    """`bm25s.BM25` whose idf and average passage length are the whole store's, not one
    shard's: only `build_index_from_ids` (bm25s's documented override point) changes, and
    it uses bm25s's own idf / term-frequency scorers."""

    def __init__(self, n_docs: int, avg_len: float, df: dict[str, int], vocab: dict[str, int], **params):
        super().__init__(**params)
        self._store = (n_docs, avg_len, df, vocab)

    def build_index_from_ids(self, unique_token_ids, corpus_token_ids, show_progress=True,
                             leave_progress=False):
        n_docs, avg_len, df, vocab = self._store
        token_of = {i: t for t, i in vocab.items()}
        local_df = _calculate_doc_freqs(corpus_token_ids, unique_token_ids, show_progress=False)
        idf = _build_idf_array({i: df[token_of[i]] for i in unique_token_ids}, n_docs=n_docs,
                               compute_idf_fn=_select_idf_scorer(self.idf_method), dtype=self.dtype)
        self.nonoccurrence_array = None
        scores, rows, cols = _build_scores_and_indices_for_matrix(
            corpus_token_ids=corpus_token_ids, idf_array=idf, avg_doc_len=avg_len, doc_frequencies=local_df,
            k1=self.k1, b=self.b, delta=self.delta, nonoccurrence_array=None, method=self.method,
            dtype=self.dtype, int_dtype=self.int_dtype, show_progress=False)
        data, indices, indptr = self._np_csc(data=scores, rows=rows, cols=cols,
                                             shape=(len(corpus_token_ids), len(unique_token_ids)))
        return {"data": data.astype(self.dtype), "indices": indices, "indptr": indptr,
                "num_docs": len(corpus_token_ids)}


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best positive scores, best first; ties go to the lower index, so
    the answer does not depend on how a store is sharded."""
    pos = np.flatnonzero(scores > 0)
    if len(pos) > k:
        s = scores[pos]
        kth = np.partition(s, len(s) - k)[len(s) - k]
        above = pos[s > kth]
        pos = np.concatenate([above, pos[s == kth][: k - len(above)]])
    return pos[np.lexsort((pos, -scores[pos]))]


def bm25_statistics(text_batches) -> dict:
    """Passage count, document frequency per term and average length (in BM25 tokens) over
    every passage of a store, given as batches of texts (None for a removed passage, which
    does not count)."""
    df: Counter[str] = Counter()
    n = total = 0
    for batch in text_batches:
        for toks in bm25_tokens([t for t in batch if t is not None]):
            df.update(set(toks))
            total += len(toks)
            n += 1
    return {"passages": n, "avg_len": total / n if total else 1.0, "df": dict(df)}


TF_FILES = ("tf_indptr", "tf_indices", "tf_data", "lengths")


def write_bm25(texts: list[str | None], stats: dict, folder: Path) -> None:
    """One shard's BM25 index over `texts`, scored with the store-wide `stats`, saved by
    bm25s (npy arrays without pickle + json), with its term frequencies and passage
    lengths beside it. Compaction rebuilds a shard with this, giving removed passages None
    (no postings, and their words leave the vocabulary)."""
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(t, len(vocab)) for t in q] for q in bm25_tokens(["" if t is None else t for t in texts])]
    bm = _StoreStatsBM25(stats["passages"], stats["avg_len"], stats["df"], vocab, **BM25_PARAMS)
    bm.index((ids, vocab), create_empty_token=False, show_progress=False)
    bm.save(folder, show_progress=False)
    n = len(ids)
    lengths = np.array([len(q) for q in ids], dtype=np.int64)
    cols = np.concatenate([np.asarray(q, dtype=np.int64) for q in ids]) if lengths.sum() else np.zeros(0, np.int64)
    keys, tf = np.unique(cols * max(n, 1) + np.repeat(np.arange(n), lengths), return_counts=True)
    term, row = keys // max(n, 1), keys % max(n, 1)
    arrays = {"tf_indptr": np.searchsorted(term, np.arange(len(vocab) + 1)).astype(np.int64),
              "tf_indices": row.astype(np.int32), "tf_data": tf.astype(np.int32), "lengths": lengths.astype(np.int32)}
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr)


def passage_texts(store: Datastore, dead_docs: np.ndarray | None = None) -> list[list[str | None]]:
    """Every shard's passage texts, None for passages of `dead_docs` or compacted ones (for
    BM25 re-indexing)."""
    out = []
    for s in store.shards:
        cols = {c: np.asarray(s.columns[c]) for c in ("doc", "char_start", "char_end")}
        texts, cache = [], {}
        for d, a, b in zip(cols["doc"], cols["char_start"], cols["char_end"], strict=True):
            if d < 0 or a < 0 or (dead_docs is not None and dead_docs[d]):
                texts.append(None)
                continue
            if d not in cache:
                cache.clear()
                cache[d] = store.doc_text(int(d))
            texts.append(cache[d][a:b])
        out.append(texts)
    return out


class PassageStore(Datastore):
    """A passage store opened for text search (BM25 or dense), passage text and attribution."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bm25: list[bm25s.BM25 | None] = [None] * len(self.shards)
        self.bm25_tf: list[dict[str, np.ndarray] | None] = [None] * len(self.shards)  # TF_FILES, mapped
        self._bits: tuple[np.ndarray, np.ndarray] | None = None
        self._gone: tuple[int, np.ndarray, int, int] | None = None  # (version, passages, count, length)

    @classmethod
    def open(cls, path: str | os.PathLike, load_index: bool = True, only_shards: set[int] | None = None,
             with_text: bool = True, lists: str | None = None, local_from: int | None = None) -> PassageStore:
        manifest = Manifest.load(path)
        if manifest.kind != "passage":
            raise StoreError(f"{path} is a {manifest.kind} store, not a passage store")
        store = super().open(path, load_index=load_index, only_shards=only_shards, with_text=with_text, lists=lists,
                             local_from=local_from)
        if load_index and "bm25" in manifest.retrievers:
            for no, shard in enumerate(store.shards):
                if only_shards is not None and no not in only_shards:
                    continue
                d = shard.path / "bm25"
                try:
                    bm = bm25s.BM25.load(str(d), allow_pickle=False, mmap=True, show_progress=False)
                except (OSError, ValueError, KeyError) as e:
                    raise StoreError(f"{d}: unreadable BM25 index ({e})") from e
                if bm.scores["num_docs"] != shard.info.entries:
                    raise StoreError(f"{d}: BM25 index has {bm.scores['num_docs']} passages, "
                                     f"manifest says {shard.info.entries}")
                store.bm25[no] = bm
                if all((d / f"{f}.npy").is_file() for f in TF_FILES):
                    store.bm25_tf[no] = {f: np.load(d / f"{f}.npy", mmap_mode="r", allow_pickle=False)
                                         for f in TF_FILES}
        return store

    # ------------------------------------------------------------------ metadata

    def passages(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """PASSAGE_COLUMNS for global ids (any shape); -1 ids (and compacted ones) give -1."""
        return self.entries(ids, PASSAGE_COLUMNS)

    def passage_text(self, ids) -> list[str]:
        """The text of each passage (its character span of the document); '' for -1."""
        ent = self.passages(np.asarray(ids, dtype=np.int64).ravel())
        return [self.docs.text_slice(int(d), int(a), int(b)) if d >= 0 and a >= 0 else ""
                for d, a, b in zip(ent["doc"], ent["char_start"], ent["char_end"], strict=True)]

    def attribute(self, ids: np.ndarray, scores: np.ndarray | None = None) -> list[dict]:
        """The base attribution (doc, source, license, sentence of the first token) plus the
        passage: its text and token / character span."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        hits = super().attribute(ids, scores)
        live = ids[(ids >= 0) & (self.entries(ids, ("doc",))["doc"] >= 0)]
        ent = self.passages(live)
        for h, text, j in zip(hits, self.passage_text(live), range(len(live)), strict=True):
            h.update(passage=text, end=int(ent["end"][j]), char_start=int(ent["char_start"][j]),
                     char_end=int(ent["char_end"][j]))
        return hits

    # ------------------------------------------------------------------ search

    def search_text(self, queries: list[str], k: int, policy: RetrievalPolicy | None = None,
                    retriever: str = "bm25", embed: Callable[[list[str]], np.ndarray] | None = None,
                    nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages per query text: (scores (n, k) float32, ids (n, k) int64), best
        first, -inf / -1 where fewer. An empty query (no words) has no hits. Dense search
        embeds the queries with `embed` (texts -> (n, dim) float32, the store's embedder)."""
        if retriever not in SEARCH_RETRIEVERS:
            raise ValueError(f"unknown retriever {retriever!r}; expected one of {', '.join(SEARCH_RETRIEVERS)}")
        needs = retrievers_needed(retriever)
        if any(r not in self.manifest.retrievers for r in needs):
            raise StoreError(f"store {self.path} was built without the {' and '.join(needs)} retriever"
                             f"{'s' if len(needs) > 1 else ''} (it has {', '.join(self.manifest.retrievers)})")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings")
        queries = list(queries)
        nq = len(queries)
        if nq == 0:
            return np.full((0, k), -np.inf, np.float32), np.full((0, k), -1, np.int64)
        if retriever == "hybrid":
            depth = HYBRID_DEPTH * k
            lists = [self.search_text(queries, depth, policy, r, embed, nprobe)[1] for r in RETRIEVERS]
            return reciprocal_rank_fusion(lists, k)
        if retriever == "dense":
            if embed is None:
                raise ValueError("dense retrieval needs the store's embedder (embed=)")
            empty = np.array([not q.strip() for q in queries])
            dist, ids = self.search(np.asarray(embed(queries), dtype=np.float32), k, nprobe=nprobe, policy=policy)
            dist = np.where(empty[:, None] | (ids < 0), -np.inf, dist).astype(np.float32)
            return dist, np.where(empty[:, None], -1, ids)
        if any(b is None for b in self.bm25):
            raise StoreError(f"store {self.path} was opened without its BM25 indexes")
        self.maybe_reload_optouts()
        allowed = self.allowed_bitmap(policy)
        bits = self._unpacked(allowed)
        tokens = bm25_tokens(queries)
        live = self._live_idf(tokens)
        results = [self._bm25_shard(no, tokens, k, bits, live) for no in range(len(self.shards))]
        if not results:
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        scores = np.concatenate([r[0] for r in results], axis=1)
        ids = np.concatenate([r[1] for r in results], axis=1)
        bad = ids < 0
        if bits is not None:  # post-filter: never trust the in-search mask alone
            bad |= ~bits[np.where(bad, 0, ids)]
        scores = np.where(bad, -np.inf, scores).astype(np.float32)
        ids = np.where(bad, -1, ids)
        order = np.lexsort((np.where(bad, np.iinfo(np.int64).max, ids), -scores), axis=1)[:, :k]
        scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores, ids

    def default_retriever(self) -> str:
        """What a search that names no retriever uses: BM25 if the store has it, else dense."""
        return "bm25" if "bm25" in self.manifest.retrievers else "dense"

    def _unpacked(self, allowed: np.ndarray | None) -> np.ndarray | None:
        """The packed allowed-bitmap as booleans (kept while the base class keeps the bitmap)."""
        if allowed is None:
            return None
        cached = self._bits
        if cached is None or cached[0] is not allowed:
            cached = (allowed, np.unpackbits(allowed, bitorder="little")[: self.n_entries].astype(bool))
            self._bits = cached
        return cached[1]

    def _removed_passages(self) -> tuple[np.ndarray, int, int] | None:
        """Passages tombstoned but still in the files (bool over entries), their count and
        BM25 length; None if there are none, or the files lack term frequencies."""
        version = self.tombstone_version
        cached = self._gone
        if cached is None or cached[0] != version:
            pending = self.dead_docs & ~self.docs.removed
            gone = np.repeat(pending, self.entries_per_doc)
            length = 0
            if gone.any() and all(tf is not None for tf in self.bm25_tf):
                for s, tf in zip(self.shards, self.bm25_tf, strict=True):
                    a = s.info.first_entry
                    length += int(np.asarray(tf["lengths"])[gone[a : a + s.info.entries]].sum())
            cached = (version, gone, int(gone.sum()), length)
            self._gone = cached
        if not cached[2] or any(tf is None for tf in self.bm25_tf):
            return None
        return cached[1], cached[2], cached[3]

    def _live_idf(self, tokens: list[list[str]]) -> dict | None:
        """Live statistics for the query terms (idf per term, average length), or None when
        the files' statistics are the live ones."""
        removed = self._removed_passages()
        stats = self.manifest.build.get("bm25") or {}
        if "passages" not in stats or (removed is None and not stats.get("stale")):
            return None
        if removed is None:  # live ingest: the shards' files carry older statistics
            if any(tf is None for tf in self.bm25_tf):
                return None
            removed = (np.zeros(self.n_entries, bool), 0, 0)
        gone, n_gone, len_gone = removed
        n_files = int(stats["passages"])
        total = round(n_files * float(stats["avg_len"])) - len_gone
        n = n_files - n_gone
        idf = {}
        for t in {t for q in tokens for t in q}:
            df = 0
            for s, bm, tf in zip(self.shards, self.bm25, self.bm25_tf, strict=True):
                j = bm.vocab_dict.get(t)
                if j is not None:
                    lo, hi = int(tf["tf_indptr"][j]), int(tf["tf_indptr"][j + 1])
                    rows = np.asarray(tf["tf_indices"][lo:hi]) + s.info.first_entry
                    df += hi - lo - int(gone[rows].sum())
            idf[t] = math.log(1 + (n - df + 0.5) / (df + 0.5))
        return {"idf": idf, "avg_len": total / n if total > 0 and n > 0 else 1.0}

    def _exact_scores(self, no: int, q: list[str], live: dict) -> np.ndarray:
        """BM25 (Lucene) of every passage of shard `no` for query terms `q`, with live statistics."""
        tf, vocab = self.bm25_tf[no], self.bm25[no].vocab_dict
        k1, b = BM25_PARAMS["k1"], BM25_PARAMS["b"]
        scores = np.zeros(self.shards[no].info.entries, dtype=np.float64)
        for t in q:  # a repeated word counts again, as in bm25s
            j = vocab[t]
            lo, hi = int(tf["tf_indptr"][j]), int(tf["tf_indptr"][j + 1])
            rows = np.asarray(tf["tf_indices"][lo:hi])
            f = np.asarray(tf["tf_data"][lo:hi], dtype=np.float64)
            norm = k1 * ((1 - b) + b * np.asarray(tf["lengths"])[rows] / live["avg_len"])
            scores[rows] += live["idf"][t] * f / (f + norm)
        return scores.astype(np.float32)

    def _bm25_shard(self, no: int, tokens: list[list[str]], k: int,
                    bits: np.ndarray | None, live: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        shard, bm = self.shards[no], self.bm25[no]
        first, n = shard.info.first_entry, shard.info.entries
        kk = min(k, n)
        scores = np.full((len(tokens), kk), -np.inf, np.float32)
        ids = np.full((len(tokens), kk), -1, np.int64)
        mask = None if bits is None else bits[first : first + n].astype(np.float32)
        if kk == 0 or (mask is not None and not mask.any()):
            return scores, ids
        vocab = bm.vocab_dict
        for qi, q in enumerate(tokens):
            q = [t for t in q if t in vocab]
            if not q:  # no word of the query occurs in this shard
                continue
            if live is not None:  # passages tombstoned, not yet compacted: the live statistics
                s = self._exact_scores(no, q, live) * (1 if mask is None else mask)
            else:
                s = bm.get_scores(q, weight_mask=mask)  # policy + tombstones inside the scoring
            top = _top_k(s, kk)
            scores[qi, : len(top)] = s[top]
            ids[qi, : len(top)] = first + top
        return scores, ids
