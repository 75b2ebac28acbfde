"""Live ingest: new documents become a new shard of an existing store, published atomically.

`add_documents(store, docs)` — behind `silo datastore add` and the gRPC `AddDocuments`:

1. under the store's lock (one writer at a time), read the opt-out log, the removal
   ledger the manifest names (`silo.datastore.ledger`: the corpus's removals, from every store
   of it) and the store's document ids: a document already opted out (by id, owner,
   source, a span it contains, or as a copy of removed text under another id) is refused
   and reported with the receipt that removed it, never tokenized; a doc id the store
   already holds (or that repeats in the input) is refused;
2. tokenize and encode the rest with the store's own model (its fingerprint is checked)
   and add them to a copy of the store's trained index — no retraining, same codes. A
   passage store's new shard gets its BM25 index (the store then scores every shard with
   the statistics of all, `silo.datastore.passages`, until a compaction re-indexes
   them); an ∞-gram store's, its own suffix array;
3. write the shard through a `StoreWriter` (fsync'd, renamed into place), then add it to
   the manifest by one atomic switch. Only then is the ingest acknowledged; a kill at any
   point leaves the store as before (an unnamed folder, swept later) or as after.

Servers notice the switched manifest on their next request and reopen the store, as
they notice opt-outs; nothing restarts.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np

from silo.build import BuildArgs, DocTokens, load_embedder, plan_documents, write_shard
from silo.corpus import iter_documents
from silo.datastore.errors import FingerprintMismatch, StoreError
from silo.datastore.ledger import read_ledger
from silo.datastore.lock import StoreLock
from silo.datastore.manifest import Manifest, model_fingerprint
from silo.datastore.optout import read_log
from silo.datastore.store import TRAINED_NAME, Datastore
from silo.datastore.writer import commit_shards, shard_name, sweep_orphans
from silo.lm import load_causal_lm
from silo.tokenizer import load_tokenizer

INGEST_KINDS = ("token", "passage", "infgram")

WORK_NAME = ".ingest"


def _next_shard(m: Manifest) -> int:
    return 1 + max((int(s.name.split("-")[0]) for s in m.shards), default=-1)


def add_documents(store_dir: str | Path, docs: Iterable[dict], model_dir: str | None = None,
                  progress: bool = False, batch_size: int = 8, model=None, tok=None) -> dict:
    """Add documents (dicts with doc_id, text, source, license, tier, owner, sentence_starts,
    as `silo.corpus` yields them) as one new shard. Returns what was added and refused.
    A server passes the model and tokenizer it has loaded (`model`, `tok`, of `model_dir`)."""
    store_dir = Path(store_dir)
    t0 = time.perf_counter()
    with StoreLock(store_dir, "ingest"):
        m = Manifest.load(store_dir)
        if m.kind not in INGEST_KINDS:
            raise StoreError(f"{store_dir}: live ingest adds to {', '.join(INGEST_KINDS)} stores, not {m.kind} stores")
        bm25 = m.kind == "passage" and "bm25" in m.retrievers
        if bm25 and not all((store_dir / "shards" / s.name / "bm25" / "lengths.npy").is_file() for s in m.shards):
            raise StoreError(f"{store_dir}: its BM25 indexes predate term-frequency files, which scoring across an "
                             "added shard needs: compact or rebuild the store first")
        model_dir = model_dir or m.model
        if model_fingerprint(model_dir) != m.model_fingerprint:
            raise FingerprintMismatch(f"{model_dir} is not the model store {store_dir} was built with ({m.model})")
        sweep_orphans(store_dir)  # what a killed ingest left: never reused under a new name
        store = Datastore.open(store_dir, load_index=False, with_text=False)
        work = store_dir / WORK_NAME
        shutil.rmtree(work, ignore_errors=True)
        b = m.build
        args = BuildArgs(model=model_dir, corpus="", out=str(store_dir), kind=m.kind, key_type=m.key_type or "ffn_input",
                         keep_keys=m.keep_keys, window=b.get("window", 512), stride=b.get("stride", 256),
                         batch_size=batch_size, passage_tokens=m.passage_tokens or 256,
                         retrievers=tuple(m.retrievers) or ("bm25",), embedder=b.get("embedder"))
        # keys need the LM; dense passages need it unless they have their own embedder
        needs_model = m.kind == "token" or (m.kind == "passage" and "dense" in m.retrievers and not b.get("embedder"))
        if tok is None or (needs_model and model is None):
            model, tok = load_causal_lm(model_dir) if needs_model else (None, load_tokenizer(model_dir))
        removals = read_ledger(m.ledger, into=read_log(store_dir))  # a missing ledger: refused, loudly
        plan = plan_documents(docs, tok, work, removals, m.kind, args.passage_tokens, 1,
                              existing=lambda d: store.doc_index(d) is not None, progress=progress)
        report = {"added_documents": 0, "added_entries": 0, "refused": plan["refused"],
                  "skipped_empty": plan["skipped_empty"], "shard": None}
        if plan["documents"] == 0:
            shutil.rmtree(work, ignore_errors=True)
            return report | {"seconds": round(time.perf_counter() - t0, 2)}
        planned = DocTokens(work, m.kind, args.passage_tokens, first_entry=m.entries, first_doc=m.documents)
        trained = faiss.read_index(str(store_dir / TRAINED_NAME)) if (store_dir / TRAINED_NAME).is_file() else None
        no = _next_shard(m)
        info = write_shard(args, model, tok, planned, no, (0, len(planned)), trained, store_dir,
                           name=shard_name(no), embedder=load_embedder(args, model, tok), progress=progress)
        check = None
        if bm25:  # the store's statistics now count the new passages; its older files do not
            lengths = np.load(store_dir / "shards" / info.name / "bm25" / "lengths.npy")

            def check(current: Manifest) -> None:
                s = current.build["bm25"]
                n = int(s["passages"]) + len(lengths)
                total = float(s["passages"]) * float(s["avg_len"]) + float(lengths.sum())
                current.build["bm25"] = {**s, "passages": n, "avg_len": total / n if total else 1.0, "stale": True}
        commit_shards(store_dir, [info], {"documents": info.documents, "entries": info.entries}, check=check,
                      lock=False)
        shutil.rmtree(work, ignore_errors=True)
        store.close()
    return report | {"added_documents": info.documents, "added_entries": info.entries, "shard": info.name,
                     "seconds": round(time.perf_counter() - t0, 2)}


def add_corpus(store_dir: str | Path, corpus: str, tiers: Iterable[str] | None = None, split: str | None = None,
               model_dir: str | None = None, progress: bool = False) -> dict:
    """`silo datastore add`: a corpus's documents (some tiers, one split) into a store, live."""
    return add_documents(store_dir, iter_documents(corpus, tiers=tiers, split=split), model_dir, progress)
