"""Building stores from a corpus with an LM: plan -> train the index -> shard jobs -> manifest.

This is the LM side of a store: it tokenizes, runs the model and embeds; the storage
engine (`silo.datastore.writer.StoreWriter`) receives arrays and metadata and writes them. The
same shard job serves a local build, worker processes and Ray (`silo.parallel`), and live
ingest (`silo.ingest`).

1. plan: the chosen documents (tiers, split, minus opted-out and excluded ones) are
   tokenized once. "Opted out" is what the corpus's removal ledger (`silo.datastore.ledger`,
   `CORPUS/removals.log` unless `ledger` names another; created by the first build) and
   the output folder's own log remove — by id, owner, source, span, or as a copy of removed
   text (its content fingerprint), each refused document reported with the receipt that
   removed it. The store's manifest records the ledger, so the store honours it from then on.
   The rest are tokenized once into `build/` (token ids and the character offset of every token, for
   sentence attribution; metadata and text in `build/docs.parquet`); each document gets
   its global entry range — entry ids are dense, in (document, position) order, so every
   shard knows its ids before any key is computed and shard jobs are independent.
2. train: for IVF-PQ, keys of an evenly spread sample train the coarse quantizer and PQ
   once, sized from the store's total entries (never from the shard count): the store's
   `trained.faiss`, shared by every shard.
3. shard jobs: forward passes over each document in sliding windows (contexts never cross
   documents); key at position t, value = token t+1 (token stores); or passages of
   `passage_tokens` tokens, BM25 and dense vectors (passage stores); written by a
   `StoreWriter` into a temporary folder and renamed, so a killed build resumes at the
   first unfinished shard and produces the same store.
4. manifest last: a store without `manifest.json` is an unfinished build.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from silo.corpus import expected_documents, iter_documents
from silo.datastore.errors import StoreError
from silo.datastore.index import LISTS, choose_factory, is_fast_scan, is_ivf, new_index, train_size
from silo.datastore.infgram import SA_DIR, token_dtype, write_suffix_array
from silo.datastore.ledger import CopyFinder, default_ledger, ensure_ledger, read_ledger
from silo.datastore.lock import StoreLock
from silo.datastore.manifest import Manifest, ShardInfo, model_fingerprint, tokenizer_fingerprint
from silo.datastore.optout import Removals, read_log
from silo.datastore.passages import (
    BM25_PARAMS,
    BM25_STOPWORDS,
    RETRIEVERS,
    bm25_statistics,
    write_bm25,
)
from silo.datastore.store import TRAINED_NAME
from silo.datastore.writer import StoreWriter, shard_name, sweep_attempts, value_dtype
from silo.embed import Embedder, resolve_embedder
from silo.evaluate import batched, pad_batch, windows_for
from silo.keys import capture_keys, key_dim
from silo.lm import load_causal_lm
from silo.parallel import ShardJob, run_jobs
from silo.progress import bar as progress_bar
from silo.tokenizer import load_tokenizer, tokenize_text

KINDS = ("token", "passage", "infgram")
EMBED_CHUNK = 4096  # passages embedded per add
PLAN_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("license", pa.string()), ("tier", pa.string()),
    ("owner", pa.string()), ("sentence_starts", pa.list_(pa.int32())), ("text", pa.large_string()),
    ("n_tokens", pa.int64()),
])


@dataclass
class BuildArgs:
    model: str
    corpus: str
    out: str
    kind: str = "token"  # token | passage
    tiers: tuple[str, ...] = ("restricted",)
    split: str = "train"
    shards: int = 1
    memory_budget: int | None = None
    factory: str | None = None
    key_type: str = "ffn_input"
    keep_keys: bool = False
    lists: str = "ram"  # where the IVF lists are served from by default: ram, or ssd (memory-mapped)
    window: int = 512
    stride: int = 256
    batch_size: int = 8
    max_docs: int | None = None
    max_tokens: int | None = None
    exclude_doc_ids: tuple[str, ...] = ()
    only_doc_ids: tuple[str, ...] = ()  # only these documents of the tiers and split (empty: all)
    progress: bool = True
    seed: int = 0
    backend: str = "local"  # local | ray: where shard jobs run (silo.parallel)
    workers: int = 1
    ray_address: str | None = None
    retries: int = 2
    passage_tokens: int = 256  # passage stores
    retrievers: tuple[str, ...] = ("bm25",)  # passage stores: bm25, dense or both
    embedder: str | None = None  # dense passages: None = the LM's hidden states, "minilm", or a folder
    ledger: str | None = None  # the removal ledger (default: CORPUS/removals.log), shared by every store of it

    def check(self) -> None:
        if self.kind not in KINDS:
            raise StoreError(f"unknown store kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.shards < 1 or self.window < 2 or not 1 <= self.stride <= self.window or self.batch_size < 1:
            raise StoreError("shards, window, stride and batch size must be positive (stride ≤ window)")
        if self.lists not in LISTS:
            raise StoreError(f"lists must be one of {', '.join(LISTS)}, got {self.lists!r}")
        if self.lists == "ssd" and is_fast_scan(self.factory):
            raise StoreError(f"{self.factory}: fast-scan lists cannot be memory-mapped from SSD; give 8-bit codes "
                             "(e.g. IVF4096,PQ32) or leave --factory out")
        if self.kind == "passage":
            retrievers = tuple(self.retrievers)
            if not retrievers or len(set(retrievers)) != len(retrievers) or set(retrievers) - set(RETRIEVERS):
                raise StoreError(f"retrievers must be one or both of {', '.join(RETRIEVERS)}, got "
                                 f"{','.join(retrievers) or 'none'}")
            if self.passage_tokens < 1:
                raise StoreError(f"passage_tokens must be positive, got {self.passage_tokens}")
            if self.embedder and "dense" not in retrievers:
                raise StoreError("an embedder is only used by the dense retriever: add 'dense' to the retrievers")


RUN_ONLY = ("progress", "backend", "workers", "ray_address", "retries")  # may differ when resuming


def entries_for(kind: str, n_tokens: np.ndarray, passage_tokens: int) -> np.ndarray:
    """Entries a document of n tokens gives: n-1 next-token keys, ceil(n/p) passages, or its
    n tokens in a suffix array."""
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    if kind == "infgram":
        return n_tokens
    return n_tokens - 1 if kind == "token" else -(-n_tokens // passage_tokens)


# ---------------------------------------------------------------------------- plan


def plan_documents(docs: Iterable[dict], tok, work: Path, removals: Removals, kind: str, passage_tokens: int,
                   shards: int, exclude: set[str] = frozenset(), existing=None, max_docs: int | None = None,
                   max_tokens: int | None = None, progress: bool = False, expected: int | None = None) -> dict:
    """Tokenize documents into `work/` (tokens.bin, chars.bin, docs.parquet, plan.json).
    Opted-out documents (`removals`) are skipped and counted, never tokenized;
    `existing(doc_id) -> bool` refuses ids a store already holds (live ingest). A copy of
    removed text under another id (`silo.datastore.ledger.CopyFinder`) is refused as opted out,
    and reported with the original's doc id and the receipt that removed it."""
    work.mkdir(parents=True, exist_ok=True)
    counts = {"documents": 0, "tokens": 0, "skipped_optout": 0, "skipped_copy": 0, "skipped_duplicate": 0,
              "skipped_empty": 0}
    copies = CopyFinder(removals)
    n_tokens: list[int] = []
    refused: list[dict] = []
    seen: set[str] = set()
    rows: list[dict] = []
    bos, eos = ([tok.bos_token_id] if tok.bos_token_id is not None else []), \
        ([tok.eos_token_id] if tok.eos_token_id is not None and kind != "infgram" else [])
    # (an ∞-gram index marks a document's end with its separator: EOS inside would break its counts)
    with (pq.ParquetWriter(work / "docs.parquet.tmp", PLAN_SCHEMA) as writer,
          open(work / "tokens.bin.tmp", "wb") as tokens_f, open(work / "chars.bin.tmp", "wb") as chars_f):
        for doc in progress_bar(docs, desc="plan: tokenize", unit="doc", progress=progress, total=expected):
            if doc["doc_id"] in exclude:
                continue
            if removals.matches(doc):
                counts["skipped_optout"] += 1
                receipt = removals.receipt_for(doc)
                refused.append({"doc_id": doc["doc_id"], "reason": "opted out" + (f" (receipt {receipt})"
                                                                                 if receipt else "")})
                continue
            copy = copies.find(doc["text"]) if copies else None
            if copy is not None:
                counts["skipped_optout"] += 1
                counts["skipped_copy"] += 1
                refused.append({"doc_id": doc["doc_id"], "original": copy["original"], "receipt": copy["receipt"],
                                "reason": f"a copy of opted-out document {copy['original']} (receipt "
                                          f"{copy['receipt']}): {copy['how']}"})
                continue
            if doc["doc_id"] in seen or (existing is not None and existing(doc["doc_id"])):
                counts["skipped_duplicate"] += 1
                refused.append({"doc_id": doc["doc_id"], "reason": "duplicate doc id"})
                continue
            enc = tokenize_text(tok, doc["text"], return_offsets_mapping=True)
            ids = bos + enc["input_ids"] + eos
            chars = [0] * len(bos) + [s for s, _ in enc["offset_mapping"]] + [len(doc["text"])] * len(eos)
            if len(ids) < 2:
                counts["skipped_empty"] += 1
                continue
            seen.add(doc["doc_id"])
            rows.append({"doc_id": doc["doc_id"], "source": doc.get("source"), "license": doc.get("license"),
                         "tier": doc.get("tier"), "owner": doc.get("owner") or None,
                         "sentence_starts": list(doc.get("sentence_starts") or [0]), "text": doc["text"],
                         "n_tokens": len(ids)})
            tokens_f.write(np.asarray(ids, dtype=np.int32).tobytes())
            chars_f.write(np.asarray(chars, dtype=np.int32).tobytes())
            n_tokens.append(len(ids))
            counts["documents"] += 1
            counts["tokens"] += len(ids)
            if len(rows) >= 1024:
                writer.write_table(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA))
                rows = []
            if (max_docs and counts["documents"] >= max_docs) or (max_tokens and counts["tokens"] >= max_tokens):
                break
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA))
    per_doc = entries_for(kind, np.asarray(n_tokens, dtype=np.int64), passage_tokens)
    cum = np.cumsum(per_doc)
    bounds = [0]
    for s in range(1, shards):  # contiguous document ranges with about equal entry counts
        bounds.append(max(int(np.searchsorted(cum, cum[-1] * s / shards)), bounds[-1]) if len(cum) else 0)
    bounds.append(len(n_tokens))
    bounds = sorted(set(bounds))
    plan = {**counts, "entries": int(per_doc.sum()), "refused": refused[:1000],
            "doc_ranges": [[a, b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]}
    for name in ("tokens.bin", "chars.bin", "docs.parquet"):
        os.replace(work / f"{name}.tmp", work / name)
    (work / "plan.json").write_text(json.dumps(plan))
    return plan


class DocTokens:
    """The planned documents: token ids and char offsets (memory-mapped), entry ranges."""

    def __init__(self, work: Path, kind: str, passage_tokens: int, first_entry: int = 0, first_doc: int = 0):
        self.work, self.first_doc = work, first_doc
        self.tokens = np.memmap(work / "tokens.bin", dtype=np.int32, mode="r") if (work / "tokens.bin").stat().st_size \
            else np.zeros(0, np.int32)
        self.chars = np.memmap(work / "chars.bin", dtype=np.int32, mode="r") if (work / "chars.bin").stat().st_size \
            else np.zeros(0, np.int32)
        meta = pq.read_table(work / "docs.parquet", columns=["n_tokens", "sentence_starts"])
        self.n_tokens = meta.column("n_tokens").to_numpy().astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.n_tokens)]).astype(np.int64)
        self.sentence_starts = meta.column("sentence_starts").to_pylist()
        self.n_entries = entries_for(kind, self.n_tokens, passage_tokens)
        self.entry_starts = first_entry + np.concatenate([[0], np.cumsum(self.n_entries)]).astype(np.int64)
        self.first_entry = self.entry_starts[:-1]

    def __len__(self) -> int:
        return len(self.n_tokens)

    def ids(self, doc: int) -> np.ndarray:
        return self.tokens[self.offsets[doc] : self.offsets[doc + 1]]

    def char_offsets(self, doc: int) -> np.ndarray:
        return self.chars[self.offsets[doc] : self.offsets[doc + 1]]

    def sentences(self, doc: int) -> np.ndarray:
        """Sentence index of every token of a document (by its first character)."""
        return np.clip(np.searchsorted(self.sentence_starts[doc], self.char_offsets(doc), side="right") - 1, 0, None)

    def rows(self, a: int, b: int) -> list[dict]:
        """Metadata and text of planned documents [a, b), as `StoreWriter.add` takes them."""
        table = pq.read_table(self.work / "docs.parquet").slice(a, b - a)
        out = []
        for i, row in enumerate(table.to_pylist()):
            d = a + i
            out.append({**row, "first_entry": int(self.first_entry[d]), "n_entries": int(self.n_entries[d])})
        return out

    def range_entries(self, a: int, b: int) -> tuple[int, int]:
        """(first global entry id, entry count) of documents [a, b)."""
        return int(self.entry_starts[a]), int(self.entry_starts[b] - self.entry_starts[a])


