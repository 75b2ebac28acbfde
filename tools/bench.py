"""SILO's benchmark suite: every speed/memory figure, measured side by side, into BENCHMARKS.md.

    python tools/bench.py                    # all benchmarks (model/corpus from `silo demo`)
    python tools/bench.py --only knn,recall  # some of them
    python tools/bench.py --entries 1000000 --model runs/demo/lm-pdsw --corpus runs/demo/corpus

Machines here are shared and noisy, so every figure is a *ratio measured in one run*
(the thing and its baseline alternately, best of `--repeat`), and each row says what it is
measured against. The table in BENCHMARKS.md is rewritten, with the date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datastore.build import BuildArgs, build_token_store  # noqa: E402
from datastore.store import Datastore  # noqa: E402
from silo.evaluate import load_eval_docs, score_documents  # noqa: E402
from silo.knnlm import KNNParams, retrieve_neighbours  # noqa: E402
from silo.lm import load_causal_lm  # noqa: E402

BENCHMARKS: dict[str, Callable] = {}


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


class Context:
    """Shared, lazily built artefacts: the model and a ≥1M-entry IVF-PQ token store."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = load_causal_lm(self.args.model)
        return self._model

    def store(self, kind: str = "ivf") -> Path:
        """Token store over the restricted tier with `--entries` entries (built once, reused)."""
        path = self.work / f"store-{kind}-{self.args.entries}"
        if not (path / "manifest.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
            t = time.perf_counter()
            build_token_store(BuildArgs(
                model=self.args.model, corpus=self.args.corpus, out=str(path), tiers=("restricted",),
                shards=2, max_tokens=self.args.entries, window=256, stride=128, batch_size=16,
                memory_budget=self.args.memory_budget if kind == "ivf" else 1 << 40,
                factory=None if kind == "ivf" else "Flat", keep_keys=kind == "ivf"))
            print(f"built {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
        return path

    def eval_docs(self, tokens: int):
        _, tok = self.model
        return load_eval_docs(self.args.corpus, tok, "test", ("restricted",), max_tokens=tokens)[1]


@benchmark("knn")
def bench_knn_vs_lm(ctx: Context) -> list[dict]:
    """kNN-LM scoring throughput as a ratio to LM-only scoring: same model, same tokens."""
    model, tok = ctx.model
    store = Datastore.open(ctx.store("ivf"))
    docs = ctx.eval_docs(ctx.args.eval_tokens)
    n = sum(len(d) - 1 for d in docs)
    p = KNNParams(k=ctx.args.k, nprobe=ctx.args.nprobe)
    kw = dict(window=256, stride=128, batch_size=16, pad_id=tok.pad_token_id or 0)
    t_lm = best_of(ctx.args.repeat, lambda: score_documents(model, docs, **kw))
    t_knn = best_of(ctx.args.repeat, lambda: retrieve_neighbours(model, store, docs, p.k, nprobe=p.nprobe, **kw))
    return [
        {"figure": "kNN-LM scoring slowdown vs LM-only", "value": f"{t_knn / t_lm:.2f}x",
         "against": f"LM-only scoring of the same {n:,} tokens (aim ≤ 2x; CPU kNN-LM ~20x, efficient kNN-LM ~2.8x)",
         "detail": f"store {store.n_entries:,} entries {store.manifest.build['factory']}, k={p.k}, nprobe={p.nprobe}; "
                   f"LM {n / t_lm:,.0f} tok/s, kNN-LM {n / t_knn:,.0f} tok/s"},
    ]


@benchmark("recall")
def bench_recall(ctx: Context) -> list[dict]:
    """Recall@k of the chosen IVF-PQ configuration against exact search, and queries/s."""
    store = Datastore.open(ctx.store("ivf"))
    keys = np.concatenate([np.load(s.path / "keys.npy", mmap_mode="r") for s in store.shards]).astype(np.float32)
    rng = np.random.default_rng(0)
    q = keys[rng.choice(len(keys), ctx.args.queries, replace=False)] + rng.normal(0, 0.01, (ctx.args.queries, keys.shape[1])).astype(np.float32)
    import faiss

    exact = faiss.IndexFlatL2(keys.shape[1])
    exact.add(keys)
    k = ctx.args.k
    t_exact = best_of(1, lambda: exact.search(q, k))
    _, ie = exact.search(q, k)
    rows = []
    for nprobe in (1, 8, 32, 128):
        t = best_of(ctx.args.repeat, lambda nprobe=nprobe: store.search(q, k, nprobe=nprobe))
        _, ia = store.search(q, k, nprobe=nprobe)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ie, ia, strict=True)])
        rows.append({"figure": f"recall@{k} IVF-PQ, nprobe {nprobe}", "value": f"{recall:.3f}",
                     "against": f"exact Flat search over the same {len(keys):,} fp16 keys",
                     "detail": f"{len(q) / t:,.0f} q/s vs exact {len(q) / t_exact:,.0f} q/s "
                               f"({t_exact / t:.1f}x faster); {store.manifest.build['factory']}"})
    return rows


