"""SILO's benchmark suite: every speed/memory figure, measured side by side, into BENCHMARKS.md.

    python tools/bench.py                              # all benchmarks (model/corpus from `silo demo`)
    python tools/bench.py --only knn,refine,shards     # some of them
    python tools/bench.py --entries 1000000 --big-entries 10000000 --model runs/demo/lm-pdsw

Machines here are shared and noisy, so every figure is a *ratio measured in one run*
(the thing and its baseline alternately, best of `--repeat`), and each row says what it is
measured against (the growth series' build cost is the exception: each store's own build
timing, cached beside it, and its row says so). The table in BENCHMARKS.md is rewritten, with the date and machine;
rows of benchmarks not run this time are kept as they were.

Stores, corpora and models are cached under `--work` (runs/bench) and reused when present:
the 1M-entry token store over the demo corpus's restricted tier (in 1 and in 8 shards),
the ~10M-entry one over a larger harvested corpus (all tiers), the growth series.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from silo.datastore import index as ix  # noqa: E402
from silo.datastore.errors import StoreError  # noqa: E402
from silo.datastore.store import Datastore  # noqa: E402

from silo.build import BuildArgs, build_store  # noqa: E402
from silo.evaluate import (  # noqa: E402
    batched,
    load_eval_docs,
    pad_batch,
    perplexity,
    score_documents,
    windows_for,
)
from silo.knnlm import DocNeighbours, KNNParams, generate, retrieve_neighbours  # noqa: E402
from silo.lm import load_causal_lm  # noqa: E402
from silo.tokenizer import text_ids  # noqa: E402

BENCHMARKS: dict[str, Callable] = {}
ALL_TIERS = ("pd", "sw", "by", "restricted")
WINDOW, STRIDE, BATCH = 256, 128, 16  # scoring and building windows (the model's context is 256)
ADMIN_TOKEN = "bench-admin-token-0123456789"


def benchmark(name: str):
    def register(fn):
        BENCHMARKS[name] = fn
        return fn
    return register


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved(repeat: int, *fns: Callable[[], object]) -> list[float]:
    """Best-of-`repeat` time of each function, the functions run alternately (A B A B …),
    so a neighbour's load hits all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [min(t) for t in times]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def nlist_of(factory: str) -> int:
    head = factory.split(",")[0]
    return int(head[3:].split("_")[0]) if head.startswith("IVF") else 0


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(approx, exact, strict=True)]))


@torch.no_grad()
def lm_queries(model, docs: list[list[int]], n: int, key_type: str = "ffn_input", pad_id: int = 0) -> np.ndarray:
    """The keys a kNN-LM searches with while scoring `docs` (the first `n` scored tokens):
    realistic queries, unlike stored keys plus noise. `key_type`: the store's
    (`store.manifest.key_type`)."""
    from silo.keys import capture_keys

    wins = [w for i, d in enumerate(docs) for w in windows_for(len(d), WINDOW, STRIDE, i)]
    out, have = [], 0
    with capture_keys(model, key_type) as box:
        for batch in batched(wins, BATCH):
            ids, mask = pad_batch([docs[w.doc][w.begin : w.end] for w in batch], pad_id)
            model(input_ids=ids, attention_mask=mask)
            keys = box["keys"].float().cpu().numpy()
            for r, w in enumerate(batch):
                out.append(keys[r, w.first_target - w.begin - 1 : w.end - w.begin - 1])
                have += len(out[-1])
            if have >= n:
                break
    return np.ascontiguousarray(np.concatenate(out)[:n], dtype=np.float32)


class Context:
    """Shared, lazily built (and cached on disk) artefacts: models, corpora, stores."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._model = None
        self._open: dict[str, Datastore] = {}
        self._docs: dict = {}

    @property
    def model(self):
        if self._model is None:
            self._model = load_causal_lm(self.args.model)
        return self._model

    @property
    def pad_id(self) -> int:
        tok = self.model[1]
        return tok.pad_token_id if tok.pad_token_id is not None else 0

    @property
    def score_kw(self) -> dict:
        """The windows, batch and padding every scoring pass here uses."""
        return dict(window=WINDOW, stride=STRIDE, batch_size=BATCH, pad_id=self.pad_id)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # ------------------------------------------------------------------ corpora and models

    def big_corpus(self) -> Path:
        """A harvested corpus large enough for the ~10M-entry store and the growth series
        (this machine's packages and docs, ~4 bytes per token, 90% in the train split)."""
        from silo.corpus import CorpusWriter, open_corpus
        from silo.errors import SiloError
        from silo.harvest import iter_harvest

        path = self.work / "big-corpus"
        try:
            open_corpus(path)
            return path
        except SiloError:
            pass
        need = int(max(self.args.big_entries, max(self.args.growth_sizes)) * 6)
        self.log(f"harvesting {need / 1e6:.0f} MB into {path}")
        with CorpusWriter(path, overwrite=True) as writer:
            for record in iter_harvest(need):
                writer.add(record)
        return path

    def tiny_model(self) -> Path:
        """A tiny model (d=64) with the demo's tokenizer: the growth series measures the
        store, not the LM."""
        from silo.train import TrainArgs, train

        tiny = self.work / "tiny-model"
        if not (tiny / "model.safetensors").is_file():
            train(TrainArgs(corpus=self.args.corpus, out=str(tiny), config="tiny", tokenizer=self.args.model,
                            steps=200, progress=False))
        return tiny

    # ------------------------------------------------------------------ stores

    def build(self, path: Path, **kw) -> Path:
        """A token store at `path`, built once (with `kw` over the defaults), then reused."""
        if (path / "manifest.json").is_file():
            return path
        args = dict(model=self.args.model, corpus=self.args.corpus, out=str(path), tiers=("restricted",),
                    window=WINDOW, stride=STRIDE, batch_size=BATCH, memory_budget=self.args.memory_budget,
                    keep_keys=True, progress=False, seed=0) | kw
        self.log(f"building {path.name} …")
        load0, cpu0, t, t_start = os.getloadavg()[0], time.process_time(), time.perf_counter(), time.time()
        try:
            m = build_store(BuildArgs(**args))  # an unfinished build of the same settings is resumed
        except StoreError as e:
            if "other settings" not in str(e):
                raise
            shutil.rmtree(path)
            m = build_store(BuildArgs(**args))
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
        # wall and CPU seconds of the build (all threads): on a shared machine the CPU time is
        # the steadier measure of the work done
        timing_path(path).write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "entries": m.entries,
                                                 "threads": torch.get_num_threads(), "start": t_start,
                                                 # plan + training end when trained.faiss is written
                                                 "plan_train_s": ((path / "trained.faiss").stat().st_mtime - t_start)
                                                 if (path / "trained.faiss").is_file() else None,
                                                 "loadavg": [load0, os.getloadavg()[0]]}))
        self.log(f"built {path.name}: {m.entries:,} entries, {m.index}, in {wall:.0f} s (CPU {cpu:.0f} s)")
        return path

    def store_path(self, shards: int = 1) -> Path:
        """The ~`--entries` token store over the demo corpus's restricted tier (fp16 keys kept)."""
        return self.build(self.work / f"store-restricted-{self.args.entries}-s{shards}", shards=shards,
                          max_tokens=self.args.entries)

    def big_store_path(self) -> Path:
        """The ~`--big-entries` token store over the big harvested corpus, all tiers."""
        path = self.work / f"store-all-{self.args.big_entries}-s1"
        if (path / "manifest.json").is_file():
            return path
        return self.build(path, corpus=str(self.big_corpus()), tiers=ALL_TIERS, max_tokens=self.args.big_entries)

    def open(self, path: Path) -> Datastore:
        key = str(path)
        if key not in self._open:
            self._open[key] = Datastore.open(path)
        return self._open[key]

    def close(self, path: Path) -> None:
        store = self._open.pop(str(path), None)
        if store is not None:
            store.close()

    def eval_docs(self, tokens: int) -> list[list[int]]:
        """Held-out (test split) restricted-tier documents of the demo corpus (token ids)."""
        key = ("docs", tokens)
        if key not in self._docs:
            _, tok = self.model
            self._docs[key] = load_eval_docs(self.args.corpus, tok, "test", ("restricted",), max_tokens=tokens)[1]
        return self._docs[key]

    def queries(self, store: Datastore, n: int) -> np.ndarray:
        """`n` LM query keys of the demo model, of `store`'s key type."""
        key_type = store.manifest.key_type or "ffn_input"
        key = ("queries", n, key_type)
        if key not in self._docs:
            self._docs[key] = lm_queries(self.model[0], self.eval_docs(max(4 * n, 20_000)), n, key_type,
                                         pad_id=self.pad_id)
        return self._docs[key]


def timing_path(store: Path) -> Path:
    return store.parent / f"{store.name}.timing.json"


def build_timing(store: Path) -> dict:
    """How long a cached store took to build (wall and CPU seconds); the manifest's
    wall time when the build was not timed here."""
    if timing_path(store).is_file():
        return json.loads(timing_path(store).read_text())
    m = json.loads((store / "manifest.json").read_text())
    return {"wall_s": m["build"]["seconds"], "cpu_s": float("nan"), "entries": m["entries"]}


class ExactSearch:
    """Exact (L2) top-k over a store's kept fp16 keys, the ground truth of recall: a chunk
    of keys at a time. The float32 chunks are kept by this object when all of them fit in
    `keep_bytes` (a 1M-entry store's: 1 GB), so that a timed search is the search, not the
    fp16 conversion; a larger store's are converted again on every call."""

    def __init__(self, store: Datastore, chunk: int = 1 << 20, keep_bytes: int = 2 << 30):
        self.store, self.chunk = store, chunk
        fits = store.n_entries * store.manifest.dim * 4 <= keep_bytes
        self.kept = list(self._chunks()) if fits else None

    def _chunks(self):
        for s in self.store.shards:
            for a in range(0, len(s.keys), self.chunk):
                yield s.info.first_entry + a, np.asarray(s.keys[a : a + self.chunk], dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, global entry ids) of each query's k nearest keys."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        best_d = np.full((len(queries), k), np.inf, np.float32)
        best_i = np.full((len(queries), k), -1, np.int64)
        for first, keys in self.kept if self.kept is not None else self._chunks():
            d, i = faiss.knn(queries, keys, k)
            d = np.concatenate([best_d, d], axis=1)
            i = np.concatenate([best_i, np.where(i >= 0, i + first, -1)], axis=1)
            order = np.argsort(d, axis=1, kind="stable")[:, :k]
            best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
        return best_d, best_i


def profile_search(store: Datastore, queries: np.ndarray, k: int, nprobe: int, refine: int = 1,
                   batch: int = 2048) -> dict[str, float]:
    """Seconds of each part of `store.search` over `queries` (in batches as a kNN-LM scores):
    coarse assignment, inverted-list scan, re-ranking from fp16 keys, the whole search
    (the rest is masks, post-filter, sorting), and the value lookup after it."""
    out = dict.fromkeys(("assign", "scan", "rerank_gather", "rerank_math", "search", "values"), 0.0)
    quantizer = ix.quantizer_of(store.trained)
    for a in range(0, len(queries), batch):
        q = queries[a : a + batch]
        t0 = time.perf_counter()
        coarse, lists = ix.assign(quantizer, q, nprobe)
        t1 = time.perf_counter()
        _, ids = ix.search_assigned(store.group, q, k * refine, lists, coarse, None)
        t2 = time.perf_counter()
        if refine > 1:
            keys = store.keys_of(ids)
            t3 = time.perf_counter()
            ix.exact_distances(q, keys, store.metric)
            t4 = time.perf_counter()
            out["rerank_gather"] += t3 - t2
            out["rerank_math"] += t4 - t3
        t5 = time.perf_counter()
        _, ids = store.search(q, k, nprobe=nprobe, refine=refine)
        t6 = time.perf_counter()
        store.values(ids)
        t7 = time.perf_counter()
        out["assign"] += t1 - t0
        out["scan"] += t2 - t1
        out["search"] += t6 - t5
        out["values"] += t7 - t6
    return out


