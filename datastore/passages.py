"""Passage store (RIC-LM, MassiveDS): fixed-length token passages, BM25 and dense retrieval.

A passage is a run of `passage_tokens` consecutive tokens of one document (the last one
of a document shorter); passages never overlap and never cross documents, so together
they cover every token of every document exactly once. The store has the token store's
format (`datastore.build`): `docs.parquet` from the same plan (same opt-out and exclusion
handling; `first_entry` is the document's first passage id), and per shard

    shards/NNNNN/entries.parquet   doc, position, end, value (-1), sentence, char_start, char_end
    shards/NNNNN/bm25/             bm25s index (npy + json; loaded with allow_pickle=False)
    shards/NNNNN/index.faiss       with "dense": passage embeddings (IDMap2 Flat IP, or IVF)

Passage ids are global and dense, in (document, position) order; a shard is a contiguous
document range. BM25 is In-Context RALM's (Lucene variant, k1 0.9, b 0.4, bm25s's word
tokenizer: lowercase, English stopwords). Every shard is scored with the statistics of
the *whole* store (passage count, document frequencies, average length), so a passage
scores the same whatever the sharding and the merged top-k is exactly one big index's.
Dense vectors: the LM's final hidden state (after its last norm) mean-pooled over the
passage, L2-normalised, inner product; or a local sentence-embedding folder (`embedder`).

Retrieval policy and opt-out tombstones are applied inside the search (`weight_mask` for
BM25, `IDSelectorBitmap` for FAISS) so the top-k is the exact top-k of what is allowed,
and results are post-filtered against the same bitmap. The build is resumable per shard
(temporary folder + rename) and writes the manifest last.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import bm25s
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from datastore.build import BuildArgs, DocTokens, _plan, attempt_folder, publish, start_build
from datastore.index import choose_factory, is_ivf, new_index, train_size
from datastore.lock import StoreLock
from datastore.manifest import (
    FingerprintMismatch,
    Manifest,
    ShardInfo,
    StoreError,
    model_fingerprint,
    tokenizer_fingerprint,
)
from datastore.policy import RetrievalPolicy
from datastore.store import Datastore
from silo.evaluate import pad_batch

RETRIEVERS = ("bm25", "dense")
BM25_PARAMS = {"k1": 0.9, "b": 0.4, "method": "lucene"}  # In-Context RALM's BM25
BM25_STOPWORDS = "en"
EMBED_CHUNK = 16384  # passages embedded per FAISS add
PASSAGE_COLUMNS = ("doc", "position", "end", "value", "sentence", "char_start", "char_end")


@dataclass
class PassageBuildArgs(BuildArgs):
    passage_tokens: int = 256
    retrievers: tuple[str, ...] = ("bm25",)
    embedder: str | None = None  # local sentence-embedding folder; None = the LM's hidden states


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
        from bm25s.scoring import (
            _build_idf_array,
            _build_scores_and_indices_for_matrix,
            _calculate_doc_freqs,
            _select_idf_scorer,
        )

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


# ---------------------------------------------------------------------------- embeddings


class Embedder:
    """Dense vectors for passages and queries: a final hidden state mean-pooled over the
    tokens (special tokens left out), L2-normalised. From the LM (`silo.keys`' "final"
    key: after the last norm), or from a local sentence-embedding folder."""

    def __init__(self, model, tok, from_lm: bool, batch_size: int = 8):
        self.model, self.tok, self.from_lm, self.batch_size = model, tok, from_lm, batch_size
        self.device = next(model.parameters()).device
        self.max_len = min(getattr(model.config, "max_position_embeddings", None) or 512,
                           getattr(tok, "model_max_length", None) or 10**9)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.special = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}

    @classmethod
    def load(cls, folder: str, batch_size: int = 8) -> Embedder:
        from transformers import AutoModel

        from silo.tokenizer import load_tokenizer

        if not (Path(folder) / "config.json").is_file():
            raise StoreError(f"embedder {folder}: not a model folder (no config.json)")
        if not list(Path(folder).glob("*.safetensors")):
            raise StoreError(f"embedder {folder}: no safetensors weights (pickled weights are never loaded)")
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        model.eval()
        return cls(model, load_tokenizer(folder), from_lm=False, batch_size=batch_size)

    @property
    def dim(self) -> int:
        return int(self.embed_ids([[self.tok.eos_token_id or 0]]).shape[1])

    @torch.no_grad()
    def embed_ids(self, seqs: list[list[int]]) -> np.ndarray:
        from silo.keys import capture_keys

        out = np.zeros((len(seqs), 0), dtype=np.float32)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for b in range(0, len(order), self.batch_size):
            rows = [list(seqs[i])[: self.max_len] or [self.pad] for i in order[b : b + self.batch_size]]
            ids, mask = pad_batch(rows, self.pad)
            pool = mask.clone()
            for s in self.special:  # pool over the text, unless a passage is nothing else
                pool &= (ids != s).long()
            pool = torch.where(pool.sum(1, keepdim=True) > 0, pool, mask)
            ids, mask, pool = ids.to(self.device), mask.to(self.device), pool.to(self.device)
            if self.from_lm:
                with capture_keys(self.model, "final") as box:
                    self.model(input_ids=ids, attention_mask=mask)
                hidden = box["keys"]
            else:
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            vec = (hidden.float() * pool[..., None]).sum(1) / pool.sum(1, keepdim=True).clamp(min=1)
            vec = torch.nn.functional.normalize(vec, dim=-1).cpu().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(seqs), vec.shape[1]), dtype=np.float32)
            out[order[b : b + self.batch_size]] = vec
        return out

    def encode(self, texts: list[str]) -> list[list[int]]:
        # The LM frames nothing (passages are embedded from their stored token ids, whose
        # specials are not pooled); a sentence embedder gets its own special tokens.
        # No `truncation=True`: it reconfigures the shared fast tokenizer (a Rust object that
        # raises "Already borrowed" when two threads do that at once); slicing is the same.
        out = []
        for t in texts:
            ids = self.tok(t, add_special_tokens=not self.from_lm)["input_ids"]
            if len(ids) > self.max_len:  # keep a sentence embedder's closing special token
                ids = ids[: self.max_len] if self.from_lm else ids[: self.max_len - 1] + ids[-1:]
            out.append(ids)
        return out

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.embed_ids(self.encode(texts))


# ---------------------------------------------------------------------------- build


def _spans(docs: DocTokens, d: int, text: str, p: int) -> dict[str, np.ndarray]:
    """The passages of document `d`: token range, sentence, character span (contiguous)."""
    n = int(docs.n_tokens[d])
    starts = np.arange(0, n, p, dtype=np.int64)
    ends = np.minimum(starts + p, n)
    chars = np.maximum.accumulate(np.clip(np.asarray(docs.chars[docs.offsets[d] : docs.offsets[d + 1]],
                                                     dtype=np.int64), 0, len(text)))
    char_start = np.where(starts == 0, 0, chars[np.minimum(starts, n - 1)])
    char_end = np.append(char_start[1:], len(text))
    return {"doc": np.full(len(starts), d), "position": starts, "end": ends, "value": np.full(len(starts), -1),
            "sentence": docs.sentences(d)[starts], "char_start": char_start, "char_end": char_end}


def _shard_passages(docs: DocTokens, texts: pa.ChunkedArray, doc_range: tuple[int, int], p: int):
    """Columns of a document range's passages, and their texts."""
    parts, ptexts = [], []
    for d in range(*doc_range):
        text = texts[d].as_py()
        sp = _spans(docs, d, text, p)
        parts.append(sp)
        ptexts.extend(text[a:b] for a, b in zip(sp["char_start"], sp["char_end"], strict=True))
    cols = {c: np.concatenate([sp[c] for sp in parts]).astype(np.int32) for c in PASSAGE_COLUMNS}
    return cols, ptexts