@benchmark("bytes")
def bench_bytes(ctx: Context) -> list[dict]:
    """Store bytes per entry (index + metadata) vs the FAISS code size + 8-byte id."""
    import faiss

    path = ctx.store("ivf")
    store = Datastore.open(path)
    n = store.n_entries
    index_b = sum((s.path / "index.faiss").stat().st_size for s in store.shards)
    entries_b = sum((s.path / "entries.parquet").stat().st_size for s in store.shards)
    keys_b = sum((s.path / "keys.npy").stat().st_size for s in store.shards)
    docs_b = (path / "docs.parquet").stat().st_size
    ivf = faiss.extract_index_ivf(store.shards[0].index)
    code = ivf.code_size
    return [{"figure": "store bytes per entry (index + entry metadata)", "value": f"{(index_b + entries_b) / n:.1f} B",
             "against": f"FAISS code {code} B + id 8 B = {code + 8} B (SILO: 72 B + 4 KB raw keys)",
             "detail": f"index {index_b / n:.1f} B, entries.parquet {entries_b / n:.1f} B, docs+text "
                       f"{docs_b / n:.1f} B, optional fp16 keys {keys_b / n:.0f} B per entry; {n:,} entries"}]


@benchmark("build")
def bench_build(ctx: Context) -> list[dict]:
    """Build throughput (tokens/s) as a ratio to the LM's plain forward throughput."""
    model, tok = ctx.model
    docs = ctx.eval_docs(ctx.args.build_tokens)
    n = sum(len(d) - 1 for d in docs)
    out = ctx.work / "build-bench"

    def forward():
        score_documents(model, docs, window=256, stride=128, batch_size=16, pad_id=tok.pad_token_id or 0)

    def build():
        shutil.rmtree(out, ignore_errors=True)
        build_token_store(BuildArgs(model=ctx.args.model, corpus=ctx.args.corpus, out=str(out), tiers=("restricted",),
                                    split="test", max_tokens=ctx.args.build_tokens, window=256, stride=128,
                                    batch_size=16, factory="Flat", progress=False))

    t_fwd = best_of(ctx.args.repeat, forward)
    t_build = best_of(ctx.args.repeat, build)
    entries = Datastore.open(out, load_index=False).n_entries
    return [{"figure": "token-store build throughput vs plain forward", "value": f"{t_fwd / t_build * entries / n:.2f}x",
             "against": "the LM's forward pass over the same text (the physical floor; 1.00x = no overhead)",
             "detail": f"build {entries / t_build:,.0f} entries/s (tokenize, keys, index, write), "
                       f"forward {n / t_fwd:,.0f} tok/s"}]


def _server(ctx: Context, store: Path, token: str = "bench-admin-token-0123456789"):
    from server.app import build_server, load_state
    from server.client import SiloClient
    from server.servicers import DatastoreServicer, LanguageModelServicer

    state = load_state(ctx.args.model, [str(store)])
    server, port, _ = build_server({"LanguageModel": LanguageModelServicer(state),
                                    "Datastore": DatastoreServicer(state)}, 0, token=token, max_workers=16,
                                   max_concurrent=64)
    return server, SiloClient(f"127.0.0.1:{port}", token=token), state


def _text_of_tokens(ctx: Context, n: int) -> str:
    _, tok = ctx.model
    docs = ctx.eval_docs(4 * n)
    ids = [t for d in docs for t in d[1:-1]][:n]
    return tok.decode(ids, skip_special_tokens=True)