def fastest_profile(store: Datastore, queries: np.ndarray, k: int, nprobe: int, refine: int = 1,
                    batch: int = 2048, rounds: int = 2) -> dict[str, float]:
    """`profile_search`, run `rounds` times: the round with the fastest whole search."""
    return min((profile_search(store, queries, k, nprobe, refine, batch) for _ in range(rounds)),
               key=lambda x: x["search"])


def precomputed_table_gain(store: Datastore, queries: np.ndarray, k: int, nprobe: int) -> str:
    """What IVF-PQ's precomputed distance table (which `group_index` skips above 64 MB)
    would save on the list scan: the scan timed without, then with it. Changes the open
    store's group index: close it afterwards."""
    import faiss

    pq = faiss.downcast_index(faiss.extract_index_ivf(store.group))
    if not isinstance(pq, faiss.IndexIVFPQ) or pq.use_precomputed_table == 1:
        return ""
    table = pq.nlist * pq.pq.M * pq.pq.ksub * 4
    if table > 2 << 30:
        return ""
    quantizer = ix.quantizer_of(store.trained)
    coarse, lists = ix.assign(quantizer, queries, nprobe)

    def scan():
        ix.search_assigned(store.group, queries, k, lists, coarse, None)

    without = best_of(3, scan)
    pq.use_precomputed_table = 1
    t = time.perf_counter()
    pq.precompute_table()
    t_build = time.perf_counter() - t
    with_table = best_of(3, scan)
    return (f"; with IVF-PQ's precomputed table (+{table / 2**20:,.0f} MB, built in {t_build:.1f} s) the list scan "
            f"takes {with_table / without:.2f}x the time ({without * 1e3:.0f} → {with_table * 1e3:.0f} ms for "
            f"{len(queries):,} queries)")


def _num(x: float | None, spec: str, unit: str = "") -> str:
    """`x` formatted, or "n/a" when it is unknown (None or NaN)."""
    return "n/a" if x is None or not np.isfinite(x) else f"{x:{spec}}{unit}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "n/a"


# ---------------------------------------------------------------------------- kNN-LM scoring