def bm25_statistics(text_batches) -> dict:
    """Passage count, document frequency per term and average length (in BM25 tokens) over
    every passage of a store, given as batches of texts ('' for a removed passage)."""
    df: Counter[str] = Counter()
    n = total = 0
    for batch in text_batches:
        for toks in bm25_tokens(batch):
            df.update(set(toks))
            total += len(toks)
            n += 1
    return {"passages": n, "avg_len": total / n if total else 1.0, "df": dict(df)}


def write_bm25(texts: list[str], stats: dict, folder: Path) -> None:
    """One shard's BM25 index over `texts`, scored with the store-wide `stats`, saved by
    bm25s (npy arrays without pickle + json). Compaction can rebuild a shard with this,
    giving removed passages '' (no postings, and their words leave the vocabulary)."""
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(t, len(vocab)) for t in q] for q in bm25_tokens(texts)]
    bm = _StoreStatsBM25(stats["passages"], stats["avg_len"], stats["df"], vocab, **BM25_PARAMS)
    bm.index((ids, vocab), create_empty_token=False, show_progress=False)
    bm.save(folder, show_progress=False)


def _bm25_stats(docs: DocTokens, texts: pa.ChunkedArray, p: int, progress: bool) -> dict:
    n_docs, chunk = len(docs.n_tokens), 256
    return bm25_statistics(_shard_passages(docs, texts, (a, min(a + chunk, n_docs)), p)[1]
                           for a in tqdm(range(0, n_docs, chunk), desc="bm25: statistics", disable=not progress))