@benchmark("grpc")
def bench_grpc_overhead(ctx: Context) -> list[dict]:
    """Score over gRPC vs the same call in-process, 512-token text."""
    from server.client import retrieval_options
    from server.gen import silo_pb2 as pb
    from server.servicers import LanguageModelServicer
    from silo.tokenizer import encode_document

    model, tok = ctx.model
    server, client, state = _server(ctx, ctx.store("ivf"))
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
                         "detail": f"median in-process {lo * 1e3:.1f} ms, gRPC {gr * 1e3:.1f} ms"})
    finally:
        server.stop(0)
    return rows


@benchmark("concurrency")
def bench_concurrency(ctx: Context) -> list[dict]:
    """16 concurrent clients, a fixed number of calls each: errors, p50/p99, throughput."""
    import threading

    from server.client import SiloClient

    server, client, _ = _server(ctx, ctx.store("ivf"))
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
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    return [{"figure": "16 concurrent clients (Score kNN-LM 64 tok / Search, alternating)",
             "value": f"{len(errors)} errors / {16 * ctx.args.calls} calls",
             "against": "zero errors expected",
             "detail": f"p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, {len(lat) / wall:.1f} calls/s on "
                       f"{os.cpu_count()} cores"}]


@benchmark("optout")
def bench_optout(ctx: Context) -> list[dict]:
    """Opt-out acknowledgement latency (fsync'd) and search slowdown with 10% tombstoned."""
    path = ctx.work / "optout-store"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(ctx.store("ivf"), path)
    server, client, state = _server(ctx, path)
    store = state.token_store
    rng = np.random.default_rng(0)
    doc_ids = store.docs.column("doc_id").to_pylist()
    lat = []
    try:
        for d in rng.choice(doc_ids, min(50, len(doc_ids) // 20), replace=False):
            t = time.perf_counter()
            client.optout(doc_ids=[str(d)])
            lat.append(time.perf_counter() - t)
    finally:
        server.stop(0)
    rows = [{"figure": "opt-out acknowledgement latency (gRPC, fsync'd log)",
             "value": f"p50 {np.percentile(lat, 50) * 1e3:.1f} ms",
             "against": "the acknowledgement waits for the fsync of optout.log",
             "detail": f"p99 {np.percentile(lat, 99) * 1e3:.1f} ms over {len(lat)} removals"}]
    clean = Datastore.open(ctx.store("ivf"))
    keys = np.load(clean.shards[0].path / "keys.npy", mmap_mode="r")
    q = np.asarray(keys[rng.choice(len(keys), ctx.args.queries, replace=False)], dtype=np.float32)
    per_doc = np.bincount(clean.entry_doc, minlength=len(clean.docs))
    order = rng.permutation(len(per_doc))
    dead = np.zeros(len(per_doc), bool)
    dead[order[: int(np.searchsorted(np.cumsum(per_doc[order]), 0.10 * clean.n_entries)) + 1]] = True
    t_clean, t_dead = [], []
    for _ in range(ctx.args.repeat):
        clean.dead_docs[:] = False
        clean.invalidate_masks()
        t_clean.append(best_of(1, lambda: clean.search(q, ctx.args.k, nprobe=ctx.args.nprobe)))
        clean.dead_docs[:] = dead
        clean.invalidate_masks()
        clean.allowed_bitmap(None)  # built once per policy, then cached: not part of a search
        t_dead.append(best_of(1, lambda: clean.search(q, ctx.args.k, nprobe=ctx.args.nprobe)))
    frac = float(np.isin(clean.entry_doc, np.flatnonzero(dead)).mean())
    rows.append({"figure": "search slowdown with ~10% of entries tombstoned",
                 "value": f"{min(t_dead) / min(t_clean):.2f}x",
                 "against": "the same queries on the clean store (REFERENCE: bitmap selector ~1.2x)",
                 "detail": f"{100 * frac:.1f}% of entries dead; {len(q) / min(t_clean):,.0f} vs "
                           f"{len(q) / min(t_dead):,.0f} q/s, k={ctx.args.k}, "
                           f"nprobe={ctx.args.nprobe}"})
    return rows


@benchmark("growth")
def bench_growth(ctx: Context) -> list[dict]:
    """Per-token build cost and per-query search cost as the store grows (1M, 4M, 16M tokens)."""
    from silo.train import TrainArgs, train

    tiny = ctx.work / "tiny-model"
    if not (tiny / "model.safetensors").is_file():
        train(TrainArgs(corpus=ctx.args.corpus, out=str(tiny), config="tiny", tokenizer=ctx.args.model, steps=200,
                        progress=False))
    corpus = ctx.work / "growth-corpus"  # enough text for the largest size (~3.5 bytes per token)
    if not (corpus / "corpus.json").is_file():
        from silo.demo import harvest_corpus

        harvest_corpus(corpus, int(max(ctx.args.growth_sizes) * 4.5))
    rows, base = [], None
    rng = np.random.default_rng(0)
    for size in ctx.args.growth_sizes:
        out = ctx.work / f"growth-{size}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        m = build_token_store(BuildArgs(model=str(tiny), corpus=str(corpus), out=str(out),
                                        tiers=("pd", "sw", "by", "restricted"), max_tokens=size, shards=max(1, size // 2_000_000),
                                        window=256, stride=128, batch_size=32, memory_budget=size * 40,
                                        workers=ctx.args.workers, progress=False))
        build_s = time.perf_counter() - t
        store = Datastore.open(out)
        q = rng.standard_normal((ctx.args.queries, m.dim)).astype(np.float32)
        t_q = best_of(ctx.args.repeat, lambda store=store, q=q: store.search(q, ctx.args.k, nprobe=ctx.args.nprobe))
        per_tok, per_q = build_s / m.entries, t_q / len(q)
        base = base or (per_tok, per_q, m.entries)
        rows.append({"figure": f"growth: {m.entries / 1e6:.1f}M-token store",
                     "value": f"build {per_tok * 1e6:.1f} µs/token ({per_tok / base[0]:.2f}x), "
                              f"search {per_q * 1e6:.0f} µs/query ({per_q / base[1]:.2f}x)",
                     "against": f"the {base[2] / 1e6:.1f}M-token store (aim: build flat within 1.25x; search "
                                "sub-linear)",
                     "detail": f"{m.build['factory']}, {len(m.shards)} shards, tiny model, k={ctx.args.k}, "
                               f"nprobe={ctx.args.nprobe}; {build_s:.0f} s build"})
        shutil.rmtree(out, ignore_errors=True)
    return rows


def write_markdown(rows: list[dict], path: Path, machine: str) -> None:
    date = time.strftime("%Y-%m-%d")
    old = path.read_text() if path.exists() else ""
    keep = []  # rows of benchmarks not run this time stay as they were
    names = {r["figure"] for r in rows}
    for line in old.splitlines():
        if line.startswith("| ") and not line.startswith("| figure") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells and cells[0] not in names:
                keep.append(line)
    lines = ["# Benchmarks", "", "Written by `python tools/bench.py`; every value is a ratio or rate measured "
             "side by side in one run (best of N), on the machine named in its row.", "",
             "| figure | value | measured against | detail | date | machine |", "|---|---|---|---|---|---|", *keep]
    for r in rows:
        lines.append(f"| {r['figure']} | {r['value']} | {r['against']} | {r['detail']} | {date} | {machine} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma list of: {', '.join(BENCHMARKS)}")
    p.add_argument("--model", default="runs/demo/lm-pdsw")
    p.add_argument("--corpus", default="runs/demo/corpus")
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--memory-budget", type=int, default=48_000_000, help="index budget for the IVF-PQ store")
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--build-tokens", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("-k", type=int, default=64)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--calls", type=int, default=20, help="calls per client in the concurrency benchmark")
    p.add_argument("--growth-sizes", type=lambda v: [int(float(x)) for x in v.split(",")],
                   default=[1_000_000, 4_000_000, 16_000_000])
    p.add_argument("--workers", type=int, default=1, help="build workers for the growth benchmark")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args()
    for path in (args.model, args.corpus):
        if not Path(path).exists():
            raise SystemExit(f"{path} not found: run `silo demo` first, or pass --model/--corpus")
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    ctx = Context(args)
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    rows = []
    for name in names:
        print(f"== {name}: {BENCHMARKS[name].__doc__.strip().splitlines()[0]}", flush=True)
        for r in BENCHMARKS[name](ctx):
            print(json.dumps(r, ensure_ascii=False), flush=True)
            rows.append(r)
    write_markdown(rows, Path(args.out), machine)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