# ---------------------------------------------------------------------------- entries of a shard


@torch.no_grad()
def iter_keys(model, docs: DocTokens, doc_range: Iterable[int], window: int, stride: int, batch_size: int,
              key_type: str, pad_id: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(keys float32 (n, d), entry columns with global "id") per batch of windows.

    The key at input position t predicts token t+1: its value is token t+1, its position t+1."""
    wins = [w for d in doc_range for w in windows_for(int(docs.n_tokens[d]), window, stride, d)]
    wins.sort(key=lambda w: (w.end - w.begin, w.doc, w.begin))
    device = next(model.parameters()).device
    with capture_keys(model, key_type) as box:
        for batch in batched(wins, batch_size):
            ids, mask = pad_batch([docs.ids(w.doc)[w.begin : w.end] for w in batch], pad_id)
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            keys = box["keys"].float().cpu()
            parts = []
            for r, w in enumerate(batch):
                lo, hi = w.first_target - w.begin - 1, w.end - w.begin - 1
                pos = np.arange(w.first_target, w.end)
                parts.append((keys[r, lo:hi].numpy(), {
                    "id": docs.first_entry[w.doc] + pos - 1, "doc": np.full(len(pos), docs.first_doc + w.doc),
                    "position": pos, "value": docs.ids(w.doc)[pos], "sentence": docs.sentences(w.doc)[pos]}))
            yield np.concatenate([k for k, _ in parts]), {c: np.concatenate([e[c] for _, e in parts]) for c in parts[0][1]}


def passage_columns(docs: DocTokens, d: int, text: str, p: int) -> dict[str, np.ndarray]:
    """The passages of planned document `d`: token range, sentence, character span (contiguous)."""
    n = int(docs.n_tokens[d])
    starts = np.arange(0, n, p, dtype=np.int64)
    ends = np.minimum(starts + p, n)
    chars = np.maximum.accumulate(np.clip(np.asarray(docs.char_offsets(d), dtype=np.int64), 0, len(text)))
    char_start = np.where(starts == 0, 0, chars[np.minimum(starts, n - 1)])
    char_end = np.append(char_start[1:], len(text))
    return {"id": docs.first_entry[d] + np.arange(len(starts)), "doc": np.full(len(starts), docs.first_doc + d),
            "position": starts, "end": ends, "sentence": docs.sentences(d)[starts], "char_start": char_start,
            "char_end": char_end}


def _passages_of(docs: DocTokens, rows: list[dict], a: int, p: int) -> tuple[dict[str, np.ndarray], list[str]]:
    cols, texts = [], []
    for i, row in enumerate(rows):
        c = passage_columns(docs, a + i, row["text"], p)
        cols.append(c)
        texts.extend(row["text"][s:e] for s, e in zip(c["char_start"], c["char_end"], strict=True))
    return {k: np.concatenate([c[k] for c in cols]) for k in cols[0]} if cols else {}, texts


def write_shard(a: BuildArgs, model, tok, docs: DocTokens, shard_no: int, doc_range: tuple[int, int],
                trained: faiss.Index | None, out: Path, name: str | None = None, embedder: Embedder | None = None,
                bm25_stats: dict | None = None, progress: bool = False) -> ShardInfo:
    """One shard job: every entry of documents [a, b) into a `StoreWriter`, then publish."""
    lo, hi = doc_range
    first, n = docs.range_entries(lo, hi)
    writer = StoreWriter(out, name or shard_name(shard_no), a.kind, first, n, docs.first_doc + lo,
                         None if trained is None else faiss.clone_index(trained), keep_keys=a.keep_keys,
                         value_type=value_dtype(len(tok)) if a.kind == "token" else None)
    try:
        rows = docs.rows(lo, hi)
        writer.add(None, {}, rows)
        extra = None
        if a.kind == "token":
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            with progress_bar(desc=f"shard {shard_no}", total=n, unit="tok", unit_scale=True, progress=progress) as bar:
                for keys, cols in iter_keys(model, docs, range(lo, hi), a.window, a.stride, a.batch_size, a.key_type,
                                            pad):
                    writer.add(keys, cols)
                    bar.update(len(keys))
        elif a.kind == "infgram":
            dtype = token_dtype(len(tok))

            def extra(folder: Path) -> None:
                write_suffix_array(folder / SA_DIR, (docs.ids(d) for d in range(lo, hi)), dtype)
        else:
            cols, texts = _passages_of(docs, rows, lo, a.passage_tokens)
            for s in range(0, len(texts), EMBED_CHUNK):  # bounded memory: embed and add a chunk at a time
                part = {c: v[s : s + EMBED_CHUNK] for c, v in cols.items()}
                vecs = None
                if embedder is not None:
                    vecs = embedder.embed_ids([docs.ids(int(d) - docs.first_doc)[p:e].tolist() for d, p, e in
                                               zip(part["doc"], part["position"], part["end"], strict=True)]) \
                        if embedder.from_lm else embedder.embed_texts(texts[s : s + EMBED_CHUNK])
                writer.add(vecs, part)
            if bm25_stats is not None or "bm25" in a.retrievers:
                # a build passes the store-wide statistics; a live ingest's shard is written
                # with its own, and the store scores it with every shard's (`PassageStore`)
                stats = bm25_stats or bm25_statistics([texts])

                def extra(folder: Path, texts=texts) -> None:
                    write_bm25(texts, stats, folder / "bm25")
        return writer.publish(extra)
    except BaseException:
        writer.abort()
        raise


# ---------------------------------------------------------------------------- the build


def start_build(args: BuildArgs, out: Path) -> Path:
    """The build folder of `out`, checked: no finished store there, and an unfinished one
    only if it was started with the same settings (then it is resumed)."""
    if (out / "manifest.json").exists():
        raise StoreError(f"{out} already holds a finished store; remove it or choose another --out")
    build = out / "build"
    build.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(args).items() if k not in RUN_ONLY}
    settings["exclude_doc_ids"] = sorted(settings["exclude_doc_ids"])
    settings["only_doc_ids"] = sorted(settings["only_doc_ids"])
    settings_path = build / "settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != json.loads(json.dumps(settings)):
        raise StoreError(f"{out} holds an unfinished build with other settings; remove it to start over")
    settings_path.write_text(json.dumps(settings))
    return build


def load_embedder(a: BuildArgs, model=None, tok=None) -> Embedder | None:
    if a.kind != "passage" or "dense" not in a.retrievers:
        return None
    folder = resolve_embedder(a.embedder)
    if folder:
        return Embedder.load(folder, a.batch_size)
    return Embedder(model, tok, from_lm=True, batch_size=a.batch_size)


def train_index(a: BuildArgs, model, tok, docs: DocTokens, factory: str, dim: int, metric: str,
                embedder: Embedder | None) -> faiss.Index:
    """The store's index trained once on keys (or passage vectors) of a random spread of documents."""
    trained = new_index(factory, dim, metric)
    if not is_ivf(trained):
        return trained
    n_train = train_size(factory, int(docs.n_entries.sum()))
    rng = np.random.default_rng(a.seed)
    sample, have = [], 0
    for d in rng.permutation(len(docs)):
        sample.append(int(d))
        have += int(docs.n_entries[d])
        if have >= n_train:
            break
    sample.sort()
    if a.kind == "token":
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        with progress_bar(desc="train: sample keys", total=int(docs.n_entries[sample].sum()), unit="tok",
                          unit_scale=True, progress=a.progress) as bar:
            parts = []
            for k, _ in iter_keys(model, docs, sample, a.window, a.stride, a.batch_size, a.key_type, pad):
                parts.append(k)
                bar.update(len(k))
            vecs = np.concatenate(parts)
    else:
        parts = []
        for d in sample:
            rows = docs.rows(d, d + 1)
            cols, texts = _passages_of(docs, rows, d, a.passage_tokens)
            parts.append(embedder.embed_ids([docs.ids(d)[p:e].tolist() for p, e in
                                             zip(cols["position"], cols["end"], strict=True)])
                         if embedder.from_lm else embedder.embed_texts(texts))
        vecs = np.concatenate(parts)
    trained.train(np.ascontiguousarray(vecs[rng.permutation(len(vecs))[:n_train]], dtype=np.float32))
    return trained


def build_store(args: BuildArgs) -> Manifest:
    """`silo datastore build`: resumable; returns the manifest written. Holds the output
    folder's lock: a second build (or a compaction) of it is refused."""
    args.check()
    with StoreLock(args.out, "build"):
        return _build(args)


def _build(args: BuildArgs) -> Manifest:
    out, t0 = Path(args.out), time.perf_counter()
    build = start_build(args, out)
    sweep_attempts(out)
    torch.manual_seed(args.seed)
    needs_model = args.kind == "token" or (args.kind == "passage" and "dense" in args.retrievers
                                           and not args.embedder)
    model, tok = load_causal_lm(args.model) if needs_model else (None, load_tokenizer(args.model))
    if args.kind == "infgram" and token_dtype(len(tok)) != "u16":  # before tokenizing the corpus for nothing
        raise StoreError(f"{args.model}: a vocabulary of {len(tok):,} tokens needs a u32 suffix array, whose builder "
                         "allocates 32 GiB at once; ∞-gram stores are built for vocabularies under 65,535 tokens")
    ledger = ensure_ledger(args.ledger or default_ledger(args.corpus))
    if (build / "plan.json").is_file():
        plan = json.loads((build / "plan.json").read_text())
    else:
        docs_in = iter_documents(args.corpus, tiers=args.tiers, split=args.split)
        expected = expected_documents(args.corpus, args.tiers, args.split)
        if args.only_doc_ids:
            only = set(args.only_doc_ids)
            docs_in, expected = (d for d in docs_in if d["doc_id"] in only), len(only)
        removals = read_ledger(ledger, into=read_log(out))
        plan = plan_documents(docs_in, tok, build, removals, args.kind, args.passage_tokens, args.shards,
                              set(args.exclude_doc_ids), max_docs=args.max_docs, max_tokens=args.max_tokens,
                              progress=args.progress, expected=expected)
    if plan["documents"] == 0:
        raise StoreError(f"no documents of tiers {','.join(args.tiers)} in split {args.split!r} of {args.corpus}")
    docs = DocTokens(build, args.kind, args.passage_tokens)
    embedder = load_embedder(args, model, tok)
    dim, trained = 0, None
    metric = factory = "infgram" if args.kind == "infgram" else "bm25"  # the index kind, for the manifest
    if args.kind == "token" or embedder is not None:
        dim = key_dim(model, args.key_type) if args.kind == "token" else embedder.dim
        metric = "l2" if args.kind == "token" else "ip"
        factory = args.factory or choose_factory(plan["entries"], dim, args.memory_budget, rerank=args.keep_keys,
                                                 lists=args.lists)
        trained_path = out / TRAINED_NAME
        if trained_path.is_file():
            trained = faiss.read_index(str(trained_path))
        else:
            trained = train_index(args, model, tok, docs, factory, dim, metric, embedder)
            faiss.write_index(trained, str(trained_path) + ".tmp")
            os.replace(str(trained_path) + ".tmp", trained_path)
    bm25_stats = None
    if args.kind == "passage" and "bm25" in args.retrievers:
        stats_path = build / "bm25_stats.json"
        if stats_path.is_file():
            bm25_stats = json.loads(stats_path.read_text())
        else:
            def batches():
                for a in progress_bar(range(0, len(docs), 256), desc="bm25: statistics", unit="batch",
                                      progress=args.progress):
                    yield _passages_of(docs, docs.rows(a, min(a + 256, len(docs))), a, args.passage_tokens)[1]
            bm25_stats = bm25_statistics(batches())
            stats_path.with_suffix(".tmp").write_text(json.dumps(bm25_stats))
            os.replace(stats_path.with_suffix(".tmp"), stats_path)

    infos: dict[int, ShardInfo] = {}
    jobs = []
    for s, (a, b) in enumerate(plan["doc_ranges"]):
        shard_json = out / "shards" / shard_name(s) / "shard.json"
        if shard_json.is_file():  # finished by an earlier run
            infos[s] = ShardInfo(**json.loads(shard_json.read_text()))
        else:
            jobs.append(ShardJob(s, (a, b), docs.range_entries(a, b)[1]))
    if args.kind == "token" and (args.backend != "local" or args.workers > 1):
        del model  # workers load their own copy (once each)
        settings = {"args": {**asdict(args), "progress": False}}
        for job, info in zip(jobs, run_jobs(jobs, settings, args.backend, args.workers, args.ray_address,
                                            args.retries, args.progress, job_fn=shard_worker), strict=True):
            infos[job.shard] = ShardInfo(**info)
    else:
        if args.backend != "local" or args.workers > 1:
            raise StoreError(f"{args.kind} stores are built in this process: --backend ray and --workers build "
                             "token stores")
        for job in progress_bar(jobs, desc="shards", unit="shard", progress=args.progress and len(jobs) > 1):
            infos[job.shard] = write_shard(args, model, tok, docs, job.shard, job.doc_range, trained, out,
                                           embedder=embedder, bm25_stats=bm25_stats,
                                           progress=args.progress and len(jobs) == 1)
    shard_infos = [infos[s] for s in range(len(plan["doc_ranges"]))]
    build_info = {"factory": factory, "window": args.window, "stride": args.stride,
                  "skipped_optout": plan["skipped_optout"], "skipped_copy": plan.get("skipped_copy", 0),
                  "refused": [r for r in plan["refused"] if r["reason"] != "duplicate doc id"][:100],
                  "seconds": round(time.perf_counter() - t0, 1),
                  "excluded_doc_ids": len(args.exclude_doc_ids), "tokens": plan["tokens"]}
    if bm25_stats is not None:
        build_info["bm25"] = {**BM25_PARAMS, "stopwords": BM25_STOPWORDS, "passages": bm25_stats["passages"],
                              "avg_len": bm25_stats["avg_len"]}
    if embedder is not None:
        folder = resolve_embedder(args.embedder)
        build_info["embedder"] = folder
        build_info["embedder_fingerprint"] = model_fingerprint(folder) if folder else None
    if args.kind == "infgram":
        build_info.update(token_dtype=token_dtype(len(tok)), eos_token_id=tok.eos_token_id, vocab_size=len(tok),
                          bos_token_id=tok.bos_token_id)
    manifest = Manifest(
        kind=args.kind, model=str(Path(args.model).resolve()), model_fingerprint=model_fingerprint(args.model),
        tokenizer_fingerprint=tokenizer_fingerprint(args.model), dim=dim, metric=metric,
        key_type=args.key_type if args.kind == "token" else None, shards=shard_infos,
        corpus=str(Path(args.corpus).resolve()), tiers=list(args.tiers), split=args.split,
        documents=plan["documents"], entries=plan["entries"], index=factory,
        value_dtype=value_dtype(len(tok)) if args.kind == "token" else None, keep_keys=args.keep_keys,
        lists=args.lists,
        passage_tokens=args.passage_tokens if args.kind == "passage" else None,
        retrievers=list(args.retrievers) if args.kind == "passage" else [], build=build_info, ledger=str(ledger))
    manifest.save(out)
    shutil.rmtree(build, ignore_errors=True)
    return manifest


def shard_worker(settings: dict, shard: int, doc_range: tuple[int, int], cache: dict) -> dict:
    """A token-store shard job in a worker (process or Ray actor); `cache` keeps the model,
    planned documents and trained index loaded between the worker's jobs."""
    if cache.get("settings") != settings:
        args = BuildArgs(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in settings["args"].items()})
        out = Path(args.out)
        model, tok = load_causal_lm(args.model)
        cache.clear()
        cache.update(settings=settings, args=args, model=model, tok=tok,
                     docs=DocTokens(out / "build", args.kind, args.passage_tokens),
                     trained=faiss.read_index(str(out / TRAINED_NAME)))
    c = cache
    info = write_shard(c["args"], c["model"], c["tok"], c["docs"], shard, doc_range, c["trained"], Path(c["args"].out))
    return asdict(info)
