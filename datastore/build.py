"""Building a token store (kNN-LM): plan -> train index -> shard jobs -> manifest.

1. plan: the chosen documents (tiers, split, minus opted-out ones) are tokenized once;
   `docs.parquet` gets their metadata and text, `build/` their token ids and the character
   offset of every token (for sentence attribution), and each document its global entry
   range — entry ids are dense, assigned in (document, position) order, so every shard
   knows its ids before any key is computed and shard jobs are independent.
2. train: for IVF-PQ, keys of an evenly spread sample train the coarse quantizer and PQ
   once (`build/trained.faiss`), shared by every shard.
3. shard jobs: forward passes over each document in sliding windows (contexts never
   cross documents), keys from `silo.keys`, value = next token; added with their global
   ids to a copy of the trained index; written to a temporary folder and renamed, so a
   killed build resumes at the first unfinished shard and produces the same store.
4. manifest last: a store without `manifest.json` is an unfinished build.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from datastore.index import choose_factory, is_ivf, new_index, train_size
from datastore.lock import StoreLock
from datastore.manifest import (
    Manifest,
    ShardInfo,
    StoreError,
    model_fingerprint,
    tokenizer_fingerprint,
)
from datastore.parallel import ShardJob, run_jobs
from silo.corpus import iter_documents
from silo.evaluate import batched, pad_batch, windows_for
from silo.keys import capture_keys

DOC_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("license", pa.string()), ("tier", pa.string()),
    ("owner", pa.string()), ("sentence_starts", pa.list_(pa.int32())), ("text", pa.large_string()),
    ("first_entry", pa.int64()), ("n_tokens", pa.int32()),
])


@dataclass
class BuildArgs:
    model: str
    corpus: str
    out: str
    tiers: tuple[str, ...] = ("restricted",)
    split: str = "train"
    shards: int = 1
    memory_budget: int | None = None
    factory: str | None = None
    key_type: str = "ffn_input"
    keep_keys: bool = False
    window: int = 512
    stride: int = 256
    batch_size: int = 8
    max_docs: int | None = None
    max_tokens: int | None = None
    exclude_doc_ids: tuple[str, ...] = ()
    progress: bool = True
    seed: int = 0
    backend: str = "local"  # local | ray: where shard jobs run (datastore.parallel)
    workers: int = 1
    ray_address: str | None = None
    retries: int = 2


RUN_ONLY = ("progress", "backend", "workers", "ray_address", "retries")  # may differ when resuming


def _plan(args: BuildArgs, tok, build: Path, out: Path) -> dict:
    """Tokenize the chosen documents; write docs.parquet and the token/char arrays."""
    from datastore.optout import read_log

    is_removed = read_log(out).matches
    excluded = set(args.exclude_doc_ids)
    n_docs = n_entries = n_tokens = skipped_optout = 0
    doc_entries: list[int] = []
    rows: list[dict] = []
    with (pq.ParquetWriter(out / "docs.parquet.tmp", DOC_SCHEMA, compression="zstd") as writer,
          open(build / "tokens.bin.tmp", "wb") as tokens_f, open(build / "chars.bin.tmp", "wb") as chars_f):
        docs = iter_documents(args.corpus, tiers=args.tiers, split=args.split)
        for doc in tqdm(docs, desc="plan: tokenize", unit="doc", disable=not args.progress):
            if doc["doc_id"] in excluded:
                continue
            if is_removed(doc):
                skipped_optout += 1
                continue
            enc = tok(doc["text"], add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            chars = [s for s, _ in enc["offset_mapping"]]
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            ids = bos + ids + eos
            chars = [0] * len(bos) + chars + [len(doc["text"])] * len(eos)
            if len(ids) < 2:
                continue
            entries = len(ids) - 1
            rows.append({"doc_id": doc["doc_id"], "source": doc["source"], "license": doc["license"],
                         "tier": doc["tier"], "owner": doc["owner"], "sentence_starts": doc["sentence_starts"],
                         "text": doc["text"], "first_entry": n_entries, "n_tokens": len(ids)})
            tokens_f.write(np.asarray(ids, dtype=np.int32).tobytes())
            chars_f.write(np.asarray(chars, dtype=np.int32).tobytes())
            doc_entries.append(entries)
            n_docs, n_entries, n_tokens = n_docs + 1, n_entries + entries, n_tokens + len(ids)
            if len(rows) >= 1024:
                writer.write_table(pa.Table.from_pylist(rows, schema=DOC_SCHEMA))
                rows = []
            if (args.max_docs and n_docs >= args.max_docs) or (args.max_tokens and n_tokens >= args.max_tokens):
                break
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=DOC_SCHEMA))
    if n_docs == 0:
        raise StoreError(f"no documents of tiers {','.join(args.tiers)} in split {args.split!r} of {args.corpus}")
    # Shards: contiguous document ranges with about equal entry counts.
    cum = np.cumsum(doc_entries)
    bounds = [0]
    for s in range(1, args.shards):
        bounds.append(max(int(np.searchsorted(cum, cum[-1] * s / args.shards)), bounds[-1]))
    bounds.append(n_docs)
    bounds = sorted(set(bounds))
    plan = {"documents": n_docs, "entries": n_entries, "tokens": n_tokens, "skipped_optout": skipped_optout,
            "doc_ranges": [[a, b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]}
    os.replace(build / "tokens.bin.tmp", build / "tokens.bin")
    os.replace(build / "chars.bin.tmp", build / "chars.bin")
    os.replace(out / "docs.parquet.tmp", out / "docs.parquet")
    (build / "plan.json").write_text(json.dumps(plan))
    return plan


class DocTokens:
    """Token ids and char offsets of the planned documents (memory-mapped)."""

    def __init__(self, build: Path, out: Path):
        self.tokens = np.memmap(build / "tokens.bin", dtype=np.int32, mode="r")
        self.chars = np.memmap(build / "chars.bin", dtype=np.int32, mode="r")
        meta = pq.read_table(out / "docs.parquet", columns=["first_entry", "n_tokens", "sentence_starts"])
        self.n_tokens = meta.column("n_tokens").to_numpy()
        self.first_entry = meta.column("first_entry").to_numpy()
        self.offsets = np.concatenate([[0], np.cumsum(self.n_tokens)])
        self.sentence_starts = meta.column("sentence_starts").to_pylist()

    def ids(self, doc: int) -> np.ndarray:
        return self.tokens[self.offsets[doc] : self.offsets[doc + 1]]

    def sentences(self, doc: int) -> np.ndarray:
        """Sentence index of every token of a document (by its first character)."""
        chars = self.chars[self.offsets[doc] : self.offsets[doc + 1]]
        return np.clip(np.searchsorted(self.sentence_starts[doc], chars, side="right") - 1, 0, None)


@torch.no_grad()
def iter_keys(model, docs: DocTokens, doc_range: Iterable[int], window: int, stride: int, batch_size: int,
              key_type: str, pad_id: int):
    """Yield (keys float32 (n,d), entry ids, doc, position, value, sentence) per batch of windows.

    Key at input position t predicts token t+1: its value is token t+1, its position t+1."""
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
                d_ids = docs.ids(w.doc)
                parts.append((keys[r, lo:hi].numpy(), docs.first_entry[w.doc] + pos - 1,
                              np.full(len(pos), w.doc), pos, d_ids[pos], docs.sentences(w.doc)[pos]))
            yield tuple(np.concatenate([p[i] for p in parts]) for i in range(6))


def _write_shard(args: BuildArgs, model, tok, docs: DocTokens, shard_no: int, doc_range: tuple[int, int],
                 trained: faiss.Index, factory: str, out: Path) -> ShardInfo:
    name = f"{shard_no:05d}"
    final = out / "shards" / name
    tmp = attempt_folder(out, name)
    index = faiss.clone_index(trained)
    first = int(docs.first_entry[doc_range[0]]) if doc_range[1] > doc_range[0] else 0
    n = int(sum(docs.n_tokens[doc_range[0] : doc_range[1]] - 1))
    cols = {c: np.zeros(n, dtype=np.int32) for c in ("doc", "position", "value", "sentence")}
    keys_mm = np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=np.float16,
                                        shape=(n, trained.d)) if args.keep_keys else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for keys, eids, doc, pos, val, sent in iter_keys(model, docs, range(*doc_range), args.window, args.stride,
                                                     args.batch_size, args.key_type, pad):
        index.add_with_ids(np.ascontiguousarray(keys), eids.astype(np.int64))
        local = eids - first
        for c, v in (("doc", doc), ("position", pos), ("value", val), ("sentence", sent)):
            cols[c][local] = v
        if keys_mm is not None:
            keys_mm[local] = keys.astype(np.float16)
    if keys_mm is not None:
        keys_mm.flush()
        del keys_mm
    assert index.ntotal == n, (index.ntotal, n)
    faiss.write_index(index, str(tmp / "index.faiss"))
    pq.write_table(pa.table(cols), tmp / "entries.parquet", compression="zstd")
    info = ShardInfo(name=name, first_entry=first, entries=n, documents=doc_range[1] - doc_range[0], index=factory)
    (tmp / "shard.json").write_text(json.dumps(asdict(info)))
    publish(tmp, final)
    return info


def attempt_folder(out: Path, name: str) -> Path:
    """A fresh temporary folder for one attempt at shard `name`: a retried job (Ray may
    rerun a task whose first attempt is still writing) never shares files with another."""
    tmp = out / "shards" / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Make a finished shard folder durable (fsync every file), then move it into place.
    If another attempt already published the shard (same inputs, same bytes), ours goes."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if (final / "shard.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(final, ignore_errors=True)  # an unfinished folder of an older layout
    os.replace(tmp, final)


def start_build(args: BuildArgs, out: Path) -> Path:
    """The build folder of `out`, checked: no finished store there, and an unfinished one
    only if it was started with the same settings (then it is resumed)."""
    if (out / "manifest.json").exists():
        raise StoreError(f"{out} already holds a finished store; remove it or choose another --out")
    build = out / "build"
    build.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(args).items() if k not in RUN_ONLY}
    settings["exclude_doc_ids"] = sorted(settings["exclude_doc_ids"])
    settings_path = build / "settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != json.loads(json.dumps(settings)):
        raise StoreError(f"{out} holds an unfinished build with other settings; remove it to start over")
    settings_path.write_text(json.dumps(settings))
    return build


def build_token_store(args: BuildArgs) -> Manifest:
    """`silo datastore build --kind token`: resumable; returns the manifest written. Holds
    the output folder's lock: a second build (or a compaction) of it is refused."""
    with StoreLock(args.out, "build"):
        return _build_token_store(args)