def _write_shard(args: PassageBuildArgs, docs: DocTokens, texts: pa.ChunkedArray, shard_no: int,
                 doc_range: tuple[int, int], first: int, stats: dict | None, embedder: Embedder | None,
                 trained: faiss.Index | None, factory: str, out: Path) -> ShardInfo:
    name = f"{shard_no:05d}"
    final = out / "shards" / name
    tmp = attempt_folder(out, name)
    cols, ptexts = _shard_passages(docs, texts, doc_range, args.passage_tokens)
    n = len(ptexts)
    if stats is not None:
        write_bm25(ptexts, stats, tmp / "bm25")
    if embedder is not None:
        index = faiss.clone_index(trained)
        for lo in range(0, n, EMBED_CHUNK):  # bounded memory: embed and add a chunk at a time
            hi = min(lo + EMBED_CHUNK, n)
            if embedder.from_lm:
                vecs = embedder.embed_ids([docs.ids(int(cols["doc"][i]))[cols["position"][i] : cols["end"][i]].tolist()
                                           for i in range(lo, hi)])
            else:
                vecs = embedder.embed_texts(ptexts[lo:hi])
            index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), first + np.arange(lo, hi, dtype=np.int64))
        assert index.ntotal == n, (index.ntotal, n)
        faiss.write_index(index, str(tmp / "index.faiss"))
    pq.write_table(pa.table(cols), tmp / "entries.parquet", compression="zstd")
    info = ShardInfo(name=name, first_entry=first, entries=n, documents=doc_range[1] - doc_range[0],
                     index=factory if embedder is not None else "bm25")
    (tmp / "shard.json").write_text(json.dumps(asdict(info)))
    publish(tmp, final)
    return info


def _check_args(args: PassageBuildArgs) -> None:
    retrievers = tuple(args.retrievers)
    bad = [r for r in retrievers if r not in RETRIEVERS]
    if bad or not retrievers or len(set(retrievers)) != len(retrievers):
        raise StoreError(f"retrievers must be one or both of {', '.join(RETRIEVERS)}, got {','.join(retrievers) or 'none'}")
    if args.passage_tokens < 1:
        raise StoreError(f"passage_tokens must be positive, got {args.passage_tokens}")
    if args.embedder and "dense" not in retrievers:
        raise StoreError("an embedder is only used by the dense retriever: add 'dense' to the retrievers")
    if args.backend != "local":
        raise StoreError("passage stores are built in this process; --backend ray builds token stores")