def _knn_rows(ctx: Context, path: Path, label: str, target: float) -> list[dict]:
    model, _ = ctx.model
    store = ctx.open(path)
    docs = ctx.eval_docs(ctx.args.eval_tokens)
    n = sum(len(d) - 1 for d in docs)
    kw = ctx.score_kw
    k = ctx.args.k
    # the LM's query keys (the same at every nprobe), kept by one pass that also warms the store
    res = retrieve_neighbours(model, store, docs, k, nprobe=ctx.args.knn_nprobes[0], refine=1, keep_queries=True, **kw)
    q = np.concatenate([r.queries for r in res])
    del res
    rows = []
    for nprobe in ctx.args.knn_nprobes:
        p = KNNParams.merged(store.manifest.defaults, k=k, nprobe=nprobe, refine=1)
        box: dict = {}

        def lm(box=box):
            box["lm"] = score_documents(model, docs, **kw)

        def knn(p=p, box=box):
            res = retrieve_neighbours(model, store, docs, p.k, nprobe=p.nprobe, refine=p.refine, **kw)
            box["knn"] = [r.knn_logprob(p) for r in res]

        lm(), knn()  # warm: page in the memory-mapped columns, build the masks
        t_lm, t_knn = interleaved(ctx.args.repeat, lm, knn)
        ppl_lm, ppl_knn = perplexity(box["lm"]), perplexity(box["knn"])
        # where the extra time goes: the same queries, searched in the same-sized batches
        prof = fastest_profile(store, q, p.k, p.nprobe, batch=BATCH * (WINDOW - STRIDE))
        extra = t_knn - t_lm
        ratio = t_knn / t_lm
        search_s = prof["search"] + prof["values"]
        rows.append({
            "figure": f"kNN-LM scoring slowdown vs LM-only, {label} entries, nprobe {p.nprobe}",
            "value": f"{ratio:.2f}x ({'meets' if ratio <= target else 'misses'} ≤ {target:g}x)",
            "against": f"LM-only scoring of the same {n:,} tokens, same windows ({WINDOW}/{STRIDE})",
            "detail": f"store {store.n_entries:,} entries {store.manifest.index}, k={p.k}, λ={p.lam}, T={p.temperature}; "
                      f"LM {n / t_lm:,.0f} tok/s, kNN-LM {n / t_knn:,.0f} tok/s; perplexity LM {ppl_lm:.2f}, "
                      f"kNN-LM {ppl_knn:.2f}; the searches alone take {search_s:.2f} s (coarse assignment "
                      f"{_pct(prof['assign'], search_s)}, list scan {_pct(prof['scan'], search_s)}, rest of search "
                      f"{_pct(prof['search'] - prof['assign'] - prof['scan'], search_s)}, value lookup "
                      f"{_pct(prof['values'], search_s)}) and run on a second thread beside the LM's forward "
                      f"(each library at {ctx.args.threads} thread(s)), so kNN-LM adds {extra:.2f} s"})
    if store.n_entries > 2 * ctx.args.entries and store.can_refine:  # the 1M store's recall: see `refine`
        sample = np.ascontiguousarray(q[:: max(1, len(q) // 500)][:500])
        t = time.perf_counter()
        _, exact = ExactSearch(store).search(sample, k)
        t_exact = time.perf_counter() - t
        for row, nprobe in zip(rows, ctx.args.knn_nprobes, strict=True):
            recalls = [recall_at(store.search(sample, k, nprobe=nprobe, refine=r)[1], exact) for r in (1, 2)]
            row["detail"] += (f"; recall@{k} vs exact search ({len(sample)} of these queries, exact over the "
                              f"fp16 keys in {t_exact:.0f} s): {recalls[0]:.3f}, with refine 2 {recalls[1]:.3f}")
    rows[-1]["detail"] += precomputed_table_gain(store, q[:4096], k, ctx.args.knn_nprobes[-1])
    return rows


@benchmark("knn")
def bench_knn_vs_lm(ctx: Context) -> list[dict]:
    """kNN-LM scoring time as a ratio to LM-only scoring (same tokens, same windows), at ~1M and ~10M entries."""
    rows = _knn_rows(ctx, ctx.store_path(), f"{ctx.args.entries / 1e6:g}M", 1.5)
    ctx.close(ctx.store_path())
    big = ctx.big_store_path()
    rows += _knn_rows(ctx, big, f"{ctx.args.big_entries / 1e6:g}M", 2.0)
    ctx.close(big)
    return rows


# ---------------------------------------------------------------------------- recall and refinement


@benchmark("recall")
def bench_recall(ctx: Context) -> list[dict]:
    """Recall@k of the chosen IVF-PQ configuration against exact search, and queries/s."""
    store = ctx.open(ctx.store_path())
    rng = np.random.default_rng(0)
    keys = store.shards[0].keys
    pick = np.sort(rng.choice(len(keys), ctx.args.queries, replace=False))
    q = np.asarray(keys[pick], dtype=np.float32) + rng.normal(0, 0.01, (len(pick), keys.shape[1])).astype(np.float32)
    k = ctx.args.k
    exact = ExactSearch(store)  # the float32 keys, converted once
    t_exact = best_of(1, lambda: exact.search(q, k))
    _, ie = exact.search(q, k)
    rows = []
    for nprobe in (1, 8, 32, 128):
        t = best_of(ctx.args.repeat, lambda nprobe=nprobe: store.search(q, k, nprobe=nprobe, refine=1))
        _, ia = store.search(q, k, nprobe=nprobe, refine=1)
        rows.append({"figure": f"recall@{k} IVF-PQ, nprobe {nprobe} (stored keys + noise)",
                     "value": f"{recall_at(ia, ie):.3f}",
                     "against": f"exact Flat search over the same {store.n_entries:,} fp16 keys",
                     "detail": f"{len(q) / t:,.0f} q/s vs exact {len(q) / t_exact:,.0f} q/s "
                               f"({t_exact / t:.1f}x faster); {store.manifest.index}, no re-ranking"})
    return rows


@benchmark("refine")
def bench_refine(ctx: Context) -> list[dict]:
    """Recall@k vs exact search at nprobe × refine factor, time vs un-refined search; kNN-LM perplexity with and without."""
    model, _ = ctx.model
    store = ctx.open(ctx.store_path())
    k = ctx.args.k
    q = ctx.queries(store, ctx.args.queries)
    exact = ExactSearch(store)  # the float32 keys, converted once
    t = time.perf_counter()
    _, ie = exact.search(q, k)
    t_exact = time.perf_counter() - t
    rows, grid = [], {}
    for nprobe in (8, 16, 32, 64):
        fns = [lambda nprobe=nprobe, r=r: store.search(q, k, nprobe=nprobe, refine=r) for r in (1, 2, 4, 8)]
        fns[-1]()  # warm: page the kept keys in
        times = interleaved(ctx.args.repeat, *fns)
        for r, t_r in zip((1, 2, 4, 8), times, strict=True):
            _, ia = store.search(q, k, nprobe=nprobe, refine=r)
            grid[nprobe, r] = (recall_at(ia, ie), t_r / times[0], t_r)
    for (nprobe, r), (rec, rel, t_r) in grid.items():
        rows.append({"figure": f"refine: recall@{k}, nprobe {nprobe}, refine {r}", "value": f"{rec:.3f}",
                     "against": f"exact search over the kept fp16 keys; time vs refine 1 at nprobe {nprobe}",
                     "detail": f"{rel:.2f}x the un-refined time; {len(q) / t_r:,.0f} q/s (exact: "
                               f"{len(q) / t_exact:,.0f} q/s); {len(q):,} LM query keys, {store.n_entries:,} entries "
                               f"{store.manifest.index}"})
    ok = sorted((t_r, nprobe, r, rec, rel) for (nprobe, r), (rec, rel, t_r) in grid.items()
                if rec >= 0.95 and rel <= 1.5)
    within = [(rec, nprobe, r, rel) for (nprobe, r), (rec, rel, _) in grid.items() if rel <= 1.5]
    reach = sorted((t_r, nprobe, r, rec, rel) for (nprobe, r), (rec, rel, t_r) in grid.items() if rec >= 0.95)
    if ok:
        _, nprobe, r, rec, rel = ok[0]
        verdict = f"nprobe {nprobe}, refine {r}"
        detail = f"the fastest such: recall {rec:.3f} at {rel:.2f}x the un-refined time at nprobe {nprobe}"
    else:
        rec, nprobe, r, rel = max(within)
        verdict = "none"
        detail = f"no configuration meets both; best recall at ≤ 1.5x: {rec:.3f} (nprobe {nprobe}, refine {r}, {rel:.2f}x)"
        if reach:
            _, nprobe, r, rec, rel = reach[0]
            detail += f"; the fastest reaching 0.95: nprobe {nprobe}, refine {r} (recall {rec:.3f}, {rel:.2f}x)"
        else:
            detail += "; no configuration reaches recall 0.95"
    # where a refined search spends its time (nprobe 32, refine 4)
    prof, prof1 = fastest_profile(store, q, k, 32, 4), fastest_profile(store, q, k, 32, 1)
    detail += (f"; nprobe 32 refine 4 vs 1: scan {prof['scan'] / prof1['scan']:.2f}x (k·4 candidates), fp16 key "
               f"gather {prof['rerank_gather'] * 1e3:.0f} ms, exact distances {prof['rerank_math'] * 1e3:.0f} ms, "
               f"whole search {prof['search'] * 1e3:.0f} ms vs {prof1['search'] * 1e3:.0f} ms for {len(q):,} queries")
    rows.append({"figure": "refine: configuration reaching recall ≥ 0.95 at ≤ 1.5x un-refined time", "value": verdict,
                 "against": "the issue's target", "detail": detail})
    # kNN-LM perplexity with and without refinement, on the same tokens (one LM pass, searches redone)
    docs = ctx.eval_docs(ctx.args.eval_tokens)
    base = retrieve_neighbours(model, store, docs, k, nprobe=32, refine=1, keep_queries=True, **ctx.score_kw)
    params = KNNParams.merged(store.manifest.defaults, k=k)
    ppl_lm = perplexity([b.lm_logprob for b in base])
    qs = np.concatenate([b.queries for b in base])
    configs = [(32, 1), (32, 2), (32, 4), (8, 4)]
    if ok and ok[0][1:3] not in configs:
        configs.append(ok[0][1:3])
    results = []
    for nprobe, r in [*configs, ("exact", 0)]:
        if nprobe == "exact":
            dist, ids = exact.search(qs, k)
        else:
            dist, ids = store.search(qs, k, nprobe=nprobe, refine=r)
        vals = store.values(ids)
        row, lps = 0, []
        for b in base:
            m = len(b.targets)
            dn = DocNeighbours(b.lm_logprob, b.targets, dist[row : row + m], vals[row : row + m], metric=store.metric)
            lps.append(dn.knn_logprob(params))
            row += m
        results.append((f"nprobe {nprobe}, refine {r}" if nprobe != "exact" else "exact search", perplexity(lps)))
    rows.append({"figure": f"refine: kNN-LM perplexity, {store.n_entries / 1e6:.1f}M entries",
                 "value": f"{results[0][1]:.3f} (refine 1) vs {results[2][1]:.3f} (refine 4)",
                 "against": f"the same {len(qs):,} held-out tokens; LM-only {ppl_lm:.3f}",
                 "detail": "; ".join(f"{name}: {ppl:.3f}" for name, ppl in results)
                           + f"; k={k}, λ={params.lam}, T={params.temperature}"})
    return rows


# ---------------------------------------------------------------------------- fast kNN-LM


def fast_scan_store(ctx: Context, path: Path) -> Path:
    """`path`'s store re-indexed from its kept keys with the fast-scan factory the build
    would choose for it (cached beside it): the same entries and keys, another index."""
    from silo.datastore.reindex import reindex

    m = Datastore.open(path, load_index=False).manifest
    factory = ix.choose_factory(m.entries, m.dim, ctx.args.memory_budget, rerank=True)
    out = path.parent / f"{path.name}-{factory.split(',')[-1]}"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        ctx.log(f"re-indexing {path.name} as {factory} …")
        t = time.perf_counter()
        reindex(path, out, factory)
        ctx.log(f"re-indexed in {time.perf_counter() - t:.0f} s")
    return out


def search_less(ctx: Context, store: Datastore, params: KNNParams) -> dict:
    """Adaptive retrieval's threshold and pointer reuse's count for `store` at `params`, tuned
    on validation text as `silo eval --sweep` tunes them (cached per store)."""
    from silo.eval_modes import decontaminated_docs, tune_search_less

    key = ("search_less", str(store.path), params)
    if key not in ctx._docs:
        model, tok = ctx.model
        val, policy, _ = decontaminated_docs(store, tok, ctx.args.corpus, "validation", ("restricted",), 10_000, 2048)
        neigh = retrieve_neighbours(model, store, val, params.k, nprobe=params.nprobe, refine=params.refine,
                                    policy=policy, keep_top=True, **ctx.score_kw)
        tuned: dict = {}
        tune_search_less(model, store, val, neigh, params, perplexity([n.knn_logprob(params) for n in neigh]),
                         WINDOW, STRIDE, BATCH, ctx.pad_id, policy, tuned)
        ctx._docs[key] = tuned
    return ctx._docs[key]


def _fast_rows(ctx: Context, path: Path, label: str, target: float) -> list[dict]:
    from silo.retomaton import REUSED, SEARCHED, SKIPPED

    model, _ = ctx.model
    base, fast = ctx.open(path), ctx.open(fast_scan_store(ctx, path))
    kw, k = ctx.score_kw, ctx.args.k
    params = KNNParams.merged(base.manifest.defaults, k=k, nprobe=32, refine=1)
    fparams = replace(params, refine=None)  # the fast-scan store's default re-ranking
    tuned = search_less(ctx, fast, fparams)
    skip, reuse = tuned["skip_above"], tuned["reuse"]
    docs = ctx.eval_docs(ctx.args.eval_tokens)
    n = sum(len(d) - 1 for d in docs)
    first = retrieve_neighbours(model, base, docs, k, nprobe=32, refine=1, keep_queries=True, **kw)
    q = np.concatenate([r.queries for r in first])
    # exact search over 10M keys takes minutes: kept beside the store, for these very queries
    cache = ctx.work / f"exact-{path.name}-{hashlib.sha256(q.tobytes()).hexdigest()[:16]}-k{k}.npy"
    t = time.perf_counter()
    if cache.is_file():
        exact_ids = np.load(cache)
    else:
        _, exact_ids = ExactSearch(base).search(q, k)
        np.save(cache, exact_ids)
    t_exact = time.perf_counter() - t
    exact_vals, exact_d = base.values(exact_ids), base.distances_to(q, exact_ids)
    ppl_exact = perplexity([lp for lp in _split_logprobs(first, exact_d, exact_vals, params)])
    configs = [
        ("IVF-PQ, nprobe 32 (before)", base, params),
        ("IVF-PQ, nprobe 32, refine 2", base, replace(params, refine=2)),
        *[(f"fast-scan, nprobe 32, refine {r}{' (default)' if r == fast.refine_for(None) else ''}", fast,
           replace(fparams, refine=r)) for r in (2, 4, 8)],
        (f"IVF-PQ + adaptive (skip_above {skip:g})", base, replace(params, skip_above=skip)),
        (f"IVF-PQ + pointer reuse (reuse {reuse})", base, replace(params, reuse=reuse)),
        (f"IVF-PQ, refine 2 + pointer reuse (reuse {reuse})", base, replace(params, refine=2, reuse=reuse)),
        (f"fast-scan, refine {fast.refine_for(None)} + adaptive + pointer reuse (skip_above {skip:g}, reuse {reuse})",
         fast, replace(fparams, skip_above=skip, reuse=reuse)),
    ]
    box: dict = {}

    def lm():
        box["lm"] = score_documents(model, docs, **kw)

    def knn(i: int, store: Datastore, p: KNNParams):
        res = retrieve_neighbours(model, store, docs, p.k, nprobe=p.nprobe, refine=p.refine, reuse=p.reuse,
                                  skip_above=p.skip_above, **kw)
        box[i] = (res, [r.knn_logprob(p) for r in res])

    fns = [lm] + [lambda i=i, s=st, p=p: knn(i, s, p) for i, (_, st, p) in enumerate(configs)]
    for fn in fns:
        fn()  # warm: page in the columns and keys, build the masks
    times = interleaved(ctx.args.repeat, *fns)
    t_lm, ppl_lm = times[0], perplexity(box["lm"])
    rows = []
    for i, ((name, store, p), t_knn) in enumerate(zip(configs, times[1:], strict=True)):
        res, lps = box[i]
        ids = np.concatenate([r.ids for r in res])
        how = np.concatenate([r.how for r in res])
        # recall of the searches that ran: reused tokens' neighbours are their documents' next
        # entries, by design not the nearest keys (their effect shows in the perplexity)
        looked = how == SEARCHED
        rec = recall_at(ids[looked], exact_ids[looked]) if looked.any() else float("nan")
        ppl = perplexity(lps)
        ratio = t_knn / t_lm
        ok = rec >= 0.95 and ppl <= ppl_exact * 1.01 and ratio <= target
        rows.append({
            "figure": f"fast kNN-LM, {label} entries: {name}",
            "value": f"{ratio:.2f}x LM-only, recall {rec:.3f}, perplexity {ppl:.2f} ({ppl / ppl_exact - 1:+.1%}) "
                     f"({'meets' if ok else 'misses'} ≤ {target:g}x, recall ≥ 0.95, ≤ exact + 1%)",
            "against": f"LM-only scoring of the same {n:,} tokens ({ppl_lm:.2f}); exact-search kNN-LM "
                       f"{ppl_exact:.2f}; recall@{k} of the searches run vs exact search over the fp16 keys",
            "detail": f"{store.n_entries:,} entries {store.manifest.index}, k={p.k}, λ={p.lam}, T={p.temperature}, "
                      f"nprobe {p.nprobe}, refine {store.refine_for(p.refine)}; tokens searched "
                      f"{(how == 0).mean():.1%}, reused {(how == REUSED).mean():.1%}, skipped "
                      f"{(how == SKIPPED).mean():.1%}; LM {n / t_lm:,.0f} tok/s, kNN-LM {n / t_knn:,.0f} tok/s; "
                      f"tuned on validation: skip_above {skip:g} ({tuned['skip_grid'][-1]}), reuse {reuse} "
                      f"({tuned['reuse_grid'][-1] if tuned['reuse_grid'] else 'n/a'}); exact search "
                      f"{t_exact:.0f} s{' (cached)' if t_exact < 5 else ''}"})
    return rows


def _split_logprobs(first: list[DocNeighbours], dist: np.ndarray, vals: np.ndarray, p: KNNParams) -> list:
    """kNN-LM log-probs per document from neighbours given for all rows at once."""
    out, row = [], 0
    for b in first:
        m = len(b.targets)
        out.append(DocNeighbours(b.lm_logprob, b.targets, dist[row : row + m], vals[row : row + m],
                                 metric=b.metric).knn_logprob(p))
        row += m
    return out


@benchmark("fastknn")
def bench_fast_knn(ctx: Context) -> list[dict]:
    """kNN-LM at full recall: fast-scan PQ, adaptive retrieval and pointer reuse, each alone and together."""
    rows = _fast_rows(ctx, ctx.store_path(), f"{ctx.args.entries / 1e6:g}M", 1.15)
    ctx.close(ctx.store_path())
    big = ctx.work / f"store-all-{ctx.args.big_entries}-s1"
    if (big / "manifest.json").is_file():
        rows += _fast_rows(ctx, big, f"{ctx.args.big_entries / 1e6:g}M", 1.3)
    else:
        ctx.log(f"{big} not built: `--prepare big` first for the {ctx.args.big_entries / 1e6:g}M rows")
    return rows


# ---------------------------------------------------------------------------- shards


@benchmark("shards")
def bench_shards(ctx: Context) -> list[dict]:
    """The same store built in 1 and in 8 shards: identical trained index and answers, per-query time 8:1."""
    p1, p8 = ctx.store_path(1), ctx.store_path(8)
    s1, s8 = ctx.open(p1), ctx.open(p8)
    same_trained = file_hash(p1 / "trained.faiss") == file_hash(p8 / "trained.faiss")
    k, nprobe = ctx.args.k, ctx.args.nprobe
    q = ctx.queries(s1, 1000)
    d1, i1 = s1.search(q, k, nprobe=nprobe, refine=1)
    d8, i8 = s8.search(q, k, nprobe=nprobe, refine=1)
    same_ids = int((i1 != i8).any(axis=1).sum())
    same_sets = int(sum(set(a) != set(b) for a, b in zip(i1, i8, strict=True)))
    max_dd = float(np.abs(d1 - d8).max())
    # a differing id at equal distance is a tie broken by list order (entries are added in
    # window-length order within a shard, so list order differs between the two builds)
    ties = int(sum(set(a) != set(b) and np.array_equal(x, y)
                   for a, b, x, y in zip(i1, i8, d1, d8, strict=True)))
    t1, t8 = interleaved(ctx.args.repeat, lambda: s1.search(q, k, nprobe=nprobe, refine=1),
                         lambda: s8.search(q, k, nprobe=nprobe, refine=1))
    single = q[:200]

    def one_by_one(store):
        for row in single:
            store.search(row[None], k, nprobe=nprobe, refine=1)

    u1, u8 = interleaved(ctx.args.repeat, lambda: one_by_one(s1), lambda: one_by_one(s8))
    detail = (f"{s1.n_entries:,} entries {s1.manifest.index}, k={k}, nprobe={nprobe}; trained.faiss "
              f"{'identical' if same_trained else 'DIFFERENT'} in both builds")
    rows = [
        {"figure": "shards: 8-shard vs 1-shard search time, batch 1000", "value": f"{t8 / t1:.2f}x (target ≤ 1.3x)",
         "against": "the same store built in 1 shard, same queries",
         "detail": f"{t1 / len(q) * 1e6:.0f} vs {t8 / len(q) * 1e6:.0f} µs/query; {detail}"},
        {"figure": "shards: 8-shard vs 1-shard search time, batch 1", "value": f"{u8 / u1:.2f}x (target ≤ 1.3x)",
         "against": "the same store built in 1 shard, same queries one at a time",
         "detail": f"{u1 / len(single) * 1e6:.0f} vs {u8 / len(single) * 1e6:.0f} µs/query; {detail}"},
        {"figure": "shards: answers of the 8-shard store vs the 1-shard store",
         "value": "identical" if same_ids == 0 and max_dd == 0 else
                  "identical up to ties" if max_dd == 0 and same_sets == ties else f"{same_ids} of {len(q)} rows differ",
         "against": "the 1-shard store's ids and distances, same queries",
         "detail": f"rows with another id order {same_ids}, with another id set {same_sets} (of which {ties} only "
                   f"swap entries at equal distance), max |Δdistance| {max_dd:.3g}; {detail}"},
    ]
    ctx.close(p8)
    return rows


# ---------------------------------------------------------------------------- growth


def _growth_store(ctx: Context, tiny: Path, corpus: Path, size: int, shards: int) -> Path:
    return ctx.build(ctx.work / "growth" / f"{size}-s{shards}", model=str(tiny), corpus=str(corpus), tiers=ALL_TIERS,
                     max_tokens=size, shards=shards, batch_size=32, keep_keys=False)


@benchmark("growth")
def bench_growth(ctx: Context) -> list[dict]:
    """Per-token build cost, per-query search cost and 8:1 shard ratio as the store grows (0.5M … 16M tokens)."""
    tiny = ctx.tiny_model()
    corpus = ctx.big_corpus()
    paths = {(size, shards): _growth_store(ctx, tiny, corpus, size, shards)
             for size in ctx.args.growth_sizes for shards in (1, 8)}
    model, _ = load_causal_lm(str(tiny))
    k, nprobe = ctx.args.k, ctx.args.nprobe
    stores = {key: Datastore.open(path) for key, path in paths.items()}
    key_type = next(iter(stores.values())).manifest.key_type or "ffn_input"
    q = lm_queries(model, ctx.eval_docs(40_000), 1000, key_type, pad_id=ctx.pad_id)
    fns = {key: (lambda st=st: st.search(q, k, nprobe=nprobe)) for key, st in stores.items()}
    for fn in fns.values():
        fn()  # warm
    # every store searched in each round (all sizes, both shard counts): one machine load for all
    times = dict(zip(fns, interleaved(ctx.args.repeat, *fns.values()), strict=True))
    one_q = q[:100]
    single = {key: (lambda st=st: [st.search(x[None], k, nprobe=nprobe) for x in one_q]) for key, st in stores.items()}
    times1 = dict(zip(single, interleaved(ctx.args.repeat, *single.values()), strict=True))
    rows, base = [], None
    for size in ctx.args.growth_sizes:
        m = stores[size, 1].manifest
        tm = {s: build_timing(paths[size, s]) for s in (1, 8)}  # each store's own build, not one run
        wall = {s: tm[s]["wall_s"] / tm[s]["entries"] for s in tm}
        cpu = {s: tm[s]["cpu_s"] / tm[s]["entries"] for s in tm}
        per_q, per_q1 = times[size, 1] / len(q), times1[size, 1] / len(one_q)
        base = base or {"wall": wall[1], "cpu": cpu[1], "q": per_q, "q1": per_q1, "entries": m.entries}
        rows.append({
            "figure": f"growth: {size / 1e6:g}M-token store",
            "value": f"build {_num(cpu[1] * 1e6, '.1f')} µs/token CPU ({_num(cpu[1] / base['cpu'], '.2f', 'x')}), search "
                     f"{per_q * 1e6:.0f} µs/query ({per_q / base['q']:.2f}x), 8:1 shards search "
                     f"{times[size, 8] / times[size, 1]:.2f}x",
            "against": f"the {base['entries'] / 1e6:.1f}M-token store (build: from each size's own build timing, "
                       "not one run; targets: build flat within 1.25x, search ≤ 6x at 32x the data, 8 shards ≤ 1.3x)",
            "detail": f"{m.entries:,} entries, {m.index} (nlist {nlist_of(m.index)}), tiny model d={m.dim}, k={k}, "
                      f"nprobe={nprobe}; built with {tm[1].get('threads', '?')} thread(s): wall {wall[1] * 1e6:.1f} µs/token ({wall[1] / base['wall']:.2f}x; "
                      f"{tm[1]['wall_s']:.0f} s, of which plan + index training "
                      f"{_num((tm[1].get('plan_train_s') or float('nan')) / tm[1]['wall_s'], '.0%')}), 8 shards "
                      f"{_num(cpu[8] * 1e6, '.1f')} µs/token CPU, {wall[8] * 1e6:.1f} wall; "
                      f"search batch {len(q)}: 8 shards {times[size, 8] / len(q) * 1e6:.0f} µs/query; one query at a "
                      f"time: {per_q1 * 1e6:.0f} µs ({per_q1 / base['q1']:.2f}x), 8 shards "
                      f"{times1[size, 8] / times1[size, 1]:.2f}x"})
    for st in stores.values():
        st.close()
    return rows


# ---------------------------------------------------------------------------- generation


@benchmark("generation")
def bench_generation(ctx: Context) -> list[dict]:
    """kNN-LM generation tokens/s vs LM-only generation on the same prompts (greedy), as before and fast."""
    store = ctx.open(ctx.store_path())
    params = KNNParams.merged(store.manifest.defaults, k=ctx.args.k, nprobe=ctx.args.nprobe, refine=1)
    fast = ctx.open(fast_scan_store(ctx, ctx.store_path()))
    fparams = replace(params, refine=None)
    tuned = search_less(ctx, fast, fparams)
    fparams = replace(fparams, reuse=tuned["reuse"], skip_above=tuned["skip_above"])
    return [_generation_row(ctx, store, params, "IVF-PQ, every token searched"),
            _generation_row(ctx, fast, fparams, f"fast-scan + adaptive (skip_above {fparams.skip_above:g}) + "
                                                f"pointer reuse (reuse {fparams.reuse})", target=1.3)]


def _generation_row(ctx: Context, store: Datastore, params: KNNParams, label: str, target: float = 2.0) -> dict:
    model, tok = ctx.model
    docs = ctx.eval_docs(ctx.args.eval_tokens)
    prompts = [tok.decode(d[1:33], skip_special_tokens=True) for d in docs[: ctx.args.prompts]]
    n_new = ctx.args.new_tokens
    import silo.retomaton as walk_module

    spent = {"search": 0.0, "values": 0.0, "attribute": 0.0, "reused_neighbours": 0.0}
    owners = {name: walk_module if name == "reused_neighbours" else store for name in spent}
    originals = {name: getattr(owners[name], name) for name in spent}

    def timed(name):
        fn = originals[name]

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    for name in spent:
        setattr(owners[name], name, timed(name))
    try:
        list(generate(model, tok, prompts[0], 4, store=store, params=params))  # warm
        for name in spent:
            spent[name] = 0.0
        best: dict[str, list[float]] = {"lm": [], "knn": []}
        for _ in range(ctx.args.repeat):
            t_lm_r = t_knn_r = 0.0
            c = {"lm": 0, "knn": 0}
            s0 = dict(spent)
            for prompt in prompts:  # alternate per prompt: both see the same load
                t = time.perf_counter()
                c["lm"] += len(list(generate(model, tok, prompt, n_new, store=None)))
                t_lm_r += time.perf_counter() - t
                t = time.perf_counter()
                c["knn"] += len(list(generate(model, tok, prompt, n_new, store=store, params=params)))
                t_knn_r += time.perf_counter() - t
            best["lm"].append(t_lm_r)
            best["knn"].append(t_knn_r)
            if t_knn_r <= min(best["knn"]):
                last = {name: spent[name] - s0[name] for name in spent}
            counts = c
        t_lm, t_knn = min(best["lm"]), min(best["knn"])
    finally:
        for name in spent:
            if owners[name] is store:
                delattr(store, name)
            else:
                setattr(owners[name], name, originals[name])
    extra = t_knn - t_lm
    ratio = (t_knn / counts["knn"]) / (t_lm / counts["lm"])
    return {"figure": f"kNN-LM generation slowdown vs LM-only (greedy), {label}",
            "value": f"{ratio:.2f}x ({'meets' if ratio <= target else 'misses'} ≤ {target:g}x)",
            "against": f"LM-only generation of the same {len(prompts)} prompts × {n_new} new tokens (per-token time)",
            "detail": f"LM {counts['lm'] / t_lm:.1f} tok/s, kNN-LM {counts['knn'] / t_knn:.1f} tok/s; store "
                      f"{store.n_entries:,} entries {store.manifest.index}, k={params.k}, nprobe={params.nprobe}, "
                      f"refine {store.refine_for(params.refine)}, reuse {params.reuse}, skip_above "
                      f"{params.skip_above:g}; extra {extra / max(counts['knn'], 1) * 1e3:.1f} ms/token = search "
                      f"{_pct(last['search'], extra)}, pointer distances {_pct(last['reused_neighbours'], extra)}, values "
                      f"{_pct(last['values'], extra)}, attribution {_pct(last['attribute'], extra)}, rest (hook, "
                      f"pointer steps, p_kNN over the vocabulary, mixing) {_pct(extra - sum(last.values()), extra)}"}


# ---------------------------------------------------------------------------- memory


RSS_CHILD = r"""
import json, sys, time
sys.path.insert(0, ROOT)

def rss_anon_kb():  # not tools/soak.py's rss_kb: importing it would load grpc before the first figure
    out = {}
    for line in open("/proc/self/status").read().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out

out = {"imports": rss_anon_kb()}
from silo.datastore.kinds import open_store
from silo.server.app import load_state
from silo.server.client import retrieval_options
from silo.server.gen import silo_pb2 as pb
from silo.server.servicers import LanguageModelServicer
import numpy as np
import faiss
state = load_state(MODEL, [])               # the model only
out["model_only"] = rss_anon_kb()
t = time.perf_counter()
store = open_store(STORE)                     # what load_state does for each store
store.check_model(MODEL)
state.stores[store.manifest.kind] = store
out["load_s"] = time.perf_counter() - t
out["store_loaded"] = rss_anon_kb()
ivf = faiss.extract_index_ivf(store.group)
inv = ivf.invlists
sizes = np.array([inv.list_size(i) for i in range(inv.nlist)], dtype=np.int64)
out["lists_bytes"] = int(sizes.sum() * (inv.code_size + 8))
out["quantizer_bytes"] = int(faiss.serialize_index(ivf.quantizer).size)
pq = faiss.downcast_index(ivf)
try:
    out["precomputed_table_bytes"] = int(pq.precomputed_table.size() * 4) if pq.use_precomputed_table == 1 else 0
except AttributeError:
    out["precomputed_table_bytes"] = 0
out["index_file_bytes"] = sum((s.path / "index.faiss").stat().st_size for s in store.shards)
out["model_bytes"] = sum(p.numel() * p.element_size() for p in state.model.parameters())
out["entries"] = store.n_entries
out["factory"] = store.manifest.index
rng = np.random.default_rng(0)
keys = np.asarray(store.shards[0].keys[rng.choice(store.shards[0].info.entries, 2048, replace=False)], dtype=np.float32)
for _ in range(3):
    store.search(keys, 64, nprobe=32)
svc = LanguageModelServicer(state)
for i in range(4):
    svc.Score(pb.ScoreRequest(text=TEXT, retrieval=retrieval_options("knn", k=64)), None)
out["served"] = rss_anon_kb()
print("RSS-JSON " + json.dumps(out))
"""


@benchmark("rss")
def bench_rss(ctx: Context) -> list[dict]:
    """Anonymous RSS of a serving process (10M store) vs FAISS index bytes + model + 256 MB."""
    store = ctx.big_store_path()
    text = _text_of_tokens(ctx, 512)
    code = (RSS_CHILD.replace("ROOT", repr(str(ROOT))).replace("MODEL", repr(str(ctx.args.model)))
            .replace("STORE", repr(str(store))).replace("TEXT", repr(text)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RSS-JSON ")), None)
    if line is None:
        raise RuntimeError(f"the serving process failed:\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("RSS-JSON "):])
    mb = 1 << 20
    index_b = r["lists_bytes"] + r["quantizer_bytes"] + r["precomputed_table_bytes"]
    served = r["served"]["RssAnon"] * 1024
    model_only = r["model_only"]["RssAnon"] * 1024
    budget = index_b + model_only + 256 * mb  # "model" = what the process holds with the model loaded
    strict = index_b + r["model_bytes"] + 256 * mb  # … or the parameters alone
    hwm = {k: r[k]["VmHWM"] / 1024 for k in ("model_only", "store_loaded", "served")}
    return [{"figure": f"serving RssAnon, {r['entries'] / 1e6:.1f}M-entry store",
             "value": f"{served / mb:,.0f} MB ({'meets' if served <= budget else 'misses'} ≤ {budget / mb:,.0f} MB)",
             "against": "FAISS index bytes + the model-only process's RssAnon + 256 MB (the issue's target)",
             "detail": f"{r['factory']}; index {index_b / mb:,.0f} MB (inverted lists {r['lists_bytes'] / mb:,.0f} MB, "
                       f"quantizer {r['quantizer_bytes'] / mb:.0f} MB, precomputed table "
                       f"{r['precomputed_table_bytes'] / mb:.0f} MB; index.faiss on disk "
                       f"{r['index_file_bytes'] / mb:,.0f} MB); RssAnon after imports {r['imports']['RssAnon'] / 1024:.0f} "
                       f"MB, model only {model_only / mb:.0f} MB (parameters {r['model_bytes'] / mb:.0f} MB: against "
                       f"parameters alone the budget is {strict / mb:,.0f} MB, {'met' if served <= strict else 'missed'}), "
                       f"store loaded {r['store_loaded']['RssAnon'] / 1024:,.0f} MB (in {r['load_s']:.0f} s), after "
                       f"3×2048 searches + 4 kNN Score calls {served / mb:,.0f} MB; store share (served − model only) "
                       f"{(served - model_only) / mb:,.0f} MB = {(served - model_only) / index_b:.2f}x the index; RssFile "
                       f"{r['served']['RssFile'] / 1024:,.0f} MB (mapped columns, text, keys); peak VmHWM after model "
                       f"{hwm['model_only']:,.0f} MB, after store load {hwm['store_loaded']:,.0f} MB, at the end "
                       f"{hwm['served']:,.0f} MB"}]


SSD_CHILD = r"""
import json, sys, time
sys.path.insert(0, ROOT)
import numpy as np

def rss_kb():
    out = {}
    for line in open("/proc/self/status").read().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(rest.split()[0])
    return out

import faiss
faiss.omp_set_num_threads(__THREADS__)
from silo.datastore import index as ix
from silo.datastore.store import Datastore
out = {"imports": rss_kb()}
t = time.perf_counter()
store = Datastore.open(STORE, lists=LISTS)
out["load_s"] = time.perf_counter() - t
out["opened"] = rss_kb()
files = [str(s.path / "index.faiss") for s in store.shards]
q = np.load(QUERIES)
k, nprobe, batch = __K__, __NPROBE__, 256

def single(rows, cold):
    lat = []
    for i in rows:
        if cold:
            for f in files:
                ix.evict_cached(f)
        t = time.perf_counter()
        store.search_ex(q[i:i + 1], k, nprobe, None, refine=1)
        lat.append(time.perf_counter() - t)
    return [float(np.percentile(lat, 50)), float(np.percentile(lat, 99))]

def batched(cold):
    best = float("inf")
    for rep in range(3):
        if cold:
            for f in files:
                ix.evict_cached(f)
        t = time.perf_counter()
        store.search_ex(q[:batch], k, nprobe, None, refine=1)
        best = min(best, (time.perf_counter() - t) / batch)
        if cold:
            break
    return best

out["ids"] = store.search_ex(q[:64], k, nprobe, None, refine=1).ids.tolist()  # the layouts must agree
store.search_ex(q, k, nprobe, None, refine=1)  # warm: every list the queries probe is in the cache
out["warm_batch"] = batched(False)
out["warm_single"] = single(range(__SINGLE__), False)
if LISTS == "ssd":
    out["cold_single"] = single(range(__SINGLE__, __SINGLE__ + 100), True)
    out["cold_batch"] = batched(True)
    for f in files:  # the kernel's default readahead, as faiss leaves a mapping
        ix.advise_random(f, random=False)
    out["cold_readahead"] = single(range(__SINGLE__ + 100, __SINGLE__ + 130), True)
    for f in files:
        ix.advise_random(f)
    import os
    fd, lat = os.open(files[0], os.O_RDONLY), []  # the disk itself: 4 KB read at random, uncached
    pages = os.fstat(fd).st_size // 4096
    for f in files:
        ix.evict_cached(f)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    for off in np.random.default_rng(0).choice(pages, 200, replace=False):
        t = time.perf_counter()
        os.pread(fd, 4096, int(off) * 4096)
        lat.append(time.perf_counter() - t)
    os.close(fd)
    out["pread_4k"] = float(np.median(lat))
out["served"] = rss_kb()
out["factory"], out["entries"] = store.manifest.index, store.n_entries
out["index_file_bytes"] = sum((s.path / "index.faiss").stat().st_size for s in store.shards)
print("SSD-JSON " + json.dumps(out))
"""


def mappable_store(ctx: Context, path: Path) -> Path:
    """`path`'s store if faiss can map its lists, else a copy re-indexed with 8-bit codes for SSD."""
    from silo.datastore.reindex import reindex

    m = Datastore.open(path, load_index=False).manifest
    if not ix.is_fast_scan(m.index):
        return path
    factory = ix.choose_factory(m.entries, m.dim, ctx.args.memory_budget, rerank=True, lists="ssd")
    out = path.parent / f"{path.name}-{factory.split(',')[-1]}"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        ctx.log(f"re-indexing {path.name} as {factory} for SSD …")
        reindex(path, out, factory, lists="ssd")
    return out


def ssd_layouts(ctx: Context, store: Path, n_queries: int = 2048, single: int = 500,
                rounds: int = 2) -> dict[str, dict]:
    """Each layout of `store`'s lists measured in a fresh process of its own (RssAnon is the
    process's): load, warm and cold single-query and batch latency, resident memory; the
    layouts alternate for `rounds` rounds, and the faster round's latencies count."""
    queries = ctx.work / f"ssd-queries-{n_queries}.npy"
    if not queries.is_file():
        np.save(queries, ctx.queries(ctx.open(store), n_queries))
        ctx.close(store)
    out: dict[str, dict] = {}
    for lists in ix.LISTS * rounds:  # ram, ssd, ram, ssd: a neighbour's load hits both alike
        code = SSD_CHILD
        for name, value in (("ROOT", str(ROOT)), ("STORE", str(store)), ("LISTS", lists), ("QUERIES", str(queries))):
            code = code.replace(name, repr(value))
        code = (code.replace("__THREADS__", str(ctx.args.threads)).replace("__NPROBE__", str(ctx.args.nprobe))
                .replace("__SINGLE__", str(single)).replace("__K__", str(ctx.args.k)))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("SSD-JSON ")), None)
        if line is None:
            raise RuntimeError(f"the {lists} layout failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[len("SSD-JSON "):])
        if lists in out:  # the faster round's latencies (a shared machine only ever adds time)
            for key in ("warm_batch", "cold_batch", "pread_4k"):
                if key in r:
                    r[key] = min(r[key], out[lists][key])
            for key in ("warm_single", "cold_single", "cold_readahead"):
                if key in r:
                    r[key] = min(r[key], out[lists][key])
        out[lists] = r
    return out


@benchmark("ssd")
def bench_ssd(ctx: Context) -> list[dict]:
    """Inverted lists on SSD (memory-mapped) vs in RAM at 10M entries: RssAnon, warm and cold latency."""
    store = mappable_store(ctx, ctx.big_store_path())
    r = ssd_layouts(ctx, store)
    ram, ssd = r["ram"], r["ssd"]
    mb = 1024  # kB per MB
    own = {k: (v["served"]["RssAnon"] - v["imports"]["RssAnon"]) / mb for k, v in r.items()}
    same = ram["ids"] == ssd["ids"]
    ms = 1e3
    head = (f"{ssd['entries'] / 1e6:.1f}M entries, {ssd['factory']}, index.faiss {ssd['index_file_bytes'] / 2**20:,.0f} "
            f"MB, k={ctx.args.k}, nprobe={ctx.args.nprobe}, {ctx.args.threads} thread(s)")
    return [
        {"figure": "SSD lists: the store's RssAnon (served − after imports)",
         "value": f"{own['ssd']:,.0f} MB vs {own['ram']:,.0f} MB = {own['ssd'] / own['ram']:.0%} "
                  f"({'meets' if own['ssd'] <= 0.25 * own['ram'] else 'misses'} ≤ 25%)",
         "against": "the same store with its lists in RAM, each in a fresh process",
         "detail": f"{head}; load {ssd['load_s']:.1f} s vs {ram['load_s']:.1f} s; RssFile at the end "
                   f"{ssd['served']['RssFile'] / mb:,.0f} MB vs {ram['served']['RssFile'] / mb:,.0f} MB (page cache, "
                   f"reclaimable); answers identical: {same}"},
        {"figure": "SSD lists: warm p50 single-query latency",
         "value": f"{ssd['warm_single'][0] * ms:.2f} ms vs {ram['warm_single'][0] * ms:.2f} ms = "
                  f"{ssd['warm_single'][0] / ram['warm_single'][0]:.2f}x "
                  f"({'meets' if ssd['warm_single'][0] <= 2 * ram['warm_single'][0] else 'misses'} ≤ 2x)",
         "against": "lists in RAM",
         "detail": f"{head}; p99 {ssd['warm_single'][1] * ms:.2f} vs {ram['warm_single'][1] * ms:.2f} ms; batch of "
                   f"256: {ssd['warm_batch'] * ms:.3f} vs {ram['warm_batch'] * ms:.3f} ms/query "
                   f"({ssd['warm_batch'] / ram['warm_batch']:.2f}x)"},
        {"figure": "SSD lists: cold-cache latency (lists evicted before each query)",
         "value": f"p50 {ssd['cold_single'][0] * ms:.1f} ms = {ssd['cold_single'][0] / ram['warm_single'][0]:.0f}x RAM",
         "against": "lists in RAM (warm single query)",
         "detail": f"{head}; p99 {ssd['cold_single'][1] * ms:.1f} ms; a cold batch of 256: "
                   f"{ssd['cold_batch'] * ms:.2f} ms/query ({ssd['cold_batch'] / ram['warm_batch']:.1f}x RAM); this "
                   f"machine's disk reads 4 KB at random in {ssd['pread_4k'] * ms:.2f} ms (p50, uncached); each probed "
                   "list is read page by page "
                   f"(MADV_RANDOM; with the kernel's default readahead, as faiss leaves a mapping, a cold query "
                   f"took {ssd['cold_readahead'][0] * ms:.0f} ms at p50)"},
    ]


@benchmark("bytes")
def bench_bytes(ctx: Context) -> list[dict]:
    """Store bytes per entry: index, entry metadata, fp16 keys, text, docs — the inputs of a capacity plan."""
    import faiss

    rows = []
    for path in (ctx.store_path(), ctx.big_store_path()):
        store = Datastore.open(path, load_index=False)
        n = store.n_entries

        def size(*names, store=store):
            return sum((s.path / name).stat().st_size for s in store.shards for name in names
                       if (s.path / name).is_file())

        index_b = size("index.faiss")
        meta_b = size(*(f"{c}.npy" for c in ("value", "doc", "position", "sentence")))
        keys_b = size("keys.npy")
        text_b = size("text.bin", "text_offsets.npy", "sentences.npy", "sentence_offsets.npy")
        docs_b = size("docs.parquet")
        trained = faiss.read_index(str(path / "trained.faiss"))
        code = faiss.extract_index_ivf(trained).code_size
        rows.append({"figure": f"bytes per entry, {n / 1e6:.1f}M-entry store",
                     "value": f"{(index_b + meta_b) / n:.1f} B in RAM-or-mapped (index + entry metadata)",
                     "against": f"FAISS code {code} B + id 8 B = {code + 8} B",
                     "detail": f"index {index_b / n:.1f} B (RAM), entry metadata {meta_b / n:.1f} B (memory-mapped "
                               f".npy: value, doc, position, sentence), fp16 keys {keys_b / n:.0f} B (optional, mapped), "
                               f"text {text_b / n:.2f} B, docs.parquet {docs_b / n:.3f} B; {n:,} entries, "
                               f"{store.n_documents:,} documents, {store.manifest.index}, {len(store.shards)} shard(s)"})
        store.close()
    return rows


# ---------------------------------------------------------------------------- ∞-gram


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


@benchmark("infgram")
def bench_infgram(ctx: Context) -> list[dict]:
    """∞-gram: build tokens/s, index bytes per token, scoring vs LM-only, Trace latency (256 tokens)."""
    from silo.datastore.infgram import SA_DIR, InfgramStore

    from silo.eval_modes import decontaminated_docs
    from silo.infgram import score_infgram, sweep_lambdas, trace

    model, tok = ctx.model
    path = ctx.work / f"infgram-restricted-{ctx.args.entries}"
    shutil.rmtree(path, ignore_errors=True)
    t, cpu0 = time.perf_counter(), time.process_time()
    build_store(BuildArgs(model=ctx.args.model, kind="infgram", corpus=ctx.args.corpus, out=str(path),
                              tiers=("restricted",), max_tokens=ctx.args.entries, progress=False))
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
    store = InfgramStore.open(path)
    n_tok = store.n_entries
    sa = sum(_dir_bytes(s.path / SA_DIR) for s in store.shards)
    total = _dir_bytes(path)
    rows = [{"figure": "∞-gram build throughput", "value": f"{n_tok / wall:,.0f} tokens/s",
             "against": "wall clock of `silo datastore build --kind infgram` (tokenize, suffix array, write)",
             "detail": f"{n_tok:,} tokens of the restricted tier in {wall:.1f} s (CPU {cpu:.1f} s in this process); "
                       f"{store.n_documents:,} documents, {len(store.shards)} shard(s)"},
            {"figure": "∞-gram index bytes per token", "value": f"{sa / n_tok:.2f} B",
             "against": "infini-gram's published ~7 B/token (2-byte token ids + 5-byte suffix array pointers)",
             "detail": f"suffix arrays and token arrays {sa:,} B; whole store {total / n_tok:.2f} B/token "
                       f"({total:,} B: + document metadata, text and offsets for attribution and tracing)"}]

    # the held-out documents, with the store's near-copies of them kept out as `silo eval` does
    # (the harvest holds templated pages: undecontaminated, most held-out text is in the store)
    docs, policy, checks = decontaminated_docs(store, tok, ctx.args.corpus, "test", ("restricted",),
                                               ctx.args.eval_tokens)
    n = sum(len(d) - 1 for d in docs)
    kw = ctx.score_kw
    box: dict = {}

    def lm():
        box["lm"] = score_documents(model, docs, **kw)

    def inf():
        box["inf"] = score_infgram(model, store, docs, **kw, policy=policy, threads=ctx.args.threads)

    lm(), inf()  # warm: page in the suffix arrays, build the decontaminated view
    t_lm, t_inf = interleaved(ctx.args.repeat, lm, inf)
    t_match = best_of(ctx.args.repeat, lambda: score_infgram(model, store, docs, **kw, lm_logprobs=box["lm"],
                                                              policy=policy, threads=ctx.args.threads))
    raw = score_infgram(model, store, docs, **kw, lm_logprobs=box["lm"], threads=ctx.args.threads)
    ppl_lm = perplexity(box["lm"])
    ppl_inf = perplexity([d.logprob(sweep_lambdas(box["inf"])[0]) for d in box["inf"]])
    ppl_raw = perplexity([d.logprob(sweep_lambdas(raw)[0]) for d in raw])
    hit = np.mean(np.concatenate([d.suffix_len for d in box["inf"]]))
    ratio = t_inf / t_lm
    rows.append({"figure": "∞-gram scoring slowdown vs LM-only",
                 "value": f"{ratio:.2f}x ({'meets' if ratio <= 1.5 else 'misses'} ≤ 1.5x)",
                 "against": f"LM-only scoring of the same {n:,} held-out tokens, same windows ({WINDOW}/{STRIDE})",
                 "detail": f"LM {n / t_lm:,.0f} tok/s, LM + ∞-gram {n / t_inf:,.0f} tok/s; the matching alone "
                           f"{n / t_match:,.0f} tok/s ({t_match * 1e6 / n:.0f} µs/token); perplexity LM {ppl_lm:.2f}, "
                           f"∞-gram {ppl_inf:.2f} (mean longest suffix {hit:.1f} tokens; {checks['leaked_eval_docs']} "
                           f"leaked and {checks['decontaminated_store_docs']} near-copy store documents kept out; "
                           f"without that {ppl_raw:.2f}; λ per suffix length tuned on these tokens); "
                           f"{n_tok:,}-token store"})

    texts = {"held-out text": _text_of_tokens(ctx, 256)}
    long_docs = np.flatnonzero(store.docs.n_tokens >= 300)
    if len(long_docs):  # a stored document's first 256 tokens: long verbatim spans
        ids = text_ids(tok, store.docs.text(int(long_docs[0])))
        texts["text copied from the store"] = tok.decode(ids[:256], skip_special_tokens=True)
    for label, text in texts.items():
        n_ids = len(text_ids(tok, text))
        trace(store, tok, text)  # warm
        times = [best_of(1, lambda text=text: trace(store, tok, text)) for _ in range(10 * ctx.args.repeat)]
        spans = trace(store, tok, text)
        rows.append({"figure": f"Trace latency, {n_ids}-token {label}",
                     "value": f"p50 {np.median(times) * 1e3:.1f} ms",
                     "against": "in-process `trace` (tokenize, maximal verbatim spans ≥ 8 tokens, documents)",
                     "detail": f"p90 {np.percentile(times, 90) * 1e3:.1f} ms over {len(times)} calls; {len(spans)} "
                               f"span(s), longest {max((s.end_token - s.start_token for s in spans), default=0)} "
                               f"tokens; {n_tok:,}-token store"})
    store.close()
    return rows


# ---------------------------------------------------------------------------- build


@benchmark("build")
def bench_build(ctx: Context) -> list[dict]:
    """Build throughput (tokens/s) as a ratio to the LM's plain forward throughput."""
    model, _ = ctx.model
    docs = ctx.eval_docs(ctx.args.build_tokens)
    n = sum(len(d) - 1 for d in docs)
    out = ctx.work / "build-bench"

    def forward():
        score_documents(model, docs, **ctx.score_kw)

    def build():  # `build_store` loads the model itself: its load is part of the build's time
        shutil.rmtree(out, ignore_errors=True)  # the last build's 50k-entry Flat store: milliseconds
        build_store(BuildArgs(model=ctx.args.model, corpus=ctx.args.corpus, out=str(out), tiers=("restricted",),
                              split="test", max_tokens=ctx.args.build_tokens, window=WINDOW, stride=STRIDE,
                              batch_size=BATCH, factory="Flat", progress=False))

    t_fwd, t_build = interleaved(ctx.args.repeat, forward, build)
    t_load = best_of(1, lambda: load_causal_lm(ctx.args.model))
    entries = Datastore.open(out, load_index=False).n_entries
    shutil.rmtree(out, ignore_errors=True)
    return [{"figure": "token-store build throughput (model load included) vs plain forward",
             "value": f"{t_fwd / t_build * entries / n:.2f}x",
             "against": "the LM's forward pass over the same text, model already loaded (the physical floor; "
                        "1.00x = no overhead)",
             "detail": f"build {entries / t_build:,.0f} entries/s (load the model, tokenize, keys, index, write; "
                       f"loading the model alone takes {t_load:.2f} s of the build's {t_build:.1f} s), "
                       f"forward {n / t_fwd:,.0f} tok/s; Flat index, {entries:,} entries"}]


# ---------------------------------------------------------------------------- serving


def _server(ctx: Context, store: Path):
    from silo.server.app import build_server, load_state
    from silo.server.auth import Auth
    from silo.server.client import SiloClient
    from silo.server.servicers import DatastoreServicer, LanguageModelServicer

    auth = Auth(admin_token=ADMIN_TOKEN)
    state = load_state(ctx.args.model, [str(store)], auth=auth)
    server, port, _ = build_server({"LanguageModel": LanguageModelServicer(state),
                                    "Datastore": DatastoreServicer(state)}, 0, auth=auth, max_workers=16,
                                   max_concurrent=64)
    return server, SiloClient(f"127.0.0.1:{port}", token=ADMIN_TOKEN), state


def _text_of_tokens(ctx: Context, n: int) -> str:
    _, tok = ctx.model
    docs = ctx.eval_docs(max(4 * n, 4000))
    ids = [t for d in docs for t in d[1:-1]][:n]
    return tok.decode(ids, skip_special_tokens=True)


@benchmark("grpc")
def bench_grpc_overhead(ctx: Context) -> list[dict]:
    """Score over gRPC vs the same call in-process, 512-token text."""
    from silo.server.client import retrieval_options
    from silo.server.gen import silo_pb2 as pb
    from silo.server.servicers import LanguageModelServicer

    from silo.tokenizer import encode_document

    _, tok = ctx.model
    server, client, state = _server(ctx, ctx.store_path())
    text = _text_of_tokens(ctx, 512)
    ids = encode_document(tok, text)
    in_process = LanguageModelServicer(state)  # the very method the server runs, minus gRPC
    rows = []
    try:
        for mode in ("none", "knn"):
            request = pb.ScoreRequest(text=text, retrieval=retrieval_options(mode))

            def local(request=request):
                in_process.Score(request, None)

            client.score(text, mode=mode)  # warm
            t_local, t_grpc = [], []
            for _ in range(ctx.args.repeat * 3):  # alternate: both see the same machine load
                t_local.append(best_of(1, local))
                t_grpc.append(best_of(1, lambda mode=mode: client.score(text, mode=mode)))
            lo, gr = float(np.median(t_local)), float(np.median(t_grpc))
            rows.append({"figure": f"Score over gRPC overhead ({mode}, {len(ids) - 1} tokens)",
                         "value": f"{100 * (gr / lo - 1):+.1f}%",
                         "against": "the same Score method called in-process (aim ≤ 10%)",
                         "detail": f"median in-process {lo * 1e3:.1f} ms, gRPC {gr * 1e3:.1f} ms; "
                                   f"store {state.token_store.n_entries:,} entries"})
    finally:
        server.stop(0)
        client.close()
    return rows


@benchmark("http")
def bench_http_overhead(ctx: Context) -> list[dict]:
    """Score (512 tokens) and a 64-token generation over HTTP and gRPC vs the same servicer in-process."""
    import openai
    from silo.server.app import make_admission
    from silo.server.client import retrieval_options
    from silo.server.gen import silo_pb2 as pb
    from silo.server.http import HttpCall, start_http
    from silo.server.servicers import LanguageModelServicer

    server, client, state = _server(ctx, ctx.store_path())
    http = start_http(state, make_admission(16, 64, state.limits))
    api = openai.OpenAI(base_url=http.url + "/v1", api_key=ADMIN_TOKEN, max_retries=0)
    model = Path(state.model_dir).resolve().name
    in_process = LanguageModelServicer(state)  # the very methods both servers run
    text = _text_of_tokens(ctx, 512)
    prompt = _text_of_tokens(ctx, 32)
    rows = []
    try:
        for mode in ("none", "knn"):
            score = pb.ScoreRequest(text=text, retrieval=retrieval_options(mode))
            gen = pb.GenerateRequest(prompt=prompt, max_new_tokens=64, retrieval=retrieval_options(mode))
            calls = {
                "Score": (lambda score=score: in_process.Score(score, None),
                          lambda mode=mode: client.score(text, mode=mode),
                          lambda score=score: http_post(http.url + "/v1/silo/score", score)),
                "64-token generation": (
                    lambda gen=gen: list(in_process.Generate(gen, HttpCall(None))),
                    lambda mode=mode: list(client.generate(prompt, max_new_tokens=64, mode=mode)),
                    lambda mode=mode: api.completions.create(model=f"{model}:{mode}", prompt=prompt, max_tokens=64,
                                                             temperature=0)),
            }
            for what, fns in calls.items():
                for fn in fns:
                    fn()  # warm
                times = [[], [], []]
                for _ in range(ctx.args.repeat * 3):  # alternate: all three see the same machine load
                    for i, fn in enumerate(fns):
                        times[i].append(best_of(1, fn))
                lo, gr, ht = (float(np.median(t)) for t in times)
                rows.append({"figure": f"{what} over HTTP overhead ({mode})",
                             "value": f"{100 * (ht / lo - 1):+.1f}%",
                             "against": "the same servicer method called in-process (gRPC beside it)",
                             "detail": f"median in-process {lo * 1e3:.1f} ms, gRPC {gr * 1e3:.1f} ms "
                                       f"({100 * (gr / lo - 1):+.1f}%), HTTP {ht * 1e3:.1f} ms; "
                                       f"store {state.token_store.n_entries:,} entries"})
    finally:
        http.stop()
        server.stop(0)
        client.close()
    return rows


def http_post(url: str, message) -> dict:
    """POST a request message as JSON (the /v1/silo/ routes), as a client would."""
    import urllib.request

    from silo.server.http import to_json

    req = urllib.request.Request(url, json.dumps(to_json(message)).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


@benchmark("concurrency")
def bench_concurrency(ctx: Context) -> list[dict]:
    """16 concurrent clients, a fixed number of calls each: errors, p50/p99, throughput."""
    import threading

    from silo.server.client import SiloClient

    server, client, _ = _server(ctx, ctx.store_path())
    text = _text_of_tokens(ctx, 64)
    lat, errors, lock = [], [], threading.Lock()

    def worker(i: int) -> None:
        c = SiloClient(client.target)
        for j in range(ctx.args.calls):
            t = time.perf_counter()
            try:
                if j % 2:
                    c.search(text[: 40 + i], k=8)
                else:
                    c.score(text, mode="knn")
                with lock:
                    lat.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(e))
        c.close()

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        t0 = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = time.perf_counter() - t0
    finally:
        server.stop(0)
        client.close()
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    return [{"figure": "16 concurrent clients (Score kNN-LM 64 tok / Search, alternating)",
             "value": f"{len(errors)} errors / {16 * ctx.args.calls} calls",
             "against": "zero errors expected",
             "detail": f"p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, {len(lat) / wall:.1f} calls/s on "
                       f"{os.cpu_count()} cores" + (f"; first error {errors[0][:200]}" if errors else "")}]


def _launch_shard_server(store: Path, shards: str, token: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """A `silo serve-shards` process, as an operator starts one; (process, host:port) once it serves."""
    ready = log.with_suffix(".port")
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "silo.app.cli", "serve-shards", str(store), "--shards", shards,
                             "--shard-token-file", str(token), "--port", "0", "--ready-file", str(ready)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    until = time.monotonic() + 300
    while not (ready.is_file() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > until:
            proc.kill()
            raise RuntimeError(f"shard server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{ready.read_text().strip()}"


@benchmark("failover")
def bench_failover(ctx: Context) -> list[dict]:
    """Shard replicas under load: a replica killed, and one stalled, vs steady state (errors, p50/p99)."""
    import signal
    import threading

    from silo.server.app import build_server, load_state
    from silo.server.client import SiloClient
    from silo.server.servicers import DatastoreServicer, LanguageModelServicer

    store = ctx.store_path(8)
    root = ctx.work / "failover"
    root.mkdir(exist_ok=True)
    token = root / "shard.token"
    token.write_text("bench-shard-token-0123456789abcdef\n")
    procs, targets = {}, {}
    for group, shards in enumerate(("0-3", "4-7")):
        for replica in "ab":
            name = f"{replica}{group}"
            procs[name], targets[name] = _launch_shard_server(store, shards, token, root / f"{name}.log")
    state = load_state(ctx.args.model, [str(store)], remote_shards=[f"{targets['a0']}+{targets['b0']}",
                                                                     f"{targets['a1']}+{targets['b1']}"],
                       shard_token=token.read_text().strip(), shard_deadline_s=5.0)
    server, port, _ = build_server({"LanguageModel": LanguageModelServicer(state),
                                    "Datastore": DatastoreServicer(state)}, 0, max_workers=16, max_concurrent=64)
    text = _text_of_tokens(ctx, 64)
    calls: list[tuple[float, float, bool]] = []  # (start, seconds, ok)
    stop, lock = threading.Event(), threading.Lock()

    def client(i: int) -> None:
        with SiloClient(f"127.0.0.1:{port}") as c:
            j = 0
            while not stop.is_set():
                t = time.monotonic()
                try:
                    c.search(text[: 30 + (7 * i + j) % 200], k=64)
                    ok = True
                except Exception:  # noqa: BLE001 - counted
                    ok = False
                with lock:
                    calls.append((t, time.monotonic() - t, ok))
                j += 1

    window = 8.0
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    try:
        [t.start() for t in threads]
        time.sleep(3)  # warm-up
        t_steady = time.monotonic()
        time.sleep(window)
        t_stall = time.monotonic()
        os.killpg(procs["a0"].pid, signal.SIGSTOP)  # late, not dead: every call to it times out
        time.sleep(window)
        os.killpg(procs["a0"].pid, signal.SIGCONT)
        time.sleep(3)
        t_kill = time.monotonic()
        for name in ("a0", "b1"):  # one replica of each group dies
            os.killpg(procs[name].pid, signal.SIGKILL)
        time.sleep(window)
        t_end = time.monotonic()
    finally:
        stop.set()
        [t.join(60) for t in threads]
        groups = [g.stats() for g in state.stores["token"].remotes]
        server.stop(0)
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def phase(a: float, b: float) -> tuple[np.ndarray, int]:
        got = [(d, ok) for t, d, ok in calls if a <= t < b]
        return np.array([d for d, ok in got if ok]) * 1e3, sum(not ok for _, ok in got)

    steady, e0 = phase(t_steady, t_stall)
    stall, e1 = phase(t_stall, t_stall + window)
    kill, e2 = phase(t_kill, t_end)
    base = np.percentile(steady, 99)
    rows = []
    for label, lat, errs in (("a replica killed (SIGKILL), one per group", kill, e2),
                             ("a replica stalled (SIGSTOP) for 8 s", stall, e1)):
        p99 = np.percentile(lat, 99)
        rows.append({"figure": f"failover: {label}, 4 clients searching",
                     "value": f"{errs} failed / {len(lat) + errs} calls; p99 {p99:.0f} ms = {p99 / base:.1f}x steady "
                              f"({'meets' if errs == 0 and p99 <= 3 * base else 'misses'} 0 failed, ≤ 3x)",
                     "against": f"steady state before it: p99 {base:.0f} ms, p50 {np.percentile(steady, 50):.0f} ms, "
                                f"{e0} failed / {len(steady) + e0} calls",
                     "detail": f"{store.name}: 2 groups of 4 shards x 2 `silo serve-shards` replicas, in-process front "
                               f"(Search k=64, 8 s windows); p50 {np.percentile(lat, 50):.0f} ms, max {lat.max():.0f} "
                               f"ms; failovers per group {[g['failovers'] for g in groups]}"})
    return rows


@benchmark("optout")
def bench_optout(ctx: Context) -> list[dict]:
    """Opt-out acknowledgement latency (fsync'd) and search slowdown with ~10% tombstoned."""
    path = ctx.work / "optout-store"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(ctx.store_path(), path)
    server, client, state = _server(ctx, path)
    store = state.token_store
    rng = np.random.default_rng(0)
    doc_ids = [store.doc_id(d) for d in range(store.n_documents)]
    lat = []
    try:
        for d in rng.choice(doc_ids, min(50, len(doc_ids) // 20), replace=False):
            t = time.perf_counter()
            client.optout(doc_ids=[str(d)])
            lat.append(time.perf_counter() - t)
    finally:
        server.stop(0)
        client.close()
    shutil.rmtree(path, ignore_errors=True)
    rows = [{"figure": "opt-out acknowledgement latency (gRPC, fsync'd log)",
             "value": f"p50 {np.percentile(lat, 50) * 1e3:.1f} ms",
             "against": "the acknowledgement waits for the fsync of optout.log",
             "detail": f"p99 {np.percentile(lat, 99) * 1e3:.1f} ms over {len(lat)} single-document removals"}]
    # the tombstone set normally grows only through the log; here it is set directly (and the
    # version bumped, so no cached mask of another set is reused)
    clean = ctx.open(ctx.store_path())
    q = ctx.queries(clean, ctx.args.queries)
    per_doc = clean.entries_per_doc
    order = rng.permutation(len(per_doc))
    dead = np.zeros(len(per_doc), bool)
    dead[order[: int(np.searchsorted(np.cumsum(per_doc[order]), 0.10 * clean.n_entries)) + 1]] = True
    k, nprobe = ctx.args.k, ctx.args.nprobe

    def set_dead(mask):
        clean.dead_docs = mask.copy()
        clean.tombstone_version += 1
        clean.allowed_bitmap(None)  # built once per tombstone set, then cached: not part of a search

    t_clean, t_dead = [], []
    for _ in range(ctx.args.repeat):
        set_dead(np.zeros(len(per_doc), bool))
        t_clean.append(best_of(1, lambda: clean.search(q, k, nprobe=nprobe, refine=1)))
        set_dead(dead)
        t_dead.append(best_of(1, lambda: clean.search(q, k, nprobe=nprobe, refine=1)))
    _, ids = clean.search(q, k, nprobe=nprobe, refine=1)
    leaked = int(np.isin(clean.entry_docs(ids[ids >= 0]), np.flatnonzero(dead)).sum())
    frac = float(per_doc[dead].sum() / clean.n_entries)
    t = time.perf_counter()
    clean.tombstone_version += 1
    clean.allowed_bitmap(None)
    t_mask = time.perf_counter() - t
    set_dead(np.zeros(len(per_doc), bool))
    rows.append({"figure": "search slowdown with ~10% of entries tombstoned",
                 "value": f"{min(t_dead) / min(t_clean):.2f}x",
                 "against": "the same queries on the clean store (REFERENCE: bitmap selector ~1.2x)",
                 "detail": f"{100 * frac:.1f}% of entries dead ({int(dead.sum())} documents); "
                           f"{len(q) / min(t_clean):,.0f} vs {len(q) / min(t_dead):,.0f} q/s, k={k}, nprobe={nprobe}; "
                           f"dead entries returned: {leaked}; building the mask once per tombstone change "
                           f"{t_mask * 1e3:.1f} ms"})
    return rows


@benchmark("soak")
def bench_soak(ctx: Context) -> list[dict]:
    """tools/soak.py: a real server under a 60 s mixed load with opt-outs and a compaction."""
    out = ctx.work / "soak" / "summary.json"
    cmd = [sys.executable, str(ROOT / "tools" / "soak.py"), "--model", ctx.args.model, "--store",
           str(ctx.store_path()), "--work", str(ctx.work / "soak"), "--duration", str(ctx.args.soak_seconds),
           "--json", str(out)]
    ctx.log(" ".join(cmd))
    proc = subprocess.run(cmd, cwd=ROOT)
    if not out.is_file():
        raise RuntimeError(f"soak.py wrote no summary (exit {proc.returncode})")
    s = json.loads(out.read_text())
    return soak_rows(s)


@benchmark("caps")
def bench_caps(ctx: Context) -> list[dict]:
    """tools/caps.py: peak RSS of the largest request each work cap still allows."""
    out = ctx.work / "caps" / "rows.json"
    cmd = [sys.executable, str(ROOT / "tools" / "caps.py"), "--work", str(ctx.work / "caps"), "--json", str(out)]
    ctx.log(" ".join(cmd))
    proc = subprocess.run(cmd, cwd=ROOT)
    if not out.is_file():
        raise RuntimeError(f"caps.py wrote no rows (exit {proc.returncode})")
    return caps_rows(json.loads(out.read_text()))


def caps_rows(rows: list[dict]) -> list[dict]:
    return [{"figure": f"work cap: {r['what']}", "value": f"+{r['growth_mb']:,.0f} MB peak RSS",
             "against": "the loaded server's RSS just before the request (bound: < 2 GiB per request)",
             "detail": f"server {r['base_rss_mb']:,.0f} MB before, peak {r['peak_rss_mb']:,.0f} MB; "
                       f"{r['seconds']:.0f} s on 2 cores; tiny model, default caps"} for r in rows]


def soak_rows(s: dict) -> list[dict]:
    mb = 1024
    rows = [
        {"figure": "soak: unexpected errors",
         "value": f"{s['unexpected_errors']} / {s['calls']:,} calls",
         "against": "zero (expected codes: INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION, "
                    "RESOURCE_EXHAUSTED)",
         "detail": f"{s['clients']} clients × {s['duration_s']:.0f} s, Compact at {s['compact']['started_s']:.0f} s "
                   f"({s['compact'].get('status', '?')}, {s['compact'].get('seconds', 0):.1f} s, "
                   f"{s['compact'].get('removed_entries', 0):,} entries removed); status codes "
                   + ", ".join(f"{k} {v}" for k, v in sorted(s["codes"].items()))
                   + (f"; first unexpected: {s['unexpected'][0][:200]}" if s["unexpected"] else "")},
        {"figure": "soak: removed documents served after their acknowledgement",
         "value": f"{s['violations']} hits",
         "against": "zero: no Search hit or Generate attribution of a call started after the ack",
         "detail": f"{s['acked_removals']} acknowledged removals ({s['optouts_admin']} admin, {s['optouts_owner']} "
                   f"owner, {s['dry_runs']} dry runs), {s['checked_calls']:,} later calls checked, "
                   f"{s['checked_hits']:,} hits checked ({s['hits_of_later_removed']} hits of documents removed later, "
                   "before their removal — the check can see a removed document)"},
        {"figure": "soak: server RSS before/after",
         "value": f"RssAnon {s['rss_before']['RssAnon'] / mb:,.0f} → {s['rss_after']['RssAnon'] / mb:,.0f} MB "
                  f"({100 * (s['rss_after']['RssAnon'] / s['rss_before']['RssAnon'] - 1):+.1f}%)",
         "against": "RssAnon growth ≤ 10% over the soak (soak.py's check; VmRSS adds mapped file pages)",
         "detail": f"VmRSS {s['rss_before']['VmRSS'] / mb:,.0f} → {s['rss_after']['VmRSS'] / mb:,.0f} MB "
                   f"({100 * (s['rss_after']['VmRSS'] / s['rss_before']['VmRSS'] - 1):+.1f}%), peak VmHWM "
                   f"{s['rss_after']['VmHWM'] / mb:,.0f} MB; server `silo serve` subprocess, "
                   f"{s['store_entries']:,}-entry store copy"},
    ]
    for op, st in sorted(s["latency"].items()):
        rows.append({"figure": f"soak: {op} latency", "value": f"p50 {st['p50_ms']:.0f} ms, p99 {st['p99_ms']:.0f} ms",
                     "against": f"the same soak ({s['clients']} concurrent clients, {s.get('cpus') or os.cpu_count()} "
                                "cores)",
                     "detail": f"{st['calls']:,} calls, {st['ok']:,} OK; codes "
                               + ", ".join(f"{k} {v}" for k, v in sorted(st["codes"].items()))})
    return rows


# ---------------------------------------------------------------------------- the table


HEADER = "| benchmark | figure | value | measured against | detail | date | machine |"


def write_markdown(rows: list[dict], path: Path, machine: str, ran: list[str]) -> None:
    """Rewrite the table: this run's rows, and the rows of benchmarks not run this time as
    they were (rows written by an older version of this script, without a benchmark
    column, are dropped). The sections after the table (`## ...`, written by other tools
    such as tools/lmeval_modes.py) are kept as they were."""
    date = time.strftime("%Y-%m-%d")
    old = path.read_text() if path.exists() else ""
    table, heading, sections = old.partition("\n## ")
    sections = heading.lstrip("\n") + sections if heading else ""
    keep = []
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith(("| figure", "| benchmark")) and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 7 and cells[0] in BENCHMARKS and cells[0] not in ran:
                keep.append(line)
    lines = ["# Benchmarks", "",
             "Written by `python tools/bench.py` (see tools/README.md); every value is a ratio or rate measured "
             "side by side in one run (interleaved, best of N) unless its row says otherwise, on the machine "
             "named in its row. Targets are the issue's; a row says whether it is met.", "",
             HEADER, "|---|---|---|---|---|---|---|", *keep]
    for r in rows:
        cells = [r["bench"], r["figure"], r["value"], r["against"], r["detail"], date, machine]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    # benchmarks in their registration order, rows of one benchmark together
    order = {name: i for i, name in enumerate(BENCHMARKS)}
    body = sorted(lines[6:], key=lambda x: order.get(x.strip("|").split("|")[0].strip(), 99))
    path.write_text("\n".join(lines[:6] + body) + "\n" + ("\n" + sections if sections else ""))


def _prepare_growth(ctx: Context) -> str:
    tiny, corpus = ctx.tiny_model(), ctx.big_corpus()
    for size in ctx.args.growth_sizes:
        for shards in (1, 8):
            _growth_store(ctx, tiny, corpus, size, shards)
    return "growth stores ready"


PREPARE: dict[str, Callable[[Context], object]] = {
    "corpus": lambda ctx: ctx.big_corpus(), "store": lambda ctx: ctx.store_path(1),
    "store8": lambda ctx: ctx.store_path(8), "big": lambda ctx: ctx.big_store_path(),
    "tiny": lambda ctx: ctx.tiny_model(), "growth": _prepare_growth,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma list of: {', '.join(BENCHMARKS)}")
    p.add_argument("--model", default="runs/demo/lm-pdsw")
    p.add_argument("--corpus", default="runs/demo/corpus")
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--entries", type=lambda v: int(float(v)), default=1_000_000,
                   help="tokens of the main store (restricted tier of --corpus)")
    p.add_argument("--big-entries", type=lambda v: int(float(v)), default=10_000_000,
                   help="tokens of the large store (a bigger harvested corpus, all tiers)")
    p.add_argument("--memory-budget", type=lambda v: int(float(v)), default=4 << 30,
                   help="index budget of the stores (default: 4 GiB, enough for PQ64)")
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--build-tokens", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("-k", type=int, default=64)
    p.add_argument("--nprobe", type=int, default=32, help="nprobe of the search benchmarks (shards, growth, …)")
    p.add_argument("--knn-nprobes", type=lambda v: [int(x) for x in v.split(",")], default=[8, 32])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--calls", type=int, default=20, help="calls per client in the concurrency benchmark")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--soak-seconds", type=float, default=60)
    p.add_argument("--growth-sizes", type=lambda v: [int(float(x)) for x in v.split(",")],
                   default=[500_000, 1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000])
    p.add_argument("--threads", type=int, default=1,
                   help="torch and FAISS threads (default 1: on a shared 2-core machine two OpenMP threads stall "
                        "behind a neighbour's process — 1.7x slower forward passes, 50-100x slower generation)")
    p.add_argument("--prepare", help="only build the cached artefacts named (comma list of: " + ", ".join(PREPARE)
                   + ") and exit: long builds can run ahead, in the background")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args()
    for path in (args.model, args.corpus):
        if not Path(path).exists():
            raise SystemExit(f"{path} not found: run `silo demo` first, or pass --model/--corpus")
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    ctx = Context(args)
    if args.prepare:
        for what in args.prepare.split(","):
            ctx.log(f"prepare {what}: {PREPARE[what](ctx)}")
        return
    machine = (f"{platform.machine()} {os.cpu_count()} cores (shared), torch {torch.__version__}, faiss "
               f"{faiss.__version__}, {args.threads} thread(s)")
    rows, ran = [], []
    for name in names:
        ctx.log(f"== {name}: {BENCHMARKS[name].__doc__.strip().splitlines()[0]}")
        t = time.perf_counter()
        for r in BENCHMARKS[name](ctx):
            r["bench"] = name
            print(json.dumps(r, ensure_ascii=False), flush=True)
            rows.append(r)
        ran.append(name)
        ctx.log(f"== {name} done in {time.perf_counter() - t:.0f} s")
        write_markdown(rows, Path(args.out), machine, ran)  # after each benchmark: a crash keeps what was measured
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