def _build_token_store(args: BuildArgs) -> Manifest:
    from silo.keys import key_dim
    from silo.lm import load_causal_lm

    out, t0 = Path(args.out), time.perf_counter()
    build = start_build(args, out)

    model, tok = load_causal_lm(args.model)
    torch.manual_seed(args.seed)
    plan = json.loads((build / "plan.json").read_text()) if (build / "plan.json").is_file() else \
        _plan(args, tok, build, out)
    docs = DocTokens(build, out)
    dim = key_dim(model, args.key_type)
    # sized for one shard: every shard is its own index, searched in full (its coarse
    # quantizer too) by every query — lists sized for the whole store make search cost
    # grow with the shard count times √(store size)
    shard_entries = max(int(docs.first_entry[b - 1] + docs.n_tokens[b - 1] - 1 - docs.first_entry[a])
                        for a, b in plan["doc_ranges"])
    per_shard_budget = None if args.memory_budget is None else args.memory_budget * shard_entries // plan["entries"]
    factory = args.factory or choose_factory(shard_entries, dim, per_shard_budget)

    trained_path = build / "trained.faiss"
    if trained_path.is_file():
        trained = faiss.read_index(str(trained_path))
    else:
        trained = new_index(factory, dim)
        if is_ivf(trained):
            n_train = train_size(factory, plan["entries"])
            rng = np.random.default_rng(args.seed)
            order = rng.permutation(plan["documents"])
            sample, have = [], 0
            for d in order:  # a random spread of documents up to the training size
                sample.append(int(d))
                have += int(docs.n_tokens[d]) - 1
                if have >= n_train:
                    break
            keys = np.concatenate([k for k, *_ in tqdm(
                iter_keys(model, docs, sorted(sample), args.window, args.stride, args.batch_size, args.key_type,
                          tok.pad_token_id or 0), desc="train: sample keys", disable=not args.progress)])
            trained.train(keys[rng.permutation(len(keys))[:n_train]])
        faiss.write_index(trained, str(trained_path) + ".tmp")
        os.replace(str(trained_path) + ".tmp", trained_path)

    infos: dict[int, ShardInfo] = {}
    jobs = []
    for s, (a, b) in enumerate(plan["doc_ranges"]):
        shard_json = out / "shards" / f"{s:05d}" / "shard.json"
        if shard_json.is_file():  # finished by an earlier run
            infos[s] = ShardInfo(**json.loads(shard_json.read_text()))
        else:
            jobs.append(ShardJob(s, (a, b), int(docs.first_entry[b - 1] + docs.n_tokens[b - 1] - 1
                                                 - docs.first_entry[a]) if b > a else 0))
    del model  # workers load their own copy (once each)
    job_settings = {"args": {**asdict(args), "progress": False}, "factory": factory}
    for job, info in zip(jobs, run_jobs(jobs, job_settings, args.backend, args.workers, args.ray_address,
                                        args.retries, args.progress), strict=True):
        infos[job.shard] = ShardInfo(**info)
    infos = [infos[s] for s in range(len(plan["doc_ranges"]))]

    manifest = Manifest(
        kind="token", model=str(Path(args.model).resolve()), model_fingerprint=model_fingerprint(args.model),
        tokenizer_fingerprint=tokenizer_fingerprint(args.model), dim=dim, metric="l2", key_type=args.key_type,
        shards=infos, corpus=str(Path(args.corpus).resolve()), tiers=list(args.tiers), split=args.split,
        documents=plan["documents"], entries=plan["entries"],
        build={"factory": factory, "window": args.window, "stride": args.stride, "keep_keys": args.keep_keys,
               "skipped_optout": plan["skipped_optout"], "seconds": round(time.perf_counter() - t0, 1),
               "excluded_doc_ids": len(args.exclude_doc_ids)},
    )
    manifest.save(out)
    shutil.rmtree(build, ignore_errors=True)
    return manifest