def build_passage_store(args: PassageBuildArgs) -> Manifest:
    """`silo datastore build --kind passage`: resumable; returns the manifest written
    (holding the output folder's lock, like a token-store build)."""
    with StoreLock(args.out, "build"):
        return _build_passage_store(args)


def _build_passage_store(args: PassageBuildArgs) -> Manifest:
    from silo.lm import load_causal_lm
    from silo.tokenizer import load_tokenizer

    _check_args(args)
    args.retrievers = tuple(args.retrievers)
    out, t0 = Path(args.out), time.perf_counter()
    build = start_build(args, out)

    dense = "dense" in args.retrievers
    embedder = None
    if dense and args.embedder:
        tok = load_tokenizer(args.model)
        embedder = Embedder.load(args.embedder, args.batch_size)
    elif dense:
        model, tok = load_causal_lm(args.model)
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and args.passage_tokens > max_pos:
            raise StoreError(f"passage_tokens {args.passage_tokens} is longer than the model's context ({max_pos})")
        embedder = Embedder(model, tok, from_lm=True, batch_size=args.batch_size)
    else:
        tok = load_tokenizer(args.model)
    torch.manual_seed(args.seed)

    plan = json.loads((build / "plan.json").read_text()) if (build / "plan.json").is_file() else \
        _plan(args, tok, build, out)
    p = args.passage_tokens
    n_tokens = pq.read_table(out / "docs.parquet", columns=["n_tokens"]).column("n_tokens").to_numpy()
    per_doc = -(-n_tokens.astype(np.int64) // p)
    first = np.concatenate([[0], np.cumsum(per_doc)])
    if not (build / "passages.json").is_file():  # docs.parquet: first_entry = first passage id
        table = pq.read_table(out / "docs.parquet")
        table = table.set_column(table.schema.get_field_index("first_entry"), "first_entry",
                                 pa.array(first[:-1], pa.int64()))
        pq.write_table(table, out / "docs.parquet.tmp", compression="zstd")
        os.replace(out / "docs.parquet.tmp", out / "docs.parquet")
        (build / "passages.json").write_text(json.dumps({"passages": int(first[-1])}))
    n_passages = int(first[-1])
    docs = DocTokens(build, out)
    texts = pq.read_table(out / "docs.parquet", columns=["text"]).column("text")

    stats = None
    if "bm25" in args.retrievers:
        stats_path = build / "bm25_stats.json"
        if stats_path.is_file():
            stats = json.loads(stats_path.read_text())
        else:
            stats = _bm25_stats(docs, texts, p, args.progress)
            stats_path.with_suffix(".tmp").write_text(json.dumps(stats))
            os.replace(stats_path.with_suffix(".tmp"), stats_path)

    dim, factory, trained = 0, "bm25", None
    if embedder is not None:
        dim = embedder.dim
        factory = args.factory or choose_factory(n_passages, dim, args.memory_budget, metric="ip")
        trained_path = build / "trained.faiss"
        if trained_path.is_file():
            trained = faiss.read_index(str(trained_path))
        else:
            trained = new_index(factory, dim, metric="ip")
            if is_ivf(trained):
                n_train = train_size(factory, n_passages)
                rng = np.random.default_rng(args.seed)
                sample, have = [], 0
                for d in rng.permutation(plan["documents"]):  # a random spread of documents
                    sample.append(int(d))
                    have += int(per_doc[d])
                    if have >= n_train:
                        break
                vecs = []
                for d in sorted(sample):
                    cols, ptexts = _shard_passages(docs, texts, (d, d + 1), p)
                    vecs.append(embedder.embed_ids([docs.ids(d)[a:b].tolist() for a, b in
                                                    zip(cols["position"], cols["end"], strict=True)])
                                if embedder.from_lm else embedder.embed_texts(ptexts))
                vecs = np.concatenate(vecs)
                trained.train(vecs[rng.permutation(len(vecs))[:n_train]])
            faiss.write_index(trained, str(trained_path) + ".tmp")
            os.replace(str(trained_path) + ".tmp", trained_path)

    infos = []
    for s, (a, b) in enumerate(tqdm(plan["doc_ranges"], desc="shards", disable=not args.progress)):
        shard_json = out / "shards" / f"{s:05d}" / "shard.json"
        if shard_json.is_file():  # finished by an earlier run
            infos.append(ShardInfo(**json.loads(shard_json.read_text())))
        else:
            infos.append(_write_shard(args, docs, texts, s, (a, b), int(first[a]), stats, embedder, trained,
                                      factory, out))
    assert sum(i.entries for i in infos) == n_passages, (infos, n_passages)

    build_info = {"factory": factory, "skipped_optout": plan["skipped_optout"],
                  "seconds": round(time.perf_counter() - t0, 1), "excluded_doc_ids": len(args.exclude_doc_ids),
                  "tokens": plan["tokens"]}
    if stats is not None:
        build_info["bm25"] = {**BM25_PARAMS, "stopwords": BM25_STOPWORDS, "passages": stats["passages"],
                              "avg_len": stats["avg_len"], "library": f"bm25s {bm25s.__version__}"}
    if dense:
        build_info["embedder"] = str(Path(args.embedder).resolve()) if args.embedder else None
        build_info["embedder_fingerprint"] = model_fingerprint(args.embedder) if args.embedder else None
    manifest = Manifest(
        kind="passage", model=str(Path(args.model).resolve()), model_fingerprint=model_fingerprint(args.model),
        tokenizer_fingerprint=tokenizer_fingerprint(args.model), dim=dim,
        metric="ip" if dense else "bm25", key_type=None, shards=infos, corpus=str(Path(args.corpus).resolve()),
        tiers=list(args.tiers), split=args.split, documents=plan["documents"], entries=n_passages,
        passage_tokens=p, retrievers=list(args.retrievers), build=build_info,
    )
    manifest.save(out)
    shutil.rmtree(build, ignore_errors=True)
    return manifest


# ---------------------------------------------------------------------------- search


class PassageStore(Datastore):
    """A passage store opened for text search (BM25 or dense), passage text and attribution."""

    def __init__(self, path, manifest: Manifest, shards, docs):
        super().__init__(path, manifest, shards, docs)
        self.bm25: list[bm25s.BM25 | None] = [None] * len(shards)
        self._text = docs.column("text")
        self._embedder: Embedder | None = None
        self._checked_models: set[str] = set()
        self._bits: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, load_index: bool = True,
             only_shards: set[int] | None = None) -> PassageStore:
        manifest = Manifest.load(path)
        if manifest.kind != "passage":
            raise StoreError(f"{path} is a {manifest.kind} store, not a passage store")
        store = super().open(path, load_index=load_index, only_shards=only_shards)
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
        return store

    # ------------------------------------------------------------------ metadata

    def passages(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """PASSAGE_COLUMNS for global ids (any shape); -1 ids (and compacted ones) give -1."""
        return self.entries(ids, PASSAGE_COLUMNS)

    def passage_text(self, ids) -> list[str]:
        """The text of each passage (its character span of the document); '' for -1."""
        ent = self.passages(np.asarray(ids, dtype=np.int64).ravel())
        out = []
        for d, a, b in zip(ent["doc"], ent["char_start"], ent["char_end"], strict=True):
            out.append(self._text[int(d)].as_py()[a:b] if d >= 0 and a >= 0 else "")
        return out

    def attribute(self, ids: np.ndarray, scores: np.ndarray | None = None) -> list[dict]:
        """The base attribution (doc, source, license, sentence of the first token) plus the
        passage: its text and token / character span."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        hits = super().attribute(ids, scores)
        live = ids[ids >= 0]
        ent = self.passages(live)
        for h, text, j in zip(hits, self.passage_text(live), range(len(live)), strict=True):
            h.update(passage=text, end=int(ent["end"][j]), char_start=int(ent["char_start"][j]),
                     char_end=int(ent["char_end"][j]))
        return hits

    # ------------------------------------------------------------------ search

    def search_text(self, queries: list[str], k: int, policy: RetrievalPolicy | None = None,
                    retriever: str = "bm25", model=None, tok=None,
                    nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages per query text: (scores (n, k) float32, ids (n, k) int64), best
        first, -inf / -1 where fewer. An empty query (no words) has no hits."""
        if retriever not in RETRIEVERS:
            raise ValueError(f"unknown retriever {retriever!r}; expected one of {', '.join(RETRIEVERS)}")
        if retriever not in self.manifest.retrievers:
            raise StoreError(f"store {self.path} was built without the {retriever} retriever "
                             f"(it has {', '.join(self.manifest.retrievers)})")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings")
        queries = list(queries)
        if retriever == "dense":
            return self._search_dense(queries, k, policy, model, tok, nprobe)
        if any(b is None for b in self.bm25):
            raise StoreError(f"store {self.path} was opened without its BM25 indexes")
        self.maybe_reload_optouts()
        allowed = self.allowed_bitmap(policy)
        bits = self._unpacked(allowed)
        tokens = bm25_tokens(queries)
        jobs = [self._pool.submit(self._bm25_shard, no, tokens, k, bits) for no in range(len(self.shards))]
        results = [j.result() for j in jobs]
        nq = len(queries)
        if not results or nq == 0:
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

    def _unpacked(self, allowed: np.ndarray | None) -> np.ndarray | None:
        """The packed allowed-bitmap as booleans (kept while the base class keeps the bitmap)."""
        if allowed is None:
            return None
        cached = self._bits
        if cached is None or cached[0] is not allowed:
            cached = (allowed, np.unpackbits(allowed, bitorder="little")[: self.n_entries].astype(bool))
            self._bits = cached
        return cached[1]

    def _bm25_shard(self, no: int, tokens: list[list[str]], k: int,
                    bits: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
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
            s = bm.get_scores(q, weight_mask=mask)  # policy + tombstones inside the scoring
            top = _top_k(s, kk)
            scores[qi, : len(top)] = s[top]
            ids[qi, : len(top)] = first + top
        return scores, ids

    def _query_embedder(self, model, tok) -> Embedder:
        folder = self.manifest.build.get("embedder")
        if folder:
            if self._embedder is None:
                fp = model_fingerprint(folder) if Path(folder).is_dir() else None
                if fp != self.manifest.build.get("embedder_fingerprint"):
                    raise FingerprintMismatch(f"store {self.path} was built with embedder {folder} "
                                              f"(fingerprint {self.manifest.build.get('embedder_fingerprint')}); "
                                              f"that folder now has fingerprint {fp}. Rebuild the store.")
                self._embedder = Embedder.load(folder)
            return self._embedder
        if model is None or tok is None:
            raise ValueError("dense retrieval in this store embeds queries with its LM: pass model and tok")
        where = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if where and (Path(where) / "config.json").is_file():
            if where not in self._checked_models:
                self.check_model(where)
                self._checked_models.add(where)
        elif getattr(model.config, "hidden_size", self.manifest.dim) != self.manifest.dim:
            raise FingerprintMismatch(f"store {self.path} holds {self.manifest.dim}-d embeddings of "
                                      f"{self.manifest.model}; this model has hidden size {model.config.hidden_size}")
        return Embedder(model, tok, from_lm=True)

    def _search_dense(self, queries: list[str], k: int, policy, model, tok, nprobe):
        emb = self._query_embedder(model, tok)
        nq = len(queries)
        if nq == 0:
            return np.full((0, k), -np.inf, np.float32), np.full((0, k), -1, np.int64)
        seqs = emb.encode(queries)
        empty = np.array([not q.strip() or not s for q, s in zip(queries, seqs, strict=True)])
        dist, ids = self.search(emb.embed_ids(seqs), k, nprobe=nprobe, policy=policy)
        dist = np.where(empty[:, None] | (ids < 0), -np.inf, dist).astype(np.float32)
        return dist, np.where(empty[:, None], -1, ids)
